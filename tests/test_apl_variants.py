"""APL's measured variants (issue #14): drop = locate / saliency, importance measured at the merge.

Every oracle here is written from the definitions in docs and docstrings, by hand on small tensors:
locate keeps the top round(q · units) hidden units by importance (ties: lower unit index) and scales
them to the tensor's L1 mass; saliency keeps the top round(q · n) entries of |g ⊙ Δ|; merged-point
importance is the loss change of switching part of λΔ_t off at θ_TA = θ0 + λ Σ Δ.
"""

import apl_fixtures as fx
import pytest
import torch

from merging import MergeEngine, MergeLabError, MergeSettings
from merging.apl.defaults import UNIT_EXTRAS
from merging.methods import PerTensor, get_method
from merging.methods.apl import locate_units

DROPS = {"embeddings": 0.4, "0": 0.5, "1": 0.75, "head": 0.3}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with fx.one_thread():
        yield


@pytest.fixture(scope="module")
def expert_set():
    return fx.expert_set(n_experts=2, seed=3)


def _profiles(expert_set, seed=0):
    """Fabricated unit percentiles per module (shared by its weight and bias), with ties: values in
    {0, 0.25, 0.5, 0.75, 1}, so the tie rule (lower unit index first) decides some cuts."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for names in expert_set.layout.unit_modules().values():
        n_units = expert_set.layout[names[0]].n_units
        per_expert = {e: torch.randint(0, 5, (1, n_units), generator=generator).double() / 4
                      for e in expert_set.experts}
        for name in names:
            values[name] = per_expert
    return {UNIT_EXTRAS: PerTensor(values, row_axis=None)}


def _expert_params(expert_set):
    return {e: {"drop_ratio": dict(DROPS), "weight": 1.0} for e in expert_set.experts}


def _merge(expert_set, shared, extras, seed=5):
    settings = MergeSettings.build(expert_set, "apl", shared, _expert_params(expert_set), seed, extras)
    return MergeEngine(expert_set, cache=False).merge(settings).tensors


def _delta(expert_set, expert, name):
    return expert_set.experts[expert].get(name).float() - expert_set.base.get(name).float()


# ---- locate -----------------------------------------------------------------------------------

def test_locate_units_keeps_exact_top_k_with_ties_by_index():
    scores = torch.tensor([0.5, 1.0, 0.5, 0.0, 0.5, 1.0, 0.25, 0.5])
    # keep 0.5 · 8 = 4: both 1.0s (units 1, 5), then the first two 0.5s by index (units 0, 2)
    assert locate_units(scores, 0.5).nonzero().reshape(-1).tolist() == [0, 1, 2, 5]
    assert locate_units(scores, 0.01).nonzero().reshape(-1).tolist() == [1]  # at least one unit while q > 0
    assert int(locate_units(scores, 1.0).sum()) == 8
    assert int(locate_units(scores, 0.0).sum()) == 0


def _hand_locate(delta, percentiles, keep_rate):
    """Oracle: sort units by (−score, index), keep the first round(q · U) (≥ 1), scale to Σ|Δ|."""
    units = percentiles.reshape(-1).tolist()
    k = max(1, round(keep_rate * len(units)))
    kept = sorted(range(len(units)), key=lambda j: (-units[j], j))[:k]
    out = torch.zeros_like(delta)
    out[kept] = delta[kept]  # units on axis 0 (rows; a bias's entries)
    return out * (delta.abs().sum() / out.abs().sum())


def test_locate_merge_equals_hand_top_units_with_mass_preserved(expert_set):
    extras = _profiles(expert_set)
    merged = _merge(expert_set, {"drop": "locate", "within_layer": "hidden"}, extras)
    random = _merge(expert_set, {"drop": "random", "within_layer": "uniform"}, {})
    layout = expert_set.layout
    for name, info in layout.tensors.items():
        if not info.droppable:
            continue
        if info.unit_axis is None:  # the embeddings have no units: the seeded random drop at the layer's rate
            assert torch.equal(merged[name], random[name]), name
            continue
        expected = expert_set.base.get(name).float()
        for e in expert_set.experts:
            profile = extras[UNIT_EXTRAS].values[name][e]
            expected = expected + _hand_locate(_delta(expert_set, e, name), profile, 1 - DROPS[info.layer])
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7)


def test_locate_kept_share_and_mass_per_expert(expert_set):
    """One expert alone: exactly round(q · U) units are non-zero and Σ|Δ_merged| = Σ|Δ|."""
    single = fx.expert_set(n_experts=1, seed=3)
    merged = _merge(single, {"drop": "locate", "within_layer": "hidden"}, _profiles(single))
    for name, info in single.layout.tensors.items():
        if not info.droppable or info.unit_axis is None:
            continue
        delta = _delta(single, "task0", name)
        out = merged[name] - single.base.get(name).float()
        rows = out.reshape(out.shape[0], -1).ne(0).any(dim=1)
        assert int(rows.sum()) == max(1, round((1 - DROPS[info.layer]) * info.n_units)), name
        torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)


def test_locate_needs_hidden_profiles(expert_set):
    with pytest.raises(MergeLabError, match="within_layer='hidden'"):
        _merge(expert_set, {"drop": "locate", "within_layer": "uniform"}, {})
    with pytest.raises(MergeLabError, match="per-unit importance profiles"):
        _merge(expert_set, {"drop": "locate", "within_layer": "hidden"}, {})
    spec = get_method("apl")
    with pytest.raises(MergeLabError, match="within_layer='hidden'") as info:
        spec.prepare(expert_set, None, None, params={"drop": "locate", "within_layer": "uniform"})
    assert info.value.field == "parameters.within_layer"


def test_new_choices_are_declared():
    spec = get_method("apl")
    assert {"locate", "saliency"} <= set(spec.param("drop").choices)
    assert spec.param("importance_at").choices == ("base", "merged")
    assert spec.param("drop").default == "random" and spec.param("importance_at").default == "base"
    for name in ("drop", "importance_at", "saliency_rescale"):
        assert spec.param(name).help
    assert spec.is_row_separable({"drop": "random"})
    assert not spec.is_row_separable({"drop": "locate"}) and not spec.is_row_separable({"drop": "saliency"})
