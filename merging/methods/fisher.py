"""Fisher-weighted merging (Matena & Raffel 2022) as a registered merge method.

The diagonal Fisher of each expert on its few-shot data arrives before the merge, computed once by
``prepare`` (:func:`merging.apl.fisher.prepare_fisher`); the kernel then averages the task vectors
entry by entry, weighted by it.
"""

from __future__ import annotations

import torch

from ..apl.defaults import FISHER_EXTRAS
from ..errors import MergeLabError
from ..params import SHARED, ParamSpec
from .base import NEEDS_BASE, NEEDS_FEW_SHOT, MethodSpec, TensorJob, register
from .classic import LAMBDA, WEIGHT

FISHER_URL = "https://arxiv.org/abs/2111.09832"

EPSILON = ParamSpec("epsilon", "float", 1e-8, "ε added to the summed Fisher so untouched entries stay finite.",
                    SHARED, 0.0, 1.0)


def _fisher_kernel(job: TensorJob) -> torch.Tensor:
    """Θ = Θ_base + λ · Σ_t w_t F_t Δ_t / (Σ_t w_t F_t + ε)."""
    deltas = job.deltas()
    fisher = job.extras.get(FISHER_EXTRAS)
    if not fisher:
        if all(not bool(torch.count_nonzero(d)) for d in deltas.values()):
            return job.base.float()
        raise MergeLabError(f"Fisher merging has no Fisher diagonal for tensor '{job.name}': compute it first "
                            "(merging.apl.fisher.prepare_fisher with the experts' few-shot data)")
    numerator = torch.zeros_like(job.base, dtype=torch.float32)
    denominator = torch.zeros_like(numerator)
    for expert, delta in deltas.items():
        if expert not in fisher:
            raise MergeLabError(f"no Fisher diagonal for expert '{expert}': prepare Fisher with every expert")
        weighted = fisher[expert].float() * float(job.params[expert]["weight"])
        numerator += weighted * delta
        denominator += weighted
    merged = numerator / (denominator + float(job.shared.get("epsilon", 1e-8)))
    return job.base.float() + float(job.shared.get("lambda", 1.0)) * merged


def _prepare_fisher(expert_set, examples=None, tokenizer=None, **kwargs) -> dict:
    """Fisher diagonals of every expert on its few-shot examples (the measurement loads only now)."""
    from ..apl.fisher import prepare_fisher

    return prepare_fisher(expert_set, examples, tokenizer, **kwargs)


register(MethodSpec(
    "fisher", "Fisher-weighted", FISHER_URL,
    "Average the task vectors entry by entry, weighted by each expert's diagonal Fisher on its few-shot data.",
    (WEIGHT, LAMBDA, EPSILON), _fisher_kernel, needs=frozenset({NEEDS_BASE, NEEDS_FEW_SHOT}),
    prepare=_prepare_fisher, row_separable=True,  # entry by entry, with the diagonals cut to the chunk's rows
    explanation=(
        'Runs each expert on its few-shot texts to estimate its diagonal Fisher information (how '
        'sensitive its loss is to each weight), then averages the task vectors entry by entry, each '
        "expert's change weighted by its Fisher value there: an entry goes mostly to the task that "
        'depends on it. λ scales the averaged change (an average, so λ near the number of experts gives '
        'the size of a sum).'),
))
