"""Each method against its paper's formula, written independently here on small tensors."""

import math

import pytest
import torch

import merging.methods.kernels
from merging import MergeLabError, merge_state_dicts
from merging.methods import available, get_method

NAME = "encoder.layer.0.attention.self.query.weight"
NORM = "encoder.layer.0.attention.output.LayerNorm.weight"


def _models(n=3, seed=0):
    torch.manual_seed(seed)
    base = {NAME: torch.randn(6, 5), NORM: torch.ones(5)}
    experts = {f"e{i}": {NAME: base[NAME] + torch.randn(6, 5), NORM: base[NORM] + 0.1 * torch.randn(5)}
               for i in range(n)}
    return base, experts


def _deltas(base, experts, name=NAME):
    return torch.stack([e[name] - base[name] for e in experts.values()])


def test_registry_has_the_classic_ids():
    expected = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude", "breadcrumbs",
                "della", "slerp"]
    assert available()[: len(expected)] == expected
    for name in expected:
        spec = get_method(name)
        assert spec.pretty_name and spec.paper_url.startswith("http")
        assert all(p.scope in ("shared", "expert", "layer") for p in spec.params)


def test_linear_is_the_weighted_average_and_a_fixed_point():
    base, experts = _models()
    out = merge_state_dicts(base, experts, "linear", expert_params={"e0": {"weight": 2.0}})
    weights = torch.tensor([2.0, 1.0, 1.0]).reshape(-1, 1, 1)
    expected = (torch.stack([e[NAME] for e in experts.values()]) * weights).sum(0) / 4
    assert torch.allclose(out[NAME], expected, atol=1e-6)
    same = {f"e{i}": experts["e0"] for i in range(3)}
    assert torch.allclose(merge_state_dicts(base, same, "linear")[NAME], experts["e0"][NAME], atol=1e-6)


def test_task_arithmetic_formula():
    base, experts = _models()
    out = merge_state_dicts(base, experts, "task_arithmetic", **{"lambda": 0.4})
    assert torch.allclose(out[NAME], base[NAME] + 0.4 * _deltas(base, experts).sum(0), atol=1e-6)


def test_ties_formula():
    base, experts = _models()
    out = merge_state_dicts(base, experts, "ties", drop_ratio=0.6)
    deltas = _deltas(base, experts)
    trimmed = []
    for d in deltas:  # keep top 40% by magnitude (12 of 30)
        flat = d.reshape(-1)
        keep = flat.abs().argsort(descending=True)[:12]
        t = torch.zeros_like(flat)
        t[keep] = flat[keep]
        trimmed.append(t.reshape(d.shape))
    trimmed = torch.stack(trimmed)
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    expected = base[NAME] + (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    assert torch.allclose(out[NAME], expected, atol=1e-6)
    # norms are never trimmed: TIES merges them as a weighted mean of the deltas
    assert torch.allclose(out[NORM], base[NORM] + _deltas(base, experts, NORM).mean(0), atol=1e-6)


def test_drop_ratio_zero_is_the_identity_of_sparsification():
    base, experts = _models()
    ta = merge_state_dicts(base, experts, "task_arithmetic")
    for method in ("dare_linear", "magnitude", "breadcrumbs"):
        params = {"drop_ratio": 0.0}
        if method == "breadcrumbs":
            params["gamma"] = 0.0
        out = merge_state_dicts(base, experts, method, **params)
        assert torch.allclose(out[NAME], ta[NAME], atol=1e-6), method


def test_dare_linear_formula_and_expectation():
    base, experts = _models()
    out = merge_state_dicts(base, experts, "dare_linear", drop_ratio=0.3, seed=5)
    expected = base[NAME].clone()
    for name, e in experts.items():
        mask = merging.methods.kernels.random_keep_mask((6, 5), 0.7, seed=5, expert=name, name=NAME)
        expected += (e[NAME] - base[NAME]) * mask / 0.7
    assert torch.allclose(out[NAME], expected, atol=1e-6)
    mean = torch.stack([merge_state_dicts(base, experts, "dare_linear", drop_ratio=0.5, seed=s)[NAME]
                        for s in range(400)]).mean(0)
    ta = merge_state_dicts(base, experts, "task_arithmetic")[NAME]
    assert (mean - ta).abs().mean() < 0.12 * (ta - base[NAME]).abs().mean()


def test_random_masks_do_not_depend_on_tensor_or_expert_order():
    base, experts = _models()
    reordered_base = dict(reversed(list(base.items())))
    reordered = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(experts.items()))}
    a = merge_state_dicts(base, experts, "dare_ties", seed=3)
    b = merge_state_dicts(reordered_base, reordered, "dare_ties", seed=3)
    assert torch.allclose(a[NAME], b[NAME], atol=1e-6)


