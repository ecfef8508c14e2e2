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

from ..apl.defaults import DEFAULTS, IMPORTANCE_AT, MEAN_DROP, Q_MIN, SALIENCY_EXTRAS, TAU1, TAU2, UNIT_EXTRAS, WITHIN
from ..errors import MergeLabError
from ..params import SHARED, ParamSpec
from . import kernels
from .base import NEEDS_BASE, NEEDS_FEW_SHOT, NEEDS_IMPORTANCE, MethodSpec, PerTensor, TensorJob, register
from .classic import LAMBDA, WEIGHT

APL_URL = "https://arxiv.org/abs/2408.09485"

#: how APL drops inside a tensor (the ``drop`` parameter's choices)
DROP_CHOICES = ("random", "magnitude", "locate", "saliency")
DROP_KIND = ParamSpec("drop", "choice", DEFAULTS["drop"],
                      "How entries are dropped. random: seeded random drop, what is kept scaled by 1/keep "
                      "(DARE-style). magnitude: keep the largest changes, no rescale. locate: keep whole hidden "
                      "units, the most important first (needs within_layer = hidden), and scale them so the "
                      "tensor's total absolute change stays the same. saliency: keep the entries whose change "
                      "moves the task's loss most (|gradient × change|, one extra gradient pass per expert).",
                      SHARED, choices=DROP_CHOICES)
SIGN = ParamSpec("sign_election", "bool", False, "Elect a sign per entry (TIES) and add only agreeing deltas.")
SALIENCY_RESCALE = ParamSpec("saliency_rescale", "bool", DEFAULTS["saliency_rescale"],
                             "With drop = saliency: scale what is kept by 1/keep like DARE (on), or keep the "
                             "kept changes as they are (off).", SHARED)


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
    kind = job.shared.get("drop", "random")
    if kind == "locate":
        return _locate(delta, expert, 1.0 - drop_ratio, job, profile)
    keep = _unit_keep(profile, 1.0 - drop_ratio, job, expert) if job.shared.get("within_layer") == "hidden" \
        and job.info.unit_axis is not None else None
    if kind == "saliency":
        return _saliency_drop(delta, expert, 1.0 - drop_ratio, keep, job)
    if kind == "magnitude":
        if keep is None:
            return delta * kernels.magnitude_mask(delta, 1.0 - drop_ratio)
        return delta * unit_magnitude_mask(delta, keep, job.info.unit_axis)
    if keep is None:
        return kernels.dare(delta, drop_ratio, seed=job.seed, expert=expert, name=job.name, rescale=True,
                            numel=job.numel, start=job.start)
    mask = kernels.random_keep_mask(delta.shape, keep, seed=job.seed, expert=expert, name=job.name,
                                    numel=job.numel, start=job.start, device=delta.device)
    return delta * mask / keep.clamp_min(1e-12)


# ---- drop = "locate": whole hidden units by importance, mass preserved ------------------------

def _locate(delta: torch.Tensor, expert: str, keep_rate: float, job: TensorJob,
            profile: torch.Tensor | None) -> torch.Tensor:
    """Deterministic locating: keep the layer's share of hidden units, most important first, zero the
    others and scale the kept ones so the tensor's L1 mass Σ|Δ| is what it was. A tensor without hidden
    units (the embeddings) has nothing to locate and gets the seeded random drop at its layer's rate."""
    if job.shared.get("within_layer") != "hidden":
        raise MergeLabError("drop='locate' keeps whole hidden units by their importance, so it needs "
                            "within_layer='hidden' (per-unit importance profiles): set within_layer to hidden, "
                            "or pick drop random, magnitude or saliency", field="parameters.drop")
    axis = job.info.unit_axis
    if axis is None:
        return kernels.dare(delta, 1.0 - keep_rate, seed=job.seed, expert=expert, name=job.name, rescale=True,
                            numel=job.numel, start=job.start)
    if profile is None:
        _unit_keep(None, keep_rate, job, expert)  # raises the missing-profile error
    units = locate_units(profile.reshape(-1), keep_rate)
    shape = [1] * delta.dim()
    shape[axis] = units.numel()
    return mass_preserving(delta, units.reshape(shape))


