"""The app's session logic (merging.workbench), without any UI: load → importance → plan → merge → probe → export.

Runs on conftest's ``app_zoo`` (the fake zoo of tiny BERTs in the zoo layout).
"""

from __future__ import annotations

import os

import pytest

from merging import workbench as wb
from merging.errors import MergeLabError

# ---------------------------------------------------------------- tests


def test_load_experts_table_and_data(loaded):
    session, zoo = loaded
    assert session.experts == list(zoo.tasks)
    assert session.layers[0] == "embeddings" and session.layers[-1] == "head"
    assert [r[0] for r in session.summary] == list(zoo.tasks)
    assert all(r[3] > 0 for r in session.summary)  # delta norms
    assert not session.missing_data()
    assert "few-shot" in wb.data_status(session)


def test_load_errors_are_readable(app_zoo):
    zoo, _ = app_zoo
    base, refs = wb.zoo_refs(zoo)
    with pytest.raises(MergeLabError, match="at least two"):
        wb.load_experts(wb.Session(), base, dict(list(refs.items())[:1]), zoo=zoo)
    with pytest.raises(MergeLabError, match="not found"):
        wb.load_experts(wb.Session(), base, {**refs, "ghost": "/no/such/folder"}, zoo=zoo)


def test_parse_extra_refs():
    assert wb.parse_extra_refs("a=/x/y\n/z/w.safetensors\n# note\nhf:org/m@main") == {
        "a": "/x/y", "w": "/z/w.safetensors", "m": "hf:org/m@main"}


def test_missing_data_blocks_apl_and_says_why(loaded, tmp_path):
    session, _ = loaded
    expert = session.experts[0]
    del session.data[expert]
    assert "no task data" in wb.data_status(session)
    assert "few-shot" in wb.method_available(session, "apl")
    assert wb.method_available(session, "task_arithmetic") is None
    with pytest.raises(MergeLabError, match="no task data"):
        wb.compute_importance(session)
    # attach a CSV with the right number of labels
    labels = len(loaded[1].label_names(expert))
    rows = ["text,label"] + [f"w{i} w{i+1},{chr(97 + i % labels)}" for i in range(30)]
    path = tmp_path / "mine.csv"
    path.write_text("\n".join(rows))
    wb.attach_task_data(session, expert, path, n_fewshot=8)
    assert session.data[expert].source == "mine.csv" and 6 <= len(session.data[expert].fewshot) <= 8
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(["text,label"] + [f"w{i},{chr(97 + i % 5)}" for i in range(30)]))
    with pytest.raises(MergeLabError, match="labels"):
        wb.attach_task_data(session, expert, bad)


