"""The classic methods as configurations of one pipeline: sparsify → consensus → weight → add.

As in mergekit's generalized task arithmetic: each expert's delta Δ_t is sparsified
(nothing, magnitude top-k, DARE random drop, breadcrumbs, DELLA), optionally a TIES sign
is elected and only agreeing entries kept, the deltas are weighted (and optionally
normalised by the summed weights of what was kept), and λ times the result is added to
the base. Norm tensors are never dropped (DESIGN.md): they skip sparsify and consensus.
SLERP interpolates two experts' weights directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..params import PER_LAYER, SHARED, ParamSpec
from .base import MethodSpec, TensorJob, register

WEIGHT = ParamSpec("weight", "float", 1.0, "Weight of the expert's delta (per expert, per layer).",
                   PER_LAYER, -5.0, 5.0)
LAMBDA = ParamSpec("lambda", "float", 1.0, "Scale λ of the merged delta added to the base.", PER_LAYER, 0.0, 5.0)
DROP = ParamSpec("drop_ratio", "float", 0.5, "Fraction of each delta set to zero (density = 1 − drop_ratio).",
                 PER_LAYER, 0.0, 0.999)
RESCALE = ParamSpec("rescale", "bool", True, "Rescale kept entries by 1/(1 − drop_ratio) so the expectation is kept.")
TRIM_SCOPE = ParamSpec("trim_scope", "choice", "tensor",
                       "Where the magnitude top-k threshold is taken: per tensor, per layer or whole model.",
                       SHARED, choices=("tensor", "layer", "model"))
GAMMA = ParamSpec("gamma", "float", 0.01, "Fraction of largest-magnitude entries removed as outliers.",
                  PER_LAYER, 0.0, 0.5)
EPSILON = ParamSpec("epsilon", "float", 0.1,
                    "Spread of keep probabilities across magnitude ranks (DELLA's ε).", PER_LAYER, 0.0, 1.0)
T_PARAM = ParamSpec("t", "float", 0.5, "Interpolation position: 0 is the first expert, 1 the second.",
                    PER_LAYER, 0.0, 1.0)


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", "bool", default,
                     "Divide the merged delta by the summed weights of the experts kept at each entry.")


@dataclass(frozen=True)
class Pipeline:
    """One configuration of sparsify → consensus → weight → add."""

    sparsify: str  # none | magnitude | random | breadcrumbs | della
    consensus: bool  # TIES sign election
    always_normalize: bool = False  # linear averaging divides by the summed weights, no parameter

    def __call__(self, job: TensorJob) -> torch.Tensor:
        deltas = job.deltas()
        droppable = job.info.droppable
        weighted = []
        weights = []
        for expert, delta in deltas.items():
            p = job.params[expert]
            if droppable:
                delta = self.sparsify_delta(delta, expert, p, job)
            weighted.append(delta * float(p["weight"]))
            weights.append(float(p["weight"]))
        stacked = torch.stack(weighted)
        weight_t = torch.tensor(weights).reshape(-1, *([1] * (stacked.dim() - 1)))
        if self.consensus and droppable:
            agree = kernels.agreement_mask(stacked, kernels.elect_sign(stacked))
            mixed = (stacked * agree).sum(0)
            divisor = (weight_t * agree).sum(0)
        else:
            mixed = stacked.sum(0)
            divisor = weight_t.sum(0).expand_as(mixed)
        if self.always_normalize or job.shared.get("normalize", False):
            divisor = torch.where(divisor.abs() < 1e-12, torch.ones_like(divisor), divisor)
            mixed = mixed / divisor
        return job.base.float() + float(job.shared.get("lambda", 1.0)) * mixed

    def sparsify_delta(self, delta: torch.Tensor, expert: str, p: dict, job: TensorJob) -> torch.Tensor:
        if self.sparsify == "none":
            return delta
        drop = float(p["drop_ratio"])
        density = 1.0 - drop
        if self.sparsify == "magnitude":
            return delta * kernels.magnitude_mask(delta, density, job.thresholds.get(expert))
        if self.sparsify == "random":
            return kernels.dare(delta, drop, seed=job.seed, expert=expert, name=job.name,
                                rescale=bool(p.get("rescale", True)), numel=job.numel, start=job.start)
        if self.sparsify == "breadcrumbs":
            return delta * kernels.breadcrumbs_mask(delta, density, float(p["gamma"]))
        if self.sparsify == "della":
            return kernels.della(delta, density, float(p["epsilon"]), seed=job.seed, expert=expert,
                                 name=job.name, numel=job.numel, start=job.start)
        raise ValueError(self.sparsify)


def _slerp_kernel(job: TensorJob) -> torch.Tensor:
    first, second = list(job.experts)
    t = float(job.params[first]["t"])
    return kernels.slerp(job.experts[first], job.experts[second], t)


register(MethodSpec(
    "linear", "Linear average", "https://arxiv.org/abs/2203.05482",
    "Weighted average of the experts' weights (model soup).",
    (WEIGHT,), Pipeline("none", False, always_normalize=True), mergekit_name="linear",
))
register(MethodSpec(
    "task_arithmetic", "Task arithmetic", "https://arxiv.org/abs/2212.04089",
    "Base plus λ times the weighted sum of task vectors.",
    (WEIGHT, LAMBDA), Pipeline("none", False), mergekit_name="task_arithmetic",
))
register(MethodSpec(
    "ties", "TIES", "https://arxiv.org/abs/2306.01708",
    "Trim each delta to its largest entries, elect a sign per entry, average the agreeing entries.",
    (WEIGHT, LAMBDA, DROP, TRIM_SCOPE, _normalize(True)), Pipeline("magnitude", True),
    mergekit_name="ties", trim_scope_param="trim_scope",
))
register(MethodSpec(
    "dare_linear", "DARE (linear)", "https://arxiv.org/abs/2311.03099",
    "Randomly drop delta entries and rescale the rest, then add like task arithmetic.",
    (WEIGHT, LAMBDA, DROP, RESCALE), Pipeline("random", False), mergekit_name="dare_linear",
))
register(MethodSpec(
    "dare_ties", "DARE + TIES", "https://arxiv.org/abs/2311.03099",
    "DARE's random drop and rescale, then TIES sign election.",
    (WEIGHT, LAMBDA, DROP, RESCALE, _normalize(False)), Pipeline("random", True), mergekit_name="dare_ties",
))
register(MethodSpec(
    "magnitude", "Magnitude pruning", "https://arxiv.org/abs/2306.01708",
    "Keep each delta's largest entries (no rescale), then add like task arithmetic.",
    (WEIGHT, LAMBDA, DROP, TRIM_SCOPE), Pipeline("magnitude", False), trim_scope_param="trim_scope",
))
register(MethodSpec(
    "breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
    "Drop both the largest outliers and the smallest entries of each delta, then add.",
    (WEIGHT, LAMBDA, DROP, GAMMA), Pipeline("breadcrumbs", False), mergekit_name="breadcrumbs",
))
register(MethodSpec(
    "della", "DELLA", "https://arxiv.org/abs/2406.11617",
    "Drop entries with probability falling with their magnitude rank, rescale, elect signs, average.",
    (WEIGHT, LAMBDA, DROP, EPSILON, _normalize(True)), Pipeline("della", True), mergekit_name="della",
))
register(MethodSpec(
    "slerp", "SLERP", "https://en.wikipedia.org/wiki/Slerp",
    "Spherical interpolation between two experts' weights.",
    (T_PARAM,), _slerp_kernel, min_experts=2, max_experts=2, mergekit_name="slerp",
))
