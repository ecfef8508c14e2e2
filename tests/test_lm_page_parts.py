"""The LM parts of the page through its workbench calls, on the fake LM zoo (``fake_zoo.build_fake_lm_zoo``):
the LM demo zoo built on first use (never at start-up) with its own progress line, layer swapping filled
from APL's layer importance and reaching the recipe and the tensors, and the export's configs-from and
tokenizer choices reaching the recipe and the exported folder."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import apl_fixtures as fx
import numpy as np
import pytest
import torch
import yaml
from fake_zoo import build_fake_lm_zoo

from merging import MergeLabError
from merging import workbench as wb
from merging.workbench import zoo_build


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with fx.one_thread():
        yield


@pytest.fixture(scope="module")
def lm_fake(merge_lab_cache):
    return build_fake_lm_zoo(merge_lab_cache, name="fake-lm-parts")


@pytest.fixture()
def lm_session(lm_fake):
    base, refs = wb.zoo_refs(lm_fake)
    session = wb.load_experts(wb.Session(), base, refs, zoo=lm_fake)
    wb.compute_importance(session, 8, "gradient", "restore")
    return session


# ---------------------------------------------------------------- the LM zoo: on first use, not at start-up

def test_the_lm_zoo_is_built_on_first_use_with_its_own_progress_line(merge_lab_cache, monkeypatch, app_zoo):
    zoo, _ = app_zoo
    release, calls = threading.Event(), []

    def slowed(name, progress=None):
        calls.append(name)
        assert release.wait(60)
        return build_fake_lm_zoo(merge_lab_cache, name=name)

    monkeypatch.setenv("MERGE_LAB_LM_ZOO", "lm-first-use")
    monkeypatch.setattr(zoo_build, "BUILDER", slowed)
    zoo_build.forget_zoo_builds()
    try:
        wb.start_zoo_build()  # what the server starts with: the classifier zoo only
        assert "lm-first-use" not in zoo_build._BUILDS and calls == []
        labels = dict((name, label) for label, name in wb.demo_zoos())
        assert labels[zoo.name].startswith("classifiers") and labels["lm-first-use"].startswith("language models")
        status = wb.zoo_status("lm-first-use")  # a tab switched to it: the build starts, once
        assert status.state == "building" and calls == ["lm-first-use"]
        assert "Building the LM demo zoo 'lm-first-use'" in status.line and "running for" in status.line
        assert status.not_ready_message().startswith("the demo zoo is still being built: try again in about")
        assert wb.zoo_status("lm-first-use").state == "building" and calls == ["lm-first-use"]
        release.set()
        assert zoo_build._BUILDS["lm-first-use"].wait(60)
        ready = wb.zoo_status("lm-first-use")
        assert ready.ready and ready.zoo.kind == "causal_lm" and ready.zoo.tasks == ["count", "echo"]
        assert wb.zoo_status().zoo.name == zoo.name  # the classifier zoo is still the default
    finally:
        release.set()
        zoo_build.forget_zoo_builds()


def test_the_zoo_switch_counts_the_built_zoos_own_experts(lm_fake, app_zoo, monkeypatch):
    """The switch's labels count each zoo's experts: a built zoo's own (the 2-expert fake LM zoo, the 2-task
    fake classifier zoo), else those its build would make (tasks.yaml's LM zoo, read here with yaml)."""
    from merging.zoo.tasks import default_task_names

    zoo, _ = app_zoo
    monkeypatch.setenv("MERGE_LAB_ZOO", zoo.name)
    monkeypatch.setenv("MERGE_LAB_LM_ZOO", lm_fake.name)
    assert wb.demo_zoos() == [(f"classifiers ({len(zoo.tasks)} tasks)", zoo.name),
                              ("language models (2 experts)", lm_fake.name)]
    monkeypatch.setenv("MERGE_LAB_ZOO", "not-built-yet")
    monkeypatch.setenv("MERGE_LAB_LM_ZOO", "lm-never-built")  # not built: what its build makes (the lm spec)
    described = yaml.safe_load((Path(wb.__file__).parents[1] / "zoo" / "tasks.yaml").read_text(encoding="utf-8"))
    n_lm = len(described["lm_zoos"]["lm"]["experts"])
    assert wb.demo_zoos() == [(f"classifiers ({len(default_task_names())} tasks)", "not-built-yet"),
                              (f"language models ({n_lm} experts)", "lm-never-built")]


def test_the_page_never_builds_a_zoo_named_by_a_typed_reference():
    from components.lm_panels import demo_zoo_status, zoo_of_ref

    assert zoo_of_ref("zoo:some-other/base") is None and zoo_of_ref("/models/base") is None
    assert zoo_of_ref(f"zoo:{wb.lm_zoo_name()}/base") == wb.lm_zoo_name()
    assert demo_zoo_status("some-other").line == wb.zoo_status().line


# ---------------------------------------------------------------- layer swapping beside APL

def _oracle_take(session) -> dict[str, str]:
    """Per layer, the expert with the larger share of its own |layer-level loss change| (the paper's evidence)."""
    imp = session.importance
    layers = list(imp.partitions["layer"])
    shares = {}
    for expert in session.refs:
        values = np.abs(np.array([imp.scores(expert, "layer")[k] for k in layers], dtype=float))
        shares[expert] = values / values.sum()
    return {layer: max(session.refs, key=lambda e: shares[e][i]) for i, layer in enumerate(layers)}


def test_suggest_from_importance_takes_each_layer_from_the_expert_it_matters_to_most(lm_session):
    session = lm_session
    note = wb.suggest_layer_swap(session)
    assert session.layer_take == _oracle_take(session)
    assert "larger share" in note
    headers, rows = wb.layer_swap_rows(session)
    assert headers == ["layer", "count importance", "echo importance", "take"]
    assert [r[0] for r in rows] == session.layers and [r[-1] for r in rows] == [session.layer_take[k] for k in
                                                                               session.layers]
    for column in (1, 2):  # shares of each expert's own total, in %
        assert sum(r[column] for r in rows) == pytest.approx(100.0, abs=0.5)


def test_the_layer_choice_reaches_the_recipe_and_the_merged_tensors(lm_session):
    session = lm_session
    first, second = session.experts
    take = {"embeddings": second, "0": first, "1": "base", "head": first}
    wb.set_layer_swap(session, [[layer, 0.0, 0.0, choice] for layer, choice in take.items()])
    shared = wb.layer_swap_shared(session, "layer_swap", {"outer_expert": "second"})
    assert shared["take"] == {"embeddings": "outer", "0": "inner", "1": "base", "head": "inner", "default": "shape"}
    wb.merge(session, "layer_swap", shared, 0)
    assert session.last_recipe.to_dict()["parameters"]["take"] == shared["take"]
    merged = wb.merged_tensors(session)
    expert_set = wb.models_for(session).expert_set
    owner = {**take, "1": None}
    for name, info in expert_set.layout.tensors.items():
        if info.layer not in owner or name not in merged:
            continue
        want = expert_set.base.get(name) if owner[info.layer] is None else expert_set.experts[owner[info.layer]].get(name)
        assert torch.equal(merged[name], want.float()), name


def test_bad_layer_swap_choices_say_what_is_allowed(lm_session):
    with pytest.raises(MergeLabError, match="take must be one of count, echo, blend, base, shape"):
        wb.set_layer_swap(lm_session, [["0", 1.0, 2.0, "somebody"]])
    with pytest.raises(MergeLabError, match="no layer '7'"):
        wb.set_layer_swap(lm_session, [["7", 1.0, 2.0, "count"]])
    with pytest.raises(MergeLabError, match="take must be one of"):  # a per-layer map is checked value by value
        wb.check_shared("layer_swap", {"take": {"0": "outer", "default": "sideways"}})


# ---------------------------------------------------------------- export choices

def _zip_json(path, suffix):
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(suffix))
        return archive.read(name).decode("utf-8")


