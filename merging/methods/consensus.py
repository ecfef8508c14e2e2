"""Consensus merging with TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging
and Compression", ICML 2024) as a registered merge method.

A task's TALL mask marks where its task vector matters more than what the other tasks add there:
``m_t = |τ_t| > λ_t · |τ_MTL − τ_t|``, τ_MTL the multi-task vector. An entry active in fewer than ``k`` tasks
is "selfish" (one task) or "catastrophic" (none) and is removed from τ_MTL; the rest is added to the base
with the scale λ: ``Θ = Θ_base + λ · τ_MTL ⊙ 1{Σ_t m_t ≥ k}``.

Facts from the authors' reference code (nik-dim/tall_masks, ``tallmask_utils.py``, ``main.py``):

- the comparison is strict (``>``) and measured entry by entry; ``k`` is ``prun_thre_k``, 2 in the paper
  (k = 0 is plain task arithmetic or TIES, k > T the base);
- τ_MTL is the task-arithmetic sum of the task vectors, or with ``use_ties`` the TIES vector (top 20 % of
  each task vector by magnitude, ``reset_thresh=20``, elected signs, agreeing entries summed: ``dis-sum``),
  and the TALL masks are then built against that TIES vector with the untrimmed τ_t;
- λ_t is chosen per task on validation data from a grid (0.2 … 2.0 in ``construct_tall_mask``); Merge Lab
  has no validation loop here, so λ_t defaults to 0.6, FusionBench's fixed ``tall_mask_lambda``.

Merge Lab's readings: expert weights w_t scale each task vector first (τ_t is ``w_t Δ_t`` throughout; at
w = 1 the reference), and norm tensors, never dropped in Merge Lab (docs/ARCHITECTURE.md, Layout), are
merged by the base method without a consensus mask or trim. The reference flattens the whole model, but
with task arithmetic every step is entry by entry, so per tensor is the same arithmetic (and row-separable);
with TIES the trim is each tensor's own top-k, as Merge Lab's TIES default (trim_scope tensor), so that
variant is merged whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..params import PER_EXPERT, PER_LAYER, SHARED, ParamSpec
from . import kernels
from .base import MethodSpec, TensorJob, register
from .classic import LAMBDA, WEIGHT

CONSENSUS_URL = "https://arxiv.org/abs/2405.07813"

TALL_LAMBDA = ParamSpec("tall_lambda", "float", 0.6,
                        "λ_t of the expert's TALL mask |τ_t| > λ_t·|τ_MTL − τ_t|: higher keeps fewer entries active "
                        "for this task (the paper tunes it per task on validation data in 0.2–2.0).",
                        PER_EXPERT, 0.0, 2.0)
K = ParamSpec("k", "int", 2, "Keep an entry only where it is active in at least k tasks' TALL masks (2 removes "
              "entries that matter to one task or to none; 0 keeps everything).", SHARED, 0, 16)
BASE_METHOD = ParamSpec("base_method", "choice", "task_arithmetic",
                        "The multi-task vector the masks are built against and applied to: the task-arithmetic "
                        "sum, or TIES (trim, elect signs, sum the agreeing entries).", SHARED,
                        choices=("task_arithmetic", "ties"))
TIES_DROP = ParamSpec("drop_ratio", "float", 0.8,
                      "With base_method ties: fraction of each task vector trimmed by magnitude, per tensor "
                      "(the reference keeps the top 20%).", PER_LAYER, 0.0, 0.999)


def _multitask_vector(job: TensorJob, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """τ_MTL of this tensor: Σ_t τ_t, or TIES' sum of the agreeing trimmed τ_t."""
    stacked = torch.stack(list(vectors.values()))
    if job.shared.get("base_method") != "ties" or not job.info.droppable:
        return kernels.ordered_sum(stacked)
    trimmed = torch.stack([v * kernels.magnitude_mask(v, 1.0 - float(job.params[e]["drop_ratio"]))
                           for e, v in vectors.items()])
    agree = kernels.agreement_mask(trimmed, kernels.elect_sign(trimmed))
    return kernels.ordered_sum(trimmed * agree)


def consensus_mask(vectors: Mapping[str, torch.Tensor], multitask: torch.Tensor, lambdas: Mapping[str, float],
                   k: int) -> torch.Tensor:
    """1{Σ_t (|τ_t| > λ_t |τ_MTL − τ_t|) ≥ k}, as a boolean tensor."""
    active = torch.zeros(multitask.shape, dtype=torch.int32, device=multitask.device)
    for expert, vector in vectors.items():
        active += vector.abs() > lambdas[expert] * (multitask - vector).abs()
    return active >= k


def _consensus_kernel(job: TensorJob) -> torch.Tensor:
    """Θ = Θ_base + λ · τ_MTL ⊙ 1{#tasks whose TALL mask is on ≥ k} (norms: no mask)."""
    vectors = {e: d * float(job.params[e]["weight"]) for e, d in job.deltas().items()}
    merged = _multitask_vector(job, vectors)
    if job.info.droppable:
        lambdas = {e: float(job.params[e]["tall_lambda"]) for e in vectors}
        merged = merged * consensus_mask(vectors, merged, lambdas, int(job.shared.get("k", 2)))
    return job.base.float() + float(job.shared.get("lambda", 1.0)) * merged


def _row_separable(shared: Mapping[str, Any]) -> bool:
    """Over task arithmetic everything is entry by entry; TIES' trim is each tensor's own top-k."""
    return shared.get("base_method", "task_arithmetic") != "ties"


register(MethodSpec(
    "consensus", "Consensus merging (TALL masks)", CONSENSUS_URL,
    "Builds each task's TALL mask, the entries where its task vector outweighs λ_t times what the other tasks "
    "add there (|τ_t| > λ_t·|τ_MTL − τ_t|), removes from the multi-task vector (task arithmetic or TIES) every "
    "entry active in fewer than k tasks, and adds λ times the rest to the base.",
    (WEIGHT, LAMBDA, TALL_LAMBDA, K, BASE_METHOD, TIES_DROP), _consensus_kernel, row_separable=_row_separable,
    explanation=(
        'Builds the multi-task vector (the task-arithmetic sum, or the TIES merge) and, for every task, a '
        "TALL mask of the entries where that task's own change is larger than λ_t times what all the "
        'other tasks add there. Entries that fewer than k masks mark, useful to a single task or to none, '
        'are removed from the multi-task vector, and λ times what remains is added to the base.'),
))
