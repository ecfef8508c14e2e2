"""The seed band equals three single merges' probes, keeps seed s, and is offered only where seeds matter."""

from __future__ import annotations

import pytest

from merging import workbench as wb
from merging.errors import MergeLabError
from merging.methods.base import all_specs
from merging.workbench import seeds as sb

DARE = {"drop_ratio": 0.6, "lambda": 1.0}


def _single_probe(zoo, seed: int) -> dict[str, float]:
    """Oracle: a fresh session's merge with one seed, rebuilt by an uncached engine and scored by the prober
    directly (neither the shared merge cache nor the probe result cache the band filled is read)."""
    from merging.engine import MergeEngine

    base, refs = wb.zoo_refs(zoo)
    session = wb.load_experts(wb.Session(), base, refs, zoo=zoo)
    settings, _ = wb.settings_for(session, wb.snapshot(session, "dare_linear", DARE, seed))
    models = wb.models_for(session)
    body = MergeEngine(models.expert_set, cache=False).merge(settings).tensors
    prober, _ = wb.prober_for(session, models)
    return {t: m["accuracy"] for t, m in prober.probe_body(body, name=f"oracle {seed}").metrics.items()}


def test_band_equals_three_single_merges(loaded):
    session, zoo = loaded
    band, report = sb.run_seed_band(session, "dare_linear", DARE, seed=4)
    assert band.seeds == (4, 5, 6) and band.metric == "accuracy"
    singles = {s: _single_probe(zoo, s) for s in band.seeds}
    for task in band.tasks:
        assert band.scores[task] == tuple(singles[s][task] for s in band.seeds)
        values = [singles[s][task] for s in band.seeds]
        assert band.mean(task) == pytest.approx(sum(values) / 3)
        assert (band.low(task), band.high(task)) == (min(values), max(values))
    # the seeds differ somewhere: DARE at p = 0.6 is not the same merge twice
    assert any(len(set(band.scores[t])) > 1 for t in band.tasks)
    # one history row, seed s's, kept for export, recording the seeds in the row and in its recipe
    assert len(session.history) == 1 and session.seed == 4 and session.merges == 1
    row = session.history[-1]
    assert row["seeds"] == [4, 5, 6] and "seeds 4, 5, 6 (kept: 4)" in row["settings"]
    assert row["recipe"]["seed"] == 4 and "run over seeds 4, 5, 6" in row["recipe"]["notes"]
    assert session.merge_inputs.seed == 4 and report.row(session.last_label).metrics[band.tasks[0]]["accuracy"] \
        == singles[4][band.tasks[0]]
    headers, rows = band.table()
    assert headers[1:4] == ["seed 4", "seed 5", "seed 6"] and rows[-1][0] == "mean over tasks"
    text = sb.band_summary(band)
    assert "Over seeds 4, 5, 6" in text and "seed 4's" in text
    for task in band.tasks:
        assert f"{task} {band.mean(task):.3f} ({band.low(task):.3f}–{band.high(task):.3f})" in text


def test_seed_dependence_from_the_declarations():
    randomised = {s.name for s in all_specs() if s.is_randomised({})}
    assert {"dare_linear", "dare_ties", "della", "apl"} <= randomised
    assert not {"task_arithmetic", "ties", "magnitude", "tsv", "regmean"} & randomised
    assert sb.seed_dependence("apl", {"drop": "magnitude"}) is None  # importance fixes its few-shot draw
    assert "random" in sb.seed_dependence("apl", {"drop": "random"})
    assert "few-shot" in sb.seed_dependence("fisher", {})  # its few-shot draw follows the seed
    assert sb.seed_dependence("task_arithmetic", {}) is None


def test_band_refuses_what_it_cannot_show(loaded):
    session, _ = loaded
    with pytest.raises(MergeLabError, match="does not depend on its seed"):
        sb.run_seed_band(session, "task_arithmetic", {}, seed=0)
    with pytest.raises(MergeLabError, match="largest seed"):
        sb.band_seeds(wb.MAX_SEED - 1)
    assert session.history == [] and session.merge_key is None


def test_stop_leaves_the_session_as_it_was(loaded, monkeypatch):
    from merging.cancel import Cancelled

    session, _ = loaded
    wb.merge(session, "dare_linear", DARE, 0)
    before = (list(session.history), session.merge_key, session.merges, session.seed)
    calls = []

    def stop_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled()

    monkeypatch.setattr(sb, "checkpoint", stop_second)
    with pytest.raises(Cancelled):
        sb.run_seed_band(session, "dare_linear", DARE, seed=7)
    assert (session.history, session.merge_key, session.merges, session.seed) == before