@pytest.mark.parametrize("source", ["base", "echo"])
def test_export_keeps_the_chosen_models_generation_config_and_records_it(lm_fake, lm_session, source):
    session = lm_session
    wb.merge(session, "task_arithmetic", {"lambda": 0.5}, 0)
    path = wb.export(session, None, "float32", configs_from=source)
    folder = lm_fake.base_path if source == "base" else lm_fake.experts[source]
    want = json.loads((folder / "generation_config.json").read_text())
    assert json.loads(_zip_json(path, "generation_config.json")) == want
    recipe = yaml.safe_load(_zip_json(path, "recipe.yaml"))
    assert recipe.get("configs_from", "base") == source


def test_a_tokenizer_choice_reaches_the_recipe_and_the_export(lm_fake):
    base, refs = wb.zoo_refs(lm_fake)
    with pytest.raises(MergeLabError, match="tokenizer must be one of base, union, count, echo"):
        wb.load_experts(wb.Session(), base, refs, zoo=lm_fake, tokenizer="nobody")
    session = wb.load_experts(wb.Session(), base, refs, zoo=lm_fake, tokenizer="union")
    assert session.tokenizer == "union" and wb.models_for(session).expert_set.vocab.choice == "union"
    plain = wb.load_experts(wb.Session(), base, refs, zoo=lm_fake)
    assert wb.models_for(plain) is not wb.models_for(session)  # another vocabulary: other tensors, other cache
    wb.merge(session, "task_arithmetic", {"lambda": 0.5}, 0)
    assert session.last_recipe.tokenizer == "union"
    path = wb.export(session, None, "float32")
    assert yaml.safe_load(_zip_json(path, "recipe.yaml"))["tokenizer"] == "union"
    exported = json.loads(_zip_json(path, "tokenizer.json"))["model"]["vocab"]
    assert exported == json.loads((lm_fake.base_path / "tokenizer.json").read_text())["model"]["vocab"]


