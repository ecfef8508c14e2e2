"""A public Space that cannot be broken into or knocked over, and a CLI that never deletes what it did not write.

Each test reproduces one hole found in review (it failed before its fix): names used as file names,
an output folder wiped by ``--out .``, YAML alias bombs, files outside the allowed roots reached through
symlinks or shard names, unbounded requests, a full disk. API tests go through ``gradio_client`` against
the app launched the way ``python app.py`` launches it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import tiny_models as tm
import yaml
from served_app import error_message

from merging import workbench as wb
from merging.cli.main import main
from merging.errors import MergeLabError
from merging.io.experts import ExpertSet
from merging.io.export import export_recipe
from merging.io.names import check_name, safe_join
from merging.io.recipe import Recipe

BAD_NAMES = ["x/..", "..", ".", "", "/abs/path", "../../x", "a" * 65, "-lead", "sp ace", "a\\b", "x\x00y"]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- critical: names are identifiers


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_expert_names_are_refused_with_how_to_fix(name):
    with pytest.raises(MergeLabError, match="rename it"):
        check_name(name)


def test_name_message_is_the_documented_one_and_good_names_pass():
    with pytest.raises(MergeLabError) as info:
        check_name("x/..")
    assert str(info.value).startswith("expert name 'x/..' may only hold letters, digits, '.', '_' and '-' (at most 64")
    for good in ("topic", "a", "A.b-c_9", "x" * 64, "v1.2"):
        assert check_name(good) == good


def test_safe_join_refuses_to_leave_its_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path, target_is_directory=True)
    assert safe_join(root, "a", "b.txt") == (root / "a" / "b.txt").resolve()
    for parts in (("..", "x"), ("/etc/passwd",), ("a/../../x",), ("link", "x")):
        with pytest.raises(MergeLabError, match="outside its folder") as info:
            safe_join(root, *parts)
        assert str(tmp_path) not in str(info.value)  # never a server path


@pytest.mark.parametrize("name", ["/abs/path", "../../x", "x/.."])
def test_recipe_expert_names_must_be_identifiers(name):
    with pytest.raises(MergeLabError, match="rename it") as info:
        Recipe.from_dict({"method": "task_arithmetic", "base": "b",
                          "experts": [{"name": name, "model": "e"}, {"name": "ok", "model": "f"}]})
    assert info.value.field == "experts[0].name"


def test_cli_never_writes_outside_out_for_path_like_names(tmp_path, capsys):
    base, experts = tm.family(tmp_path / "models", "bert", 2, expert_kind="bert_cls")
    work = tmp_path / "work"
    work.mkdir()
    for name in (str(tmp_path / "abs-target"), "../../escaped"):
        recipe = work / "r.yaml"
        recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base), "experts": [
            {"name": name, "model": str(experts[0])}, {"name": "two", "model": str(experts[1])}]}))
        capsys.readouterr()
        assert main(["merge", str(recipe), "--out", str(work / "out" / "deep")]) == 2
        assert "rename it" in capsys.readouterr().err
    assert not (tmp_path / "abs-target").exists() and not (tmp_path / "escaped").exists()
    assert not (work / "out").exists()


def test_export_joins_task_folders_safely_even_if_a_name_slipped_through(tmp_path):
    base, experts = tm.family(tmp_path / "models", "bert", 2, expert_kind="bert_cls")
    expert_set = ExpertSet.load(base, {"one": experts[0], "two": experts[1]})
    expert_set.experts["../../../escaped"] = expert_set.experts.pop("one")  # as if a caller skipped the check
    recipe = Recipe.from_dict({"method": "task_arithmetic", "base": str(base),
                               "experts": [{"name": "one", "model": str(experts[0])},
                                           {"name": "two", "model": str(experts[1])}]})
    with pytest.raises(MergeLabError, match="rename it"):
        export_recipe(recipe, tmp_path / "out" / "x", expert_set=expert_set)
    assert not (tmp_path / "escaped").exists() and not list((tmp_path / "out").glob("*"))


def test_library_and_workbench_refuse_path_like_names(app_zoo, tmp_path):  # noqa: F811
    zoo, _ = app_zoo
    with pytest.raises(MergeLabError, match="rename it"):
        ExpertSet.load(zoo.base_path, {"../x": zoo.experts["topic"], "y": zoo.experts["mood"]})
    base, refs = wb.zoo_refs(zoo)
    with pytest.raises(MergeLabError, match="rename it"):
        wb.load_experts(wb.Session(), base, {**refs, "x/../../zoo": refs["topic"]})
    with pytest.raises(MergeLabError, match="rename it"):
        wb.parse_extra_refs("a/../../b=zoo:x/topic")
    assert wb.parse_extra_refs("/some/where/my model v2")["my_model_v2"] == "/some/where/my model v2"
    with pytest.raises(MergeLabError, match="zoo name"):
        wb.load_experts(wb.Session(), base, {**refs, "z": "zoo:../../elsewhere/topic"})


def test_history_restore_refuses_path_like_names(app_zoo, tmp_path):  # noqa: F811
    import json

    path = tmp_path / "h.json"
    path.write_text(json.dumps({"format": wb.HISTORY_FORMAT, "merges": [{"label": "#1", "method": "ties", "recipe": {
        "method": "ties", "base": "b", "experts": [{"name": "../../x", "model": "e"}, {"name": "y", "model": "f"}]}}]}))
    with pytest.raises(MergeLabError, match="rename it"):
        wb.restore_history(wb.Session(), path)


def test_api_path_like_names_cannot_write_into_the_zoo_or_elsewhere(fake_app_url, app_zoo, tmp_path):  # noqa: F811
    from gradio_client import Client

    zoo, cache = app_zoo
    client = Client(fake_app_url, verbose=False)
    base = f"zoo:{zoo.name}/base"
    before = _digest(zoo.experts["topic"])
    target = tmp_path / "target"
    into_zoo = f"x/../../../../zoo/{zoo.name}/experts/topic=zoo:{zoo.name}/topic"
    outside = "x/" + "../" * 14 + str(target).lstrip("/") + f"=zoo:{zoo.name}/topic"
    for line in (into_zoo, outside):
        text = error_message(lambda line=line: client.predict(base, ["mood"], line, None, "apl", api_name="/load_experts"))
        assert "may only hold letters, digits" in text and "rename it" in text
    out = client.predict(base, ["mood"], f"mine=zoo:{zoo.name}/topic", None, "apl", api_name="/load_experts")
    assert "homology check passed" in out[1]
    client.predict("task_arithmetic", 0, api_name="/merge")
    client.predict(["mine", "mood"], "fp32", api_name="/export")
    assert _digest(zoo.experts["topic"]) == before and not target.exists()


def test_uploads_with_odd_file_names_get_identifier_names(app_zoo, tmp_path):  # noqa: F811
    from components import handlers as h

    zoo, _ = app_zoo
    odd = tmp_path / "my expert (copy).safetensors"
    shutil.copyfile(Path(zoo.experts["topic"]) / "model.safetensors", odd)
    refs = h.upload_refs([str(odd)])
    assert list(refs) == ["my_expert__copy_"]


# ---------------------------------------------------------------- high (a): the CLI never deletes what it did not write


def _cli_recipe(tmp_path) -> Path:
    base, experts = tm.family(tmp_path / "models", "bert", 2, expert_kind="bert_cls")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base), "experts": [
        {"name": "one", "model": str(experts[0])}, {"name": "two", "model": str(experts[1])}]}))
    return path


def test_cli_refuses_a_non_empty_folder_that_is_not_an_export(tmp_path, capsys, monkeypatch):
    recipe = _cli_recipe(tmp_path)
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    (here / "sub").mkdir()
    (here / "sub" / "data.csv").write_text("a,b")
    monkeypatch.chdir(here)
    capsys.readouterr()
    assert main(["merge", str(recipe), "--out", "."]) == 2  # `--out .` once wiped the current folder
    err = capsys.readouterr().err
    assert "is not empty and is not a previous Merge Lab export" in err and "--force" in err and "new folder" in err
    assert sorted(p.name for p in here.rglob("*")) == ["data.csv", "notes.txt", "sub"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cli_force_adds_beside_user_files_and_never_overwrites_them(tmp_path, capsys):
    recipe = _cli_recipe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["merge", str(recipe), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "one" / "model.safetensors").is_file()
    clash = tmp_path / "clash"
    (clash / "one").mkdir(parents=True)
    (clash / "one" / "README.md").write_text("my own readme")
    capsys.readouterr()
    assert main(["merge", str(recipe), "--out", str(clash), "--force"]) == 2
    assert "already holds 'one/README.md', which Merge Lab did not write" in capsys.readouterr().err
    assert (clash / "one" / "README.md").read_text() == "my own readme" and len(list(clash.rglob("*"))) == 2


def test_re_export_replaces_only_what_the_previous_export_wrote(tmp_path):
    recipe = _cli_recipe(tmp_path)
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "--out", str(out)]) == 0
    (out / "my-eval.json").write_text("{}")
    (out / "one" / "notes.md").write_text("keep")
    assert main(["merge", str(recipe), "--out", str(out), "--tasks", "two"]) == 0  # no --force needed
    assert (out / "my-eval.json").is_file() and (out / "one" / "notes.md").read_text() == "keep"
    assert not (out / "one" / "model.safetensors").exists() and (out / "two" / "model.safetensors").is_file()


def test_cli_mergekit_out_never_replaces_an_existing_file(tmp_path, capsys):
    recipe = _cli_recipe(tmp_path)
    mine = tmp_path / "mine.yaml"
    mine.write_text("precious")
    assert main(["merge", str(recipe), "--format", "mergekit", "--out", str(mine)]) == 2
    assert mine.read_text() == "precious" and "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------- high (b): YAML alias bombs


def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    import time

    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1},"
              f"*a{i - 1}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("method: ties\nbase: b\nexperts: [e, f]\nnotes:\n  " + "\n  ".join(lines) + "\n")
    start = time.perf_counter()
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "anchor or alias" in err and "(line 5)" in err


def test_deeply_nested_yaml_gets_a_clear_error():
    with pytest.raises(MergeLabError, match="nests deeper than"):
        Recipe.from_yaml("method: ties\nnotes: " + "[" * 5000 + "]" * 5000 + "\n")


# ---------------------------------------------------------------- high (c): one request cannot exhaust memory


def test_too_many_experts_are_refused_before_anything_opens(app_zoo, monkeypatch):  # noqa: F811
    zoo, _ = app_zoo
    base, refs = wb.zoo_refs(zoo)
    many = {f"e{i}": refs["topic"] for i in range(9)}
    with pytest.raises(MergeLabError, match=r"9 experts is more than this server merges at once "
                                            r"\(MERGE_LAB_MAX_EXPERTS = 8\): pick at most 8"):
        wb.load_experts(wb.Session(), base, many)
    monkeypatch.setenv("MERGE_LAB_MAX_EXPERTS", "2")
    with pytest.raises(MergeLabError, match="pick at most 2"):
        wb.load_experts(wb.Session(), base, {"a": refs["topic"], "b": refs["mood"], "c": refs["topic"]})
    monkeypatch.setenv("MERGE_LAB_MAX_EXPERTS", "abc")
    with pytest.warns(UserWarning, match="MERGE_LAB_MAX_EXPERTS='abc'"):
        assert wb.max_experts() == 8


@pytest.mark.parametrize("field, value, shown", [
    ("intermediate_size", 150000, "says intermediate_size = 150000 but its weights have 32"),
    ("hidden_size", 4096, "says hidden_size = 4096 but its weights have 16"),
    ("num_hidden_layers", 1000, "says num_hidden_layers = 1000 but its weights have 2 layers"),
    ("vocab_size", "lots", "says vocab_size = lots"),
    ("num_attention_heads", 5, "num_attention_heads = 5 but its weights have hidden size 16"),
])
def test_config_sizes_must_match_the_weights(tmp_path, field, value, shown):
    import json

    base, experts = tm.family(tmp_path, "bert", 2, expert_kind="bert_cls")
    config_path = experts[0] / "config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(MergeLabError, match="fix " + field) as info:
        ExpertSet.load(base, {"one": experts[0], "two": experts[1]})
    assert shown in str(info.value) and "'one'" in str(info.value) and info.value.field == field


def test_memory_budget_refuses_heavy_steps_with_the_numbers(app_zoo, monkeypatch):  # noqa: F811
    zoo, _ = app_zoo
    base, refs = wb.zoo_refs(zoo)
    session = wb.load_experts(wb.Session(), base, refs)
    monkeypatch.setenv("MERGE_LAB_MEMORY_BUDGET", "1K")
    with pytest.raises(MergeLabError, match=r"merge of these 2 experts needs about 0\.\d\d GB of memory, over this "
                                            r"server's budget of 0\.00 GB \(MERGE_LAB_MEMORY_BUDGET\)"):
        wb.merge(session, "task_arithmetic", {}, 0)
    with pytest.raises(MergeLabError, match="importance of these 2 experts needs about"):
        wb.compute_importance(session, 8)
    with pytest.raises(MergeLabError, match="merge of these 2 experts needs"):
        wb.load_experts(wb.Session(), base, refs)
    monkeypatch.delenv("MERGE_LAB_MEMORY_BUDGET")
    assert wb.merge(session, "task_arithmetic", {}, 0).label.startswith("#1")
    assert wb.estimate_step_bytes(wb.models_for(session).expert_set, "importance") < wb.memory_budget_bytes()


def test_task_files_are_capped_in_size_and_rows(app_zoo, tmp_path, monkeypatch):  # noqa: F811
    zoo, _ = app_zoo
    base, refs = wb.zoo_refs(zoo)
    session = wb.load_experts(wb.Session(), base, refs)
    big = tmp_path / "big.csv"
    big.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(60_000)))
    with pytest.raises(MergeLabError, match="has 60000 rows, over the limit of 50000"):
        wb.attach_task_data(session, "topic", big)
    monkeypatch.setenv("MERGE_LAB_MAX_TASK_MB", "0.1")
    with pytest.raises(MergeLabError, match=r"big.csv is 0\.\d MB, over the 0.1 MB limit for task files") as info:
        wb.attach_task_data(session, "topic", big)
    assert str(tmp_path) not in str(info.value)


def test_a_5000_label_mismatch_message_stays_short(app_zoo, tmp_path):  # noqa: F811
    zoo, _ = app_zoo
    base, refs = wb.zoo_refs(zoo)
    session = wb.load_experts(wb.Session(), base, refs)
    labels = tmp_path / "labels.csv"
    labels.write_text("text,label\n" + "".join(f"row {i},label-number-{i}\n" for i in range(5000)))
    with pytest.raises(MergeLabError, match="has 5000 labels") as info:
        wb.attach_task_data(session, "topic", labels)
    assert len(str(info.value)) < 600 and "and 4990 more" in str(info.value)


# ---------------------------------------------------------------- medium (f): every opened file is checked


@pytest.fixture()
def allowed(tmp_path, monkeypatch):
    root = tmp_path / "allowed"
    root.mkdir()
    monkeypatch.setenv("MERGE_LAB_ALLOWED_ROOTS", str(root))
    return root


def test_symlinked_file_inside_an_allowed_folder_is_refused(tmp_path, allowed):
    base, experts = tm.family(allowed / "models", "bert", 2)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "vocab.txt").write_text("TOP SECRET")
    (base / "vocab.txt").symlink_to(secret / "vocab.txt")
    with pytest.raises(MergeLabError, match="file 'vocab.txt' leads outside the allowed folders") as info:
        ExpertSet.load(base, experts)
    assert str(tmp_path) not in str(info.value)
    moved = tmp_path / "weights.safetensors"
    shutil.move(experts[0] / "model.safetensors", moved)
    (experts[0] / "model.safetensors").symlink_to(moved)
    (base / "vocab.txt").unlink()
    with pytest.raises(MergeLabError, match="file 'model.safetensors' leads outside the allowed folders"):
        ExpertSet.load(base, experts)


def test_shard_names_in_the_index_cannot_leave_the_folder(tmp_path, allowed):
    import json

    base, experts = tm.family(allowed / "models", "bert", 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(experts[0] / "model.safetensors", outside / "x.safetensors")
    from safetensors import safe_open

    with safe_open(str(outside / "x.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    (experts[0] / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../../../outside/x.safetensors" for k in keys}}))
    with pytest.raises(MergeLabError, match="names shard '../../../outside/x.safetensors', which is not a "
                                            ".safetensors file beside it"):
        ExpertSet.load(base, experts)


def test_refusals_do_not_tell_whether_a_path_exists_or_where_the_roots_are(tmp_path, allowed):
    from merging.io.sources import open_model

    texts = []
    for ref in ("/etc/passwd", "/no/such/file.safetensors", str(tmp_path / "missing")):
        with pytest.raises(MergeLabError) as info:
            open_model(ref)
        texts.append(str(info.value).replace(ref, "REF"))
        assert str(allowed) not in str(info.value)
    assert len(set(texts)) == 1 and "is not allowed here" in texts[0]


def test_public_host_without_allowed_roots_warns_at_start_up(monkeypatch):
    import app as app_module

    monkeypatch.delenv("MERGE_LAB_ALLOWED_ROOTS", raising=False)
    with pytest.warns(UserWarning, match="served publicly but MERGE_LAB_ALLOWED_ROOTS is not set"):
        app_module.launch_kwargs(app_module.parse_args(["--host", "0.0.0.0"]))
    monkeypatch.setenv("SPACE_ID", "someone/merge-lab")
    with pytest.warns(UserWarning, match="served publicly"):
        app_module.launch_kwargs(app_module.parse_args(["--host", "127.0.0.1"]))
    monkeypatch.setenv("MERGE_LAB_ALLOWED_ROOTS", "/srv/models")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        app_module.launch_kwargs(app_module.parse_args(["--host", "0.0.0.0"]))


def test_deeply_nested_config_json_gets_a_clear_error(tmp_path):
    base, experts = tm.family(tmp_path, "bert", 2)
    (experts[0] / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(MergeLabError, match="nests too deeply"):
        ExpertSet.load(base, experts)


# ---------------------------------------------------------------- high (d): Stop stops the work; light calls do not wait


@pytest.fixture()
def slow_merge(monkeypatch):
    """Every merged tensor takes 0.1 s, and the patch counts calls and how many run right now."""
    import threading
    import time

    from merging.engine import MergeEngine

    original = MergeEngine._merge_one
    state = {"calls": 0, "active": 0}
    lock = threading.Lock()

    def slow(self, *args, **kwargs):
        with lock:
            state["calls"] += 1
            state["active"] += 1
        try:
            time.sleep(0.1)
            return original(self, *args, **kwargs)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(MergeEngine, "_merge_one", slow)
    return state


def _wait_for(predicate, timeout=20.0):
    import time

    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow  # waits on the served app's queue (3-6 s)
def test_api_cancel_stops_the_computation_and_the_server_returns_to_idle(fake_app_url, app_zoo, slow_merge):  # noqa: F811
    import threading
    import time

    from gradio_client import Client

    zoo, _ = app_zoo
    client = Client(fake_app_url, verbose=False)
    client.predict(f"zoo:{zoo.name}/base", list(zoo.tasks), "", None, "apl", api_name="/load_experts")
    threads_before = threading.active_count()
    for attempt in range(3):
        start_calls = slow_merge["calls"]
        job = client.submit("ties", attempt + 1, api_name="/merge")  # a new seed each time: no cache hit
        assert _wait_for(lambda start_calls=start_calls: slow_merge["calls"] > start_calls + 2), "the merge never started"
        job.cancel()
        assert _wait_for(lambda: slow_merge["active"] == 0, 3.0), "the merge thread kept working after cancel"
        stopped_at = slow_merge["calls"]
        time.sleep(0.6)
        assert slow_merge["calls"] == stopped_at, "merged tensors kept coming after cancel"
    assert threading.active_count() <= threads_before + 2  # no thread left behind per cancelled job
    out = client.predict("ties", 99, api_name="/merge")  # and the next job runs normally
    assert "ties" in out


def test_api_light_calls_do_not_wait_behind_a_heavy_job(fake_app_url, app_zoo, slow_merge):  # noqa: F811
    import time

    from gradio_client import Client

    zoo, _ = app_zoo
    heavy, light = Client(fake_app_url, verbose=False), Client(fake_app_url, verbose=False)
    for client in (heavy, light):
        client.predict(f"zoo:{zoo.name}/base", list(zoo.tasks), "", None, "apl", api_name="/load_experts")
    start_calls = slow_merge["calls"]
    job = heavy.submit("ties", 1234, api_name="/merge")
    assert _wait_for(lambda: slow_merge["calls"] > start_calls + 1)
    clock = time.perf_counter()
    light.predict("topic", "1", "weight", 0.5, "task_arithmetic", api_name="/set_layer")
    seconds = time.perf_counter() - clock
    still_running = slow_merge["active"] > 0
    job.cancel()
    assert still_running and seconds < 2.0, f"a slider edit waited {seconds:.1f} s behind a merge"


# ---------------------------------------------------------------- medium (e): a full disk is recognised


@pytest.fixture()
def small_disk(tmp_path):
    """A real 2 MB filesystem (tmpfs), or a skip when this machine does not allow mounting."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here ({done.stderr.decode().strip() or 'not permitted'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _big_family(tmp_path):
    """Experts of ~1.5 MB each: an export of two task folders (~3 MB) cannot fit on the 2 MB disk."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = dict(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
               max_position_embeddings=32)
    base = tm.save(BertModel(BertConfig(**cfg)), tmp_path / "base")
    experts = [tm.save(tm.perturbed(BertForSequenceClassification(BertConfig(**cfg, num_labels=2)), i),
                       tmp_path / f"e{i}") for i in range(2)]
    recipe = Recipe.from_dict({"method": "task_arithmetic", "base": str(base),
                               "experts": [{"name": f"e{i}", "model": str(e)} for i, e in enumerate(experts)]})
    return recipe


def test_export_that_cannot_fit_is_refused_before_writing(tmp_path, small_disk):
    recipe = _big_family(tmp_path)
    with pytest.raises(MergeLabError, match=r"the disk is full: this export needs about 3\.\d MB but only "
                                            r"\d\.\d MB are free") as info:
        export_recipe(recipe, small_disk / "out")
    assert info.value.kind == "disk_full" and not list(small_disk.iterdir())


def test_export_hitting_a_full_disk_mid_write_says_so(tmp_path, small_disk, monkeypatch):
    recipe = _big_family(tmp_path)
    monkeypatch.setattr("merging.io.export._check_free_space", lambda *a: None)  # the disk fills up meanwhile
    with pytest.raises(MergeLabError, match="the disk is full while exporting") as info:
        export_recipe(recipe, small_disk / "out")
    assert info.value.kind == "disk_full" and not list(small_disk.iterdir())


def test_zoo_build_on_a_full_disk_says_so(small_disk, monkeypatch):
    from merging.zoo.tasks import Task
    from merging.zoo.zoo import build_zoo

    monkeypatch.setenv("MERGE_LAB_CACHE", str(small_disk))
    rows = [(f"word{i % 7} text {i}", i % 2) for i in range(60)]
    task = Task("tiny", ["a", "b"], "two labels", "test", lambda: rows, default_steps=1)
    with pytest.raises(MergeLabError, match="the disk is full while building zoo 'full'") as info:
        build_zoo("full", tasks=[task], steps=1, n_probe=10)
    assert info.value.kind == "disk_full"
    assert not (small_disk / "zoo" / ".full.building").exists()


def test_disk_full_is_recognised_by_kind_not_text():
    from safetensors import SafetensorError

    from merging.errors import is_disk_full

    assert is_disk_full(OSError(28, "No space left on device"))
    assert is_disk_full(SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)'))
    assert is_disk_full(MergeLabError("whatever the words", kind="disk_full"))
    assert not is_disk_full(MergeLabError("the disk is full, said a user's note"))
    assert MergeLabError("x").kind is None


# ---------------------------------------------------------------- medium (g): one retention policy for every copy


def test_one_retention_policy_cleans_uploads_exports_and_killed_staging(app_zoo, tmp_path):  # noqa: F811
    import os
    import time

    from merging.paths import cache_root

    zoo, _ = app_zoo
    upload = tmp_path / "mine.safetensors"
    shutil.copyfile(Path(zoo.experts["topic"]) / "model.safetensors", upload)
    kept = Path(wb.accept_upload(upload))
    old_upload = cache_root() / "uploads" / "0123456789ab"
    old_upload.mkdir(parents=True)
    (old_upload / "x.safetensors").write_bytes(b"x" * 100)
    long_ago = time.time() - 7 * 3600
    os.utime(old_upload, (long_ago, long_ago))
    killed = wb.exports_root() / "merge-20260101-000000-abc"  # a process killed mid-export left this
    (killed / "merge" / ".merge.tmp-1").mkdir(parents=True)
    (killed / "merge" / ".merge.tmp-1" / ".shard-00000.safetensors").write_bytes(b"\0" * 1000)
    finished = wb.exports_root() / "merge-20260101-000001-def"
    finished.mkdir()
    (finished / "merge-lab-ties.zip").write_bytes(b"PK")
    removed = wb.retention_sweep(startup=True)
    assert not old_upload.exists() and kept.is_file() and removed["uploads"] >= 1
    assert not killed.exists() and finished.exists() and removed["unfinished"] >= 1
    os.utime(finished, (long_ago, long_ago))
    wb.retention_sweep()
    assert not finished.exists()


def test_gradio_copies_of_exports_follow_the_same_hour():
    import app as app_module

    assert app_module.demo.delete_cache == (600, int(wb.EXPORT_MAX_AGE))


# ---------------------------------------------------------------- low: clear messages, no dead ends


def test_one_damaged_zoo_expert_leaves_the_rest_usable(tmp_path, monkeypatch):
    from fake_zoo import build_tiny_zoo

    from components import handlers as h
    from merging.zoo.zoo import open_zoo

    monkeypatch.setenv("MERGE_LAB_CACHE", str(tmp_path / "cache"))
    zoo = build_tiny_zoo(tmp_path / "cache", name="halfbroken")
    weights = Path(zoo.experts["mood"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    zoo = open_zoo("halfbroken")
    assert zoo.tasks == ["topic"] and "truncated" in zoo.damaged["mood"]
    with pytest.raises(MergeLabError, match="expert 'mood' is damaged .*rebuild it") as info:
        h.load(None, f"zoo:{zoo.name}/base", ["mood", "topic"], "", None, zoo)
    assert "not ready" not in str(info.value)


def test_a_lock_naming_a_live_but_unrelated_process_does_not_block_the_build(tmp_path, monkeypatch):
    import os

    from merging.zoo.zoo import _BuildLock

    lock = tmp_path / ".z.lock"
    lock.write_text(str(os.getppid()))  # a live process that is not building anything (bare-pid lock)
    with _BuildLock(lock):
        assert lock.read_text().split()[0] == str(os.getpid())
    lock.write_text(f"{os.getppid()} 1")  # the pid's process started at another time: the pid was reused
    with _BuildLock(lock):
        pass
    with _BuildLock(lock):  # the real holder still blocks a second build
        with pytest.raises(MergeLabError, match="is building this zoo"):
            _BuildLock(lock).__enter__()


def test_cli_and_app_agree_on_the_largest_seed():
    from merging.io.recipe import MAX_SEED

    assert wb.MAX_SEED == MAX_SEED == 2**31 - 1
    assert Recipe.from_dict({"method": "ties", "base": "b", "experts": ["e", "f"], "seed": MAX_SEED}).seed == MAX_SEED
    with pytest.raises(MergeLabError, match=r"seed must be a whole number in \[0, 2147483647\]"):
        Recipe.from_dict({"method": "ties", "base": "b", "experts": ["e", "f"], "seed": MAX_SEED + 1})
    with pytest.raises(MergeLabError, match="Seed must lie in"):
        wb.check_seed(MAX_SEED + 1)


def test_restored_history_is_capped_and_deep_json_gets_a_clear_error(tmp_path):
    import json

    from merging.workbench.limits import MAX_HISTORY_ENTRIES

    path = tmp_path / "h.json"
    merges = [{"label": f"#{i}", "method": "ties"} for i in range(MAX_HISTORY_ENTRIES + 50)]
    path.write_text(json.dumps({"format": wb.HISTORY_FORMAT, "merges": merges}))
    session = wb.Session()
    for _ in range(3):
        session, _ = wb.restore_history(session, path)
    assert len(session.history) == MAX_HISTORY_ENTRIES
    path.write_text('{"format": "merge-lab-history/1", "merges": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(MergeLabError, match="nested far too deeply"):
        wb.restore_history(wb.Session(), path)


def test_bad_cache_entries_setting_warns_instead_of_stopping_the_app(monkeypatch):
    from merging.workbench.cache import ModelCache

    for raw in ("abc", "-1", "0"):
        monkeypatch.setenv("MERGE_LAB_APP_CACHE_ENTRIES", raw)
        with pytest.warns(UserWarning, match="MERGE_LAB_APP_CACHE_ENTRIES"):
            assert ModelCache().max_entries == 8


def test_read_only_output_folder_and_too_long_names_get_clear_errors(tmp_path, capsys):
    import os

    from merging.io.sources import open_model

    recipe = _cli_recipe(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: a read-only bind mount instead
            import subprocess

            if subprocess.run(["mount", "--bind", "-o", "ro", str(locked), str(locked)]).returncode != 0:
                pytest.skip("cannot make a read-only folder here")
            subprocess.run(["mount", "-o", "remount,ro,bind", str(locked)])
        capsys.readouterr()
        assert main(["merge", str(recipe), "--out", str(locked / "out")]) == 2
        err = capsys.readouterr().err
        assert "cannot write the export" in err and "Choose a folder you can write to" in err
    finally:
        import subprocess

        subprocess.run(["umount", str(locked)], capture_output=True)
        os.chmod(locked, 0o700)
    with pytest.raises(MergeLabError, match="not found"):
        open_model("/" + "a" * 5000)


def test_zoo_checksums_catch_finite_corruption(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from merging.zoo.tasks import Task
    from merging.zoo.zoo import build_zoo, open_zoo

    monkeypatch.setenv("MERGE_LAB_CACHE", str(tmp_path / "cache"))
    rows = [(f"word{i % 7} text {i}", i % 2) for i in range(60)]
    zoo = build_zoo("sums", tasks=[Task("tiny", ["a", "b"], "two labels", "test", lambda: rows)], steps=1, n_probe=10)
    weights = Path(zoo.experts["tiny"]) / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("intermediate.dense.weight"))
    state[name].view(-1)[0] = 1e30  # finite: no NaN/Inf scan sees it
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(MergeLabError, match="does not match the checksum recorded when the zoo was built"):
        open_zoo("sums")


def test_deeply_nested_safetensors_header_is_called_corrupt(tmp_path):
    import struct

    from merging.io.integrity import check_safetensors

    header = ("[" * 100000 + "]" * 100000).encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(MergeLabError, match="corrupt safetensors header"):
        check_safetensors(path)


def test_int8_and_bool_body_tensors_are_named_not_merged_silently(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    base, experts = tm.family(tmp_path, "bert", 2)
    for folder in (base, *experts):
        state = load_file(str(folder / "model.safetensors"))
        state["encoder.layer.0.quant.weight"] = torch.ones(4, 4, dtype=torch.int8)
        state["encoder.layer.1.keep.mask"] = torch.ones(4, dtype=torch.bool)
        state["encoder.layer.1.f8.weight"] = torch.ones(4, 4).to(torch.float8_e4m3fn)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    warnings = ExpertSet.load(base, experts).warnings
    assert any("3 tensor(s) are int8/bool/float8 and are copied from the base, not merged" in w
               and "'encoder.layer.0.quant.weight' (int8)" in w for w in warnings), warnings


def test_api_too_many_experts_and_lying_configs_are_refused_readably(fake_app_url, app_zoo, tmp_path):  # noqa: F811
    import json

    from gradio_client import Client

    zoo, _ = app_zoo
    client = Client(fake_app_url, verbose=False)
    base = f"zoo:{zoo.name}/base"
    many = "\n".join(f"e{i}=zoo:{zoo.name}/topic" for i in range(9))
    text = error_message(lambda: client.predict(base, ["mood"], many, None, "apl", api_name="/load_experts"))
    assert "is more than this server merges at once (MERGE_LAB_MAX_EXPERTS = 8)" in text
    liar = shutil.copytree(zoo.experts["topic"], tmp_path / "liar")
    config = json.loads((liar / "config.json").read_text())
    config["intermediate_size"] = 150000
    (liar / "config.json").write_text(json.dumps(config))
    text = error_message(lambda: client.predict(base, ["mood"], f"liar={liar}", None, "apl", api_name="/load_experts"))
    assert "says intermediate_size = 150000 but its weights have 32" in text and str(tmp_path) not in text


def test_messages_about_model_folders_do_not_show_server_paths(tmp_path):
    from merging.io.sources import open_model

    folder = tmp_path / "deep" / "server" / "empty-model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(MergeLabError, match="has no weights in its folder") as info:
        open_model(folder, name="mine")
    assert str(tmp_path) not in str(info.value)


@pytest.mark.slow  # waits on the served app's queue (3-6 s)
def test_api_a_tab_repeating_a_queued_job_gets_only_the_newest_computed(fake_app_url, app_zoo, slow_merge):  # noqa: F811
    from gradio_client import Client

    zoo, _ = app_zoo
    client = Client(fake_app_url, verbose=False)
    client.predict(f"zoo:{zoo.name}/base", list(zoo.tasks), "", None, "apl", api_name="/load_experts")
    start_calls = slow_merge["calls"]
    first = client.submit("ties", 501, api_name="/merge")
    assert _wait_for(lambda: slow_merge["calls"] > start_calls + 1)
    repeats = [client.submit("ties", 502 + i, api_name="/merge") for i in range(3)]
    assert _wait_for(lambda: all(j.status().code.name in ("IN_QUEUE", "PROCESSING", "FINISHED") for j in repeats), 5)
    first.cancel()
    outcomes = []
    for job in repeats:
        try:
            outcomes.append(str(job.result(timeout=60)))
        except Exception as exc:  # noqa: BLE001
            outcomes.append(f"error: {exc}")
    superseded = [o for o in outcomes if "only the newest one runs" in o]
    assert len(superseded) == 2 and sum("ties** done" in o for o in outcomes) == 1, outcomes  # one did the work


def test_folder_task_data_must_fit_the_expert_head(app_zoo, tmp_path):  # noqa: F811
    import json

    zoo, _ = app_zoo
    odd = shutil.copytree(zoo.experts["topic"], tmp_path / "odd")  # a 2-class head
    record = json.loads((odd / "merge_lab_task.json").read_text())
    record["label_names"] = ["a", "b", "c", "d", "e"]
    (odd / "merge_lab_task.json").write_text(json.dumps(record))
    with pytest.raises(MergeLabError, match="expert 'odd' has a 2-class head but the task data in its folder has 5"):
        wb.load_experts(wb.Session(), f"zoo:{zoo.name}/base", {"odd": str(odd), "mood": f"zoo:{zoo.name}/mood"})


def test_staging_left_by_a_killed_cli_export_is_removed_an_hour_later(tmp_path):
    import os
    import time

    recipe = _cli_recipe(tmp_path)
    old, fresh = tmp_path / ".out.tmp-killed", tmp_path / ".out.tmp-running"
    for folder in (old, fresh):
        folder.mkdir()
        (folder / ".shard-00000.safetensors").write_bytes(b"\0" * 100)
    long_ago = time.time() - 2 * 3600
    os.utime(old, (long_ago, long_ago))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 0
    assert not old.exists() and fresh.exists()
