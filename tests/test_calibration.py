"""APL calibration against the rules in docs/ARCHITECTURE.md: mean keep rate, bounds, temperatures, weights, units."""

import math

import apl_fixtures as fx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from merging import MergeLabError, MergeSettings
from merging.apl.calibration import (
    DeltaSupport,
    calibrate,
    droppable_counts,
    layer_drop_ratios,
    layer_weights,
    normalise,
    softmax,
    solve_keep_rates,
    unit_keep_rates,
    unit_percentiles,
)
from merging.apl.importance import compute_importance

importances = st.lists(st.floats(0.0, 50.0, allow_nan=False), min_size=1, max_size=9)


@settings(max_examples=150, deadline=None)
@given(importances, st.data(), st.floats(0.0, 0.98), st.sampled_from([0.05, 0.5, 2.0, 10.0, math.inf]),
       st.sampled_from([0.0, 0.01, 0.05]))
def test_mean_keep_rate_is_exact_and_bounded(values, data, drop_ratio, tau, q_min):
    if drop_ratio > 1 - q_min:
        drop_ratio = 1 - q_min
    counts = data.draw(st.lists(st.integers(1, 10_000), min_size=len(values), max_size=len(values)))
    layers = [str(i) for i in range(len(values))]
    drops = layer_drop_ratios(dict(zip(layers, values)), dict(zip(layers, counts)), drop_ratio, tau, q_min)
    keep = np.array([1 - drops[k] for k in layers])
    mean = float((np.array(counts) * keep).sum() / sum(counts))
    assert abs(mean - (1 - drop_ratio)) < 1e-6
    assert np.all(keep >= q_min - 1e-12) and np.all(keep <= 1 + 1e-12)


def test_more_important_layers_keep_more():
    drops = layer_drop_ratios({"0": 1.0, "1": 2.0, "2": 4.0}, {"0": 100, "1": 100, "2": 100}, 0.5, 2.0, 0.01)
    assert drops["0"] > drops["1"] > drops["2"]


@pytest.mark.parametrize("tau", [math.inf, 1e12])
def test_infinite_temperature_gives_uniform_drops_and_unit_weights(tau):
    drops = layer_drop_ratios({"0": 0.1, "1": 9.0, "2": 3.0}, {"0": 10, "1": 500, "2": 70}, 0.3, tau, 0.01)
    assert all(abs(p - 0.3) < 1e-9 for p in drops.values())
    weights = layer_weights({"a": {"0": 0.2, "1": 3.0}, "b": {"0": 5.0, "1": 0.1}}, {"a": {"0", "1"}, "b": {"0", "1"}}, tau)
    assert all(abs(w - 1.0) < 1e-9 for per in weights.values() for w in per.values())
    if tau == math.inf:  # exactly p̄: APL then equals DARE bit for bit
        assert set(drops.values()) == {0.3}


def test_drop_ratio_above_one_minus_q_min_is_a_clear_error():
    with pytest.raises(MergeLabError, match="q_min"):
        layer_drop_ratios({"0": 1.0, "1": 2.0}, {"0": 5, "1": 5}, 0.995, 2.0, 0.01)


def test_zero_importance_normalises_to_ones():
    assert normalise([0.0, 0.0, 0.0]).tolist() == [1.0, 1.0, 1.0]
    assert normalise([1.0, 3.0]).tolist() == [0.5, 1.5]
    assert softmax([1.0, 2.0], math.inf).tolist() == [0.5, 0.5]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=2, max_size=6), st.floats(0.05, 20.0))
def test_weights_sum_to_the_number_of_active_experts(values, tau):
    experts = {f"e{i}": {"0": v} for i, v in enumerate(values)}
    weights = layer_weights(experts, {e: {"0"} for e in experts}, tau)
    assert abs(sum(w["0"] for w in weights.values()) - len(values)) < 1e-9
    inactive = layer_weights(experts, {e: ({"0"} if e != "e0" else set()) for e in experts}, tau)
    assert inactive["e0"]["0"] == 1.0
    assert abs(sum(w["0"] for e, w in inactive.items() if e != "e0") - (len(values) - 1)) < 1e-9


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=60), st.floats(0.02, 0.99),
       st.sampled_from([0.5, 2.0, math.inf]))
def test_unit_keep_rates_centre_on_the_layer(scores, layer_keep, tau):
    pct = unit_percentiles(np.array(scores))
    assert np.all((pct >= 0) & (pct <= 1))
    keep = unit_keep_rates(pct, layer_keep, tau, 0.01)
    assert abs(keep.mean() - layer_keep) < 1e-6
    assert np.all(keep >= 0.01 - 1e-12) and np.all(keep <= 1 + 1e-12)
    order = np.argsort(pct, kind="stable")
    assert np.all(np.diff(keep[order]) >= -1e-12)  # higher rank, higher keep rate


def test_solver_is_exact_for_equal_shares():
    assert solve_keep_rates([3, 4], [0.5, 0.5], 0.7, 0.01).tolist() == [0.7, 0.7]


@pytest.fixture(scope="module")
def tiny():
    with fx.one_thread():
        import tempfile
        from pathlib import Path

        expert_set = fx.expert_set(frozen=("embeddings.word_embeddings.weight",))
        tok = fx.tokenizer(Path(tempfile.mkdtemp()))
        examples = {t: fx.examples(10, i) for i, t in enumerate(expert_set.experts)}
        importance = compute_importance(expert_set, examples, tok, mode="gradient", level="all")
        yield expert_set, importance


def test_calibrate_a_tiny_expert_set(tiny):
    expert_set, importance = tiny
    support = DeltaSupport.of(expert_set)
    table = calibrate(importance, expert_set, drop_ratio=0.6, tau1=1.0, tau2=1.0, within_layer="hidden", support=support)
    counts = droppable_counts(expert_set.layout)
    for expert in expert_set.experts:
        layers = sorted(support.droppable[expert])
        assert abs(table.mean_keep(expert, expert_set.layout, layers) - 0.4) < 1e-6
        assert set(table.drop[expert]) == set(expert_set.layout.layers)
        for module, tensors in table.module_tensors.items():
            layer = expert_set.layout[tensors[0]].layer
            keep = table.unit_keep(expert, module, layer)
            assert abs(keep.mean() - (1 - table.drop[expert][layer])) < 1e-6
    assert counts["0"] > 0
    for layer in expert_set.layout.layers:
        assert abs(sum(table.weight[t][layer] for t in expert_set.experts) - 2.0) < 1e-9
    settings = MergeSettings.build(expert_set, "apl", {"within_layer": "hidden"}, table.to_expert_params(),
                                   extras=table.extras())
    assert settings.per_expert["task0"]["drop_ratio"] == table.drop["task0"]
    header, rows = table.rows("weight")
    assert header[0] == "expert" and len(rows) == 2 and '"drop"' in table.to_json()


def test_hidden_calibration_needs_every_unit(tiny):
    expert_set, importance = tiny
    sampled = compute_importance(expert_set, None, None, mode="exact", level=["layer", "hidden"], sample=5,
                                 loss_fn=lambda s: sum(v.sum() for v in s.values()))
    with pytest.raises(MergeLabError, match="every unit"):
        calibrate(sampled, expert_set, within_layer="hidden")
    with pytest.raises(MergeLabError, match="within_layer"):
        calibrate(importance, expert_set, within_layer="rows")
