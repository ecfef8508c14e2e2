"""The pruning chart and its text twin from hand-made curves; the stored analyses, only for their zoo."""

from __future__ import annotations

import json
from types import SimpleNamespace

from components import analyses as an
from components import figures as fg
from merging.apl.pruning import CurvePoint, PruningCurve
from merging.workbench import findings as fd

SCORES = {  # strategy → fraction → scores per seed (0, 1, 2); deterministic strategies have seed 0 only
    "dare": {0.5: [0.80, 0.78, 0.82], 0.95: [0.60, 0.64, 0.62]},
    "magnitude": {0.5: [0.83], 0.95: [0.77]},
    "apl_layer": {0.5: [0.84, 0.85, 0.83], 0.95: [0.80, 0.81, 0.82]},
}


def _curve() -> PruningCurve:
    points = tuple(CurvePoint(sid, p, seed, score) for sid, by_p in SCORES.items() for p, values in by_p.items()
                   for seed, score in enumerate(values))
    return PruningCurve("topic", "topic", "accuracy", True, base_score=0.25, expert_score=0.86,
                        fractions=(0.5, 0.95), seeds=(0, 1, 2), points=points)


def test_text_twin_quotes_the_measured_numbers():
    text = fg.pruning_summary(_curve())
    # oracle by hand: at p = 0.95 the means are APL 0.81, magnitude 0.77, DARE 0.62 (range 0.60–0.64)
    assert text == ("Expert topic on its task topic: at p = 0.95, APL per-layer rates keep 0.81 accuracy (3 seeds, "
                    "range 0.80–0.82), magnitude 0.77, DARE 0.62 (3 seeds, range 0.60–0.64). For reference the "
                    "unpruned expert scores 0.86 and the base 0.25.")


def test_text_twin_without_p_095_picks_the_widest_gap():
    points = tuple(pt for pt in _curve().points if pt.fraction == 0.5)
    curve = PruningCurve("topic", "topic", "accuracy", True, 0.25, 0.86, (0.5,), (0, 1, 2), points)
    assert "at p = 0.5, APL per-layer rates keep 0.84 accuracy" in fg.pruning_summary(curve)


def test_figure_lines_bands_and_references():
    curve = _curve()
    fig = fg.pruning_figure(curve, expert_colour="#0072B2")
    lines = {t.name: t for t in fig.data if t.mode == "lines+markers"}
    assert set(lines) == {fg.strategy_name(s) for s in SCORES}
    for sid, by_p in SCORES.items():
        trace = lines[fg.strategy_name(sid)]
        assert list(trace.y) == [sum(v) / len(v) for v in by_p.values()]
    colours = {t.line.color for t in lines.values()}
    assert len(colours) == len(lines)  # one colour per strategy
    bands = [t for t in fig.data if t.fill == "toself"]
    assert {t.legendgroup for t in bands} == {"dare", "apl_layer"}  # magnitude has one seed: no band
    dare = next(t for t in bands if t.legendgroup == "dare")
    assert list(dare.y) == [0.82, 0.64, 0.60, 0.78]  # max at each p, then min back
    assert list(fig.layout.xaxis.ticktext) == ["0.5", "0.95"]  # p named, placed by the share kept
    refs = {t.name: t for t in fig.data if t.mode == "lines"}
    assert list(refs["base"].y) == [0.25, 0.25] and list(refs["expert topic (unpruned)"].y) == [0.86, 0.86]
    assert fg.strategy_name("dare", short=True) == "DARE" and fg.strategy_name("magnitude", short=True) == "magnitude"


def test_stored_analyses_only_for_their_zoo(tmp_path):
    zoo = SimpleNamespace(name="default")
    data, why = fd.analyses_for(zoo, tmp_path)
    assert data is None and "bench_apl_analyses.py --zoo default" in why
    record = {"zoo": "default", "zoo_fingerprint": None, "commands": ["python benchmarks/bench_apl_analyses.py"],
              "pruning": [_curve().to_json()], "drop_range": [{"p": 0.9, "apl": 0.8}, {"p": 0.99, "apl": 0.6}],
              "out_of_domain": {"topic": {"apl": 0.7, "dare": 0.6}}, "summary": "APL keeps more. It costs more."}
    (tmp_path / fd.ANALYSES_JSON).write_text(json.dumps(record), encoding="utf-8")
    data, why = fd.analyses_for(zoo, tmp_path)
    assert data == record and why == ""
    data, why = fd.analyses_for(SimpleNamespace(name="toy"), tmp_path)
    assert data is None and "not this one ('toy')" in why
    assert an.stored_curve(record, "topic") == _curve()
    assert an.records_table(record["drop_range"]) == {"headers": ["p", "apl"], "data": [[0.9, 0.8], [0.99, 0.6]]}
    assert an.records_table(record["out_of_domain"]) == {"headers": ["name", "apl", "dare"],
                                                         "data": [["topic", 0.7, 0.6]]}


