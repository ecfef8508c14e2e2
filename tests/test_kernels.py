"""Numeric properties of the merge primitives and oracle comparisons with the papers' formulas."""

import math

import pytest
import torch

from merging.methods import kernels


def test_uniforms_do_not_depend_on_chunking():
    n = kernels.RNG_BLOCK * 2 + 123
    whole = kernels.uniforms(7, "a", "w", n)
    parts = torch.cat([kernels.uniforms(7, "a", "w", n, s, min(n, s + 777_777)) for s in range(0, n, 777_777)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, kernels.uniforms(8, "a", "w", n))
    assert not torch.equal(whole, kernels.uniforms(7, "b", "w", n))


def test_dare_drop_zero_is_identity_and_keeps_expected_sum():
    delta = torch.randn(200, 50)
    assert torch.equal(kernels.dare(delta, 0.0, seed=0, expert="e", name="x"), delta)
    draws = torch.stack([kernels.dare(delta, 0.7, seed=s, expert="e", name="x") for s in range(300)])
    mean = draws.mean(0)
    # E[dare(Δ)] = Δ: the average over seeded draws converges to Δ (std error ~ |Δ|·sqrt(p/q/300))
    assert (mean - delta).abs().mean() < 0.1 * delta.abs().mean()
    kept = (draws[0] != 0).float().mean()
    assert abs(float(kept) - 0.3) < 0.02


def test_exact_kept_count_at_a_density():
    delta = torch.randn(1000, 37)
    for density in (0.0, 0.1, 0.5, 0.93, 1.0):
        mask = kernels.magnitude_mask(delta, density)
        assert int(mask.sum()) == round(density * delta.numel())
        if 0 < density < 1:
            assert delta.abs()[mask].min() >= delta.abs()[~mask].max()


def test_exact_kept_count_with_ties():
    delta = torch.tensor([1.0, 1.0, 1.0, 2.0, -2.0, 0.5])
    # ties at the threshold are kept lowest index first: deterministic and exact
    assert kernels.magnitude_mask(delta, 0.5).tolist() == [True, False, False, True, True, False]
    factor = kernels.magnitude_keep_factor(delta, 0.5)
    assert factor.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_streaming_threshold_equals_concatenated_topk():
    torch.manual_seed(0)
    tensors = [torch.randn(300, 20) * s for s in (1e-4, 1.0, 30.0)] + [torch.zeros(50)]
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
    for k in (1, 17, 5000, flat.numel() - 60, flat.numel()):
        threshold = kernels.streaming_kth_largest(lambda: iter(tensors), k)
        assert int((flat > threshold).sum()) == k


def test_ties_sign_election_by_hand():
    stacked = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 1.0, 0.5], [1.0, 0.5, 0.0]])
    sign = kernels.elect_sign(stacked)
    assert sign.tolist() == [-1.0, -1.0, 1.0]
    agree = kernels.agreement_mask(stacked, sign)
    assert agree.tolist() == [[False, True, True], [True, False, True], [False, False, False]]


def test_slerp_endpoints_and_midpoint_norm():
    a, b = torch.randn(64), torch.randn(64)
    assert torch.allclose(kernels.slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(kernels.slerp(a, b, 1.0), b, atol=1e-5)
    unit_a, unit_b = a / a.norm(), b / b.norm()
    mid = kernels.slerp(unit_a, unit_b, 0.5)
    assert math.isclose(float(mid.norm()), 1.0, rel_tol=1e-5)  # stays on the sphere


def test_breadcrumbs_removes_outliers_and_small():
    delta = torch.arange(1, 101, dtype=torch.float32)
    mask = kernels.breadcrumbs_mask(delta, density=0.5, gamma=0.1)
    kept = delta[mask]
    assert kept.numel() == 50 and kept.max() == 90 and kept.min() == 41


def test_della_probabilities_rise_with_magnitude_and_average_density():
    delta = torch.randn(8, 101)
    probs = kernels.della_keep_probabilities(delta, 0.5, 0.2)
    row = delta[0].abs().argsort()
    assert torch.all(probs[0][row][1:] >= probs[0][row][:-1])
    assert abs(float(probs.mean()) - 0.5) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_no_nan_in_low_precision(dtype):
    delta = (torch.randn(64, 64) * 1e-3).to(dtype).float()
    out = kernels.dare(delta, 0.9, seed=1, expert="e", name="n")
    assert torch.isfinite(out.to(dtype)).all()
