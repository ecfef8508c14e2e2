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


def test_breadcrumbs_keeps_an_exact_count_with_ties():
    # |Δ| = 4 (×3), 3 (×4), 2 (×4), 1 (×4), 0.5 (×5); n = 20, gamma 0.1 → 2 outliers, density 0.5 → keep 10
    delta = torch.tensor([4.0, -4.0, 4.0, 3.0, 3.0, -3.0, 3.0, 2.0, 2.0, -2.0, 2.0, 1.0, 1.0, 1.0, -1.0,
                          0.5, 0.5, 0.5, 0.5, 0.5])
    mask = kernels.breadcrumbs_mask(delta, density=0.5, gamma=0.1)
    # outliers: the first two 4s; kept: the third 4, the four 3s, the four 2s, the first 1
    expected = [False, False, True, True, True, True, True, True, True, True, True, True] + [False] * 8
    assert mask.tolist() == expected


def test_della_probabilities_are_the_rank_formula():
    """p = density + ε·(rank/(n − 1) − ½) per row, ranks of |Δ| from 0 (smallest) with ties by position."""
    delta = torch.tensor([[0.3, -2.0, 0.1, 0.3, 1.0], [5.0, 4.0, -3.0, 2.0, 1.0]])
    probs = kernels.della_keep_probabilities(delta, 0.5, 0.4)
    ranks = torch.tensor([[1.0, 4.0, 0.0, 2.0, 3.0], [4.0, 3.0, 2.0, 1.0, 0.0]])  # by hand; the tied 0.3s: 1, 2
    torch.testing.assert_close(probs, 0.5 + 0.4 * (ranks / 4 - 0.5), rtol=0, atol=1e-7)
    clipped = kernels.della_keep_probabilities(delta, 0.9, 0.4)  # 0.9 + 0.2 at the top: clipped to 1
    torch.testing.assert_close(clipped, (0.9 + 0.4 * (ranks / 4 - 0.5)).clamp(max=1.0), rtol=0, atol=1e-7)


def test_della_probabilities_do_not_depend_on_other_rows():
    """Ranks are taken within a row, so a row chunk's probabilities are those rows of the whole tensor's."""
    delta = torch.randn(12, 30)
    whole = kernels.della_keep_probabilities(delta, 0.4, 0.3)
    assert torch.equal(kernels.della_keep_probabilities(delta[5:9], 0.4, 0.3), whole[5:9])


