"""PCB-merging, Parameter Competition Balancing (Du et al., NeurIPS 2024), as a registered merge method.

Each entry of each task vector gets a score from two balances, the entries below the drop ratio's quantile of
their task's score are dropped, and the task vectors are averaged entry by entry weighted by the scores:

- outliers clamped: |τ_i| clipped to its own [0.01 %, 99.99 %] order statistics (sorted positions
  ``int(d·1e-4)`` and ``int(d·(1 − 1e-4) − 1)``), keeping signs: τ̃_i;
- intra-balancing: ``exp(n · minmax(|τ̃_i|)²)``, minmax over the task's own entries, n the number of tasks;
- inter-balancing: ``tanh(τ_i ⊙ Σ_j τ_j)`` (the unclamped task vectors);
- score s_i = intra ⊙ inter, clamped from below at its value at sorted position ``int(d · drop_ratio)`` and
  min-max normalised, so everything at or below the cut weighs 0 and the largest score 1;
- ``Θ = Θ_base + λ · Σ_i s_i τ̃_i / max(Σ_i s_i, 1e-12)``.

These are the facts of the authors' ``PCB_merge`` (duguodong7/pcb-merging, ``pcb-merging.py``): its
``pcb_ratio`` is the kept fraction, 1 − drop_ratio, 0.1 by default there (0.05 in their evolutionary runs),
so drop_ratio defaults to 0.9. A min-max over constant values (a zero task vector) is 0/0 in the reference;
here it is 0, so such a task weighs nothing.

Scope: the reference flattens the whole model into one vector per task, so its quantiles and min-max
normalisations run over every parameter at once. Merge Lab takes them per tensor: the engine streams one
tensor at a time (a model-wide score needs every task vector of the model in memory, or several passes
over it, plus a model-wide sort), and per tensor one loud layer cannot push every other layer's entries
under the cut — the per-tensor default of Merge Lab's magnitude trims (TIES, magnitude). The whole tensor's
statistics decide every entry, so PCB is not row-separable and is merged whole. Norm tensors, never dropped
in Merge Lab (docs/ARCHITECTURE.md, Layout), are the mean of the task vectors.
"""

from __future__ import annotations

import torch

from ..params import PER_LAYER, ParamSpec
from . import kernels
from .base import MethodSpec, TensorJob, register
from .classic import LAMBDA

PCB_URL = "https://arxiv.org/abs/2410.02396"
OUTLIER_RATIO = 1e-4  # the reference's min_ratio = max_ratio of the magnitude clamp

PCB_DROP = ParamSpec("drop_ratio", "float", 0.9,
                     "Fraction of each task's entries with the lowest balanced score given weight 0 (the reference's "
                     "pcb_ratio = 1 − drop_ratio keeps 10%). Cut per tensor: the reference flattens the whole model "
                     "into one vector per task; per tensor one loud layer cannot push the others under the cut, "
                     "and the merge streams tensor by tensor.",
                     PER_LAYER, 0.0, 0.999)


def quantile_clamp(x: torch.Tensor, low_ratios: list[float], high_ratio: float) -> torch.Tensor:
    """Row i of ``x`` [n, d] clipped to its order statistics at sorted positions int(d·low_ratios[i]) and
    int(d·(1 − high_ratio) − 1) (the reference's ``clamp``, with a low ratio per row)."""
    d = x.shape[1]
    at = max(int(d * (1 - high_ratio) - 1), 0)
    low = torch.stack([order_statistic(row, int(d * r)) for row, r in zip(x, low_ratios)]).unsqueeze(1)
    high = torch.stack([order_statistic(row, at) for row in x]).unsqueeze(1)
    return torch.maximum(torch.minimum(x, high), low)


def order_statistic(row: torch.Tensor, position: int) -> torch.Tensor:
    """``row.sort().values[position]`` (a 0-d tensor of ``row``'s dtype) without sorting the row: its min or
    max at the ends, else the exact k-th smallest by selection (``kernels.kth_smallest``) — the same value."""
    if position <= 0:
        return row.min()
    if position >= row.numel() - 1:
        return row.max()
    return torch.tensor(kernels.kth_smallest(row, position + 1), dtype=row.dtype, device=row.device)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` [n, d] mapped to [0, 1] by its min and max; 0 where a row is constant."""
    low = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def pcb_scores(vectors: torch.Tensor, drop_ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(clamped task vectors τ̃, balanced scores s) of ``vectors`` [n, d], task i cut at drop_ratios[i]."""
    n = vectors.shape[0]
    magnitude = quantile_clamp(vectors.abs(), [OUTLIER_RATIO] * n, OUTLIER_RATIO)
    clamped = torch.sign(vectors) * magnitude
    intra = torch.exp(n * minmax(magnitude) ** 2)
    inter = torch.tanh(vectors * vectors.sum(dim=0))
    scores = minmax(quantile_clamp(intra * inter, drop_ratios, 0.0))
    return clamped, scores


def _pcb_kernel(job: TensorJob) -> torch.Tensor:
    """Θ = Θ_base + λ · Σ_i s_i τ̃_i / Σ_i s_i (norms: the mean task vector)."""
    deltas = job.deltas()
    stacked = torch.stack([d.reshape(-1) for d in deltas.values()])
    if job.info.droppable:
        clamped, scores = pcb_scores(stacked, [float(job.params[e]["drop_ratio"]) for e in deltas])
        merged = (clamped * scores).sum(dim=0) / scores.sum(dim=0).clamp(min=1e-12)
    else:
        merged = stacked.mean(dim=0)
    return job.base.float() + float(job.shared.get("lambda", 1.0)) * merged.reshape(job.base.shape)


register(MethodSpec(
    "pcb", "PCB (Parameter Competition Balancing)", PCB_URL,
    "Scores every entry of each task vector by how large it is within its own task (exp(n·minmax(|τ|)²)) times "
    "how much it agrees with the other tasks there (tanh(τ_i ⊙ Σ_j τ_j)), gives the entries below the drop "
    "ratio's quantile of their task's score weight 0, and adds λ times the score-weighted mean of the "
    "outlier-clamped task vectors to the base, tensor by tensor.",
    (LAMBDA, PCB_DROP), _pcb_kernel, min_experts=1, row_separable=False,
    explanation=(
        'Scores every entry of each task vector: how large it is relative to the rest of its own task '
        'vector (intra-balancing) times how much it agrees with the sum of all task vectors there '
        '(inter-balancing). In each task the lowest-scoring entries (the drop ratio) get score 0, and the '
        'merged change is the score-weighted average of the outlier-clamped task vectors, times λ, tensor '
        'by tensor.'),
))