def test_quick_pruning_counts_merges():
    # 5 strategies: 3 random ones over 2 seeds, 2 deterministic once, at 3 fractions
    assert an.pruning_steps() == (3 * 2 + 2) * 3
    assert an.pruning_steps((0.5, 0.9), (0, 1, 2)) == (3 * 3 + 2) * 2


def test_stored_views_show_the_file_or_hide_the_empty_parts(tmp_path, monkeypatch):
    session = SimpleNamespace(refs={"topic": "zoo:default/topic"}, experts=["topic"], base_ref="zoo:default/base")
    monkeypatch.setattr(fd, "BENCH_DIR", tmp_path)
    monkeypatch.setattr(fd, "loaded_zoo", lambda s: SimpleNamespace(name="default"))
    monkeypatch.setattr(an.h, "session_of", lambda s: s)
    text, plot, twin, pick, table = an.stored_views(session, "topic")
    assert "No stored APL analyses yet" in text and plot["visible"] is False and table["visible"] is False
    record = {"zoo": "default", "pruning": [_curve().to_json()], "taus": [{"tau1": 2, "mean": 0.61}],
              "summary": "APL keeps more at p = 0.95. Magnitude is close."}
    (tmp_path / fd.ANALYSES_JSON).write_text(json.dumps(record), encoding="utf-8")
    text, plot, twin, pick, table = an.stored_views(session, "topic")
    assert text == record["summary"] and plot["visible"] is True
    assert twin == fg.pruning_summary(_curve())
    assert pick["choices"] == ["taus"] and table["value"] == {"headers": ["tau1", "mean"], "data": [[2, 0.61]]}


def test_the_page_names_the_analyses_runs_without_the_machine_s_scratch_paths():
    """The stored commands carry scratch files of the machine that ran them (checkpoints, parts to combine): the
    page counts the runs and points to the results file in the repository instead of printing those paths."""
    data = {"commands": ["python benchmarks/bench_apl_analyses.py --only 1 --checkpoint /work/aa/ck.json",
                         "python benchmarks/bench_apl_analyses.py --only 2 --json-only /tmp/p2.json",
                         "python benchmarks/bench_apl_analyses.py --combine /work/aa/p1.json /tmp/p2.json"]}
    line = an.measured_line(data)
    assert "/work/" not in line and "/tmp/" not in line
    assert "2 runs of `benchmarks/bench_apl_analyses.py`, joined with its `--combine`" in line
    assert "`benchmarks/RESULTS-apl-analyses.md`" in line
    assert an.measured_line({"commands": ["python benchmarks/bench_apl_analyses.py"]}).startswith(
        "\n\nMeasured by 1 run of `benchmarks/bench_apl_analyses.py`;")
    assert an.measured_line({}) == ""
    parts = {**data, "meta": {"parts": [{"command": data["commands"][1]}]}}  # a combined file: its shown runs
    assert "Measured by 1 run of `benchmarks/bench_apl_analyses.py`, joined with its `--combine`" in an.measured_line(parts)


def test_a_perplexity_curve_is_drawn_on_a_log_axis():
    """An LM expert's perplexity ratio: APL locate's blow-up at p = 0.99 (millions) must not flatten the other
    lines (as it did on the stored LM curve), so a lower-is-better ratio gets a log axis; accuracy stays 0–1."""
    points = (CurvePoint("dare", 0.5, 0, 0.6), CurvePoint("dare", 0.99, 0, 1.3),
              CurvePoint("apl_locate", 0.5, 0, 0.7), CurvePoint("apl_locate", 0.99, 0, 4.2e7))
    curve = PruningCurve("de", "de", "perplexity / base perplexity", False, base_score=1.0, expert_score=0.51,
                         fractions=(0.5, 0.99), seeds=(0,), points=points)
    axis = fg.pruning_figure(curve).layout.yaxis
    assert axis.type == "log" and axis.title.text.endswith("(lower is better; log)")
    accuracy = fg.pruning_figure(_curve()).layout.yaxis
    assert accuracy.type != "log" and tuple(accuracy.range) == (0, 1)