# ---------------------------------------------------------------- the device

def test_the_device_reaches_importance_and_the_probe(lm_fake, monkeypatch, tmp_path):
    import merging.apl.importance as importance
    from merging.cli.main import main
    from merging.lm.model import resolve_device
    from merging.lm.probe import LMProber

    seen = []
    real = importance.compute_importance

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return real(*args, **{**kwargs, "device": "cpu"})  # no GPU here: record it, then run on the CPU

    monkeypatch.setattr(importance, "compute_importance", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "imp.json"
    assert main(["importance", "--zoo", lm_fake.name, "--device", "cuda", "--n-fewshot", "4", "--out", str(out)]) == 0
    assert main(["importance", "--zoo", lm_fake.name, "--n-fewshot", "4", "--out", str(out)]) == 0
    assert seen == ["cuda", "cuda"]  # asked for, and auto where a CUDA device is present
    with pytest.raises(MergeLabError, match="only 1 CUDA device"):
        resolve_device("cuda:3")
    monkeypatch.undo()
    assert resolve_device() == resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MergeLabError, match="no CUDA device is available here"):
            resolve_device("cuda")
    with pytest.raises(MergeLabError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    # the LM probe's model and batches are put on the device it is given (meta: no memory, no values)
    from merging.io.experts import ExpertSet
    from merging.io.taskdata import tokenizer_of

    expert_set = ExpertSet.load(lm_fake.base_path, dict(lm_fake.experts))
    prober = LMProber(expert_set, {t: lm_fake.probe(t) for t in lm_fake.experts}, tokenizer_of(expert_set),
                      device="meta")
    assert {p.device.type for p in prober.model.parameters()} == {"meta"}
    assert {v.device.type for batches in prober.batches.values() for b in batches for v in b.values()} == {"meta"}
