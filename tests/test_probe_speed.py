"""The page's probe after the zoo is built: reference rows read from the zoo (written once at build), and a
merge after one per-layer slider change re-merging that layer only and re-running the probe from it."""

import re

import pytest
import torch

import merging.workbench.probe as wb_probe
from merging import workbench as wb
from merging.zoo.probe import Prober, _Body, zoo_reference_dir


def _fresh_prober(session):
    models = wb.models_for(session)
    models.prober, models.prober_key = None, None  # another test of this process may have built one
    return models


def test_zoo_build_writes_the_reference_rows(app_zoo):
    zoo, _ = app_zoo
    prober = Prober.for_zoo(zoo)
    assert prober._cache_file().is_file() and prober._cache_file().parent == zoo_reference_dir(zoo)


def test_first_probe_reads_the_zoo_rows_and_they_equal_a_fresh_computation(loaded, monkeypatch):
    session, zoo = loaded
    oracle = Prober.for_zoo(zoo, disk_cache=False).reference()  # computed here, no file read
    _fresh_prober(session)

    def refuse(self):
        raise AssertionError("the reference rows were computed, not read from the zoo")

    monkeypatch.setattr(Prober, "_compute_reference", refuse)
    monkeypatch.setattr(wb_probe, "tempfile", _NoTemp())  # no machine-wide cache to fall back on
    wb.merge(session, "task_arithmetic", {})
    report = wb.run_probe(session)
    for row in oracle.rows:
        got = report.row(row.name).metrics
        for task, metrics in row.metrics.items():
            assert got[task] == pytest.approx(metrics, rel=1e-6, abs=1e-7)


class _NoTemp:
    """A tempfile stand-in whose folder holds nothing (a first probe on a fresh machine)."""

    def __init__(self):
        import tempfile

        self._dir = tempfile.mkdtemp()

    def gettempdir(self):
        return self._dir


def test_slider_change_remerges_one_layer_and_probes_from_it(loaded, monkeypatch):
    session, _ = loaded
    _fresh_prober(session)
    wb.merge(session, "dare_linear", {})
    wb.run_probe(session)
    stages = []
    forward = _Body.stage_forward

    def counting(self, stage, hidden, batch):
        stages.append(stage)
        return forward(self, stage, hidden, batch)

    monkeypatch.setattr(_Body, "stage_forward", counting)
    last = session.layers[-2]  # the last block
    wb.set_cell(session, session.experts[0], last, wb.DROP, 0.37, "dare_linear")
    summary = wb.merge(session, "dare_linear", {})
    assert summary.changed_layers == [last] and summary.recomputed > 0
    report = wb.run_probe(session)
    n_layers = len(session.layers) - 2
    assert stages and set(stages) == {int(last) + 1, n_layers + 1}  # that block and the pooler, nothing below
    with torch.no_grad():  # the replayed row equals a full probe of the same body (a fresh prober)
        full = Prober(*_inputs(session)).probe_body(wb.merged_tensors(session))
    for task, metrics in full.metrics.items():
        assert report.row(session.last_label).metrics[task] == pytest.approx(metrics, rel=1e-6, abs=1e-7)


def _inputs(session):
    from merging.workbench.probe import _probe_inputs

    base, experts, sets, _ = _probe_inputs(session, wb.models_for(session))
    return base, experts, sets


def test_sweep_scores_every_point_on_one_seeded_probe_subset(loaded, monkeypatch):
    session, _ = loaded
    monkeypatch.setattr(wb_probe, "SWEEP_PROBE_ROWS", 10)
    prober = wb_probe.sweep_prober(session, wb.models_for(session))
    assert all(len(rows) == 10 for rows in prober.sets.values())
    again = wb_probe.sweep_prober(session, wb.models_for(session))
    assert again is prober  # built once per selection
    full = {t: session.data[t].probe for t in session.experts}
    assert all(set(rows) <= set(full[t]) for t, rows in prober.sets.items())
    out = wb.drop_sweep(session, ratios=(0.2, 0.6), methods=("dare_linear",))
    # the oracle: the same merge probed by a prober built here on the same subset
    from merging.engine import MergeEngine, MergeSettings

    models = wb.models_for(session)
    settings = MergeSettings.build(models.expert_set, "dare_linear", {"drop_ratio": 0.6}, seed=session.seed)
    body = MergeEngine(models.expert_set, cache=False).merge(settings).tensors
    base, experts, _ = _inputs(session)
    row = Prober(base, experts, prober.sets).probe_body(body)
    assert out["dare_linear"][1] == pytest.approx(row.mean("accuracy"), abs=1e-9)


