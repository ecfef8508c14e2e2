"""RegMean, Regression Mean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023), as a registered, data-aware merge method.

For a linear layer, the weights that best reproduce every expert's outputs on that expert's inputs (least
squares over all of them) are ``W* = (Σ_t G_t)⁻¹ Σ_t G_t W_t`` with ``G_t = X_tᵀ X_t`` the Gram matrix of the
layer's inputs on expert t's data (weights oriented ``[in, out]``). The Gram matrices arrive before the merge,
measured once by ``prepare`` (:func:`merging.apl.regmean.prepare_regmean`) on each expert's few-shot texts.

- The off-diagonal entries of every G_t are scaled by α (``G̃ = α G + (1 − α) diag(G)``, the reference's
  ``reduce_non_diag``); α = 1 is the exact regression, α = 0 a per-input-feature weighted average.
- Written on the task vectors: ``Θ = Θ_base + λ · (Σ G̃_t)⁻¹ Σ G̃_t Δ_t`` (at λ = 1 exactly W*, as the G̃ sum
  to the same matrix); ``nn.Linear`` weights are stored ``[out, in]`` and transposed for the solve, GPT-2's
  ``Conv1D`` weights are ``[in, out]`` already.
- Every other tensor (embeddings, biases, norms) is the mean task vector, as the reference averages what
  is not a linear weight; λ scales it too.
- The solve runs in float64; where Σ G̃ is singular (an input feature no expert's data ever moved) the
  least-squares (pseudo-inverse) solution is used.

Facts from the authors' code (bloomberg/dataless-model-merging, ``avg_merger.py``): grams are averaged over
the batch rows (``regmean_mean``), the off-diagonal reduction multiplies off-diagonal entries by
``regmean_reduce_nondiag`` (off by default there, 0.6 for GPT-2 and 0.95 for CLIP in FusionBench's configs);
Merge Lab's default α = 0.9 sits in that range, and the paper tunes it. The solve needs the whole weight
(Conv1D rows mix), so RegMean is merged whole (not row-separable).
"""

from __future__ import annotations

import torch

from ..errors import MergeLabError
from ..params import SHARED, ParamSpec
from .base import NEEDS_BASE, NEEDS_FEW_SHOT, MethodSpec, TensorJob, register
from .classic import LAMBDA

REGMEAN_URL = "https://arxiv.org/abs/2212.09849"
REGMEAN_GRAMS = "regmean_grams"  # PerTensor {tensor: {expert: G [in, in]}}, whole (row_axis None)
REGMEAN_INPUT_AXIS = "regmean_input_axis"  # PerTensor {tensor: tensor(axis)}: the weight's axis over the inputs

ALPHA = ParamSpec("alpha", "float", 0.9,
                  "Scale α of the Gram matrices' off-diagonal entries (1: the exact regression; 0: a weighted "
                  "average per input feature).", SHARED, 0.0, 1.0)


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 − α) diag(G): off-diagonal entries times α, the diagonal kept."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_delta(deltas: list[torch.Tensor], grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """(Σ G̃_t)⁻¹ Σ G̃_t Δ_t for ``[in, out]`` task vectors, in float64."""
    reduced = [reduce_off_diagonal(g.double(), alpha) for g in grams]
    lhs = sum(reduced)
    rhs = sum(g @ d.double() for g, d in zip(reduced, deltas))
    try:
        return torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # singular: an input feature that never moved; the least-squares solution
        return torch.linalg.pinv(lhs) @ rhs


def _regmean_kernel(job: TensorJob) -> torch.Tensor:
    """Linear weights: Θ_base + λ (Σ G̃)⁻¹ Σ G̃ Δ; other tensors: Θ_base + λ · mean Δ."""
    deltas = job.deltas()
    lam = float(job.shared.get("lambda", 1.0))
    base = job.base.float()
    if REGMEAN_GRAMS not in job.extras and any(bool(torch.count_nonzero(d)) for d in deltas.values()):
        raise MergeLabError(f"RegMean has no Gram matrices (tensor '{job.name}'): compute them first "
                            "(merging.apl.regmean.prepare_regmean with the experts' few-shot data)")
    grams = job.extras.get(REGMEAN_GRAMS)
    if not grams or job.base.dim() != 2:  # not a linear layer's weight (embeddings, biases, norms)
        return base + lam * torch.stack(list(deltas.values())).mean(dim=0)
    missing = [e for e in deltas if e not in grams]
    if missing:
        raise MergeLabError(f"RegMean has no Gram matrix of '{job.name}' for expert '{missing[0]}': prepare "
                            "RegMean with every expert's few-shot data")
    axis = job.extras.get(REGMEAN_INPUT_AXIS)
    axis = 1 if axis is None else int(axis)
    oriented = [d if axis == 0 else d.T for d in deltas.values()]  # [in, out]
    if grams[next(iter(deltas))].shape[0] != oriented[0].shape[0]:
        raise MergeLabError(f"RegMean's Gram matrix of '{job.name}' is {tuple(grams[next(iter(deltas))].shape)}, "
                            f"but the weight has {oriented[0].shape[0]} inputs: prepare RegMean again")
    merged = regmean_delta(oriented, [grams[e] for e in deltas], float(job.shared.get("alpha", 0.9))).float()
    return base + lam * (merged if axis == 0 else merged.T)


def _prepare_regmean(expert_set, examples=None, tokenizer=None, **kwargs) -> dict:
    """Every expert's input Gram matrices on its few-shot examples (the measurement loads only now)."""
    from ..apl.regmean import prepare_regmean

    return prepare_regmean(expert_set, examples, tokenizer, **kwargs)


register(MethodSpec(
    "regmean", "RegMean", REGMEAN_URL,
    "Runs each expert on its few-shot texts to record the Gram matrix of every linear layer's inputs, then "
    "solves each linear layer for the weights that best reproduce all experts' outputs on their own inputs, "
    "(Σ G_t)⁻¹ Σ G_t W_t with the off-diagonal Gram entries scaled by α, and averages the task vectors of "
    "every other tensor; λ scales the result.",
    (LAMBDA, ALPHA), _regmean_kernel, needs=frozenset({NEEDS_BASE, NEEDS_FEW_SHOT}),
    prepare=_prepare_regmean, row_separable=False,
    explanation=(
        "Records, on each expert's few-shot texts, the Gram matrix of every linear layer's inputs, then "
        "replaces that layer's task vectors by the single change that best reproduces every expert's "
        'outputs on its own inputs (least squares, (Σ G_t)⁻¹ Σ G_t Δ_t, with the off-diagonal Gram '
        "entries scaled by α): input directions one expert uses get that expert's change. Other tensors "
        'get the mean task vector; λ scales the result.'),
))