def test_magnitude_has_no_rescale():
    base, experts = _models()
    out = merge_state_dicts(base, experts, "magnitude", drop_ratio=0.5)
    deltas = _deltas(base, experts)
    expected = base[NAME].clone()
    for d in deltas:
        keep = d.abs() > d.abs().reshape(-1).kthvalue(15).values
        expected += d * keep
    assert torch.allclose(out[NAME], expected, atol=1e-6)


def test_trim_scopes_differ_and_model_scope_keeps_the_global_fraction():
    base, experts = _models()
    loud = "encoder.layer.1.attention.self.query.weight"
    base[loud] = torch.zeros(6, 5)
    for e in experts.values():
        e[loud] = 100 + torch.rand(6, 5)  # a loud layer
    per_tensor = merge_state_dicts(base, experts, "magnitude", drop_ratio=0.5, trim_scope="tensor")
    per_layer = merge_state_dicts(base, experts, "magnitude", drop_ratio=0.5, trim_scope="layer")
    per_model = merge_state_dicts(base, experts, "magnitude", drop_ratio=0.5, trim_scope="model")
    quiet = NAME
    tensor_expected = base[quiet] + sum(d * (d.abs() > d.abs().reshape(-1).kthvalue(15).values)
                                        for d in _deltas(base, experts))
    torch.testing.assert_close(per_tensor[quiet], tensor_expected, rtol=0, atol=1e-6)  # half of each tensor
    # each layer holds one droppable tensor (norms are never trimmed), so layer scope keeps what tensor scope does
    for name in (quiet, loud, NORM):
        assert torch.equal(per_layer[name], per_tensor[name]), name
    # model-wide: 30 of each expert's 60 droppable entries are kept, and the loud layer's 30 are the largest
    torch.testing.assert_close(per_model[loud], base[loud] + _deltas(base, experts, loud).sum(0), rtol=0, atol=1e-4)
    assert torch.equal(per_model[quiet], base[quiet])
    assert torch.equal(per_model[NORM], per_tensor[NORM])


def test_slerp_endpoints_and_two_experts_only():
    base, experts = _models(2)
    start = merge_state_dicts(base, experts, "slerp", t=0.0)
    end = merge_state_dicts(base, experts, "slerp", t=1.0)
    assert torch.allclose(start[NAME], experts["e0"][NAME], atol=1e-5)
    assert torch.allclose(end[NAME], experts["e1"][NAME], atol=1e-5)
    with pytest.raises(MergeLabError, match="exactly 2"):
        merge_state_dicts(*_models(3), "slerp")


def _della_oracle(delta, density, epsilon, seed, expert, name):
    """DELLA's MagPrune from the paper, written here: in each row, rank |Δ| from smallest (0) to largest
    (n − 1, ties by position); keep probability p = density + ε·(rank/(n − 1) − ½), clipped to (0, 1];
    keep where the entry's uniform U < p and rescale the kept entry by 1/p (so E[result] = Δ)."""
    rows, cols = delta.shape
    probs = torch.empty(rows, cols)
    for r in range(rows):
        order = sorted(range(cols), key=lambda c: (abs(float(delta[r, c])), c))
        for rank, c in enumerate(order):
            probs[r, c] = min(max(density + epsilon * (rank / (cols - 1) - 0.5), 1e-6), 1.0)
    u = merging.methods.kernels.uniforms(seed, expert, name, rows * cols).reshape(rows, cols)
    return torch.where(u < probs, delta / probs, torch.zeros(())), probs


