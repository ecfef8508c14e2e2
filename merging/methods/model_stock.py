"""Model Stock (Jang, Yun & Han, ECCV 2024) as a registered merge method.

From the angle θ between the experts' task vectors Model Stock picks how far to move from the base
towards the experts' average: ``t = N cosθ / (1 + (N − 1) cosθ)`` and ``Θ = t · mean_t Θ_t + (1 − t) · Θ_base``.
With N > 2 experts cosθ is the mean of the pairwise cosines.

The arithmetic follows mergekit 0.1.5's ``model_stock`` (``merge_methods/model_stock.py``), so an export
to mergekit merges the same tensors:

- one angle per tensor (the flattened task vectors); ``filter_wise`` takes one per row of the stored
  tensor instead (mergekit's last axis; for GPT-2's Conv1D ``[in, out]`` a row is an input unit) and a
  1-D tensor is one row either way;
- cos = ⟨Δ_a, Δ_b⟩ / max(‖Δ_a‖‖Δ_b‖, 1e-6), clamped to [−1, 1] (a zero delta has cosine 0 to everything);
- where ``|1 + (N − 1) cosθ| < 1e-6`` (two opposite task vectors) there is no finite estimate and the base
  is kept (t = 0); t is otherwise not clamped;
- every merged tensor takes part, norms included; at least two experts.

Row chunks: per tensor the angle is a whole-tensor statistic (not row-separable, merged whole); per row it
is, so ``filter_wise`` merges in row chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..params import SHARED, ParamSpec
from . import kernels
from .base import MethodSpec, TensorJob, register

MODEL_STOCK_URL = "https://arxiv.org/abs/2403.19522"
NORM_FLOOR = 1e-6  # mergekit's floor on the product of the two norms
SINGULAR = 1e-6  # |1 + (N − 1) cosθ| below this keeps the base (mergekit)

FILTER_WISE = ParamSpec("filter_wise", "bool", False,
                        "One angle (and interpolation t) per row of each tensor instead of one per tensor "
                        "(mergekit's filter_wise).", SHARED)


def model_stock_ratio(deltas: list[torch.Tensor]) -> torch.Tensor:
    """t over the last axis of the deltas (each [..., n]): N cosθ / (1 + (N − 1) cosθ), cosθ the mean
    pairwise cosine; 0 where the denominator vanishes. Shape [..., 1]. Each delta's norm is taken once and
    each pair's products go to one reused buffer (the same values as a fresh ``a * b``)."""
    norms = [torch.norm(delta, dim=-1) for delta in deltas]
    cosines = []
    for index, a in enumerate(deltas):
        for other in range(index + 1, len(deltas)):
            products = torch.mul(a, deltas[other], out=kernels.scratch("model-stock-products", a.numel(), a.device).view(a.shape))
            pair_norm = norms[index] * norms[other]
            cosines.append((products.sum(dim=-1) / pair_norm.clamp(min=NORM_FLOOR)).clamp(-1, 1))
    # the mean in pair order (not torch's mean over a stack, whose order of addition from 5 terms depends on
    # an entry's position in memory: a row chunk would not average like the same rows of the whole tensor)
    cos = (kernels.ordered_sum(torch.stack(cosines)) / len(cosines)).unsqueeze(-1)
    count = len(deltas)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


def _as_rows(tensor: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The tensor as the vectors whose angles are taken: flattened, or (filter_wise) its rows."""
    if not filter_wise:
        return tensor.reshape(-1)
    return tensor.reshape(1, -1) if tensor.dim() <= 1 else tensor


def _model_stock_kernel(job: TensorJob) -> torch.Tensor:
    """Θ = t · mean_t Θ_t + (1 − t) · Θ_base, t from the angle between the task vectors. The task vectors
    and the experts' sum live in reused buffers (a fresh tensor of tens of MB costs more in page faults than
    its arithmetic); the arithmetic is the formula's, step for step."""
    base = job.base.float()
    shape = base.shape
    filter_wise = bool(job.shared.get("filter_wise", False))
    w0 = _as_rows(base, filter_wise)
    weights = [_as_rows(tensor.float(), filter_wise) for tensor in job.experts.values()]
    deltas = [torch.sub(w, w0, out=kernels.scratch(f"model-stock-delta{index}", w0.numel(), w0.device).view(w0.shape))
              for index, w in enumerate(weights)]
    t = model_stock_ratio(deltas)
    del deltas
    average = torch.add(weights[0], weights[1], out=kernels.scratch("model-stock-delta0", w0.numel(), w0.device).view(w0.shape))
    for w in weights[2:]:
        average.add_(w)
    average.div_(len(weights))
    merged = (1 - t) * w0  # t · average + (1 − t) · Θ_base, added in either order: the same sum
    return merged.add_(average.mul_(t)).reshape(shape)


#: NaN or Inf in any input reaches the output (through a norm, a cosine and t, or the average), so the
#: engine scans only the output and names a broken input from it (engine._nonfinite_reaches_output)
_model_stock_kernel.nonfinite_reaches_output = True


def _row_separable(shared: Mapping[str, Any]) -> bool:
    """Per row (filter_wise) a chunk of rows has its own angles; per tensor the angle needs all rows."""
    return bool(shared.get("filter_wise", False))


register(MethodSpec(
    "model_stock", "Model Stock", MODEL_STOCK_URL,
    "Measures the angle θ between the experts' task vectors in each tensor (the mean pairwise cosine for more "
    "than two experts) and moves from the base towards the experts' average by t = N·cosθ / (1 + (N − 1)·cosθ): "
    "the more the task vectors agree, the closer to the average; where they are orthogonal, the base is kept.",
    (FILTER_WISE,), _model_stock_kernel, min_experts=2, mergekit_name="model_stock", row_separable=_row_separable,
    explanation=(
        "Looks at the angle between the experts' task vectors in each tensor (or in each row, with "
        "filter_wise). Where they point the same way the merge moves all the way to the experts' average; "
        'the more they disagree, the closer it stays to the base, going the fraction t = N·cosθ / (1 + (N '
        '− 1)·cosθ) of the way. No entry is dropped and there is nothing to tune.'),
))
