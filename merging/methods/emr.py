"""EMR-Merging (Huang et al., NeurIPS 2024, "EMR-Merging: Tuning-Free High-Performance Model Merging") as a
registered method. Its result is not one model but **one body per task**: a shared unified task vector plus,
for each task, a mask and a scalar rescaler.

With task vectors τ_t = θ_t − θ_0 of every merged tensor:

- **Elect**: γ = sgn(Σ_t τ_t) elementwise; ε = max over the tasks whose τ_t has the sign γ of |τ_t|;
  τ_uni = γ ⊙ ε (the largest magnitude that agrees with the elected sign);
- **Mask**: M_t = (τ_t ⊙ τ_uni > 0), the entries where task t agrees with the unified vector;
- **Rescale**: λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|, one scalar per task over the whole model (so the task's
  body keeps the task vector's total magnitude);
- **Body of task t**: θ_0 + λ_t · M_t ⊙ τ_uni.

Facts from the authors' code (harveyhuang18/EMR_Merging, ``emr_merge`` in ``merge_vit/src/main_emr_merging.py``
and ``emr_merging`` in ``merge_lm/model_merging_methods/merging_methods.py``), and what Merge Lab does:

- λ_t is **model-wide** there too (one scalar per task, accumulated over every tensor), but as a sum over
  tensors of per-tensor *means* ``Σ_n mean|τ_t,n| / Σ_n mean|M_t ⊙ τ_uni|_n`` — every tensor weighs the same
  whatever its size — where the paper writes sums over all entries. ``rescalers: model`` (default) is the
  paper's formula, ``tensor_means`` the released code's, ``none`` fixes λ_t = 1 (the ablation).
- The code elects ``flag = (mean_t τ_t > 0)·2 − 1``: −1 where the sum is exactly 0. Merge Lab takes the
  paper's sgn, 0 there, so τ_uni = 0 where the tasks cancel exactly (the two differ only on exact ties).
- Every tensor of the task vector takes part (norms and biases included): here every merged tensor; task
  heads stay with their expert (EMR keeps each task's own head too).
- λ_t where the denominator is 0 (the task agrees with τ_uni nowhere, or equals the base): the body is
  θ_0 whatever λ_t is; Merge Lab sets λ_t = 1.

The engine computes the rescalers in one pre-pass over the model (:class:`~merging.methods.base.ModelStat`,
summing per-row pieces in float64 so a chunked pass adds exactly as a whole one) and then merges each tensor
once per task. ``MergeResult.tensors`` of an EMR merge is θ_0 + τ_uni, the unified body, labelled as such —
not EMR's model: each task's model is ``MergeResult.task_bodies[task]``. Elementwise, hence row-separable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..params import SHARED, ParamSpec
from . import kernels
from .base import MethodSpec, ModelStat, TensorJob, register

EMR_URL = "https://arxiv.org/abs/2405.17461"
RESCALERS = ParamSpec(
    "rescalers", "choice", "model",
    "How each task's rescaler λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni| is summed: 'model' over every entry of the model "
    "(the paper), 'tensor_means' over the tensors' mean magnitudes (the authors' released code: each tensor "
    "counts the same), 'none' for λ_t = 1.", SHARED, choices=("model", "tensor_means", "none"))


def emr_elect(deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_uni, agree) of task vectors ``deltas`` (float32, one shape): τ_uni = γ ⊙ ε with γ = sgn(Σ τ_t) and
    ε the largest |τ_t| among tasks of sign γ; ``agree[t]`` = M_t = (τ_t ⊙ τ_uni > 0), stacked on axis 0."""
    stacked = torch.stack(deltas)
    sign = torch.sign(kernels.ordered_sum(stacked))  # in task order: a row chunk elects as the whole tensor
    agree = stacked * sign > 0
    magnitude = torch.where(agree, stacked.abs(), torch.zeros_like(stacked)).amax(dim=0)
    return sign * magnitude, agree


def _row_sums(values: torch.Tensor) -> torch.Tensor:
    """Σ|values| of each row in float64 (a tensor of under two dimensions is one row): the pieces the
    rescalers add, the same for a row chunk as for those rows of the whole tensor."""
    rows = values.reshape(1, -1) if values.dim() < 2 else values.reshape(values.shape[0], -1)
    return rows.abs().double().sum(dim=1)


def _emr_partial(job: TensorJob) -> dict[str, Any]:
    """This tensor's (or row chunk's) share of every task's rescaler: per-row Σ|τ_t| and Σ|M_t ⊙ τ_uni|."""
    deltas = job.deltas()
    unified, agree = emr_elect(list(deltas.values()))
    return {"numel": job.numel,
            "task": {e: _row_sums(d) for e, d in deltas.items()},
            "kept": {e: _row_sums(torch.where(agree[i], unified, torch.zeros_like(unified)))
                     for i, e in enumerate(deltas)}}


def emr_rescalers(partials: list[tuple[str, dict[str, Any]]], shared: Mapping[str, Any]) -> dict[str, float]:
    """λ_t of every task from the per-tensor pieces (tensors in layout order, chunks in row order)."""
    mode = shared.get("rescalers", RESCALERS.default)
    experts = list(partials[0][1]["task"]) if partials else []
    if mode == "none":
        return {e: 1.0 for e in experts}
    by_tensor: dict[str, list[dict[str, Any]]] = {}
    for name, piece in partials:
        by_tensor.setdefault(name, []).append(piece)
    out = {}
    for expert in experts:
        numerator = denominator = 0.0
        for pieces in by_tensor.values():
            scale = 1.0 / pieces[0]["numel"] if mode == "tensor_means" else 1.0
            numerator += float(torch.cat([p["task"][expert] for p in pieces]).sum()) * scale
            denominator += float(torch.cat([p["kept"][expert] for p in pieces]).sum()) * scale
        out[expert] = numerator / denominator if denominator > 0 else 1.0
    return out


def _emr_kernel(job: TensorJob) -> torch.Tensor:
    """θ_0 + λ_t · M_t ⊙ τ_uni for ``job.task``; θ_0 + τ_uni (the unified body) when no task is given."""
    base = job.base.float()
    deltas = job.deltas()
    unified, agree = emr_elect(list(deltas.values()))
    if job.task is None:
        return base + unified
    index = list(deltas).index(job.task)
    kept = torch.where(agree[index], unified, torch.zeros_like(unified))
    return base + float(job.model_stat[job.task]) * kept


register(MethodSpec(
    "emr", "EMR-Merging (one body per task)", EMR_URL,
    "One elected task vector, masked and rescaled per task: one body per task, not one model.",
    (RESCALERS,), _emr_kernel, min_experts=2, row_separable=True, per_task_bodies=True,
    model_stat=ModelStat(_emr_partial, emr_rescalers),
    explanation=(
        "Elects one unified task vector — in every entry the sign of the summed task vectors and the largest "
        "magnitude that agrees with it — then gives each task its own body: the unified vector masked to the "
        "entries where that task agrees with it, scaled by one factor per task so the task vector's total "
        "magnitude is kept. Not one model but one body per task (each task's folder holds its own body); probe "
        "rows say so, and its scores are not comparable head-to-head with single-model merges."),
))