def test_importance_calibration_overrides_merge_probe_export(loaded, tmp_path):
    session, zoo = loaded
    wb.compute_importance(session, n_fewshot=8, mode="gradient")
    imp = session.importance
    assert set(imp.experts) == set(session.experts) and "module" in imp.signed and imp.units
    shared = {"drop_ratio": 0.5}
    table = wb.view_prepared(session, "apl", shared)["table"]  # APL's prepare, fed the importance map
    sugg = wb.plan(session, "apl", shared)
    e0 = session.experts[0]
    assert sugg[e0]["drop_ratio"] == pytest.approx(table.drop[e0])
    assert wb.suggestion_source(session, "apl", shared).startswith("APL")
    # a slider move is an override; the recipe records it beside the suggestion
    wb.set_cell(session, e0, "0", "drop_ratio", 0.9)
    assert wb.is_overridden(session, e0, "drop_ratio", "0")
    assert wb.plan(session, "apl", shared)[e0]["drop_ratio"]["0"] == 0.9
    recipe = wb.build_recipe(session, "apl", shared)
    assert recipe.experts[0].parameters["drop_ratio"]["0"] == 0.9
    assert recipe.experts[0].parameters["drop_ratio"]["1"] == pytest.approx(table.drop[e0]["1"])
    assert recipe.suggested["overrides"][0]["layer"] == "0"
    assert recipe.suggested["overrides"][0]["suggested"] == pytest.approx(table.drop[e0]["0"])
    assert recipe.suggested["apl"]["drop_ratio"][e0]["0"] == pytest.approx(table.drop[e0]["0"])
    assert recipe.calibrated is not None and recipe.few_shot[e0]["file"] == session.refs[e0]
    # the page's temperature reaches the calibration (it used to be ignored after Compute importance)
    hot = wb.suggestion(session, "apl", {"drop_ratio": 0.5, "tau1": 1e6})
    assert max(hot[e0]["drop_ratio"].values()) - min(hot[e0]["drop_ratio"].values()) < \
        max(table.drop[e0].values()) - min(table.drop[e0].values())
    summary = wb.merge(session, "apl", {"drop_ratio": 0.5, "tau1": 2.0, "tau2": 2.0, "q_min": 0.01})
    assert summary.recomputed > 0
    first = wb.run_probe(session)
    assert [r.name for r in first.rows][-1] == summary.label
    # second merge after one more override re-merges only that layer
    wb.set_cell(session, e0, "1", "weight", 0.5)
    again = wb.merge(session, "apl", {"drop_ratio": 0.5, "tau1": 2.0, "tau2": 2.0, "q_min": 0.01})
    assert again.changed_layers == ["1"]
    report = wb.run_probe(session)
    names = [r.name for r in report.rows]
    assert names[0] == "base" and summary.label in names and again.label in names
    headers, rows = wb.history_rows(session)
    assert len(rows) == 2 and rows[-1][2] is not None
    preds = wb.predict(session, "w1 w2 w3")
    assert {r[1] for r in preds} == {"base", "expert", "merged"}
    wb.reset_overrides(session)
    assert not session.overrides
    path = wb.export(session, dtype="float16")
    assert wb.zip_is_stored(path)
    names = wb.read_zip_names(path)
    assert "recipe.yaml" in names and "importance.json" in names
    assert any(n.endswith("model.safetensors") for n in names) and any(n.endswith("README.md") for n in names)


def test_presets(loaded):
    session, _ = loaded
    wb.preset_uniform(session, 0.3, 1.0)
    values = wb.plan(session, "dare_linear", {"drop_ratio": 0.5})
    assert all(v == 0.3 for e in values for v in values[e]["drop_ratio"].values())
    wb.preset_layer_swap(session)
    a, b = session.experts[:2]
    outer, middle = wb.layer_swap_groups(session.layers)
    assert "embeddings" in outer and "head" in outer and middle
    p = wb.plan(session, "linear", {})
    assert all(p[a]["weight"][k] == 1.0 and p[b]["weight"][k] == 0.0 for k in outer)
    assert all(p[b]["weight"][k] == 1.0 and p[a]["weight"][k] == 0.0 for k in middle)
    assert wb.layer_swap_groups(["embeddings", *map(str, range(6)), "head"]) == (
        ["embeddings", "0", "1", "4", "5", "head"], ["2", "3"])


def test_table_edit_records_overrides(loaded):
    session, _ = loaded
    headers, rows = wb.table_rows(session, "weight", "task_arithmetic", {})
    assert headers == ["expert", *session.layers]
    rows[1][2] = 0.25
    wb.apply_table(session, "weight", rows, "task_arithmetic", {})
    assert session.overrides == {session.experts[1]: {"weight": {session.layers[1]: 0.25}}}
    params = wb.expert_parameters(session, "task_arithmetic", {})
    assert params[session.experts[1]]["weight"][session.layers[1]] == 0.25
    assert session.experts[0] not in params


def test_merge_without_importance_uses_uniform(loaded):
    session, _ = loaded
    assert "Compute importance" in wb.method_available(session, "apl")
    summary = wb.merge(session, "dare_linear", {"drop_ratio": 0.3, "lambda": 1.0, "rescale": True})
    assert summary.method == "dare_linear"
    assert session.last_recipe.parameters["drop_ratio"] == 0.3