def test_slerp_interior_t_is_the_closed_form():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 16, generator=generator), torch.randn(4, 16, generator=generator)
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    theta = math.acos(float(x @ y / (x.norm() * y.norm())))
    for t in (0.3, 0.8):
        expected = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
        torch.testing.assert_close(kernels.slerp(a, b, t), expected.reshape(4, 16).float(), rtol=1e-5, atol=1e-6)
    # nearly colinear: linear interpolation (the angle is too small to divide by)
    torch.testing.assert_close(kernels.slerp(a, 2 * a, 0.3), 1.3 * a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dare_in_low_precision_is_the_formula(dtype):
    """Tiny fp16/bf16 deltas rescaled by 1/0.1: finite, and exactly Δ·1{U < 0.1}/0.1 in float32."""
    delta = (torch.randn(64, 64) * 1e-3).to(dtype).float()
    out = kernels.dare(delta, 0.9, seed=1, expert="e", name="n")
    u = kernels.uniforms(1, "e", "n", delta.numel()).reshape(delta.shape)
    torch.testing.assert_close(out, delta * (u < 0.1) / torch.tensor(0.1), rtol=1e-6, atol=0)
    assert torch.isfinite(out.to(dtype)).all()


def test_ordered_sum_does_not_depend_on_position():
    """Σ over experts in order: a row chunk sums exactly like those rows of the whole stack."""
    stacked = torch.randn(6, 45, 40)
    whole = kernels.ordered_sum(stacked)
    assert torch.equal(whole, stacked[0] + stacked[1] + stacked[2] + stacked[3] + stacked[4] + stacked[5])
    assert torch.equal(torch.cat([kernels.ordered_sum(stacked[:, r:r + 6]) for r in range(0, 45, 6)]), whole)


def test_streaming_topk_counts_ties_and_their_quota():
    tensors = [torch.tensor([3.0, 1.0, -1.0, 0.5]), torch.tensor([[1.0, 2.0], [-1.0, 0.0]]), torch.tensor([1.0])]
    top = kernels.streaming_topk(lambda: iter(tensors), 4)  # |.|: 3, 2 above 1; five 1s for two places
    assert (top.cut, top.ties, top.tied) == (1.0, 2, (2, 2, 1))
    assert kernels.share_ties(top.tied, top.ties) == [2, 0, 0]
    assert kernels.share_ties([1, 3, 2], 3) == [1, 2, 0]
    zeros = kernels.streaming_topk(lambda: iter([torch.zeros(3), torch.zeros(2)]), 4)
    assert (zeros.cut, zeros.ties, zeros.tied) == (0.0, 4, (3, 2))  # all zeros: k of them kept, like top-k
    assert kernels.streaming_topk(lambda: iter(tensors), 0).cut == math.inf
    assert kernels.streaming_topk(lambda: iter(tensors), 11).cut == -math.inf


@pytest.mark.parametrize("band", [True, False], ids=["band", "histogram"])
def test_streaming_topk_equals_the_concatenated_top_k_with_ties(band, monkeypatch):
    """Both ways to the cut (the sampled band, and the histogram it falls back to) give the exact top-k."""
    found = []
    original = kernels._band_topk
    monkeypatch.setattr(kernels, "_band_topk", lambda *args: found.append(original(*args) if band else None))
    generator = torch.Generator().manual_seed(1)
    tensors = [(torch.randn(400, 30, generator=generator) * s).to(torch.bfloat16).float() for s in (1e-3, 1.0)]
    tensors.append(torch.zeros(70))
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
    for k in (1, 333, 12_000, flat.numel() - 100, flat.numel() - 1):
        top = kernels.streaming_topk(lambda: iter(tensors), k)
        assert int((flat > top.cut).sum()) + top.ties == k
        assert top.tied == tuple(int((t.abs() == top.cut).sum()) for t in tensors)
        assert 0 <= top.ties <= sum(top.tied)
        kth = float(flat.kthvalue(flat.numel() - k + 1).values)  # the k-th largest
        assert bool((flat[flat > top.cut] >= kth).all())  # what is kept above the cut is the top
        if top.ties:
            assert top.cut == kth  # and ties are taken at the k-th largest value itself
    assert all(f is not None for f in found) if band else not any(found)  # each way really was taken
    assert any(kernels.streaming_topk(lambda: iter(tensors), k).ties for k in (333, flat.numel() - 1))


def test_streaming_topk_on_mostly_zero_deltas():
    """A cut among the zeros of a barely changed model: exact, with the zeros counted, not gathered."""
    generator = torch.Generator().manual_seed(2)
    tensors = [torch.where(torch.rand(300, 20, generator=generator) < 0.1, torch.randn(300, 20, generator=generator),
                           torch.zeros(())) for _ in range(3)]
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
    nonzero = int((flat > 0).sum())
    for k in (nonzero - 5, nonzero, nonzero + 7, flat.numel() // 2):
        top = kernels.streaming_topk(lambda: iter(tensors), k)
        assert int((flat > top.cut).sum()) + top.ties == k
        if k > nonzero:
            assert top.cut == 0.0 and top.ties == k - nonzero
            assert top.tied == tuple(int((t == 0).sum()) for t in tensors)


def test_threshold_with_tie_quota_keeps_the_first_tied_entries():
    delta = torch.tensor([[1.0, -1.0, 2.0], [1.0, 0.5, -1.0]])
    mask = kernels.magnitude_mask(delta, 0.5, threshold=1.0, ties=2)
    assert mask.tolist() == [[True, True, True], [False, False, False]]
    factor = kernels.magnitude_keep_factor(delta, 0.5, threshold=1.0, ties=3)
    assert factor.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


def _python_order(row: list[float], descending: bool) -> list[int]:
    """The oracle: columns by |value| (largest first if descending), tied magnitudes lowest column first."""
    return sorted(range(len(row)), key=lambda j: (-abs(row[j]) if descending else abs(row[j]), j))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("descending", [False, True])
def test_row_magnitude_order_is_a_stable_sort_of_magnitudes(dtype, descending):
    """The packed-key sort (float32/16, bfloat16 on the CPU) and torch's argsort (float64) order each row by
    |value| with ties by column, including ±0, subnormals, infinities and runs of tied magnitudes."""
    generator = torch.Generator().manual_seed(5)
    matrix = (torch.randn(9, 41, generator=generator) * 1e-2).to(dtype)
    matrix[0, :20] = 0.0
    matrix[0, 20:] = -0.0
    matrix[1] = torch.tensor([0.5, -0.5] * 20 + [0.25]).to(dtype)  # one magnitude, signs alternating
    matrix[2, ::4] = float("inf")
    matrix[2, 1::4] = -float("inf")
    matrix[3, :10] = torch.finfo(dtype).tiny / 4  # subnormal
    matrix[3, 10:20] = -torch.finfo(dtype).tiny / 4
    got = kernels.row_magnitude_order(matrix, descending=descending)
    rows = matrix.double().tolist()
    assert got.tolist() == [_python_order(row, descending) for row in rows]


def test_row_magnitude_order_of_a_strided_view_equals_that_of_a_copy():
    matrix = torch.randn(30, 24)
    view = matrix.T[:, ::2]  # not contiguous
    assert torch.equal(kernels.row_magnitude_order(view), kernels.row_magnitude_order(view.contiguous()))
    assert kernels.row_magnitude_order(torch.empty(0, 5)).shape == (0, 5)
    assert kernels.row_magnitude_order(torch.empty(3, 0)).shape == (3, 0)


def test_replace_tiny_divisors_equals_the_masked_fill():
    """Below 1e-12 in magnitude → 1; everything else, NaN and ±inf included, unchanged (bit for bit)."""
    values = [0.0, -0.0, 1e-13, -1e-13, 1e-12, -1e-12, 9.99e-13, 2.0, -3.5, 1e-30, float("nan"),
              float("inf"), -float("inf"), 1e38, 0.5]
    for divisor in (torch.tensor(values), torch.tensor(values).reshape(3, 5).T, torch.tensor(values[2])):
        expected = divisor.clone().masked_fill_(divisor.abs() < 1e-12, 1.0)
        got = kernels.replace_tiny_divisors_(divisor.clone())
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))
        assert torch.equal(got.signbit(), expected.signbit())