def test_della_kernel_equals_the_formula_entry_by_entry():
    torch.manual_seed(4)
    delta = torch.randn(7, 9)
    for density, epsilon in ((0.5, 0.2), (0.9, 0.4), (0.3, 1.0)):  # (0.9, 0.4) clips the top ranks at 1
        expected, _ = _della_oracle(delta, density, epsilon, 3, "e", "w")
        got = merging.methods.kernels.della(delta, density, epsilon, seed=3, expert="e", name="w")
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_della_is_unbiased_and_keeps_with_the_formula_probabilities():
    torch.manual_seed(5)
    delta = torch.randn(6, 11)
    _, probs = _della_oracle(delta, 0.4, 0.3, 0, "e", "w")
    draws = torch.stack([merging.methods.kernels.della(delta, 0.4, 0.3, seed=s, expert="e", name="w")
                         for s in range(600)])
    # E[Δ·1{U<p}/p] = Δ: the seed average converges to Δ (std error ≈ |Δ|·sqrt((1−p)/p/600) ≈ 0.05|Δ|);
    # without the 1/p rescale it would converge to p·Δ, about 0.4·Δ
    assert (draws.mean(0) - delta).abs().mean() < 0.1 * delta.abs().mean()
    # each entry is kept at its own rank's rate (binomial std over 600 draws ≤ 0.02)
    assert ((draws != 0).float().mean(0) - probs).abs().max() < 0.08


def test_della_method_formula():
    """Θ = base + λ Σ_t w_t d_t a_t / Σ_t w_t a_t, d_t = MagPrune(Δ_t), a_t: sign of d_t agrees with sign Σ w_t d_t."""
    base, experts = _models()
    weights = {"e0": 1.0, "e1": 0.5, "e2": 2.0}
    out = merge_state_dicts(base, experts, "della", drop_ratio=0.4, epsilon=0.3, seed=2, **{"lambda": 0.8},
                            expert_params={e: {"weight": w} for e, w in weights.items()})
    pruned = torch.stack([_della_oracle(e[NAME] - base[NAME], 0.6, 0.3, 2, name, NAME)[0] * weights[name]
                          for name, e in experts.items()])
    w = torch.tensor(list(weights.values())).reshape(-1, 1, 1)
    sign = torch.sign(pruned.sum(0))
    sign[sign == 0] = 1
    agree = (torch.sign(pruned) == sign).float()
    divisor = (w * agree).sum(0)
    divisor[divisor.abs() < 1e-12] = 1
    expected = base[NAME] + 0.8 * (pruned * agree).sum(0) / divisor
    torch.testing.assert_close(out[NAME], expected, rtol=1e-5, atol=1e-6)