def test_model_cache_is_bounded_and_shared(loaded):
    session, zoo = loaded
    cache = wb.ModelCache(max_entries=1)
    a = cache.put(wb.Models("a", None, None))
    cache.put(wb.Models("b", None, None))
    assert len(cache) == 1 and cache.get("a") is None and a.key == "a"
    other = wb.load_experts(wb.Session(), session.base_ref, session.refs, zoo=zoo)
    assert wb.models_for(other) is wb.models_for(session) and other.id != session.id


def test_old_exports_are_deleted(app_zoo):
    root = wb.exports_root()
    old = root / "old.zip"
    old.write_bytes(b"x")
    os.utime(old, (1, 1))
    assert wb.clean_old_exports() >= 1 and not old.exists()


def test_zoo_build_runs_once_and_reports_one_progress_line(app_zoo, monkeypatch):
    """The background zoo build: started once per zoo, its progress as one line (expert i of n, task,
    step, time left from the measured rate), the not-ready message, then ready."""
    import threading

    from merging.workbench import zoo_build

    release, calls = threading.Event(), []

    def slowed(name, progress=None):
        calls.append(name)
        progress(0.25, "topic: step 10/40, loss 0.9")
        release.wait(30)
        return app_zoo[0]

    monkeypatch.setattr(zoo_build, "BUILDER", slowed)
    monkeypatch.setenv("MERGE_LAB_ZOO", "never-built")
    zoo_build.forget_zoo_builds()
    try:
        first = wb.start_zoo_build()
        assert wb.start_zoo_build() is first
        for _ in range(100):
            status = wb.zoo_status()
            if "step 10/40" in status.line:
                break
            threading.Event().wait(0.02)
        assert status.state == "building" and not status.ready
        assert "expert 1 of" in status.line and "topic · step 10/40" in status.line and "left" in status.line
        message = status.not_ready_message()
        assert message.startswith("the demo zoo is still being built (expert 1 of") and "try again in" in message
        # an expert's place in the zoo, even when an interrupted build already finished the ones before it
        from merging.zoo.tasks import default_task_names

        order = default_task_names()
        first._progress(0.6, f"{order[-1]}: step 5/40, loss 1.0")
        assert f"expert {len(order)} of {len(order)} · {order[-1]} · step 5/40" in wb.zoo_status().line
        release.set()
        assert first.wait(30)
        assert wb.zoo_status().ready and calls == ["never-built"]
    finally:
        release.set()
        zoo_build.forget_zoo_builds()


def test_zoo_build_can_be_turned_off(monkeypatch, app_zoo):
    from merging.workbench import zoo_build

    monkeypatch.setenv("MERGE_LAB_ZOO", "never-built-either")
    monkeypatch.setenv("MERGE_LAB_ZOO_BUILD", "off")
    zoo_build.forget_zoo_builds()
    try:
        assert wb.start_zoo_build() is None
        status = wb.zoo_status()
        assert status.state == "off" and "folders or paths" in status.not_ready_message()
        monkeypatch.setenv("MERGE_LAB_ZOO", app_zoo[0].name)  # a built zoo still opens with building off
        assert wb.zoo_status().ready
    finally:
        zoo_build.forget_zoo_builds()


def test_merge_before_load_says_load_experts_first():
    """Not "APL needs importance": with nothing loaded, the first missing step is Load experts."""
    with pytest.raises(wb.MergeLabError, match="press Load experts"):
        wb.merge(wb.Session(), "apl", wb.check_shared("apl", {}), 0)


def test_a_failed_zoo_build_says_what_to_do(monkeypatch):
    from merging.workbench import zoo_build

    def broken(name, progress=None):
        raise OSError("no space left on device")

    monkeypatch.setattr(zoo_build, "BUILDER", broken)
    monkeypatch.setenv("MERGE_LAB_ZOO", "never-built-broken")
    zoo_build.forget_zoo_builds()
    try:
        assert wb.start_zoo_build().wait(30)
        status = wb.zoo_status()
        assert status.state == "failed" and "no space left on device" in status.line
        assert status.not_ready_message().startswith("the demo zoo 'never-built-broken' could not be built")
        assert "folders or paths" in status.not_ready_message()
    finally:
        zoo_build.forget_zoo_builds()
