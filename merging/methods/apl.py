"""APL (Activated Parameter Locating) as a registered merge method.

APL merges one tensor at a time like every other method; what the few-shot data contributes
arrives *before* the merge, computed once by ``prepare``: calibration (drop ratio and weight per
expert × layer) enters as ordinary per-expert layer maps of ``drop_ratio`` and ``weight`` — so a
user's override of one cell is one map entry — and, with ``within_layer="hidden"``, per-unit
percentile profiles as engine extras, which the kernel centres on whatever drop ratio the layer
has at merge time.

APL's random drop uses the shared (seed, expert, tensor) generators, so at uniform drop ratios and
unit weights it is DARE (linear) bit for bit, and at drop 0 task arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..apl.defaults import DEFAULTS, MEAN_DROP, Q_MIN, TAU1, TAU2, UNIT_EXTRAS, WITHIN
from ..errors import MergeLabError
from ..params import SHARED, ParamSpec
from . import kernels
from .base import NEEDS_BASE, NEEDS_FEW_SHOT, NEEDS_IMPORTANCE, MethodSpec, TensorJob, register
from .classic import LAMBDA, WEIGHT

APL_URL = "https://arxiv.org/abs/2408.09485"

DROP_KIND = ParamSpec("drop", "choice", "random",
                      "How entries are dropped: seeded random with rescale 1/keep (DARE-style) or magnitude "
                      "top-k (no rescale).", SHARED, choices=("random", "magnitude"))
SIGN = ParamSpec("sign_election", "bool", False, "Elect a sign per entry (TIES) and add only agreeing deltas.")



# ---- APL kernel ----------------------------------------------------------------------------

def _apl_kernel(job: TensorJob) -> torch.Tensor:
    """Θ = Θ_base + λ Σ_t w_t ⊙ drop(Δ_t, p_t), optionally with TIES sign election (droppable tensors)."""
    droppable = job.info.droppable
    profiles = job.extras.get(UNIT_EXTRAS) or {}
    weighted = []
    for expert, delta in job.deltas().items():
        p = job.params[expert]
        if droppable:
            delta = _apl_drop(delta, expert, p, job, profiles.get(expert))
        weighted.append(delta * float(p["weight"]))
    stacked = torch.stack(weighted)
    if job.shared.get("sign_election") and droppable:
        mixed = kernels.ordered_sum(stacked * kernels.agreement_mask(stacked, kernels.elect_sign(stacked)))
    else:
        mixed = kernels.ordered_sum(stacked)  # in expert order, so row chunks sum like the whole tensor
    return job.base.float() + float(job.shared.get("lambda", 1.0)) * mixed


def _apl_drop(delta: torch.Tensor, expert: str, p: Mapping[str, Any], job: TensorJob,
              profile: torch.Tensor | None) -> torch.Tensor:
    drop_ratio = float(p["drop_ratio"])
    keep = _unit_keep(profile, 1.0 - drop_ratio, job, expert) if job.shared.get("within_layer") == "hidden" \
        and job.info.unit_axis is not None else None
    if job.shared.get("drop") == "magnitude":
        if keep is None:
            return delta * kernels.magnitude_mask(delta, 1.0 - drop_ratio)
        return delta * unit_magnitude_mask(delta, keep, job.info.unit_axis)
    if keep is None:
        return kernels.dare(delta, drop_ratio, seed=job.seed, expert=expert, name=job.name, rescale=True,
                            numel=job.numel, start=job.start)
    mask = kernels.random_keep_mask(delta.shape, keep, seed=job.seed, expert=expert, name=job.name,
                                    numel=job.numel, start=job.start)
    return delta * mask / keep.clamp_min(1e-12)


def _unit_keep(profile: torch.Tensor | None, layer_keep: float, job: TensorJob, expert: str) -> torch.Tensor:
    """Per-unit keep rates centred on this layer's keep rate, shaped to broadcast along the unit axis
    (and cut to the rows of a row chunk)."""
    if profile is None:
        raise MergeLabError(f"within_layer='hidden' needs APL's per-unit importance profiles for expert '{expert}' "
                            f"(tensor '{job.name}'): prepare APL with within_layer='hidden' (gradient importance at "
                            "hidden level), or use within_layer='uniform'")
    from ..apl.calibration import unit_keep_rates  # measurement code loads when a merge needs it, not on import

    keep = unit_keep_rates(profile.reshape(-1).double().numpy(), layer_keep,
                           float(job.shared["tau1"]), float(job.shared["q_min"]))
    keep_t = torch.from_numpy(np.asarray(keep, dtype=np.float32))
    axis = job.info.unit_axis
    if axis == 0:  # units are rows: a row chunk keeps its rows' rates (the profile came whole, row_axis=None)
        r0, r1 = job.row_range()
        keep_t = keep_t[r0:r1]
    shape = [1] * job.base.dim()
    shape[axis] = keep_t.numel()
    return keep_t.reshape(shape)


def unit_magnitude_mask(delta: torch.Tensor, keep: torch.Tensor, unit_axis: int) -> torch.Tensor:
    """Per unit, keep the round(q_j · entries) largest |Δ| of that unit's slice (deterministic top-k)."""
    moved = delta.movedim(unit_axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    k = torch.round(keep.reshape(-1).double() * rows.shape[1]).long()
    rank = (-rows.abs()).argsort(dim=1, stable=True).argsort(dim=1)
    mask = rank < k.unsqueeze(1)
    return mask.reshape(moved.shape).movedim(0, unit_axis)


def _apl_row_separable(shared: Mapping[str, Any]) -> bool:
    """The random drop is located by flat index and the unit rates cut to a chunk's rows, so row chunks
    merge exactly; a magnitude drop takes its top-k over the whole tensor (or over a unit's column when
    units run along axis 1), so the engine merges those whole."""
    return shared.get("drop", "random") != "magnitude"


def prepare_apl(expert_set, examples: Mapping[str, Sequence] | None = None, tokenizer=None, *,
                params: Mapping[str, Any] | None = None, importance=None, progress=None, **kwargs) -> dict:
    """APL's inputs: gradient importance on the few-shot ``examples`` (unless an ``importance`` map is
    given — the app computes it once and passes it in), calibrated with the method's parameters.

    Returns ``{"expert_params", "extras", "suggestion", "table", "importance"}``: per-expert layer maps
    of ``drop_ratio`` and ``weight`` (the caller lays a user's per-cell overrides over them), the per-unit
    profiles for ``within_layer="hidden"`` as engine extras, and the record a recipe keeps under
    ``suggested.apl``. The examples arrive as an input: where they came from is the caller's business.
    """
    from ..apl.calibration import DeltaSupport, calibrate

    params = dict(params or {})
    within = params.get("within_layer", "uniform")
    if importance is None:
        if not examples:
            raise MergeLabError("APL needs few-shot examples of every expert's task (or an importance map "
                                "computed from them): attach task data, or pick a weight-only method",
                                field="few_shot")
        from ..apl.importance import compute_importance

        level = "all" if within == "hidden" else "layer"
        importance = compute_importance(expert_set, examples, tokenizer, mode="gradient", level=level,
                                        progress=progress, **kwargs)
    mean_drop = params.get("drop_ratio", DEFAULTS["drop_ratio"])
    if not isinstance(mean_drop, (int, float)):
        raise MergeLabError("APL calibration needs one mean drop_ratio p̄ (a number); per-layer values are "
                            "overrides applied after calibration", field="parameters.drop_ratio")
    table = calibrate(importance, expert_set, drop_ratio=float(mean_drop),
                      tau1=float(params.get("tau1", DEFAULTS["tau1"])), tau2=float(params.get("tau2", DEFAULTS["tau2"])),
                      q_min=float(params.get("q_min", DEFAULTS["q_min"])), within_layer=within,
                      support=DeltaSupport.cached(expert_set))
    return {"expert_params": table.to_expert_params(), "extras": table.extras(),
            "suggestion": table.recipe_suggestion(), "table": table, "importance": importance}


register(MethodSpec(
    "apl", "APL (Activated Parameter Locating)", APL_URL,
    "Few-shot importance per layer sets each expert's drop ratios (τ1) and merge weights (τ2), then a DARE-style "
    "drop and weighted sum.",
    (WEIGHT, LAMBDA, MEAN_DROP, TAU1, TAU2, Q_MIN, WITHIN, DROP_KIND, SIGN), _apl_kernel,
    needs=frozenset({NEEDS_BASE, NEEDS_FEW_SHOT, NEEDS_IMPORTANCE}), prepare=prepare_apl,
    row_separable=_apl_row_separable, randomised=lambda shared: shared.get("drop", "random") == "random",
    explanation=(
        'Measures, with a few examples of each task, how much each layer (and module, and hidden unit) of '
        "each task vector matters: how much the task's loss rises when that part of the change is removed "
        '(a causal intervention), or its gradient estimate. Important layers get a lower drop ratio (τ1 '
        'sets how strongly) and a larger merge weight (τ2); each task vector is then sparsified '
        'DARE-style (random drop and rescale, or a magnitude drop), optionally sign-elected, and the '
        'weighted sum times λ is added to the base.'),
))
