"""Merge primitives: small pure functions, one job each, testable against a formula.

Random drops draw from a generator owned by (seed, expert, tensor name) — one uniform
per entry, kept where it falls under the keep rate — so a partial re-merge equals a full
merge, tensor order never matters, and DARE and APL share masks at equal rates. The
uniforms come in fixed blocks of elements, each block with its own generator, so a
tensor merged in row chunks draws exactly what it would draw whole.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable

import torch

RNG_BLOCK = 1 << 20  # elements per generator block


def _block_seed(seed: int, expert: str, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{expert}\x00{name}\x00{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def uniforms(seed: int, expert: str, name: str, numel: int, start: int = 0, end: int | None = None) -> torch.Tensor:
    """The uniforms U[start:end] of tensor ``name`` of ``expert`` (flat, float32)."""
    end = numel if end is None else end
    pieces = []
    generator = torch.Generator()
    first, last = start // RNG_BLOCK, (max(end, 1) - 1) // RNG_BLOCK
    for block in range(first, last + 1):
        generator.manual_seed(_block_seed(seed, expert, name, block))
        block_len = min(RNG_BLOCK, numel - block * RNG_BLOCK)
        draw = torch.rand(block_len, generator=generator)
        lo = max(start - block * RNG_BLOCK, 0)
        hi = min(end - block * RNG_BLOCK, block_len)
        pieces.append(draw[lo:hi])
    return torch.cat(pieces) if pieces else torch.empty(0)


def random_keep_mask(shape: torch.Size | tuple, keep_rate: float | torch.Tensor, *, seed: int, expert: str,
                     name: str, numel: int | None = None, start: int = 0) -> torch.Tensor:
    """Boolean mask, True where U < keep_rate (``keep_rate`` may broadcast, e.g. per unit).

    ``numel``/``start`` locate a row chunk inside the full tensor (defaults: the whole tensor).
    """
    size = math.prod(shape)
    total = size if numel is None else numel
    u = uniforms(seed, expert, name, total, start, start + size).reshape(shape)
    return u < keep_rate


def dare(delta: torch.Tensor, drop_ratio: float | torch.Tensor, *, seed: int, expert: str, name: str,
         rescale: bool = True, numel: int | None = None, start: int = 0) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability p, rescale survivors by 1/(1-p)."""
    keep = 1.0 - drop_ratio
    if not torch.is_tensor(keep) and keep >= 1.0:
        return delta
    mask = random_keep_mask(delta.shape, keep, seed=seed, expert=expert, name=name, numel=numel, start=start)
    kept = delta * mask
    if rescale:
        keep_t = torch.as_tensor(keep, dtype=delta.dtype)
        kept = kept / keep_t.clamp_min(1e-12)
    return kept


def kth_largest_threshold(values: torch.Tensor, k: int) -> float:
    """Threshold t such that exactly the k largest of ``values`` are > t (no ties), via k-th value, not a sort."""
    flat = values.reshape(-1)
    n = flat.numel()
    if k >= n:
        return -math.inf
    if k <= 0:
        return math.inf
    return float(torch.kthvalue(flat, n - k).values)


def magnitude_mask(delta: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest |Δ| (top-k by k-th value)."""
    if threshold is None:
        k = int(round(density * delta.numel()))
        threshold = kth_largest_threshold(delta.abs(), k)
        mask = delta.abs() > threshold
        if int(mask.sum()) != k and 0 < k < delta.numel():  # ties at the threshold: fall back to exact top-k
            mask = torch.zeros(delta.numel(), dtype=torch.bool)
            mask[torch.topk(delta.abs().reshape(-1), k).indices] = True
            mask = mask.reshape(delta.shape)
        return mask
    return delta.abs() > threshold


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the top ``gamma`` outliers and the smallest entries,
    keeping a ``density`` fraction in between."""
    n = delta.numel()
    magnitude = delta.abs()
    top = int(round(gamma * n))
    keep = int(round(density * n))
    upper = kth_largest_threshold(magnitude, top)  # entries > upper are outliers
    lower = kth_largest_threshold(magnitude, min(n, top + keep))  # entries > lower are the top+keep largest
    return (magnitude > lower) & ~(magnitude > upper)


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al. 2024): per row, keep probability rises linearly with magnitude rank
    from density − ε/2 (smallest) to density + ε/2 (largest), clipped to (0, 1]."""
    matrix = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)
    cols = matrix.shape[1]
    ranks = matrix.abs().argsort(dim=1).argsort(dim=1).float()
    spread = ranks / max(cols - 1, 1) - 0.5 if cols > 1 else torch.zeros_like(ranks)
    probs = (density + epsilon * spread).clamp(1e-6, 1.0)
    return probs.reshape(delta.shape)


def della(delta: torch.Tensor, density: float, epsilon: float, *, seed: int, expert: str, name: str,
          numel: int | None = None, start: int = 0) -> torch.Tensor:
    probs = della_keep_probabilities(delta, density, epsilon)
    mask = random_keep_mask(delta.shape, probs, seed=seed, expert=expert, name=name, numel=numel, start=start)
    return delta * mask / probs


def elect_sign(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election: the sign of the summed (weighted, trimmed) deltas per entry. Input [T, ...]."""
    sign = torch.sign(weighted_deltas.sum(dim=0))
    return torch.where(sign == 0, torch.ones_like(sign), sign)


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


def streaming_kth_largest(chunks: Callable[[], Iterable[torch.Tensor]], k: int, bins: int = 4096) -> float:
    """Exact threshold of the k-th largest |value| over many tensors without concatenating them.

    Pass 1 counts values per logarithmic bin; pass 2 gathers only the bin holding the k-th
    largest and selects inside it. ``chunks`` is called once per pass and yields tensors.
    """
    total = 0
    low, high = math.inf, -math.inf
    for chunk in chunks():
        nonzero = chunk.abs().reshape(-1)
        nonzero = nonzero[nonzero > 0]
        total += chunk.numel()
        if nonzero.numel():
            low = min(low, float(nonzero.min()))
            high = max(high, float(nonzero.max()))
    if k >= total:
        return -math.inf
    if k <= 0 or high == -math.inf:
        return math.inf
    log_low, log_high = math.log(low), math.log(high) + 1e-6
    width = (log_high - log_low) / bins
    counts = torch.zeros(bins + 1, dtype=torch.long)  # last slot: zeros
    for chunk in chunks():
        index = _log_bin(chunk, log_low, width, bins)
        counts += torch.bincount(index, minlength=bins + 1)
    # walk from the largest bin down until k values are covered (zeros sit in slot `bins`)
    order = list(range(bins - 1, -1, -1)) + [bins]
    above = 0
    for b in order:
        if above + int(counts[b]) >= k:
            target_bin, need = b, k - above
            break
        above += int(counts[b])
    gathered = [c.abs().reshape(-1)[_log_bin(c, log_low, width, bins) == target_bin] for c in chunks()]
    inside = torch.cat(gathered)
    if target_bin == bins:  # threshold falls among zeros
        return 0.0 if need < inside.numel() else -math.inf
    if need >= inside.numel():  # the whole bin is kept: cut just below its smallest value
        smallest = inside.min().float()
        return float(torch.nextafter(smallest, torch.tensor(-math.inf)))
    return kth_largest_threshold(inside, need)


def _log_bin(chunk: torch.Tensor, log_low: float, width: float, bins: int) -> torch.Tensor:
    magnitude = chunk.abs().reshape(-1).double()
    index = ((magnitude.clamp_min(1e-300).log() - log_low) / width).floor().long().clamp(0, bins - 1)
    return torch.where(magnitude > 0, index, torch.full_like(index, bins))
