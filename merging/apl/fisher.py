"""Diagonal Fisher information of each expert on its few-shot set (the Fisher-merging baseline).

F_t = mean over D_t of the *per-example* squared gradient of the loss at Θ_t (Matena & Raffel
2022) — not the square of the batch gradient, which would cancel opposing examples. The
gradients come from a batch-1 loop over the examples tokenised once: memory stays at one
model, where a vmap over examples would hold one gradient per example (64 × the model).
Only tensors some expert changed are differentiated: where every delta is zero the merge
is the base whatever the Fisher.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..io.experts import ExpertSet
from ..methods.base import PerTensor
from .defaults import FISHER_EXTRAS
from .taskloss import (
    MAX_LENGTH,
    Example,
    ExampleLoss,
    TaskLoss,
    body_state,
    expert_task_loss,
)

Progress = Callable[[float, str], None]


def fisher_diagonal(task: TaskLoss, names: Sequence[str], progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Mean over the task's examples of the squared per-example gradient, for ``names``."""
    total = {n: torch.zeros_like(task.live[n]) for n in names}
    for index in range(task.n_examples):
        _, grads = task.gradient(names, index=index)
        for name, grad in grads.items():
            total[name].add_(grad * grad)
        if progress:
            progress((index + 1) / task.n_examples, f"example {index + 1}/{task.n_examples}")
    return {n: t / max(task.n_examples, 1) for n, t in total.items()}


def changed_tensors(expert_set: ExpertSet) -> list[str]:
    """Merged tensors where at least one expert differs from the base."""
    out = []
    for name in expert_set.layout.merged_names():
        base = expert_set.base.get(name)
        if any(not torch.equal(e.get(name), base) for e in expert_set.experts.values()):
            out.append(name)
    return out


@dataclass
class FisherResult:
    """Diagonal Fisher per expert and tensor (base names), with timings and example counts."""

    diagonals: dict[str, dict[str, torch.Tensor]]
    n_examples: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def extras(self) -> dict[str, PerTensor]:
        """Engine extras for the ``fisher`` method: ``{FISHER_EXTRAS: PerTensor({tensor: {expert: F}})}``.

        A diagonal has its tensor's shape, so its rows are the tensor's rows (``row_axis=0``): a tensor
        merged in row chunks gets each chunk's rows of every expert's F."""
        per_tensor: dict[str, dict[str, torch.Tensor]] = {}
        for expert, tensors in self.diagonals.items():
            for name, value in tensors.items():
                per_tensor.setdefault(name, {})[expert] = value
        return {FISHER_EXTRAS: PerTensor(per_tensor, row_axis=0)}


def compute_fisher(expert_set: ExpertSet, examples: Mapping[str, Sequence[Example]] | None, tokenizer, *,
                   device: str = "cpu", progress: Progress | None = None, max_length: int = MAX_LENGTH,
                   example_loss_fn: ExampleLoss | Mapping[str, ExampleLoss] | None = None,
                   n_examples: int | None = None) -> FisherResult:
    """Fisher diagonals of every expert at its own weights, on its few-shot examples.

    ``example_loss_fn(state, i)`` (with ``n_examples``) replaces the transformers classifier by a
    function of a state dict keyed by base tensor names (tests, custom models).
    """
    names = changed_tensors(expert_set)
    result = FisherResult({})
    experts = list(expert_set.experts)
    for index, expert in enumerate(experts):
        clock = time.perf_counter()
        state = body_state(expert_set, expert)
        task = expert_task_loss(expert_set, expert, state, examples, tokenizer, purpose="Fisher merging",
                                device=device, max_length=max_length, example_loss_fn=example_loss_fn, n_examples=n_examples)
        step = None if progress is None else (
            lambda f, m, i=index, e=expert: progress((i + f) / len(experts), f"Fisher {e}: {m}"))
        result.diagonals[expert] = fisher_diagonal(task, names, step)
        result.n_examples[expert] = task.n_examples
        result.seconds[expert] = time.perf_counter() - clock
    return result


def prepare_fisher(expert_set: ExpertSet, examples: Mapping[str, Sequence[Example]] | None = None, tokenizer=None,
                   *, params: Mapping | None = None, progress: Progress | None = None, **kwargs) -> dict:
    """The ``fisher`` method's inputs: ``{"expert_params": {}, "extras": …, "fisher": FisherResult}``.

    The few-shot ``examples`` arrive as an input (replay reads them from the recipe's few-shot
    record, the app from its session): this measures, it never looks for files."""
    result = compute_fisher(expert_set, examples, tokenizer, progress=progress, **kwargs)
    return {"expert_params": {}, "extras": result.extras(), "fisher": result}
