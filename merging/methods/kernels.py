"""Merge primitives: small pure functions, one job each, testable against a formula.

Random drops draw from a generator owned by (seed, expert, tensor name) — one uniform
per entry, kept where it falls under the keep rate — so a partial re-merge equals a full
merge, tensor order never matters, and DARE and APL share masks at equal rates. The
uniforms come in fixed blocks of elements, each block with its own generator, so a
tensor merged in row chunks draws exactly what it would draw whole (blocks being
independent, a tensor's blocks are drawn in parallel threads).

Devices: every helper makes its tensors on its inputs' device (the engine may hand a kernel CUDA
tensors). A drop's generator lives on that device too, and CUDA's generator (Philox) is not CPU's
(Mersenne Twister): the same seed draws a different, equally valid mask on a GPU than on the CPU, which
is why a merge's recipe records its device. The sampling that only locates a k-th value (below) uses a
CPU generator on every device: its draw changes how fast the exact value is found, never the value.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

RNG_BLOCK = 1 << 20  # elements per generator block


def _block_seed(seed: int, expert: str, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{expert}\x00{name}\x00{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: random draws on a device need its own generator (a
    CUDA draw from a CPU generator is an error), and their stream is that device's."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def uniforms(seed: int, expert: str, name: str, numel: int, start: int = 0, end: int | None = None,
             out: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """The uniforms U[start:end] of tensor ``name`` of ``expert`` (flat, float32; written to ``out`` if given,
    else made on ``device``, default the CPU), drawn by generators on that device."""
    end = numel if end is None else end
    if out is None:
        out = torch.empty(max(end - start, 0), device=device)
    if end <= start:
        return out

    def draw(span: tuple[int, int, int, int]) -> None:
        block, lo, hi, length = span
        target = out[block * RNG_BLOCK + lo - start:block * RNG_BLOCK + hi - start]
        if lo == 0 and hi == length:  # the whole block: draw straight into the output
            _draw_block(seed, expert, name, numel, block, target)
        else:
            target.copy_(_draw_block(seed, expert, name, numel, block, device=out.device)[lo:hi])

    spans = list(_rng_spans(numel, start, end))
    pool = _rng_pool() if len(spans) > 1 and out.device.type == "cpu" else None  # a GPU draws a block at once
    if pool is None:
        for span in spans:
            draw(span)
    else:  # each block has its own generator, so blocks can be drawn concurrently (torch releases the GIL)
        for _ in pool.map(draw, spans):
            pass
    return out


def _rng_spans(numel: int, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
    """(block, lo, hi, length) for each RNG block that U[start:stop] of a ``numel``-entry tensor touches: its
    entries lo:hi of the block's ``length``."""
    for block in range(start // RNG_BLOCK, (stop - 1) // RNG_BLOCK + 1) if stop > start else ():
        offset = block * RNG_BLOCK
        length = min(RNG_BLOCK, numel - offset)
        yield block, max(start - offset, 0), min(stop - offset, length), length


def _draw_block(seed: int, expert: str, name: str, numel: int, block: int, out: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """RNG block ``block`` of tensor ``name`` of ``expert`` whole (its own generator's first draws), into ``out``
    if given."""
    length = min(RNG_BLOCK, numel - block * RNG_BLOCK)
    where = out.device if out is not None else (device or "cpu")
    generator = seeded_generator(_block_seed(seed, expert, name, block), where)
    if out is not None:
        return torch.rand(length, generator=generator, out=out)
    return torch.rand(length, generator=generator, device=where)


class UniformStream:
    """The uniforms of one tensor of one expert (:func:`uniforms`' values), read range by range.

    A kernel that works block by block on blocks that are not RNG blocks (DELLA: whole rows) would, through
    :func:`uniforms`, draw an RNG block once for every block that ends inside it; the stream keeps the last
    RNG block it drew part of (in the scratch buffer ``slot``), so with ranges read in ascending order each
    RNG block is drawn once. Any order reads the right values; it only draws more."""

    def __init__(self, seed: int, expert: str, name: str, numel: int, slot: str):
        self.key, self.numel, self.slot = (seed, expert, name), numel, slot
        self.kept_block, self.kept = -1, None  # the RNG block whose rest a later range may read

    def read(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """U[start:stop] into ``out`` (``stop − start`` float32 entries), drawn on ``out``'s device."""
        for block, lo, hi, length in _rng_spans(self.numel, start, stop):
            target = out[block * RNG_BLOCK + lo - start:block * RNG_BLOCK + hi - start]
            if lo == 0 and hi == length:  # the whole block: straight into the output, nothing left to keep
                _draw_block(*self.key, self.numel, block, target)
                continue
            if block != self.kept_block or self.kept.device != out.device:
                self.kept = _draw_block(*self.key, self.numel, block, scratch(self.slot, length, out.device))
                self.kept_block = block
            target.copy_(self.kept[lo:hi])
        return out


SCRATCH_MAX = 1 << 24  # float32 entries (64 MB, the engine's row-chunk size) per scratch slot and thread
_SCRATCH = threading.local()


def scratch(slot: str, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """An uninitialised flat float32 buffer on ``device`` (default the CPU), reused between calls on this
    thread for the same ``slot``: a fresh buffer of tens of MB costs more in page faults than the
    arithmetic done in it. Above ``SCRATCH_MAX`` entries, and on a GPU (whose caching allocator already
    reuses blocks, and whose memory should hold only the tensors in flight), a fresh buffer. The caller
    must be done with it before asking again."""
    device = torch.device("cpu" if device is None else device)
    if numel > SCRATCH_MAX or device.type != "cpu":
        return torch.empty(numel, dtype=torch.float32, device=device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(slot)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[slot] = torch.empty(numel, dtype=torch.float32)
    return buffer[:numel]


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)
_POOL_LOCK = threading.Lock()


def _rng_pool() -> ThreadPoolExecutor | None:
    """A shared pool of ``torch.get_num_threads()`` workers for drawing RNG blocks (None when single-threaded)."""
    global _POOL
    workers = torch.get_num_threads()
    if workers <= 1:
        return None
    with _POOL_LOCK:
        if _POOL is None or _POOL[:2] != (os.getpid(), workers):  # new after a fork or a thread-count change
            _POOL = (os.getpid(), workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge-rng"))
        return _POOL[2]


def random_keep_mask(shape: torch.Size | tuple, keep_rate: float | torch.Tensor, *, seed: int, expert: str,
                     name: str, numel: int | None = None, start: int = 0,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask, True where U < keep_rate (``keep_rate`` may broadcast, e.g. per unit), on ``device``
    (default: ``keep_rate``'s device when it is a tensor, else the CPU).

    ``numel``/``start`` locate a row chunk inside the full tensor (defaults: the whole tensor).
    """
    size = math.prod(shape)
    total = size if numel is None else numel
    if device is None and torch.is_tensor(keep_rate):
        device = keep_rate.device
    u = uniforms(seed, expert, name, total, start, start + size, device=device).reshape(shape)
    return u < keep_rate


def dare(delta: torch.Tensor, drop_ratio: float | torch.Tensor, *, seed: int, expert: str, name: str,
         rescale: bool = True, numel: int | None = None, start: int = 0, inplace: bool = False) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability p, rescale survivors by 1/(1-p).

    ``inplace=True`` lets the result overwrite ``delta`` (same values, one allocation fewer)."""
    keep = 1.0 - drop_ratio
    if not torch.is_tensor(keep) and keep >= 1.0:
        return delta
    size = math.prod(delta.shape)
    total = size if numel is None else numel
    u = uniforms(seed, expert, name, total, start, start + size,
                 out=scratch("uniforms", size, delta.device)).reshape(delta.shape)
    if _broadcasts_into(tuple(keep.shape) if torch.is_tensor(keep) else (), tuple(u.shape)):
        # the keep mask as 1.0/0.0 written over the uniforms: multiplying by it is multiplying by
        # random_keep_mask's booleans, without torch first copying the booleans to floats
        mask = u.lt_(keep)
        mask = mask if mask.dtype == delta.dtype else mask.to(delta.dtype)
    else:
        mask = u < keep
    kept = delta.mul_(mask) if inplace and mask.shape == delta.shape else delta * mask
    if rescale:
        keep_t = torch.as_tensor(keep, dtype=delta.dtype, device=delta.device)
        kept.div_(keep_t.clamp_min(1e-12))
    return kept


def _broadcasts_into(shape: tuple, target: tuple) -> bool:
    """A tensor of ``shape`` broadcasts to ``target`` without enlarging it."""
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def kth_largest_threshold(values: torch.Tensor, k: int) -> float:
    """Threshold t such that exactly the k largest of ``values`` are > t (no ties), via k-th value, not a sort."""
    flat = values.reshape(-1)
    n = flat.numel()
    if k >= n:
        return -math.inf
    if k <= 0:
        return math.inf
    return kth_smallest(flat, n - k)


def kth_smallest(values: torch.Tensor, j: int) -> float:
    """The j-th smallest (1-based) of ``values``: exactly ``torch.kthvalue(values.reshape(-1), j)``'s value,
    by a sample-located band on large float inputs (a few passes instead of a selection over everything)."""
    flat = values.reshape(-1)
    if flat.numel() >= _SELECT_MIN and flat.is_floating_point():
        value = _kth_smallest_in_band(flat, j)
        if value is not None:
            return value
    return float(torch.kthvalue(flat, j).values)


_SELECT_SAMPLE = 1 << 16  # sample size for locating the k-th value
_SELECT_MIN = 1 << 18  # below this many entries torch.kthvalue on everything is fast enough


def _sample_band(sample: torch.Tensor, q: float) -> tuple[float, float]:
    """The sample's order statistics six standard deviations either side of quantile ``q``: a band that holds
    the population's q-quantile unless the sample is very unlucky. A side the sample cannot bound is ±inf."""
    size = sample.numel()
    spread = 6.0 * math.sqrt(size * q * (1.0 - q)) + 8.0
    lo_index, hi_index = int(q * size - spread), int(q * size + spread)
    ordered = _sorted_values(sample)
    lo = float(ordered[lo_index]) if lo_index >= 0 else -math.inf
    hi = float(ordered[hi_index]) if hi_index < size else math.inf
    return lo, hi


def _numpy_float32(values: torch.Tensor) -> bool:
    """Whether ``values`` takes the numpy path: float32 on the CPU (numpy holds no bfloat16, and a GPU keeps
    torch's)."""
    return values.device.type == "cpu" and values.dtype == torch.float32


def _sorted_values(values: torch.Tensor):
    """``values`` sorted ascending (NaN last): by numpy on the CPU, whose sort of a 16k-entry sample takes
    85 µs where torch's takes 1.2 ms and one torch.kthvalue 0.25 ms; by torch on a GPU."""
    if _numpy_float32(values):
        return np.sort(values.detach().numpy())
    return values.sort().values.cpu()


def _kth_of(values: torch.Tensor, j: int) -> float:
    """``torch.kthvalue(values, j)``'s value (1-based; ``values`` flat and free of NaN), by numpy's
    introselect on the CPU (a 5k-entry band: 12 µs, against 52 µs)."""
    if _numpy_float32(values):
        return float(np.partition(values.detach().numpy(), j - 1)[j - 1])
    return float(torch.kthvalue(values, j).values)


@functools.lru_cache(maxsize=256)
def _sample_positions(n: int, size: int) -> torch.Tensor:
    """The fixed random positions (CPU generator seeded 0, so the same on every device) that locate a k-th
    value among ``n`` entries, drawn once per (n, size): a model repeats a few tensor sizes many times.
    Ascending, as the band depends on the sampled values, not their order, and ``index_select`` reads memory
    in order fastest (16k of 2.4M entries: 87 µs, against 261 µs for unsorted advanced indexing). Read-only."""
    return torch.randint(n, (size,), generator=seeded_generator(0)).sort().values


def _kth_smallest_in_band(flat: torch.Tensor, j: int) -> float | None:
    """The j-th smallest (1-based) of ``flat`` — the value ``torch.kthvalue(flat, j)`` returns — found by
    locating a narrow band of values around it from a fixed random sample, counting what lies below the
    band and selecting inside it: a few vectorised passes instead of a selection over every entry.
    None when the band misses (then the caller selects over everything) or ``flat`` holds NaN."""
    n = flat.numel()
    sample = flat.index_select(0, _sample_positions(n, _SELECT_SAMPLE).to(flat.device))  # the same every time
    lo, hi = _sample_band(sample, j / n)
    has_lo, has_hi = lo != -math.inf, hi != math.inf  # a missing side is unbounded
    if not (has_lo or has_hi):
        return None
    if _numpy_float32(flat):
        value = _kth_in_counted_band(_value_band_counts(flat.detach().numpy(), lo, hi), lo, hi, n, j)
        if value is None or value != 0.0 or not bool(torch.signbit(flat).any()):
            return value  # a miss, a non-zero, or a zero where there is no -0.0 (magnitudes)
        return float(torch.kthvalue(flat, j).values)  # +0.0 or -0.0: the one torch.kthvalue picks
    # two comparisons over everything where both sides are bounded: NaN fails both, so it is counted below
    # and above and the three counts add up to more than n; one-sided, NaN is in no count (fewer than n)
    at_least = flat >= lo if has_lo else None
    at_most = flat <= hi if has_hi else None
    if has_lo and has_hi:
        below, above = n - int(at_least.count_nonzero()), n - int(at_most.count_nonzero())
    else:
        below = int((flat < lo).count_nonzero()) if has_lo else 0
        above = int((flat > hi).count_nonzero()) if has_hi else 0
    inside = at_least.logical_and_(at_most) if has_lo and has_hi else (at_least if has_lo else at_most)
    del at_most
    band = flat[inside]
    del inside, at_least
    if below + band.numel() + above != n:  # NaN somewhere
        return None
    if not below < j <= below + band.numel():
        return None
    return _kth_of(band, j - below)


def _kth_in_counted_band(counts: tuple[int, int, int, int, torch.Tensor], lo: float, hi: float, n: int,
                         j: int) -> float | None:
    """The j-th smallest of ``n`` values from their band counts (:func:`_value_band_counts`), or None when the
    band misses it or some value is NaN (in no count)."""
    below, above, at_lo, at_hi, between = counts
    if below + at_lo + between.numel() + at_hi + above != n:
        return None
    rank = j - below  # within the band [lo, hi]
    if not 0 < rank <= at_lo + between.numel() + at_hi:
        return None
    if rank <= at_lo:
        return lo
    if rank > at_lo + between.numel():
        return hi
    return _kth_of(between, rank - at_lo)


def magnitude_mask(delta: torch.Tensor, density: float, threshold: float | None = None,
                   ties: int = 0) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest |Δ| (top-k by k-th value, not a sort).

    Entries tied at the threshold are kept lowest flat index first, so the kept count is exact and the
    choice is deterministic (fp16/bf16 deltas tie often). With a ``threshold`` taken over more than
    ``delta`` (a row chunk, a layer, the model: :class:`~merging.methods.base.Threshold`) the entries
    above it are kept plus the first ``ties`` entries equal to it — this job's share of the ties."""
    magnitude = delta.abs()
    if threshold is not None:
        mask = magnitude > threshold
        need = ties
    else:
        k = int(round(density * delta.numel()))
        threshold = kth_largest_threshold(magnitude, k)
        mask = magnitude > threshold
        need = k - int(mask.count_nonzero()) if 0 < k < delta.numel() else 0
    if need > 0:
        mask.view(-1)[_first_tied(magnitude, threshold, need)] = True
    return mask


def magnitude_keep_factor(delta: torch.Tensor, density: float, threshold: float | None = None,
                          ties: int = 0) -> torch.Tensor:
    """:func:`magnitude_mask` as 1.0 (kept) / 0.0 in ``delta``'s dtype, built in place of the |Δ| buffer:
    ``delta * factor`` equals ``delta * magnitude_mask(...)`` without torch's bool→float copy."""
    factor = delta.abs()
    if threshold is not None:
        tied = _first_tied(factor, threshold, ties) if ties > 0 else None
        factor.gt_(threshold)
    else:
        n = delta.numel()
        k = int(round(density * n))
        threshold = kth_largest_threshold(factor, k)
        factor.gt_(threshold)
        need = k - _count_ones(factor) if 0 < k < n else 0
        tied = _first_tied(delta.abs(), threshold, need) if need > 0 else None
    if tied is not None:
        factor.view(-1)[tied] = 1.0
    return factor


def _first_tied(magnitude: torch.Tensor, cut: float, count: int) -> torch.Tensor:
    """Flat indices of the first ``count`` entries equal to ``cut`` (lowest flat index first): the tied
    entries a top-k keeps. An index list, not a cumulative count over every entry."""
    return (magnitude.reshape(-1) == cut).nonzero().reshape(-1)[:count]


def _count_ones(factor: torch.Tensor) -> int:
    """Entries equal to 1 in a 1.0/0.0 tensor: a float sum is exact while counts stay below 2^24."""
    if factor.dtype == torch.float32 and factor.numel() < (1 << 24):
        return int(factor.sum())
    return int((factor != 0).count_nonzero())


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the top ``gamma`` outliers and the smallest entries,
    keeping a ``density`` fraction in between.

    Both cuts are exact top-k masks with ties kept lowest flat index first, so the outliers are a prefix
    of the top ``top + keep`` and exactly round(density · n) entries survive even where magnitudes tie."""
    n = delta.numel()
    top = int(round(gamma * n))
    keep = int(round(density * n))
    kept = magnitude_mask(delta, min(n, top + keep) / n if n else 0.0)  # the top+keep largest
    if top > 0:
        kept &= ~magnitude_mask(delta, top / n)  # less the top outliers
    return kept


def row_magnitude_order(matrix: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Per row of a 2-D tensor, its column indices sorted by |value|, tied magnitudes by column index (lowest
    first), NaN last in both directions: ``matrix.abs().argsort(dim=1, stable=True)``, or
    ``(-matrix.abs()).argsort(dim=1, stable=True)`` when ``descending``.

    On the CPU, a float32, float16 or bfloat16 row is ranked by sorting one int64 key per entry: the
    magnitude's float32 bit pattern (ordered like the magnitude, as it is non-negative; every NaN made one
    value above infinity) above the column index. The keys are distinct, so any sort returns the stable order,
    and numpy sorts them with SIMD, releasing the GIL, about 4x faster than torch's stable float argsort
    (``benchmarks/bench_merge.py``, DELLA)."""
    rows, cols = matrix.shape
    if not _packs_row_keys(matrix):
        magnitude = matrix.abs()
        return (-magnitude if descending else magnitude).argsort(dim=1, stable=True)
    magnitude_bits = matrix.detach().float().view(torch.int32).bitwise_and(0x7FFFFFFF)
    magnitude_bits.clamp_(max=_NAN_KEY)  # every NaN payload one key, so NaNs keep their column order
    if descending:  # a larger magnitude gets a smaller key; NaN (-1 here) the largest, 0x7FFFFFFF
        magnitude_bits.neg_().add_(_INF_BITS).bitwise_and_(0x7FFFFFFF)
    halves = torch.empty(rows, cols, 2, dtype=torch.int32)  # little-endian int64: low word, then high word
    halves[..., 0] = torch.arange(cols, dtype=torch.int32)
    halves[..., 1] = magnitude_bits
    keys = halves.view(torch.int64).reshape(rows, cols)
    keys.numpy().sort(axis=1)  # in place, off the GIL
    return keys.bitwise_and_(0xFFFFFFFF)  # the column index, in the low word


_INF_BITS = 0x7F800000  # float32 +inf; a magnitude's bits above it are NaN
_NAN_KEY = _INF_BITS + 1


def _packs_row_keys(matrix: torch.Tensor) -> bool:
    return (matrix.device.type == "cpu" and matrix.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and 0 < matrix.shape[1] < (1 << 31) and sys.byteorder == "little")


def della_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length) of the matrix DELLA ranks a tensor of ``shape`` as: axis 0 by everything after it,
    a 1-D or 0-dim tensor one row. (Spelled out, not ``reshape(shape[0], -1)``, which fails with no rows.)"""
    return (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, math.prod(shape))


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al. 2024): per row, keep probability rises linearly with magnitude rank
    from density − ε/2 (smallest) to density + ε/2 (largest), clipped to (0, 1].

    Ranks are taken within each row (axis 0; everything else flattened), so a row chunk gets the
    probabilities its rows get in the whole tensor: DELLA merges in row chunks unchanged. Tied magnitudes
    rank by position. The probability of each rank is computed once per row length and scattered to the
    entries holding that rank."""
    matrix = delta.reshape(della_rows(delta.shape))
    cols = matrix.shape[1]
    ranks = torch.arange(cols, device=matrix.device).float()
    spread = ranks / max(cols - 1, 1) - 0.5 if cols > 1 else torch.zeros_like(ranks)
    rank_probs = (density + epsilon * spread).clamp(1e-6, 1.0)
    order = row_magnitude_order(matrix)
    probs = torch.empty(matrix.shape, dtype=rank_probs.dtype, device=matrix.device)
    probs.scatter_(1, order, rank_probs.expand_as(order))
    return probs.reshape(delta.shape)


def della(delta: torch.Tensor, density: float, epsilon: float, *, seed: int, expert: str, name: str,
          numel: int | None = None, start: int = 0) -> torch.Tensor:
    probs = della_keep_probabilities(delta, density, epsilon)
    mask = random_keep_mask(delta.shape, probs, seed=seed, expert=expert, name=name, numel=numel, start=start,
                            device=delta.device)
    return delta * mask / probs


def ordered_sum(stacked: torch.Tensor) -> torch.Tensor:
    """Σ over axis 0, adding the rows in order (x0 + x1 + …), as a new float tensor.

    Not ``stacked.sum(0)``: from 5 rows torch adds them in an order that depends on an entry's position
    in memory, so a row chunk would not sum like the same rows of the whole tensor (1 ulp, enough to flip
    an elected sign where deltas cancel)."""
    total = stacked[0].float().clone()
    for row in stacked[1:]:
        total.add_(row)
    return total


def elect_sign(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election: the sign of the summed (weighted, trimmed) deltas per entry. Input [T, ...]."""
    return sign_of_sum(ordered_sum(weighted_deltas), inplace=True)


def sign_of_sum(summed: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """:func:`elect_sign` from the already summed deltas: sign per entry, zeros counted as +1
    (``inplace=True`` overwrites ``summed``)."""
    sign = summed.sign_() if inplace else torch.sign(summed)
    if sign.dtype != torch.float32 or sign.dim() == 0:
        return sign.masked_fill_(sign == 0, 1)
    # + 1.0 where the sign is 0: masked_fill_(sign == 0, 1.0) by float arithmetic, as a comparison written
    # into floats takes a fifth of the time of one written into booleans
    zero = torch.eq(sign, 0, out=scratch("sign-zero", sign.numel(), sign.device).view(sign.shape))
    return sign.add_(zero)


TINY_DIVISOR = 1e-12  # a normalising divisor smaller than this in magnitude counts as no weight at all


def replace_tiny_divisors_(divisor: torch.Tensor) -> torch.Tensor:
    """``divisor`` with every entry of magnitude below :data:`TINY_DIVISOR` set to 1, in place: what
    ``masked_fill_(divisor.abs() < TINY_DIVISOR, 1.0)`` does (NaN and ±inf kept), by float arithmetic —
    d · [|d| ≥ tiny] + [|d| < tiny] — which is several times faster on the CPU than a boolean mask."""
    if divisor.dim() == 0 or divisor.dtype != torch.float32:
        return divisor.masked_fill_(divisor.abs() < TINY_DIVISOR, 1.0)
    fine = torch.abs(divisor, out=scratch("divisor-fine", divisor.numel(), divisor.device).view(divisor.shape))
    fine.ge_(TINY_DIVISOR)  # 1.0 where |d| ≥ tiny; 0.0 where tiny, and where NaN (NaN · 0 stays NaN)
    divisor.mul_(fine)
    return divisor.add_(fine.neg_().add_(1.0))


def agreement_mask(weighted_deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Entries whose sign agrees with the elected sign (zeros never agree)."""
    return torch.sign(weighted_deltas) == sign.unsqueeze(0)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation between two flattened tensors; linear when nearly colinear.

    Uses the directions for the angle and interpolates the raw tensors (mergekit's convention)."""
    a32, b32 = a.float().reshape(-1), b.float().reshape(-1)
    na, nb = a32.norm(), b32.norm()
    if na < eps or nb < eps:
        return ((1 - t) * a32 + t * b32).reshape(a.shape)
    dot = torch.clamp((a32 / na) @ (b32 / nb), -1.0, 1.0)
    if abs(float(dot)) > 0.9995:
        return ((1 - t) * a32 + t * b32).reshape(a.shape)
    theta = torch.arccos(dot)
    sin_theta = torch.sin(theta)
    s0 = torch.sin((1 - t) * theta) / sin_theta
    s1 = torch.sin(t * theta) / sin_theta
    return (s0 * a32 + s1 * b32).reshape(a.shape)


@dataclass(frozen=True)
class TopK:
    """Where the k largest |values| over many tensors end: keep |value| > ``cut`` and the first ``ties``
    entries with |value| == ``cut`` (lowest position first). ``tied[i]`` counts the entries equal to
    ``cut`` in the i-th tensor the chunks yielded, so a caller can hand out the tie quota in order."""

    cut: float
    ties: int
    tied: tuple[int, ...]


def streaming_kth_largest(chunks: Callable[[], Iterable[torch.Tensor]], k: int, bins: int = 4096) -> float:
    """Threshold t of the k largest |value| over many tensors: exactly k are > t when no value ties at t
    (:func:`streaming_topk` also says how many tied ones to keep)."""
    return streaming_topk(chunks, k, bins).cut


def streaming_topk(chunks: Callable[[], Iterable[torch.Tensor]], k: int, bins: int = 4096) -> TopK:
    """Exact top-k of |value| over many tensors without concatenating them, ties included.

    Pass 1 samples the magnitudes; pass 2 gathers the narrow band around the k-th largest that the
    sample locates, counts what lies above it and selects inside it. Should the band miss, a
    logarithmic histogram (count per bin, then gather the bin holding the k-th largest) does it in
    two more passes. Equal values fall in the same band or bin, so the entries tied at the cut are
    all in what was gathered: counting them per input tensor costs no extra pass. ``chunks`` is called
    once per pass and yields tensors (worked through in flat pieces of at most ``_PIECE`` entries,
    bounding the temporaries).
    """
    owner: list[int] = []  # input tensor of each piece (filled on the first pass)
    pieces = _in_pieces(chunks, owner)
    total = 0
    low, high = math.inf, -math.inf
    samples = []
    for index, chunk in enumerate(pieces()):
        total += chunk.numel()
        if chunk.numel():  # about one entry in _SAMPLE_EVERY, drawn with replacement (count rounded at random)
            generator = seeded_generator(index)  # CPU on any device: the sample only locates the cut
            whole, part = divmod(chunk.numel(), _SAMPLE_EVERY)
            count = whole + int(float(torch.rand(1, generator=generator)) * _SAMPLE_EVERY < part)
            picks = torch.randint(chunk.numel(), (count,), generator=generator).to(chunk.device)
            samples.append(chunk[picks].abs())
    n_inputs = (owner[-1] + 1) if owner else 0
    none = (0,) * n_inputs
    if k >= total:
        return TopK(-math.inf, 0, none)
    if k <= 0:
        return TopK(math.inf, 0, none)
    found = _band_topk(pieces, owner, n_inputs, torch.cat(samples), total, k)
    if found is not None:
        return found
    for chunk in pieces():  # the histogram's range
        nonzero = chunk.abs()
        nonzero = nonzero[nonzero > 0]
        if nonzero.numel():
            low = min(low, float(nonzero.min()))
            high = max(high, float(nonzero.max()))
    if high == -math.inf:  # all zeros: k of them are kept, as the whole-tensor top-k keeps them
        return TopK(0.0, k, _tied_per_input(pieces, owner, n_inputs, 0.0))
    log_low, log_high = math.log(low), math.log(high) + 1e-6
    width = (log_high - log_low) / bins
    counts = torch.zeros(bins + 1, dtype=torch.long)  # last slot: zeros (on the CPU: 4097 counts, read there)
    for chunk in pieces():
        index = _log_bin(chunk, log_low, width, bins)
        counts += torch.bincount(index, minlength=bins + 1).cpu()
    # walk from the largest bin down until k values are covered (zeros sit in slot `bins`)
    order = list(range(bins - 1, -1, -1)) + [bins]
    above = 0
    for b in order:
        if above + int(counts[b]) >= k:
            target_bin, need = b, k - above
            break
        above += int(counts[b])
    gathered = [c.abs().reshape(-1)[_log_bin(c, log_low, width, bins) == target_bin] for c in pieces()]
    inside = torch.cat(gathered)
    if target_bin == bins:  # the cut falls among zeros: every nonzero kept, and `need` zeros
        cut, ties = 0.0, need
    elif need >= inside.numel():  # the whole bin is kept: cut just below its smallest value
        smallest = inside.min().float()
        return TopK(float(torch.nextafter(smallest, smallest.new_tensor(-math.inf))), 0, none)
    else:
        cut = kth_largest_threshold(inside, need)
        ties = need - int((inside > cut).count_nonzero())
    tied = [0] * n_inputs
    for piece, values in zip(owner, gathered):
        tied[piece] += int((values == cut).count_nonzero())
    return TopK(cut, ties, tuple(tied))


_SAMPLE_EVERY = 256  # one magnitude in this many is sampled for locating the k-th value (a 4096² matrix: 65k)


def _band_topk(pieces, owner: list[int], n_inputs: int, sample: torch.Tensor, total: int, k: int) -> TopK | None:
    """:func:`streaming_topk` in one more pass: a narrow band [lo, hi] of magnitudes around the k-th
    largest, located from the sample, is gathered (counting what lies above and below it) and selected
    in. Entries equal to lo or hi are counted, not gathered: a band on a value held by most entries (the
    zeros of a barely changed model) costs no memory. None when the band misses the k-th value (an
    unlucky sample, NaN): the caller falls back to the histogram."""
    j = total - k  # the cut is the j-th smallest magnitude (1-based); keep what is above it, and ties
    size = sample.numel()
    if size == 0:
        return None
    q = j / total
    spread = 6.0 * math.sqrt(size * q * (1.0 - q)) + 8.0
    lo_index, hi_index = int(q * size - spread), int(q * size + spread)
    ordered = _sorted_values(sample)  # a side the sample cannot bound stays open
    lo = float(ordered[lo_index]) if lo_index >= 0 else -math.inf
    hi = float(ordered[hi_index]) if hi_index < size else math.inf
    below = above = 0
    at_lo, at_hi, between = [], [], []  # per piece: count == lo, count == hi (if hi > lo), values in (lo, hi)
    for piece in pieces():
        counts = _band_counts_numpy(piece, lo, hi) if _numpy_float32(piece) else _band_counts_torch(piece, lo, hi)
        below += counts[0]
        above += counts[1]
        at_lo.append(counts[2])
        at_hi.append(counts[3])
        between.append(counts[4])
    values = torch.cat(between)
    n_lo, n_hi, n_mid = sum(at_lo), sum(at_hi), values.numel()
    if below + n_lo + n_mid + n_hi + above != total or not below < j <= below + n_lo + n_mid + n_hi:
        return None
    rank = j - below  # of the cut within the band
    if rank <= n_lo:
        cut, tied = lo, at_lo
    elif rank > n_lo + n_mid:
        cut, tied = hi, at_hi
    else:
        cut = _kth_of(values, rank - n_lo)
        tied = [int((inside == cut).count_nonzero()) for inside in between]
    kept_above = above + (n_hi if cut < hi else 0) + int((values > cut).count_nonzero())
    per_input = [0] * n_inputs
    for piece, count in zip(owner, tied):
        per_input[piece] += count
    return TopK(cut, k - kept_above, tuple(per_input))


def _band_counts_torch(piece: torch.Tensor, lo: float, hi: float) -> tuple[int, int, int, int, torch.Tensor]:
    """Of ``piece``'s magnitudes: how many are < lo, > hi, == lo, == hi (0 unless hi > lo), and those in
    (lo, hi), in flat order."""
    magnitude = piece.abs()
    return (int((magnitude < lo).count_nonzero()), int((magnitude > hi).count_nonzero()),
            int((magnitude == lo).count_nonzero()), int((magnitude == hi).count_nonzero()) if hi > lo else 0,
            magnitude[(magnitude > lo) & (magnitude < hi)])


def _band_counts_numpy(piece: torch.Tensor, lo: float, hi: float) -> tuple[int, int, int, int, torch.Tensor]:
    """:func:`_band_counts_torch` for a float32 piece on the CPU, by numpy (see
    :func:`_delta_band_pass_numpy` for why)."""
    return _value_band_counts(torch.abs(piece.detach().reshape(-1), out=scratch("band-magnitude", piece.numel())).numpy(),
                              lo, hi)


def _value_band_counts(magnitude: np.ndarray, lo: float, hi: float) -> tuple[int, int, int, int, torch.Tensor]:
    """Of flat float32 ``magnitude``: how many are < lo, > hi, == lo, == hi (0 unless hi > lo), and a copy
    of those in (lo, hi), in flat order. NaN is in none of them. Block by block, so that the masks stay in
    the CPU cache."""
    size = min(magnitude.size, _TOPK_BLOCK)
    mask, other = np.empty(size, dtype=bool), np.empty(size, dtype=bool)
    below = above = at_lo = at_hi = 0
    between = []
    for start in range(0, magnitude.size, _TOPK_BLOCK):
        block = magnitude[start:start + _TOPK_BLOCK]
        m, o = mask[:block.size], other[:block.size]
        below += int(np.count_nonzero(np.less(block, lo, out=m)))
        above += int(np.count_nonzero(np.greater(block, hi, out=m)))
        at_lo += int(np.count_nonzero(np.equal(block, lo, out=m)))
        at_hi += int(np.count_nonzero(np.equal(block, hi, out=m))) if hi > lo else 0
        between.append(block[np.logical_and(np.greater(block, lo, out=m), np.less(block, hi, out=o), out=m)])
    return below, above, at_lo, at_hi, torch.from_numpy(np.concatenate(between) if between else magnitude[:0].copy())


def delta_topk(tensor: torch.Tensor, base: torch.Tensor, k: int) -> tuple[float, int]:
    """Exact top-k of |tensor − base| (flat, float32 arithmetic) without materialising the delta: the cut and
    how many entries equal to it to keep (lowest flat index first) — what :func:`magnitude_keep_factor`
    keeps from the materialised delta. A fixed random sample of the delta locates a narrow band of
    magnitudes around the k-th largest; one pass in blocks that stay in the CPU cache counts what lies
    below the band and gathers it; the cut is selected inside the band. A miss (an unlucky sample)
    falls back to the materialised delta. NaN is not looked for: it reaches the merge's output, which
    the engine rejects, whatever cut is taken here."""
    flat_x, flat_b = tensor.reshape(-1), base.reshape(-1)
    n = flat_b.numel()
    if k >= n:
        return -math.inf, 0
    if k <= 0:
        return math.inf, 0
    j = n - k  # the cut is the j-th smallest magnitude (1-based): keep what is above it, and ties
    if n > _TOPK_BLOCK:
        found = _delta_band_select(flat_x, flat_b, j)
        if found is not None:
            cut, above = found
            return cut, k - above
    magnitude = torch.sub(flat_x, flat_b.float(), out=scratch("topk-delta", n, flat_b.device)).abs_()
    cut = kth_largest_threshold(magnitude, k)
    return cut, k - int((magnitude > cut).count_nonzero())


_TOPK_BLOCK = 1 << 18  # entries per block of delta_topk's pass (1 MB of float32 and two 256 KB masks)
_TOPK_SAMPLE = 1 << 14  # sampled deltas locating its band (measured fastest of 2^12 … 2^16 with that block)


def _delta_band_select(flat_x: torch.Tensor, flat_b: torch.Tensor, j: int) -> tuple[float, int] | None:
    """The j-th smallest |x − b| and how many entries lie strictly above it, or None when the sampled band
    misses it."""
    n = flat_b.numel()
    index = _sample_positions(n, _TOPK_SAMPLE).to(flat_b.device)  # the same sample on every device
    sample = (flat_x.index_select(0, index).float() - flat_b.index_select(0, index).float()).abs_()
    lo, hi = _sample_band(sample, j / n)
    band_pass = _delta_band_pass_numpy if flat_b.device.type == "cpu" else _delta_band_pass_torch
    below, values = band_pass(flat_x, flat_b, lo, hi)
    if not below < j <= below + values.numel():
        return None
    cut = _kth_of(values, j - below)
    return cut, (n - below - values.numel()) + int((values > cut).count_nonzero())


def _delta_blocks(flat_x: torch.Tensor, flat_b: torch.Tensor) -> Iterator[torch.Tensor]:
    """|x − b| block by block (float32, in one reused scratch buffer that stays in the CPU cache)."""
    n = flat_b.numel()
    magnitude = scratch("topk-delta", min(n, _TOPK_BLOCK), flat_b.device)
    for start in range(0, n, _TOPK_BLOCK):
        stop = min(n, start + _TOPK_BLOCK)
        yield torch.sub(flat_x[start:stop].detach(), flat_b[start:stop].detach().float(),
                        out=magnitude[:stop - start]).abs_()


def _delta_band_pass_torch(flat_x, flat_b, lo: float, hi: float) -> tuple[int, torch.Tensor]:
    """How many |x − b| are below ``lo`` (NaN counted there), and those in [lo, hi], in flat order."""
    below, band = 0, []
    for values in _delta_blocks(flat_x, flat_b):
        at_least = values >= lo
        below += values.numel() - int(at_least.count_nonzero())
        band.append(values[(values <= hi).logical_and_(at_least)])
    return below, torch.cat(band)


def _delta_band_pass_numpy(flat_x, flat_b, lo: float, hi: float) -> tuple[int, torch.Tensor]:
    """:func:`_delta_band_pass_torch` on the CPU, its comparisons, counts and gathers done by numpy on the same
    buffer: torch writes a float comparison into booleans and gathers by a boolean mask several times
    slower (measured on one 2^18 block: 0.92 ms for torch's pass, 0.28 ms for numpy's)."""
    size = min(flat_b.numel(), _TOPK_BLOCK)
    at_least, inside = np.empty(size, dtype=bool), np.empty(size, dtype=bool)
    below, band = 0, []
    for values in _delta_blocks(flat_x, flat_b):
        magnitude = values.numpy()
        count = magnitude.size
        ge = np.greater_equal(magnitude, lo, out=at_least[:count])
        below += count - int(np.count_nonzero(ge))
        band.append(magnitude[np.logical_and(np.less_equal(magnitude, hi, out=inside[:count]), ge, out=inside[:count])])
    return below, torch.from_numpy(np.concatenate(band))


def _tied_per_input(pieces, owner: list[int], n_inputs: int, cut: float) -> tuple[int, ...]:
    tied = [0] * n_inputs
    for piece, chunk in zip(owner, pieces()):
        tied[piece] += int((chunk.abs() == cut).count_nonzero())
    return tuple(tied)


def share_ties(tied: Iterable[int], ties: int) -> list[int]:
    """Split a quota of ``ties`` tied entries over inputs holding ``tied[i]`` of them, first inputs first
    (lowest index first, as the whole-tensor top-k keeps them)."""
    out = []
    for count in tied:
        take = min(count, ties)
        out.append(take)
        ties -= take
    return out


def _log_bin(chunk: torch.Tensor, log_low: float, width: float, bins: int) -> torch.Tensor:
    magnitude = chunk.abs().reshape(-1).double()
    index = ((magnitude.clamp_min(1e-300).log() - log_low) / width).floor().long().clamp(0, bins - 1)
    return torch.where(magnitude > 0, index, torch.full_like(index, bins))


_PIECE = 1 << 21  # entries per piece in streaming_kth_largest (its float64 temporaries stay ~16 MB)


def _in_pieces(chunks: Callable[[], Iterable[torch.Tensor]],
               owner: list[int] | None = None) -> Callable[[], Iterable[torch.Tensor]]:
    """``chunks`` in flat pieces of at most ``_PIECE`` entries; ``owner`` (filled on the first call) gets the
    index of the chunk each piece comes from."""
    def pieces() -> Iterable[torch.Tensor]:
        record = owner is not None and not owner
        for index, chunk in enumerate(chunks()):
            flat = chunk.reshape(-1)
            parts = [flat] if flat.numel() <= _PIECE else flat.split(_PIECE)
            for part in parts:
                if record:
                    owner.append(index)
                yield part
    return pieces
