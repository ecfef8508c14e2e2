"""APL's measured variants (issue #14): drop = locate / saliency, importance measured at the merge.

Every oracle here is written from the definitions in docs and docstrings, by hand on small tensors:
locate keeps the top round(q · units) hidden units by importance (ties: lower unit index) and scales
them to the tensor's L1 mass; saliency keeps the top round(q · n) entries of |g ⊙ Δ|; merged-point
importance is the loss change of switching part of λΔ_t off at θ_TA = θ0 + λ Σ Δ.
"""

import apl_fixtures as fx
import pytest
import torch

from merging import MergeEngine, MergeLabError, MergeSettings, engine
from merging.apl.defaults import SALIENCY_EXTRAS, UNIT_EXTRAS
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


# ---- saliency -----------------------------------------------------------------------------------

def _linear_loss(seed):
    """L(θ) = Σ_n ⟨c_n, θ_n⟩: its gradient is c everywhere, so |g ⊙ Δ| = |c ⊙ Δ| by hand."""
    generator = torch.Generator().manual_seed(seed)
    directions = {}

    def loss(state):
        total = 0.0
        for name, value in state.items():
            if name not in directions:
                directions[name] = torch.randn(value.shape, generator=generator)
            total = total + (directions[name] * value).sum()
        return total
    loss.directions = directions
    return loss


def _hand_top_k(score, keep_rate):
    """Oracle: the round(q · n) largest scores, ties lowest flat index first, as a bool mask."""
    flat = score.reshape(-1).tolist()
    k = round(keep_rate * len(flat))
    kept = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[kept] = True
    return mask.reshape(score.shape)


@pytest.mark.parametrize("rescale", [False, True])
def test_saliency_keeps_hand_top_k_of_gradient_times_delta(expert_set, rescale):
    spec = get_method("apl")
    losses = {e: _linear_loss(i) for i, e in enumerate(expert_set.experts)}
    shared = {"drop": "saliency", "saliency_rescale": rescale, "drop_ratio": 0.6}
    prepared = spec.prepare(expert_set, None, None, params=shared, loss_fn=losses)
    settings = MergeSettings.build(expert_set, "apl", shared, prepared["expert_params"], 3, prepared["extras"])
    merged = MergeEngine(expert_set, cache=False).merge(settings).tensors
    table = prepared["table"]
    for name, info in expert_set.layout.tensors.items():
        if not info.droppable:
            continue
        expected = expert_set.base.get(name).float()
        for e in expert_set.experts:
            delta = _delta(expert_set, e, name)
            keep = 1 - table.drop[e][info.layer]
            kept = delta * _hand_top_k((losses[e].directions[name] * delta).abs(), keep)
            expected = expected + table.weight[e][info.layer] * (kept / keep if rescale else kept)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_saliency_without_its_scores_is_a_clear_error(expert_set):
    with pytest.raises(MergeLabError, match="saliency"):
        _merge(expert_set, {"drop": "saliency"}, {})


# ---- importance at the merged point ---------------------------------------------------------------

def _quadratic_loss(seed):
    """L(θ) = Σ_n Σ a_n (θ_n − m_n)²: curved, so where the gradient is taken matters."""
    generator = torch.Generator().manual_seed(seed)
    coeffs = {}

    def loss(state):
        total = 0.0
        for name, value in state.items():
            if name not in coeffs:
                coeffs[name] = (torch.rand(value.shape, generator=generator), torch.randn(value.shape, generator=generator))
            a, m = coeffs[name]
            total = total + (a * (value - m) ** 2).sum()
        return total
    loss.coeffs = coeffs
    return loss


def _bodies(expert_set):
    """Base and expert bodies (float32 merged tensors), read directly — not through the library's helpers."""
    names = [n for n, i in expert_set.layout.tensors.items() if i.role == "merge"]
    base = {n: expert_set.base.get(n).float() for n in names}
    return base, {e: {n: s.get(n).float() for n in names} for e, s in expert_set.experts.items()}


@pytest.mark.parametrize("loss_kind", ["linear", "quadratic"])
def test_merged_point_importance_equals_hand_finite_difference(expert_set, loss_kind):
    from merging.apl.importance import compute_importance_at_merge

    lam = 0.7
    make = _linear_loss if loss_kind == "linear" else _quadratic_loss
    losses = {e: make(10 + i) for i, e in enumerate(expert_set.experts)}
    base, own = _bodies(expert_set)
    theta = {n: base[n] + lam * sum(own[e][n] - base[n] for e in own) for n in base}
    levels = ["layer", "module"]
    exact = compute_importance_at_merge(expert_set, None, None, lam=lam, mode="exact", level=levels, loss_fn=losses)
    grad = compute_importance_at_merge(expert_set, None, None, lam=lam, mode="gradient", level=levels, loss_fn=losses)
    layout = expert_set.layout
    for row, e in enumerate(expert_set.experts):
        with torch.no_grad():
            at_merge = float(losses[e](theta))
        for level in levels:
            for col, (part, names) in enumerate(layout.partitions(level).items()):
                ablated = dict(theta)
                for n in names:
                    ablated[n] = theta[n] - lam * (own[e][n] - base[n])
                with torch.no_grad():
                    change = float(losses[e](ablated)) - at_merge
                assert exact.signed[level][row, col] == pytest.approx(change, rel=1e-4, abs=1e-4), (e, part)
                if loss_kind == "quadratic":  # first order at θ_TA: ⟨2a(θ_TA − m), −λΔ_t^k⟩
                    first = sum(float((2 * losses[e].coeffs[n][0] * (theta[n] - losses[e].coeffs[n][1])
                                       * -lam * (own[e][n] - base[n])).sum()) for n in names)
                else:
                    first = change  # a linear loss: the first-order term is the whole change
                assert grad.signed[level][row, col] == pytest.approx(first, rel=1e-4, abs=1e-4), (e, part)
    again, _ = _bodies(expert_set)
    assert all(torch.equal(again[n], base[n]) for n in base)  # measuring at θ_TA never writes into the base


