"""Pruning one expert (merging.apl.pruning, workbench.analyses.pruning_curve, bench_apl_analyses.py).

Oracles are written here from the definitions: DARE keeps an entry where its seeded uniform falls under the
keep rate and rescales by 1/keep; APL locate keeps the round(q · units) units of highest importance
(ties: lower index) and scales them to the tensor's L1 mass; ``at`` is the mean, min and max over seeds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from apl_fixtures import examples, expert_set, one_thread, tokenizer

from merging.apl import pruning as P
from merging.errors import MergeLabError
from merging.methods import kernels


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(one-expert set, its gradient importance at every level) of the tiny in-memory experts."""
    from merging.apl.importance import compute_importance

    with one_thread():
        es = expert_set(2)
        one = P.one_expert_set(es, "task0")
        tok = tokenizer(tmp_path_factory.mktemp("tok"))
        importance = compute_importance(one, {"task0": examples(12, 3)}, tok, mode="gradient", level="all")
        yield one, importance


def _droppable(one):
    return [n for n, i in one.layout.tensors.items() if i.role == "merge" and i.droppable]


def _locate_available() -> bool:
    return P.unavailable_reason(P.strategy("apl_locate")) is None


@pytest.mark.parametrize("sid", [s.id for s in P.STRATEGIES])
def test_each_strategy_at_zero_drop_is_the_expert(pruned, sid):
    one, importance = pruned
    s = P.strategy(sid)
    if P.unavailable_reason(s):
        pytest.skip(P.unavailable_reason(s))
    with one_thread():
        tensors = P.prune(s, one, 0.0, seed=3, importance=importance)
    expert = one.experts["task0"]
    for name, info in one.layout.tensors.items():
        if info.role != "merge":
            continue
        base = one.base.get(name).float()
        oracle = base + (expert.get(name).float() - base)  # what base + λ·Δ gives at λ = 1, bit for bit
        torch.testing.assert_close(tensors[name].float(), oracle, rtol=0, atol=0, msg=f"{sid}: {name}")


def test_dare_strategy_is_the_dare_kernel(pruned):
    one, _ = pruned
    p, seed = 0.7, 5
    with one_thread():
        tensors = P.prune(P.strategy("dare"), one, p, seed=seed)
    for name in _droppable(one):
        base = one.base.get(name).float()
        delta = one.experts["task0"].get(name).float() - base
        u = kernels.uniforms(seed, "task0", name, delta.numel()).reshape(delta.shape)
        oracle = base + torch.where(u < 1 - p, delta / (1 - p), torch.zeros_like(delta))  # DARE's definition
        torch.testing.assert_close(tensors[name].float(), oracle, rtol=1e-6, atol=1e-7)
        ref = base + kernels.dare(delta, p, seed=seed, expert="task0", name=name, rescale=True, numel=delta.numel())
        assert torch.equal(tensors[name].float(), ref)


@pytest.mark.skipif(not _locate_available(), reason="APL drop='locate' is not in this checkout")
def test_locate_keeps_exactly_the_most_important_units(pruned):
    from merging.apl.calibration import calibrate

    one, importance = pruned
    p = 0.6
    with one_thread():
        tensors = P.prune(P.strategy("apl_locate"), one, p, seed=0, importance=importance)
    table = calibrate(importance, one, drop_ratio=p, within_layer="hidden")
    layout = one.layout
    checked = 0
    for module, names in layout.unit_modules().items():
        scores = [abs(float(v)) for v in importance.unit_scores("task0", module)]
        for name in names:
            info = layout.tensors[name]
            keep = 1.0 - table.drop["task0"][info.layer]
            k = max(1, min(len(scores), int(round(keep * len(scores)))))
            expected = sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]  # highest first, ties by index
            base = one.base.get(name).float()
            delta = one.experts["task0"].get(name).float() - base
            got = (tensors[name].float() - base).movedim(info.unit_axis, 0).reshape(len(scores), -1)
            kept = [j for j in range(len(scores)) if bool(got[j].abs().sum() > 0)]
            assert kept == sorted(expected), name
            assert math.isclose(float(got.abs().sum()), float(delta.abs().sum()), rel_tol=1e-4), name
            checked += 1
    assert checked > 0


def _curve():
    pts = (P.CurvePoint("dare", 0.5, 0, 0.8), P.CurvePoint("dare", 0.5, 1, 0.6), P.CurvePoint("dare", 0.5, 2, 0.7),
           P.CurvePoint("magnitude", 0.5, 0, 0.75), P.CurvePoint("dare", 0.9, 0, 0.4), P.CurvePoint("dare", 0.9, 1, 0.5))
    return P.PruningCurve("topic", "topic", "accuracy", True, 0.3, 0.9, (0.5, 0.9), (0, 1, 2), pts)