def locate_units(scores: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Bool mask of the units kept: exactly k = round(keep_rate · units) of them (at least one while
    keep_rate > 0, so q_min's "nothing is dropped entirely" holds), the highest scores first, ties
    broken by the lower unit index (a stable sort)."""
    n = scores.numel()
    k = min(n, int(round(keep_rate * n)))
    if keep_rate > 0:
        k = max(k, 1)
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[order[:k]] = True
    return mask


def mass_preserving(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``delta`` where ``mask`` holds, scaled by Σ|Δ| / Σ_kept|Δ| (0 if the kept part is all zero): the
    kept units carry the tensor's whole L1 mass, as DARE's 1/keep does in expectation."""
    kept = delta * mask
    kept_mass = float(kept.abs().sum(dtype=torch.float64))
    if kept_mass == 0.0:
        return kept
    return kept * (float(delta.abs().sum(dtype=torch.float64)) / kept_mass)


# ---- drop = "saliency": element-level |g ⊙ Δ| --------------------------------------------------

def _saliency_drop(delta: torch.Tensor, expert: str, keep_rate: float, unit_keep: torch.Tensor | None,
                   job: TensorJob) -> torch.Tensor:
    """Keep the entries with the largest saliency |g ⊙ Δ| (exact count round(q · n), ties lowest flat index
    first), per tensor — or per hidden unit at its own keep rate with within_layer='hidden'; scaled by
    1/keep when ``saliency_rescale`` is on."""
    scores = (job.extras.get(SALIENCY_EXTRAS) or {}).get(expert)
    if scores is None:
        raise MergeLabError(f"drop='saliency' needs the saliency |g ⊙ Δ| of expert '{expert}' for tensor "
                            f"'{job.name}': prepare APL with drop='saliency' (it takes one gradient pass per "
                            "expert on the few-shot data), or pick another drop", field="parameters.drop")
    scores = scores.to(delta.dtype)
    rescale = bool(job.shared.get("saliency_rescale", SALIENCY_RESCALE.default))
    if unit_keep is None:
        kept = delta * kernels.magnitude_mask(scores, keep_rate)
        return kept / keep_rate if rescale and keep_rate > 0 else kept
    kept = delta * unit_magnitude_mask(scores, unit_keep, job.info.unit_axis)
    return kept / unit_keep.clamp_min(1e-12) if rescale else kept


def _unit_keep(profile: torch.Tensor | None, layer_keep: float, job: TensorJob, expert: str) -> torch.Tensor:
    """Per-unit keep rates centred on this layer's keep rate, shaped to broadcast along the unit axis
    (and cut to the rows of a row chunk)."""
    if profile is None:
        raise MergeLabError(f"within_layer='hidden' needs APL's per-unit importance profiles for expert '{expert}' "
                            f"(tensor '{job.name}'): prepare APL with within_layer='hidden' (gradient importance at "
                            "hidden level), or use within_layer='uniform'")
    from ..apl.calibration import unit_keep_rates  # measurement code loads when a merge needs it, not on import

    keep = unit_keep_rates(profile.reshape(-1).double().cpu().numpy(), layer_keep,  # numpy: on the CPU
                           float(job.shared["tau1"]), float(job.shared["q_min"]))
    keep_t = torch.from_numpy(np.asarray(keep, dtype=np.float32)).to(job.base.device)
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
    order = kernels.row_magnitude_order(rows, descending=True)  # ties: the lower index is kept first
    within = torch.arange(rows.shape[1], device=rows.device) < k.to(rows.device).unsqueeze(1)
    mask = torch.empty(rows.shape, dtype=torch.bool, device=rows.device).scatter_(1, order, within.expand_as(order))
    return mask.reshape(moved.shape).movedim(0, unit_axis)


def _apl_row_separable(shared: Mapping[str, Any]) -> bool:
    """The random drop is located by flat index and the unit rates cut to a chunk's rows, so row chunks
    merge exactly; a magnitude or saliency drop takes its top-k over the whole tensor (or over a unit's
    column when units run along axis 1) and locate rescales by the whole tensor's mass, so the engine
    merges those whole."""
    return shared.get("drop", "random") == "random"


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
    if params.get("drop") == "locate" and within != "hidden":
        raise MergeLabError("drop='locate' keeps whole hidden units by their importance, so it needs "
                            "within_layer='hidden': set within_layer to hidden, or pick another drop",
                            field="parameters.within_layer")
    point = params.get("importance_at", IMPORTANCE_AT.default)
    IMPORTANCE_AT.check_scalar(point, "parameters.importance_at")
    lam = _merge_lambda(params) if point == "merged" else 1.0
    level = "all" if within == "hidden" else "layer"
    if point == "merged":  # the app's map is measured at the base: this one is APL's own, at θ_TA
        from ..apl.importance import cached_importance_at_merge

        _need_examples(examples, kwargs)
        importance = cached_importance_at_merge(expert_set, examples, tokenizer, lam=lam, level=level,
                                                progress=progress, **kwargs)
    elif importance is None:
        _need_examples(examples, kwargs)
        from ..apl.importance import compute_importance

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
    extras = table.extras()
    if params.get("drop") == "saliency":
        from ..apl.importance import cached_element_saliency

        _need_examples(examples, kwargs)
        saliency = cached_element_saliency(expert_set, examples, tokenizer, point=point, lam=lam, **kwargs)
        extras[SALIENCY_EXTRAS] = PerTensor(saliency, row_axis=0)
    return {"expert_params": table.to_expert_params(), "extras": extras,
            "suggestion": table.recipe_suggestion(), "table": table, "importance": importance}


def _need_examples(examples, kwargs: Mapping[str, Any]) -> None:
    if not examples and kwargs.get("loss_fn") is None:
        raise MergeLabError("APL needs few-shot examples of every expert's task (or an importance map "
                            "computed from them): attach task data, or pick a weight-only method",
                            field="few_shot")


def _merge_lambda(params: Mapping[str, Any]) -> float:
    """λ of the task-arithmetic point θ_TA = θ0 + λ Σ Δ that importance_at='merged' measures at."""
    lam = params.get("lambda", DEFAULTS["lambda"])
    if not isinstance(lam, (int, float)):
        raise MergeLabError("importance_at='merged' measures at the task-arithmetic merge θ0 + λ·ΣΔ, which needs "
                            "one λ (a number), not per-layer values: give lambda one value, or measure at the base",
                            field="parameters.lambda")
    return float(lam)


def _prepare_is_heavy(params: Mapping[str, Any]) -> bool:
    """Whether preparing takes gradient passes even with an importance map given (the page then prepares
    on Merge only, not at every change of a control)."""
    return (params.get("importance_at", IMPORTANCE_AT.default) == "merged"
            or params.get("drop", DROP_KIND.default) == "saliency")


prepare_apl.heavy = _prepare_is_heavy


register(MethodSpec(
    "apl", "APL (Activated Parameter Locating)", APL_URL,
    "Few-shot importance per layer sets each expert's drop ratios (τ1) and merge weights (τ2), then a DARE-style "
    "drop and weighted sum.",
    (WEIGHT, LAMBDA, MEAN_DROP, TAU1, TAU2, Q_MIN, WITHIN, DROP_KIND, SIGN, SALIENCY_RESCALE, IMPORTANCE_AT), _apl_kernel,
    needs=frozenset({NEEDS_BASE, NEEDS_FEW_SHOT, NEEDS_IMPORTANCE}), prepare=prepare_apl,
    row_separable=_apl_row_separable, randomised=lambda shared: shared.get("drop", "random") == "random",
    explanation=(
        'Measures, with a few examples of each task, how much each layer (and module, and hidden unit) of '
        "each task vector matters: how much the task's loss rises when that part of the change is removed "
        '(a causal intervention), or its gradient estimate. Important layers get a lower drop ratio (τ1 '
        'sets how strongly) and a larger merge weight (τ2); each task vector is then sparsified '
        'DARE-style (random drop and rescale, a magnitude drop, whole hidden units located by importance, '
        'or the entries whose gradient × change is largest), optionally sign-elected, and the '
        'weighted sum times λ is added to the base. Importance can also be measured at the plain '
        'task arithmetic merge instead of the base, where the experts\' changes meet.'),
))