def test_sign_of_sum_counts_zero_as_plus_one():
    """The elected sign: ±1 by the sum's sign, a zero sum (±0) +1 — the masked fill it replaced, NaN included
    (torch's sign of NaN is 0 on the CPU)."""
    summed = torch.tensor([3.0, -2.0, 0.0, -0.0, 1e-40, -1e-40, float("nan"), float("inf"), -float("inf")])
    expected = torch.sign(summed).masked_fill_(torch.sign(summed) == 0, 1.0)
    got = kernels.sign_of_sum(summed)
    assert got[:6].tolist() == [1.0, -1.0, 1.0, 1.0, 1.0, -1.0] and got[7:].tolist() == [1.0, -1.0]
    assert torch.equal(got, expected)
    assert torch.equal(kernels.sign_of_sum(summed.clone(), inplace=True), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_numpy_band_pass_equals_torch_s(dtype):
    """The CPU's numpy pass and the torch pass (a GPU's) count and gather the same band, in the same order."""
    generator = torch.Generator().manual_seed(3)
    n = kernels._TOPK_BLOCK * 2 + 1234  # three blocks, the last partial
    base = torch.randn(n, generator=generator)
    tensor = (base + torch.randn(n, generator=generator) * 1e-2).to(dtype)
    tensor[::97] = base[::97].to(dtype)  # zero deltas (where the base is exact in dtype)
    tensor[5] = float("nan")
    for lo, hi in [(0.004, 0.006), (-math.inf, 0.001), (0.02, math.inf), (0.0, 0.0)]:
        below_np, band_np = kernels._delta_band_pass_numpy(tensor, base, lo, hi)
        below_t, band_t = kernels._delta_band_pass_torch(tensor, base, lo, hi)
        magnitude = (tensor.float() - base).abs()
        assert below_np == below_t == int((~(magnitude >= lo)).sum())  # NaN counts below
        assert torch.equal(band_np, band_t) and torch.equal(band_t, magnitude[(magnitude >= lo) & (magnitude <= hi)])


def test_the_numpy_band_counts_equal_torch_s():
    """streaming_topk's band pass counts and gathers the same on the CPU's numpy path as on torch's."""
    generator = torch.Generator().manual_seed(4)
    piece = torch.randn(100_003, generator=generator) * 1e-2
    piece[::11] = 0.0
    piece[1::13] = 0.005
    piece[2::17] = -0.005
    piece[7] = float("nan")
    for lo, hi in [(0.004, 0.006), (0.005, 0.005), (0.0, 0.001), (-math.inf, 0.003), (0.01, math.inf)]:
        by_numpy, by_torch = kernels._band_counts_numpy(piece, lo, hi), kernels._band_counts_torch(piece, lo, hi)
        assert by_numpy[:4] == by_torch[:4] and torch.equal(by_numpy[4], by_torch[4])
        magnitude = piece.abs()
        assert by_numpy[2] == int((magnitude == lo).sum()) and by_numpy[4].numel() == int(((magnitude > lo) & (magnitude < hi)).sum())


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "nan"])
def test_kth_smallest_equals_torch_kthvalue(kind):
    """The band selection (numpy's counts on the CPU) returns torch.kthvalue's value at every rank tried,
    where values tie, where most are zero, and where NaN forces the fallback."""
    generator = torch.Generator().manual_seed(6)
    values = torch.randn(300_001, generator=generator)
    if kind == "ties":
        values = (values * 4).round() / 4
    elif kind == "zeros":
        values[:280_000] = 0.0
    elif kind == "nan":
        values[123] = float("nan")
    for j in (1, 17, 150_000, 280_000, 280_001, 299_999, 300_001):
        got, expected = kernels.kth_smallest(values, j), float(torch.kthvalue(values, j).values)
        assert got == expected or (math.isnan(got) and math.isnan(expected)), j


