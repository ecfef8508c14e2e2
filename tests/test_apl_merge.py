"""The ``apl`` merge method: reduces to DARE / task arithmetic, honours overrides, drops per unit."""

import math

import apl_fixtures as fx
import pytest
import torch

from merging import MergeEngine, MergeLabError, MergeSettings, engine
from merging.apl.calibration import calibrate
from merging.apl.importance import compute_importance
from merging.methods import get_method
from merging.methods.apl import unit_magnitude_mask


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with fx.one_thread():
        yield


@pytest.fixture(scope="module")
def setup():
    expert_set = fx.expert_set(n_experts=3, frozen=("embeddings.word_embeddings.weight",))
    loss = {t: _loss(i) for i, t in enumerate(expert_set.experts)}
    importance = compute_importance(expert_set, None, None, mode="gradient", level="all", loss_fn=loss)
    return expert_set, importance


def _loss(seed):
    """A smooth non-linear stand-in task loss (no tokenizer needed)."""
    generator = torch.Generator().manual_seed(seed)
    directions = {}

    def loss(state):
        total = 0.0
        for name, value in state.items():
            if name not in directions:
                directions[name] = torch.randn(value.shape, generator=generator)
            total = total + torch.tanh((directions[name] * value).sum() / value.numel() ** 0.5) ** 2
        return total
    return loss


def _merge(expert_set, method, params=None, expert_params=None, extras=None, seed=11):
    settings = MergeSettings.build(expert_set, method, params or {}, expert_params, seed, extras)
    return MergeEngine(expert_set, cache=False).merge(settings).tensors


def _same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        if atol:
            torch.testing.assert_close(a[name].float(), b[name].float(), rtol=0, atol=atol)
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("within", ["uniform", "hidden"])
@pytest.mark.parametrize("drop_ratio", [0.5, 0.3])
def test_infinite_temperatures_reduce_to_dare_linear(setup, within, drop_ratio):
    expert_set, importance = setup
    table = calibrate(importance, expert_set, drop_ratio=drop_ratio, tau1=math.inf, tau2=math.inf, within_layer=within)
    apl = _merge(expert_set, "apl", {"drop_ratio": drop_ratio, "tau1": 1e12, "within_layer": within},
                 table.to_expert_params(), table.extras())
    dare = _merge(expert_set, "dare_linear", {"drop_ratio": drop_ratio})
    if within == "uniform":
        _same(apl, dare)  # bit for bit: same generators, same keep rate, same arithmetic
    else:
        _same(apl, dare, atol=1e-6)


def test_drop_zero_is_task_arithmetic(setup):
    expert_set, importance = setup
    table = calibrate(importance, expert_set, drop_ratio=0.0, tau1=math.inf, tau2=math.inf)
    _same(_merge(expert_set, "apl", {"drop_ratio": 0.0}, table.to_expert_params()),
          _merge(expert_set, "task_arithmetic"))


def test_sign_election_matches_dare_ties(setup):
    expert_set, _ = setup
    _same(_merge(expert_set, "apl", {"sign_election": True, "drop_ratio": 0.4}),
          _merge(expert_set, "dare_ties", {"drop_ratio": 0.4, "normalize": False}))


def test_calibrated_weights_and_drops_follow_the_formula(setup):
    """Θ = base + λ Σ_t w_t^k · dare(Δ_t, p_t^k), checked on one tensor against kernels.dare."""
    from merging.methods import kernels

    expert_set, importance = setup
    table = calibrate(importance, expert_set, tau1=1.0, tau2=1.0)
    merged = _merge(expert_set, "apl", {"lambda": 0.7}, table.to_expert_params())
    name = "encoder.layer.0.intermediate.dense.weight"
    expected = expert_set.base.get(name).float().clone()
    for t in expert_set.experts:
        p = table.drop[t]["0"]
        expected += 0.7 * table.weight[t]["0"] * kernels.dare(expert_set.delta(t, name), p, seed=11, expert=t, name=name)
    torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)
    norm = "encoder.layer.0.output.LayerNorm.weight"  # norms: weighted, never dropped
    expected = expert_set.base.get(norm).float() + 0.7 * sum(table.weight[t]["0"] * expert_set.delta(t, norm)
                                                               for t in expert_set.experts)
    torch.testing.assert_close(merged[norm], expected, rtol=1e-6, atol=1e-6)


