"""Each method against its paper's formula, written independently here on small tensors."""

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
    base["encoder.layer.1.attention.self.query.weight"] = torch.zeros(6, 5)
    for i, e in enumerate(experts.values()):
        e["encoder.layer.1.attention.self.query.weight"] = 100 + torch.rand(6, 5)  # a loud layer
    per_tensor = merge_state_dicts(base, experts, "magnitude", drop_ratio=0.5, trim_scope="tensor")
    per_model = merge_state_dicts(base, experts, "magnitude", drop_ratio=0.5, trim_scope="model")
    quiet = NAME
    assert (per_tensor[quiet] != base[quiet]).any()
    # model-wide: the loud layer takes all the kept entries, the quiet one keeps (almost) none
    assert torch.allclose(per_model[quiet], base[quiet])


def test_slerp_endpoints_and_two_experts_only():
    base, experts = _models(2)
    start = merge_state_dicts(base, experts, "slerp", t=0.0)
    end = merge_state_dicts(base, experts, "slerp", t=1.0)
    assert torch.allclose(start[NAME], experts["e0"][NAME], atol=1e-5)
    assert torch.allclose(end[NAME], experts["e1"][NAME], atol=1e-5)
    with pytest.raises(MergeLabError, match="exactly 2"):
        merge_state_dicts(*_models(3), "slerp")


def test_della_runs_and_stays_close_to_ties_in_expectation():
    base, experts = _models()
    out = merge_state_dicts(base, experts, "della", drop_ratio=0.5, epsilon=0.2, seed=1)
    assert torch.isfinite(out[NAME]).all() and not torch.allclose(out[NAME], base[NAME])


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