@pytest.mark.parametrize("descending", [False, True])
def test_row_magnitude_order_puts_nan_last_in_column_order(descending):
    """NaN — any payload — goes after every magnitude in both directions, NaNs among themselves by column, as
    torch's stable argsort of |x| (ascending) and of −|x| (descending) put them."""
    row = torch.tensor([[float("nan"), 1.0, 0.0, float("inf"), 2.0, float("nan"), -0.0]])
    row.view(torch.int32)[0, 5] = 0x7FC00001  # another NaN payload, larger bits than column 0's
    row.view(torch.int32)[0, 0] = -0x00400000  # a negative NaN (sign bit set)
    reference = (-row.abs() if descending else row.abs()).argsort(dim=1, stable=True)
    assert torch.equal(kernels.row_magnitude_order(row, descending), reference)
    assert kernels.row_magnitude_order(row, descending)[0, -2:].tolist() == [0, 5]


def test_kernels_keep_their_dtype_under_a_float64_default():
    """Scratch buffers are float32 whatever torch's default dtype, so DELLA and a layer-scope TIES cut run."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        delta = torch.randn(60, 50, dtype=torch.float32)
        probs = kernels.della_keep_probabilities(delta, 0.5, 0.2)
        assert probs.dtype == torch.float32
        assert kernels.scratch("test-dtype", 10).dtype == torch.float32
        top = kernels.streaming_topk(lambda: iter([delta]), 300)
        assert int((delta.abs() > top.cut).sum()) + top.ties == 300
    finally:
        torch.set_default_dtype(previous)


def test_sign_and_divisor_fix_ups_keep_other_dtypes():
    wide = torch.tensor([9.99999999e-13, 1e-12, 0.0, -3.0], dtype=torch.float64)
    assert kernels.replace_tiny_divisors_(wide.clone()).tolist() == [1.0, 1e-12, 1.0, -3.0]
    assert kernels.sign_of_sum(torch.tensor([0, -3, 2])).tolist() == [1, -1, 1]
    half = torch.tensor([0.0, -2.0], dtype=torch.float16)
    assert kernels.sign_of_sum(half).tolist() == [1.0, -1.0]


def test_kth_smallest_picks_torch_s_zero():
    """Where the k-th value is zero, its sign is the one torch.kthvalue returns (PCB clamps by signed values)."""
    values = torch.zeros(2**18 + 3)
    values[::2] = -0.0
    values[:10] = torch.arange(1.0, 11.0)
    for j in (1, 2, 1000, 2**18 - 7):
        got, expected = kernels.kth_smallest(values, j), torch.kthvalue(values, j).values
        assert got == float(expected) and math.copysign(1, got) == math.copysign(1, float(expected)), j
