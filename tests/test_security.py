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
from test_app_api import launched_app
from test_workbench import app_zoo  # noqa: F401  (fixture)

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


def _message(call) -> str:
    with pytest.raises(Exception) as info:
        call()
    text = str(info.value)
    assert "Traceback" not in text and "Something went wrong" not in text, text
    return text


@pytest.fixture(scope="module")
def api_url(app_zoo):  # noqa: F811
    zoo, _ = app_zoo
    patch = pytest.MonkeyPatch()
    patch.setenv("MERGE_LAB_ZOO", zoo.name)
    try:
        with launched_app() as url:
            yield url
    finally:
        patch.undo()


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


def test_api_path_like_names_cannot_write_into_the_zoo_or_elsewhere(api_url, app_zoo, tmp_path):  # noqa: F811
    from gradio_client import Client

    zoo, cache = app_zoo
    client = Client(api_url, verbose=False)
    base = f"zoo:{zoo.name}/base"
    before = _digest(zoo.experts["topic"])
    target = tmp_path / "target"
    into_zoo = f"x/../../../../zoo/{zoo.name}/experts/topic=zoo:{zoo.name}/topic"
    outside = "x/" + "../" * 14 + str(target).lstrip("/") + f"=zoo:{zoo.name}/topic"
    for line in (into_zoo, outside):
        text = _message(lambda: client.predict(base, ["mood"], line, None, "apl", api_name="/load_experts"))
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
