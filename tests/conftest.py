"""Shared fixtures: an isolated cache root and one tiny real zoo for every expert-needing test.

Tests never build the default zoo and never touch ~/.cache: the session points
``MERGE_LAB_CACHE`` at a temporary folder before anything reads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

# Property tests draw their examples from a seed derived from each test's name (derandomize), so a run is
# repeatable and a failure shows again on the next run and in CI; Hypothesis prints the failing example.
hypothesis_settings.register_profile("merge-lab", derandomize=True, print_blob=True)
hypothesis_settings.load_profile("merge-lab")

TINY_TASKS = ("topic", "language")
TINY_STEPS = 25
TINY_PROBE = 100


@pytest.fixture(scope="session")
def session_env():
    """Environment changes that last the whole session, undone at its end (never a bare os.environ write)."""
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def merge_lab_cache(tmp_path_factory, session_env):
    """Every test of the session caches under a temporary folder."""
    root = tmp_path_factory.mktemp("merge-lab-cache")
    session_env.setenv("MERGE_LAB_CACHE", str(root))
    session_env.delenv("MERGE_LAB_ZOO", raising=False)
    return root


@pytest.fixture(scope="session")
def tiny_zoo(merge_lab_cache):
    """Two real experts (topic, language) fine-tuned 25 steps from the packaged base.

    Topic and language are the tasks where 25 steps already give a clear margin over the
    base with the expert's head, so the margin test is a real check. Shared by the session:
    tests must not modify it (copy it first).
    """
    from merging.zoo.zoo import build_zoo

    return build_zoo(name="tiny", tasks=list(TINY_TASKS), steps=TINY_STEPS, seed=0, n_probe=TINY_PROBE)


@pytest.fixture(scope="session")
def toy_zoo(merge_lab_cache):
    """The fake zoo (``fake_zoo.build_tiny_zoo``) under its own name, for probe tests that need a zoo
    object and nothing else: instant to build and to probe."""
    from fake_zoo import build_tiny_zoo

    return build_tiny_zoo(merge_lab_cache, name="toy")


@pytest.fixture(scope="session")
def app_zoo(merge_lab_cache, session_env):
    """(zoo, cache root): the fake zoo under MERGE_LAB_CACHE (instant); MERGE_LAB_ZOO points at it so
    ``zoo:`` refs and the app resolve to it."""
    from fake_zoo import build_tiny_zoo

    zoo = build_tiny_zoo(merge_lab_cache)
    session_env.setenv("MERGE_LAB_ZOO", zoo.name)
    return zoo, merge_lab_cache


@pytest.fixture()
def loaded(app_zoo):
    """(session, zoo): a fresh workbench session with every expert of the fake zoo loaded."""
    from merging import workbench as wb

    zoo, _ = app_zoo
    base, refs = wb.zoo_refs(zoo)
    return wb.load_experts(wb.Session(), base, refs, zoo=zoo), zoo


@pytest.fixture(scope="session")
def real_zoo(request, session_env):
    """(zoo, cache root): ``tiny_zoo`` (real experts of the packaged base), which the API and browser tests
    use; MERGE_LAB_TEST_FAKE_ZOO=1 swaps in the instant fake zoo for quick local iterations."""
    import os

    if os.environ.get("MERGE_LAB_TEST_FAKE_ZOO") == "1":
        return request.getfixturevalue("app_zoo")
    zoo = request.getfixturevalue("tiny_zoo")
    session_env.setenv("MERGE_LAB_ZOO", zoo.name)
    return zoo, Path(zoo.root).parent.parent


@pytest.fixture(scope="module")
def fake_app_url(app_zoo):
    """The app served on a free port over the instant fake zoo (API tests that need no trained expert).
    MERGE_LAB_ZOO names the fake zoo while it serves, whichever zoo fixture ran last."""
    from served_app import launched_app

    zoo, _ = app_zoo
    patch = pytest.MonkeyPatch()
    patch.setenv("MERGE_LAB_ZOO", zoo.name)
    try:
        with launched_app() as url:
            yield url
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def app_url(real_zoo):
    """The app served on a free port over ``real_zoo``, its cache outside the system temp folder."""
    from served_app import launched_app

    _, cache = real_zoo
    with launched_app(cache_outside_tmp=cache) as url:
        yield url


TRAINING_FIXTURES = {"tiny_zoo", "real_zoo", "lm_zoo"}


def pytest_collection_modifyitems(config, items):
    """Every test that needs a trained zoo is ``slow``, so ``pytest -m "not slow"`` is the fast inner
    loop. Read from each test's fixture closure, so a new test that asks for ``tiny_zoo`` is marked
    without anyone remembering to."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


#: A tiny LM zoo (merging/zoo/lm_zoo.py): 2 layers, 64 wide, vocabulary 512, 20 steps, 2 experts (~20 s).
TINY_LM_SPEC = {
    "model": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
              "num_key_value_heads": 2},
    "vocab_size": 512, "max_items": 600, "n_probe": 60, "n_fewshot": 16, "pretrain_texts": ["de", "computers"],
    "pretrain": {"steps": 20, "lr": 3e-3}, "finetune": {"lr": 3e-3},
}
TINY_LM_TASKS = ("de", "computers")


@pytest.fixture(scope="session")
def tiny_lm_spec():
    """(spec overrides, expert tasks) of the tiny LM zoo, for tests that rebuild it."""
    import copy

    return copy.deepcopy(TINY_LM_SPEC), list(TINY_LM_TASKS)


@pytest.fixture(scope="session")
def lm_zoo(merge_lab_cache):
    """The tiny LM zoo ``lm-tiny`` (base pretrained 20 steps, German and computers experts 20 steps each).
    Shared by the session: tests must not modify it."""
    from merging.zoo.lm_zoo import build_lm_zoo

    return build_lm_zoo("lm-tiny", tasks=list(TINY_LM_TASKS), steps=20, seed=0, spec=TINY_LM_SPEC)


@pytest.fixture()
def blocked_zoo_build(monkeypatch):
    """``block(build, reports=())``: the next demo-zoo builds (classifier or LM) report ``reports`` (fraction,
    line pairs) as their progress, then wait until the returned event is set, then return ``build(zoo_name)`` — the page while a
    zoo is still being built, with nothing trained. Builds are forgotten before and after; teardown releases."""
    import threading

    from merging.workbench import zoo_build

    events: list[threading.Event] = []

    def block(build, reports=()):
        release = threading.Event()

        def slowed_build(zoo_name, progress=None):
            for fraction, line in reports:
                progress(fraction, line)
            if not release.wait(240):
                raise RuntimeError("the test never released the zoo build")
            return build(zoo_name)

        monkeypatch.setattr(zoo_build, "BUILDER", slowed_build)
        zoo_build.forget_zoo_builds()
        events.append(release)
        return release

    yield block
    for release in events:
        release.set()
    zoo_build.forget_zoo_builds()