def test_overriding_one_cell_remerges_only_that_layer(setup):
    expert_set, importance = setup
    table = calibrate(importance, expert_set, within_layer="hidden")
    params = table.to_expert_params()
    merger = MergeEngine(expert_set)
    first = merger.merge(MergeSettings.build(expert_set, "apl", {"within_layer": "hidden"}, params, 3, table.extras()))
    params["task1"]["drop_ratio"]["1"] = 0.9
    second = merger.merge(MergeSettings.build(expert_set, "apl", {"within_layer": "hidden"}, params, 3, table.extras()))
    assert second.changed_layers == ["1"]
    assert all(expert_set.layout[n].layer == "1" for n in second.recomputed)
    assert not torch.equal(first.tensors["encoder.layer.1.output.dense.weight"],
                           second.tensors["encoder.layer.1.output.dense.weight"])

    assert merger.cached_bytes() > 0
    assert merger.clear_cache() == len(first.recomputed)  # every merged tensor was cached once
    assert merger.cached_bytes() == 0
    third = merger.merge(MergeSettings.build(expert_set, "apl", {"within_layer": "hidden"}, params, 3, table.extras()))
    assert sorted(third.recomputed) == sorted(first.recomputed)
    for name, tensor in second.tensors.items():  # recomputed after clearing: the same tensors, bitwise
        assert torch.equal(tensor, third.tensors[name]), name


def test_row_chunks_merge_like_whole_tensors(setup, monkeypatch):
    expert_set, importance = setup
    table = calibrate(importance, expert_set, within_layer="hidden", tau1=0.5)
    args = ({"within_layer": "hidden"}, table.to_expert_params(), table.extras())
    whole = _merge(expert_set, "apl", *args)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 4 * 16 * 5)  # 5 rows of a [*, 16] matrix per chunk
    _same(_merge(expert_set, "apl", *args), whole)


def test_magnitude_drop_keeps_top_k(setup):
    expert_set, _ = setup
    merged = _merge(expert_set, "apl", {"drop": "magnitude", "drop_ratio": 0.75})
    only = _merge(expert_set, "apl", {"drop": "magnitude", "drop_ratio": 0.75},
                  {t: {"weight": 0.0} for t in list(expert_set.experts)[1:]})
    name = "encoder.layer.0.attention.self.value.weight"
    delta = only[name] - expert_set.base.get(name)
    assert int(torch.count_nonzero(delta)) == round(0.25 * delta.numel())
    expected = expert_set.base.get(name).float().clone()
    for t in expert_set.experts:  # Θ = base + Σ_t Δ_t kept at its top 25% |Δ_t| (no rescale for magnitude)
        d = expert_set.delta(t, name).reshape(-1)
        top = d.abs().argsort(descending=True, stable=True)[:round(0.25 * d.numel())]
        kept = torch.zeros_like(d)
        kept[top] = d[top]
        expected += kept.reshape(delta.shape)
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_unit_magnitude_mask_counts_per_unit():
    delta = torch.randn(4, 10)
    keep = torch.tensor([0.1, 0.5, 1.0, 0.3]).reshape(4, 1)
    mask = unit_magnitude_mask(delta, keep, 0)
    assert mask.sum(1).tolist() == [1, 5, 10, 3]
    assert torch.all(delta.abs()[1][mask[1]].min() >= delta.abs()[1][~mask[1]].max())
    columns = unit_magnitude_mask(delta.T.contiguous(), keep.reshape(1, 4), 1)
    assert columns.sum(0).tolist() == [1, 5, 10, 3]


def test_unit_magnitude_mask_broadcasts_one_rate_and_keeps_nan_last():
    """One rate for every unit keeps that share of each; a NaN score ranks below every magnitude (the order of
    a stable argsort of −|Δ|), so it is dropped first."""
    delta = torch.randn(3, 6)
    mask = unit_magnitude_mask(delta, torch.tensor([0.5]), 0)
    assert mask.sum(1).tolist() == [3, 3, 3]
    scores = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])
    assert unit_magnitude_mask(scores, torch.tensor([0.5]), 0).tolist() == [[False, False, True, True]]


def test_hidden_without_profiles_is_a_clear_error(setup):
    expert_set, _ = setup
    with pytest.raises(MergeLabError, match="within_layer"):
        _merge(expert_set, "apl", {"within_layer": "hidden"})


def test_registry_declares_apl_and_fisher():
    apl = get_method("apl").describe()
    assert {"drop_ratio", "tau1", "tau2", "q_min", "lambda", "within_layer", "drop", "sign_election", "weight"} \
        <= {p["name"] for p in apl["params"]}
    assert {"few_shot", "importance"} <= set(apl["needs"])
    assert "few_shot" in get_method("fisher").describe()["needs"]
    assert get_method("apl").prepare is not None and get_method("fisher").prepare is not None