def test_first_look_scores_its_subset_first_and_leaves_the_full_probe_unchanged(loaded, monkeypatch):
    """The page's probe runs a seeded subset's texts first and reports them (the progress line) while the
    rest run: the first look equals a prober built on that subset alone, it comes before the other texts'
    forward, its change since the previous merge is the change on the same texts, and the full result is the
    plain probe's."""
    session, _ = loaded
    monkeypatch.setattr(wb_probe, "FIRST_LOOK_ROWS", 10)
    base, experts, sets = _inputs(session)
    assert all(len(rows) > 10 for rows in sets.values())
    _fresh_prober(session)
    stages, lines = [], []
    forward = _Body.stage_forward

    def counting(self, stage, hidden, batch):
        stages.append(stage)
        return forward(self, stage, hidden, batch)

    monkeypatch.setattr(_Body, "stage_forward", counting)
    subsets = wb_probe.first_look_positions(sets)
    oracle = Prober(base, experts, {t: [sets[t][i] for i in subsets[t]] for t in sets})

    def merge_and_probe(value):
        wb.set_cell(session, session.experts[0], session.layers[1], wb.DROP, value, "dare_linear")
        wb.merge(session, "dare_linear", {})
        stages.clear()
        report = wb.run_probe(session, progress=lambda f, m: lines.append((m, len(stages))))
        looks = [(m, n, len(stages)) for m, n in lines if m.startswith("first look")]
        lines.clear()
        return report, looks[-1], oracle.probe_body(wb.merged_tensors(session))

    wb.merge(session, "dare_linear", {})
    wb.run_probe(session)  # the reference rows and a first merge: what follows times only a slider's merge
    session.first_looks.clear()
    first, (line, done, total), expected = merge_and_probe(0.3)
    label = session.last_label
    prober = wb.models_for(session).prober
    per_batch = total // len(prober.batches)
    assert done == prober.n_first_look_batches * per_batch < total  # the subset ran first, alone
    look = session.first_looks[session.merge_key]
    for task, metrics in expected.metrics.items():
        assert look[task] == pytest.approx(metrics, rel=1e-6, abs=1e-7)
    assert f"mean accuracy {100 * expected.mean('accuracy'):.1f}" in line and "since" not in line
    full = Prober(base, experts, sets).probe_body(wb.merged_tensors(session))
    for task, metrics in full.metrics.items():
        assert first.row(session.last_label).metrics[task] == pytest.approx(metrics, rel=1e-6, abs=1e-7)

    _, (line, _, _), moved = merge_and_probe(0.9)
    change = 100 * (moved.mean("accuracy") - expected.mean("accuracy"))
    assert f"{change:+.1f} points on the same texts since {label}" in line


@pytest.mark.parametrize("kind, settings, said", [
    ("deberta-v2", dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        conv_kernel_size=3, relative_attention=True), "encoder parts outside its blocks (rel_embeddings, conv)"),
    ("gpt2", dict(n_embd=16, n_layer=2, n_head=2), "no embeddings + encoder.layer blocks"),
])
def test_the_classifier_probe_refuses_an_encoder_it_cannot_stage(tmp_path, kind, settings, said):
    """The probe calls embeddings, each encoder.layer block and the pooler itself: DeBERTa-v2's conv after block 0
    (and its relative embeddings) would be skipped, every score silently wrong, so such a base is refused in words;
    a BERT base is run."""
    from transformers import AutoConfig, AutoModel

    from merging.errors import MergeLabError

    AutoModel.from_config(AutoConfig.for_model(kind, vocab_size=64, **settings)).save_pretrained(tmp_path / kind)
    with pytest.raises(MergeLabError, match=re.escape(said)) as refused:
        _Body(tmp_path / kind)
    assert f"this base ({kind})" in str(refused.value) and "Importance, merging and export work" in str(refused.value)
    bert = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    AutoModel.from_config(AutoConfig.for_model("bert", vocab_size=64, **bert)).save_pretrained(tmp_path / "bert")
    assert _Body(tmp_path / "bert").n_layers == 2
