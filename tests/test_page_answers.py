"""One answer per question, and predictable waits: the workbench numbers behind the page's answers.

History diffs ("topic L5 drop 0.30 → 0.91"), the below-base flag, per-expert gradient-vs-exact agreement,
the layer-level answer to "which layer matters most", time estimates from measured rates, one colour per
expert, the guided walk. Oracles are written here from the definitions, not from the code under test.
Runs on conftest's fake zoo (instant).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from components import figures as fg
from components import handlers as h
from merging import workbench as wb
from merging.apl.importance import ImportanceMap
from merging.errors import MergeLabError

# ---------------------------------------------------------------- history: what changed, below the base


def _recipe(method="apl", drop=0.5, cells=None):
    return {"method": method, "parameters": {"drop_ratio": drop, "lambda": 1.0},
            "experts": [{"name": e, "model": f"zoo:x/{e}", "parameters": {"drop_ratio": dict(c)}}
                        for e, c in (cells or {}).items()]}


def test_merge_changes_names_each_moved_cell_with_an_arrow():
    before = _recipe(cells={"topic": {"4": 0.5, "5": 0.30}, "mood": {"5": 0.6}})
    after = _recipe(cells={"topic": {"4": 0.5, "5": 0.91}, "mood": {"5": 0.7}})
    assert wb.merge_changes(before, after) == "topic L5 drop 0.30 → 0.91; mood L5 drop 0.60 → 0.70"
    assert wb.merge_changes(None, after) == "first merge"
    assert wb.merge_changes(after, after) == "same settings"
    other = _recipe(method="ties", drop=0.7, cells={"topic": {"4": 0.1, "5": 0.91}, "mood": {"5": 0.7}})
    text = wb.merge_changes(after, other, limit=2)
    # the method and the shared drop ratio come first, then the largest per-layer move, then a count
    assert text == "method apl → ties; drop_ratio 0.50 → 0.70; and 1 more"
    assert wb.merge_changes(after, other, limit=3).endswith("topic L4 drop 0.50 → 0.10")


def test_below_base_flags_what_the_mean_hides():
    merged = {"subjectivity": {"accuracy": 0.485}, "topic": {"accuracy": 0.95}}
    base = {"subjectivity": {"accuracy": 0.505}, "topic": {"accuracy": 0.40}}
    assert (0.485 + 0.95) / 2 > (0.505 + 0.40) / 2  # the mean says "better than the base"...
    assert wb.below_base(merged, base) == [("subjectivity", 0.485, 0.505)]  # ...one task says otherwise
    assert wb.below_base(merged, None) == []
    from merging.workbench.history import below_base_text

    assert below_base_text(wb.below_base(merged, base)) == "⚠ subjectivity 0.485 < base 0.505"
    assert wb.accuracy_changes({"topic": {"accuracy": 0.9}, "mood": {"accuracy": 0.5}},
                               {"topic": {"accuracy": 0.95}, "mood": {"accuracy": 0.4}}) == "topic +0.050, mood −0.100"


def test_history_table_diffs_and_flags_on_real_merges(loaded):
    session, _ = loaded
    e0 = session.experts[0]
    wb.merge(session, "task_arithmetic", {"lambda": 1.0})
    wb.run_probe(session)
    wb.set_cell(session, e0, "1", "weight", 0.4)
    wb.merge(session, "dare_linear", {"drop_ratio": 0.3, "lambda": 1.0})
    report = wb.run_probe(session)
    headers, rows = wb.history_rows(session)
    col = {name: i for i, name in enumerate(headers)}
    assert rows[0][col["changed from previous"]] == "first merge"
    second = rows[1][col["changed from previous"]]
    assert "method task_arithmetic → dare_linear" in second and f"{e0} L1 weight 1.00 → 0.40" in second
    base = next(r.metrics for r in report.rows if r.name == "base")
    for row, item in zip(rows, session.history):
        expected = [t for t, m in item["metrics"].items() if m["accuracy"] < base[t]["accuracy"]]
        flag = row[col["below base"]]
        assert all(f"⚠ {t} " in flag for t in expected) and flag.count("⚠") == len(expected)
    first, last = session.history[0]["metrics"], session.history[1]["metrics"]
    delta = {t: last[t]["accuracy"] - first[t]["accuracy"] for t in last}
    text = rows[1][col["Δ accuracy vs previous"]]
    for t, d in delta.items():
        assert f"{t} {d:+.3f}".replace("-", "−") in text


# ---------------------------------------------------------------- which layer matters most: one answer


def _map(layer_scores, module_scores):
    """A two-expert map over layers 0, 1 with modules a, b in layer 0 and c in layer 1."""
    modules = {"l0.a": ("0", "attn"), "l0.b": ("0", "ffn"), "l1.c": ("1", "attn")}
    return ImportanceMap(["topic", "mood"], ["0", "1"], "exact", "restore", 0,
                         {"layer": ["0", "1"], "module": list(modules)},
                         {"layer": np.array(layer_scores, float), "module": np.array(module_scores, float)},
                         modules=modules)


def test_layer_answer_says_why_summed_modules_differ():
    session = wb.Session(refs={"topic": "x", "mood": "y"})
    # topic: modules a and b each matter alone (0.4, -0.4) but cancel when layer 0 is switched whole
    session.importance = _map([[0.05, 0.30], [0.6, 0.2]], [[0.4, -0.4, 0.2], [0.3, 0.2, 0.1]])
    layers, layer, modules = wb.layer_importance(session)
    assert layers == ["0", "1"]
    assert layer["topic"] == pytest.approx([0.05 / 0.35, 0.30 / 0.35])
    assert modules["topic"] == pytest.approx([0.8 / 1.0, 0.2 / 1.0])  # |a| + |b| = 0.8 in layer 0
    text = wb.layer_answer(session)
    assert "**topic**: layer 1 (86% of the layer-level total)" in text
    assert "summed module scores point to layer 0 (80%)" in text and "cancel" in text
    assert "**mood**: layer 0 (75%" in text  # agrees: no disagreement clause for mood
    fig = fg.layer_importance_figure(layers, layer, modules)
    colours = fg.colour_map(["topic", "mood"])
    assert {t.marker.color if t.type == "bar" else t.line.color for t in fig.data if "topic" in t.name} \
        == {colours["topic"]}


def test_layer_importance_matches_the_map_on_the_fake_zoo(loaded):
    session, _ = loaded
    wb.compute_importance(session, n_fewshot=8)
    layers, layer, modules = wb.layer_importance(session)
    imp, layout = session.importance, wb.models_for(session).expert_set.layout
    for e in imp.experts:
        raw = np.abs(imp.signed["layer"][imp.experts.index(e)])
        assert layer[e] == pytest.approx(list(raw / raw.sum()))
        sums = {k: 0.0 for k in layers}
        for name, value in zip(imp.partitions["module"], np.abs(imp.signed["module"][imp.experts.index(e)])):
            owner = next(info.layer for info in layout.tensors.values() if info.module == name)
            sums[owner] += value
        total = sum(sums.values())
        assert modules[e] == pytest.approx([sums[k] / total for k in layers])


def test_fidelity_per_expert_at_layer_and_module_level(loaded):
    session, _ = loaded
    assert wb.fidelity_by_expert(session) is None
    wb.compute_importance(session, n_fewshot=8, mode="gradient")
    wb.compute_importance(session, n_fewshot=8, mode="exact")
    intervention, table = wb.fidelity_by_expert(session)
    exact, grad = session.importance_runs["exact/restore"], session.importance_runs["gradient/restore"]
    assert intervention == "restore" and set(table) == {"layer", "module"}
    for level in ("layer", "module"):
        for i, e in enumerate(exact.experts):
            x, y = np.abs(exact.signed[level][i]), np.abs(grad.signed[level][i])
            keep = ~((x == 0) & (y == 0))
            assert table[level][e] == pytest.approx(spearmanr(x[keep], y[keep]).statistic)
        x, y = np.abs(exact.signed[level]).ravel(), np.abs(grad.signed[level]).ravel()
        keep = ~((x == 0) & (y == 0))
        assert table[level]["all experts"] == pytest.approx(spearmanr(x[keep], y[keep]).statistic)
    text = fg.fidelity_by_expert_text(intervention, table)
    assert all(f"**{e}**: module" in text for e in exact.experts)


# ---------------------------------------------------------------- predictable waits


def test_estimate_is_measured_rate_times_units():
    wb.forget_rates()
    from merging.workbench.estimates import estimate, record

    assert estimate("forward", 250).seconds is None
    assert "measured on the first run" in estimate("forward", 250).text()
    record("forward", 3.0, 4, "a test")
    est = estimate("forward", 250)
    assert est.seconds == pytest.approx(0.75 * 250)
    assert est.text() == "about 3 min on this machine (250 forward passes × 0.75 s, measured on a test)"
    assert wb.duration_text(40) == "40 s" and wb.duration_text(3900) == "1 h 5 min"
    # a pass measured on 32 examples, estimated for 64: twice the time per pass (CPU time ~ batch size)
    record("gradient", 2.0, 1, "a test", examples=32)
    assert estimate("gradient", 10, examples=64).seconds == pytest.approx(40.0)
    assert "scaled from 32 to 64 examples" in estimate("gradient", 10, examples=64).text()
    assert estimate("gradient", 10, examples=32).seconds == pytest.approx(20.0)
    with pytest.raises(ValueError):
        record("coffee", 1, 1, "x")
    wb.forget_rates()


def test_exact_run_counts_and_measures_its_forward_passes(loaded, monkeypatch):
    """The estimate's unit count is the number of forward passes an exact run makes (counted here), and the
    run leaves its own pace as the next estimate's rate."""
    from merging.apl.taskloss import ClassifierLoss
    from merging.workbench.estimates import exact_forwards

    session, _ = loaded
    wb.forget_rates()
    calls = []
    original = ClassifierLoss.loss
    monkeypatch.setattr(ClassifierLoss, "loss", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    wb.compute_importance(session, n_fewshot=8, mode="exact", scope=wb.QUICK_SCOPE)
    assert sorted(session.importance.signed) == ["layer", "model"]  # the quick scope: no module level
    assert len(calls) == exact_forwards(session, ["model", "layer"])
    rate = wb.rate_of("forward")
    assert rate is not None and rate.source == "the last exact run" and rate.seconds > 0 and rate.examples == 8
    lines = wb.step_estimates(session, "exact", wb.QUICK_SCOPE, n=8)
    assert f"{len(calls)} forward passes × " in lines["importance"] and "on this machine" in lines["importance"]
    with pytest.raises(MergeLabError, match="Exact scope"):
        wb.exact_levels("everything")
    wb.forget_rates()


def test_progress_in_words_counts_partitions():
    from merging.workbench.importance import worded_progress

    seen = []
    sink = worded_progress(lambda f, m: seen.append((f, m)), "exact",
                           {"layer": ["0", "1"], "module": ["m1", "m2", "m3"]}, experts=2)
    sink(0.1, "topic: layer: 0")
    sink(0.2, "topic: module: m2")
    sink(0.5, "loading")
    assert seen[0][0] == pytest.approx(1 / 10) and seen[0][1].startswith("exact · topic · layer 1 of 2")
    assert seen[1][0] == pytest.approx(2 / 10) and seen[1][1].startswith("exact · topic · module 2 of 3")
    assert seen[2] == (0.5, "exact · loading")


def test_calibration_measures_before_any_run(loaded):
    session, _ = loaded
    wb.forget_rates()
    wb.calibrate(session, 8)
    assert all(wb.rate_of(k) and "calibration" in wb.rate_of(k).source for k in ("forward", "gradient", "example"))
    lines = h.estimate_lines(session, "gradient", None)
    assert "on this machine" in lines[0] and "backward pass" in lines[0] and "first probe" in lines[2]
    wb.forget_rates()


# ---------------------------------------------------------------- one colour per expert, one size per file


def test_colour_map_is_stable_per_expert_across_charts():
    experts = ["topic", "mood", "language"]
    colours = fg.colour_map(experts, ["#1 apl", "#2 ties"])
    assert fg.colour_map(experts) == {k: v for k, v in colours.items() if k in experts + ["base"]}
    assert len({colours[e] for e in experts}) == 3 and colours["base"] == fg.BASE_COLOUR
    assert not {colours["#1 apl"], colours["#2 ties"]} & {colours[e] for e in experts}
    layers = ["0", "1"]
    values = {e: {"drop_ratio": {k: 0.5 for k in layers}, "weight": {k: 1.0 for k in layers}} for e in experts}
    numbers = {e: [0.1, 0.2] for e in experts}
    charts = [fg.layer_profile_figure(layers, values), fg.magnitude_figure(layers, numbers, numbers),
              fg.comparison_figure(layers, numbers, numbers, {}, {}),
              fg.probe_bars(experts, [("base", {}), ("mood", {}), ("#1 apl", {})], experts=experts)]
    for fig in charts:
        for trace in fig.data:
            name = trace.name.split(" · ")[0]
            if name in experts:
                colour = trace.marker.color if trace.type == "bar" else (trace.line.color or trace.marker.color)
                assert colour == colours[name], (fig.layout.title, trace.name)


def test_export_size_reads_like_the_download_box():
    # gradio's download box divides by 1024 per step and labels it KB / MB: the status line must agree
    assert wb.size_text(368_500_000) == f"{368_500_000 / 1024 ** 2:.1f} MB" == "351.4 MB"
    assert wb.size_text(512) == "512.0 B" and wb.size_text(2048) == "2.0 KB"


# ---------------------------------------------------------------- the guided walk


def test_guide_walks_the_five_steps(loaded):
    session, _ = loaded
    assert wb.guide_line(session, None).startswith("**Step 1 of 5**: press **Load experts**")
    steps, done = [], None
    while (done := wb.next_step(done)) is not None:
        steps.append(done)
    assert steps == list(wb.GUIDE_STEPS) == ["load", "importance", "merge", "probe", "export"]
    line = wb.guide_line(session, "load")
    assert line.startswith("✓ What you just saw: 2 experts") and "**Step 2 of 5**: press **Compute importance**" in line
    views = h.guide_views(session, "load")
    assert [u.get("elem_classes") for u in views[1:]] == [[], h.GUIDE_CLASSES, [], [], []]
    assert views[0]["elem_classes"] == ["ml-guide-on"] and h.guide_views(session, "export")[0]["elem_classes"] == []
    wb.merge(session, "task_arithmetic", {"lambda": 1.0})
    wb.run_probe(session)
    assert "mean accuracy" in wb.guide_line(session, "probe")
    assert "That is the whole loop" in wb.guide_line(session, "export")