def test_merged_point_differs_from_base_and_feeds_calibration(expert_set):
    from merging.apl.importance import MERGED_INTERVENTION, compute_importance_at_merge

    spec = get_method("apl")
    losses = {e: _quadratic_loss(20 + i) for i, e in enumerate(expert_set.experts)}
    at_base = spec.prepare(expert_set, None, None, params={}, loss_fn=losses)["importance"]
    prepared = spec.prepare(expert_set, None, None, params={"importance_at": "merged", "lambda": 0.5}, loss_fn=losses)
    merged = prepared["importance"]
    assert merged.intervention == MERGED_INTERVENTION and at_base.intervention == "restore"
    hand = compute_importance_at_merge(expert_set, None, None, lam=0.5, level="layer", loss_fn=losses)
    assert (merged.signed["layer"] == hand.signed["layer"]).all()
    assert not torch.allclose(torch.tensor(merged.signed["layer"]), torch.tensor(at_base.signed["layer"]))
    assert prepared["table"].settings["intervention"] == MERGED_INTERVENTION
    with pytest.raises(MergeLabError, match="one λ") as info:
        spec.prepare(expert_set, None, None, params={"importance_at": "merged", "lambda": {"0": 0.5}}, loss_fn=losses)
    assert info.value.field == "parameters.lambda"


def test_one_expert_merged_point_at_lambda_one_is_the_papers_ablate():
    from merging.apl.importance import compute_importance, compute_importance_at_merge

    single = fx.expert_set(n_experts=1, seed=3)
    losses = {"task0": _quadratic_loss(30)}
    merged = compute_importance_at_merge(single, None, None, lam=1.0, mode="exact", loss_fn=losses)
    ablate = compute_importance(single, None, None, mode="exact", intervention="ablate", loss_fn=losses)
    assert merged.signed["layer"] == pytest.approx(ablate.signed["layer"], rel=1e-5, abs=1e-6)


def test_saliency_and_merged_importance_are_cached_per_draw_and_point(expert_set, tmp_path, monkeypatch):
    from merging.apl import importance as imp

    tok = fx.tokenizer(tmp_path)
    calls = []
    for fn in ("element_saliency", "compute_importance_at_merge"):
        original = getattr(imp, fn)
        monkeypatch.setattr(imp, fn, lambda *a, _f=original, _n=fn, **k: calls.append(_n) or _f(*a, **k))
    draw = {e: fx.examples(8, seed=i) for i, e in enumerate(expert_set.experts)}
    other = {e: fx.examples(8, seed=9 + i) for i, e in enumerate(expert_set.experts)}
    first = imp.cached_element_saliency(expert_set, draw, tok, point="base", lam=1.0)
    assert imp.cached_element_saliency(expert_set, draw, tok, point="base", lam=1.0) is first
    assert imp.cached_element_saliency(expert_set, other, tok, point="base", lam=1.0) is not first
    imp.cached_element_saliency(expert_set, draw, tok, point="merged", lam=1.0)
    assert calls == ["element_saliency"] * 3
    calls.clear()
    a = imp.cached_importance_at_merge(expert_set, draw, tok, lam=1.0)
    assert imp.cached_importance_at_merge(expert_set, draw, tok, lam=1.0) is a
    imp.cached_importance_at_merge(expert_set, draw, tok, lam=0.5)
    assert calls == ["compute_importance_at_merge"] * 2
    name = "encoder.layer.0.output.dense.weight"
    assert first[name]["task0"].shape == expert_set.layout[name].shape and (first[name]["task0"] >= 0).all()


def test_heavy_settings_are_not_prepared_by_a_plan_refresh():
    heavy = get_method("apl").prepare.heavy
    assert heavy({"importance_at": "merged"}) and heavy({"drop": "saliency"})
    assert not heavy({"drop": "locate", "within_layer": "hidden"}) and not heavy({})


# ---- chunks -------------------------------------------------------------------------------------

def _saliency_extras(expert_set, seed=1):
    """Fabricated saliency scores with ties (a few distinct values), per droppable tensor and expert."""
    generator = torch.Generator().manual_seed(seed)
    values = {name: {e: torch.randint(0, 4, info.shape, generator=generator).float() for e in expert_set.experts}
              for name, info in expert_set.layout.tensors.items() if info.droppable}
    return {SALIENCY_EXTRAS: PerTensor(values, row_axis=0)}


@pytest.mark.parametrize("shared", [
    {"drop": "locate", "within_layer": "hidden"},
    {"drop": "locate", "within_layer": "hidden", "sign_election": True},
    {"drop": "saliency", "within_layer": "uniform", "saliency_rescale": True},
    {"drop": "saliency", "within_layer": "hidden"},
], ids=["locate", "locate-sign", "saliency-rescale", "saliency-hidden"])
def test_chunked_merge_equals_whole_for_the_new_drops(expert_set, shared, monkeypatch):
    extras = {**_profiles(expert_set), **_saliency_extras(expert_set)}
    whole = _merge(expert_set, shared, extras)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 4 * 16 * 4)  # 4 rows of a [*, 16] float32 matrix
    chunked = _merge(expert_set, shared, extras)
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name