def test_curve_at_and_json_round_trip():
    c = _curve()
    mean, lo, hi = c.at("dare", 0.5)
    assert math.isclose(mean, (0.8 + 0.6 + 0.7) / 3) and (lo, hi) == (0.6, 0.8)
    assert c.at("magnitude", 0.5) == (0.75, 0.75, 0.75)
    assert math.isclose(c.at("dare", 0.9)[0], 0.45)
    back = P.PruningCurve.from_json(json.loads(json.dumps(c.to_json())))
    assert back == c
    with pytest.raises(MergeLabError, match="no point for strategy 'apl_layer'"):
        c.at("apl_layer", 0.5)
    with pytest.raises(MergeLabError, match="not a pruning curve record"):
        P.PruningCurve.from_json({"expert": "x"})


def test_bad_grid_is_refused_in_words():
    with pytest.raises(MergeLabError, match=r"fractions must be .* in \[0, 1\)"):
        P.check_grid([1.0], [0], None)
    with pytest.raises(MergeLabError, match="unknown pruning strategy 'random'"):
        P.check_grid([0.5], [0], ["random"])
    with pytest.raises(MergeLabError, match="at least one seed"):
        P.check_grid([0.5], [], None)


def test_workbench_pruning_curve(loaded):
    from merging.workbench.analyses import pruning_curve

    session, _ = loaded
    expert = session.experts[0]
    with one_thread():
        curve = pruning_curve(session, expert, fractions=(0.0, 0.9), strategies=["dare", "magnitude", "apl_layer"],
                              seeds=(0, 1))
    assert curve.metric == "accuracy" and curve.higher_is_better and curve.fractions == (0.0, 0.9)
    assert len(curve.scores("dare", 0.9)) == 2 and len(curve.scores("magnitude", 0.9)) == 1  # deterministic: once
    for sid in ("dare", "magnitude", "apl_layer"):  # nothing dropped: the unpruned expert's score
        assert math.isclose(curve.at(sid, 0.0)[0], curve.expert_score, abs_tol=1e-6)
    with pytest.raises(MergeLabError, match="no expert 'nobody'"):
        pruning_curve(session, "nobody")


@pytest.mark.slow  # every analysis on the fake zoo: ≈ 15 s of CPU, over a minute of wall time on a loaded machine
def test_bench_quick_writes_both_files(app_zoo, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_apl_analyses

    zoo, _ = app_zoo
    with one_thread():
        assert bench_apl_analyses.main(["--zoo", zoo.name, "--quick", "--n-fewshot", "8", "--fractions", "0.5", "--drop-fractions", "0.9",
                                        "--sizes", "4", "--taus", "2,inf", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "RESULTS-apl-analyses.json").read_text())
    for key in ("zoo", "zoo_fingerprint", "commands", "pruning", "drop_range", "fewshot_size", "taus", "ablation",
                "out_of_domain", "summary"):
        assert key in data, key
    assert data["zoo"] == zoo.name and len(data["pruning"]) == len(zoo.tasks)
    assert not data["meta"]["parts"][0]["failed"]
    P.PruningCurve.from_json(data["pruning"][0])
    text = (tmp_path / "RESULTS-apl-analyses.md").read_text()
    for heading in ("## 1. Pruning one expert", "## 2. Merging across the drop range", "## 3. Few-shot size",
                    "## 4. τ1 and τ2", "## 5. Ablation", "## 6. Out of domain"):
        assert heading in text
    assert data["summary"] in text and data["summary"].count(". ") >= 1


def test_bench_exits_non_zero_when_an_analysis_is_refused(app_zoo, tmp_path, capsys):
    """The fake zoo's 16-example pools cannot give 2 seeds different draws of 16: every analysis is refused,
    the file names why, and the run exits 1 — a run that measured nothing never looks like a success."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_apl_analyses

    zoo, _ = app_zoo
    assert bench_apl_analyses.main(["--zoo", zoo.name, "--quick", "--n-fewshot", "16", "--only", "1",
                                    "--fractions", "0.5", "--out-dir", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "RESULTS-apl-analyses.json").read_text())
    assert "takes the whole pool" in data["meta"]["parts"][0]["failed"]["1"]
    assert "analysis 1 failed" in capsys.readouterr().err