def _slerp_oracle(a, b, t):
    """Closed-form slerp of the flattened tensors: sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b,
    θ the angle between a and b."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    theta = math.acos(float(x @ y / (x.norm() * y.norm())))
    return ((math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)).reshape(a.shape).float()


def test_slerp_interior_t_is_the_closed_form():
    base, experts = _models(2)
    out = merge_state_dicts(base, experts, "slerp", t=0.3)
    a, b = experts["e0"], experts["e1"]
    torch.testing.assert_close(out[NAME], _slerp_oracle(a[NAME], b[NAME], 0.3), rtol=1e-5, atol=1e-6)
    assert (out[NAME] - _slerp_oracle(a[NAME], b[NAME], 0.5)).abs().max() > 1e-2  # 0.3 is not the midpoint


def test_slerp_per_layer_t():
    base, experts = _models(2)
    name1 = "encoder.layer.1.attention.self.query.weight"
    base[name1] = torch.zeros(6, 5)
    for i, e in enumerate(experts.values()):
        e[name1] = torch.randn(6, 5, generator=torch.Generator().manual_seed(i))
    out = merge_state_dicts(base, experts, "slerp", t={"0": 0.3, "1": 0.8})
    a, b = experts["e0"], experts["e1"]
    for name, t in ((NAME, 0.3), (NORM, 0.3), (name1, 0.8)):
        torch.testing.assert_close(out[name], _slerp_oracle(a[name], b[name], t), rtol=1e-5, atol=1e-6)


def _pipeline_oracle(base, experts, weights, drop, seed, consensus, lam=1.0):
    """DARE (+ TIES) from the formula: d_t = w_t Δ_t 1{U_t < q}/q; with consensus keep the d_t whose sign
    agrees with sign Σ d_t, unnormalised; Θ = base + λ Σ."""
    keep = 1.0 - drop
    stacked = []
    for name, e in experts.items():
        u = merging.methods.kernels.uniforms(seed, name, NAME, e[NAME].numel()).reshape(e[NAME].shape)
        stacked.append(weights[name] * (e[NAME] - base[NAME]) * (u < keep) / keep)
    stacked = torch.stack(stacked)
    if consensus:
        sign = torch.sign(stacked.sum(0))
        sign[sign == 0] = 1
        stacked = stacked * (torch.sign(stacked) == sign)
    return base[NAME] + lam * stacked.sum(0)


@pytest.mark.parametrize("method, consensus", [("dare_linear", False), ("dare_ties", True)])
def test_four_and_five_experts_follow_the_same_formula(method, consensus, monkeypatch):
    """Up to 4 experts the pipeline merges in place; above, it reduces a stack (Pipeline._stacked)."""
    from merging.methods import classic

    stacked_calls = []
    original = classic.Pipeline._stacked
    monkeypatch.setattr(classic.Pipeline, "_stacked", lambda self, job: stacked_calls.append(job.name) or original(
        self, job))
    base, experts = _models(5, seed=8)
    weights = {f"e{i}": 0.5 + 0.25 * i for i in range(5)}
    for n in (4, 5):
        chosen = dict(list(experts.items())[:n])
        stacked_calls.clear()
        out = merge_state_dicts(base, chosen, method, drop_ratio=0.3, seed=6, **{"lambda": 0.7},
                                expert_params={e: {"weight": weights[e]} for e in chosen})
        expected = _pipeline_oracle(base, chosen, weights, 0.3, 6, consensus, 0.7)
        torch.testing.assert_close(out[NAME], expected, rtol=1e-5, atol=1e-6)
        assert bool(stacked_calls) == (n == 5)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude",
                                    "della"])
def test_a_fifth_expert_at_weight_zero_changes_nothing(method):
    """5 experts (stacked path) with the fifth at weight 0 equal the first 4 (in-place path) bit for bit."""
    base, experts = _models(5, seed=9)
    weights = {"e0": 1.0, "e1": 0.5, "e2": 1.5, "e3": 0.75, "e4": 0.0}
    four = merge_state_dicts(base, dict(list(experts.items())[:4]), method, seed=1,
                             expert_params={e: {"weight": w} for e, w in weights.items() if e != "e4"})
    five = merge_state_dicts(base, experts, method, seed=1, expert_params={e: {"weight": w} for e, w in weights.items()})
    for name in four:
        assert torch.equal(four[name], five[name]), (method, name)


def test_per_layer_values_list_and_map():
    base, experts = _models()
    name1 = "encoder.layer.1.attention.self.query.weight"
    base[name1] = torch.zeros(6, 5)
    for e in experts.values():
        e[name1] = torch.randn(6, 5)
    out = merge_state_dicts(base, experts, "task_arithmetic", expert_params={"e0": {"weight": {"1": 0.0}}})
    expected = base[name1] + _deltas(base, experts, name1)[1:].sum(0)
    assert torch.allclose(out[name1], expected, atol=1e-6)
    assert torch.allclose(out[NAME], base[NAME] + _deltas(base, experts).sum(0), atol=1e-6)


@pytest.mark.parametrize("params, message", [
    ({"drop_ratio": 0.5, "density": 0.5}, "not both"),
    ({"drop_ratio": 1.5}, r"\[0.0, 0.999\]"),
    ({"lambada": 1.0}, "unknown parameter 'lambada'"),
    ({"drop_ratio": {"7": 0.1}}, "layer '7'"),
    ({"drop_ratio": "lots"}, "must be a number"),
    ({"drop_ratio": float("nan")}, "finite"),
])
def test_bad_parameters_name_the_field(params, message):
    base, experts = _models()
    with pytest.raises(MergeLabError, match=message):
        merge_state_dicts(base, experts, "ties", **params)


def test_density_alias():
    base, experts = _models()
    a = merge_state_dicts(base, experts, "ties", density=0.3)
    b = merge_state_dicts(base, experts, "ties", drop_ratio=0.7)
    assert torch.equal(a[NAME], b[NAME])


def test_unknown_method():
    with pytest.raises(MergeLabError, match="unknown merge method 'tie'"):
        merge_state_dicts(*_models(), "tie")


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude",
                                    "breadcrumbs", "della"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_no_nan_or_inf_in_any_precision(method, dtype):
    base, experts = _models()
    base = {k: v.to(dtype) for k, v in base.items()}
    experts = {n: {k: v.to(dtype) for k, v in e.items()} for n, e in experts.items()}
    out = merge_state_dicts(base, experts, method)
    assert all(torch.isfinite(t.to(dtype)).all() for t in out.values())
