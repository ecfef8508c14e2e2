"""Localize-and-Stitch's localize step: one sparse mask γ_t per expert over its task vector τ_t.

Two ways, both returning exactly k = round((1 − drop_ratio) · N) kept entries over the N entries of the
expert's maskable tensors (the droppable merged tensors, model-wide, in layout order):

- **magnitude** (data-free): the top-k |τ_t|;
- **trained** (He et al. 2024): logits S start at ±init_logit on the magnitude mask; a fixed number of
  Adam steps lowers ``L_t(θ0 + σ(S) ⊙ τ_t) + l1 · Σ σ(S) / k`` on the expert's few-shot batch; the mask
  is the top-k logits. The loss goes through :class:`~.taskloss.TaskLoss` (the one forward path APL,
  Fisher and the probe use): its gradient in θ is taken at the relaxed point, and the chain rule gives
  ``∂/∂S = (∇_θL ⊙ τ + l1 / k) · σ'(S)`` — APL's gradient-mode product ∇L ⊙ Δ, times σ'.

Adam normalises each logit's step, so an entry moves by about the learning rate per step whatever its
gradient's size; the L1 term ``l1 / k`` then works as a threshold: an entry rises only while its loss
benefit −∇L·τ exceeds it. Measured on all-MiniLM-L6-v2 with one expert fine-tuned 15 steps on a toy
sentiment task (64 examples, 1 % kept): few-shot loss 0.656 with the magnitude mask, 0.594 trained with the
defaults (40 steps, lr 0.5, l1 0.1; 0.287 for the whole expert, 0.693 for the base), about 3 s a step on
one CPU thread; at 20 steps l1 = 0 or 1 did worse than 0.1 (0.653, 0.651 against 0.637), the relaxed mask
then keeping too much or too little.

Ties in a top-k are kept lowest flat index first in layout order, so a mask never depends on how a
sort breaks them. No random choice is made: the batch is the whole few-shot draw and the start is the
magnitude mask, so the same inputs give the same mask. Masks are bools (one byte an entry) and are
cached per expert set, expert, few-shot draw and mask parameters — moving λ re-stitches, never retrains.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..cancel import checkpoint
from ..errors import MergeLabError
from ..hashing import content_hash
from ..io.experts import ExpertSet
from ..io.layout import ROLE_MERGE
from ..methods.base import PerTensor
from ..methods.localize_stitch import MASK_PARAMS, MASKS_EXTRAS
from .taskloss import (
    MAX_LENGTH,
    Example,
    ExampleLoss,
    TaskLoss,
    body_state,
    classifier_task_loss,
    expert_task_loss,
)

Progress = Callable[[float, str], None]
Tensors = dict[str, torch.Tensor]


def top_k_masks(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Bool masks of the k largest scores over all tensors together; ties at the cut kept lowest flat
    index first, in the mapping's order (so the count is exactly k whatever the ties)."""
    flat = torch.cat([s.detach().float().reshape(-1) for s in scores.values()]) if scores else torch.zeros(0)
    n = flat.numel()
    if not 0 <= k <= n:
        raise MergeLabError(f"cannot keep {k} of {n} entries: the kept count must lie in [0, {n}]")
    if k == 0:
        keep = torch.zeros(n, dtype=torch.bool)
    elif k == n:
        keep = torch.ones(n, dtype=torch.bool)
    else:
        cut = flat.kthvalue(n - k + 1).values  # the k-th largest
        above = flat > cut
        tied = flat == cut
        keep = above | (tied & (torch.cumsum(tied, 0) <= k - int(above.sum())))
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


def kept_count(deltas: Mapping[str, torch.Tensor], drop_ratio: float) -> int:
    """k = round((1 − drop_ratio) · N) over the entries of ``deltas``."""
    return int(round((1.0 - drop_ratio) * sum(d.numel() for d in deltas.values())))


def magnitude_mask(deltas: Mapping[str, torch.Tensor], drop_ratio: float) -> dict[str, torch.Tensor]:
    """The data-free mask: the top-k |τ| model-wide."""
    return top_k_masks({n: d.abs() for n, d in deltas.items()}, kept_count(deltas, drop_ratio))


def relaxed_gradient(task: TaskLoss, base: Tensors, deltas: Tensors, logits: Tensors, l1: float = 0.0,
                     k: int = 1) -> tuple[float, Tensors]:
    """(loss at θ0 + σ(S) ⊙ τ, ∂(loss + l1 Σσ(S)/k)/∂S): the task's gradient in θ, chained through the mask."""
    with torch.no_grad():
        task.assign({n: base[n] + torch.sigmoid(logits[n]) * deltas[n] for n in deltas})
    loss, grads = task.gradient(list(deltas))
    out = {}
    for n, s in logits.items():
        sig = torch.sigmoid(s.detach())
        out[n] = (grads[n] * deltas[n] + l1 / max(k, 1)) * sig * (1 - sig)
    return loss, out


def train_mask(task: TaskLoss, base: Tensors, deltas: Tensors, *, drop_ratio: float, steps: int, lr: float,
               l1: float, init_logit: float, progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """(the trained top-k mask, the relaxed loss before each step): Adam on the logits for ``steps`` steps."""
    k = kept_count(deltas, drop_ratio)
    start = magnitude_mask(deltas, drop_ratio)
    logits = {n: torch.where(m, init_logit, -init_logit).float().requires_grad_(True) for n, m in start.items()}
    optimiser = torch.optim.Adam(list(logits.values()), lr=lr)
    losses = []
    for step in range(steps):
        checkpoint()
        loss, grads = relaxed_gradient(task, base, deltas, logits, l1, k)
        for n, s in logits.items():
            s.grad = grads[n]
        optimiser.step()
        losses.append(loss)
        if progress:
            progress((step + 1) / steps, f"step {step + 1}/{steps}, loss {loss:.4f}")
    task.assign({n: base[n] for n in deltas})
    return top_k_masks({n: s.detach() for n, s in logits.items()}, k), losses


def maskable_tensors(expert_set: ExpertSet) -> list[str]:
    """The tensors a mask covers: every droppable merged tensor (norms never are), in layout order."""
    return [n for n, i in expert_set.layout.tensors.items() if i.role == ROLE_MERGE and i.droppable]


@dataclass
class LocalizeResult:
    """Each expert's bool mask (base tensor names), kept fraction, training losses and seconds."""

    masks: dict[str, dict[str, torch.Tensor]]
    kept: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def extras(self) -> dict[str, PerTensor]:
        """``{MASKS_EXTRAS: PerTensor({tensor: {expert: mask}}, row_axis=0)}``: a mask has its tensor's shape."""
        per_tensor: dict[str, dict[str, torch.Tensor]] = {}
        for expert, masks in self.masks.items():
            for name, mask in masks.items():
                per_tensor.setdefault(name, {})[expert] = mask
        return {MASKS_EXTRAS: PerTensor(per_tensor, row_axis=0)}


def mask_params(params: Mapping | None) -> dict:
    """The declared mask parameters, defaults filled in, checked against their ranges."""
    given = dict(params or {})
    if "density" in given:
        if "drop_ratio" in given:
            raise MergeLabError("give drop_ratio or density (= 1 − drop_ratio), not both", field="parameters.density")
        given["drop_ratio"] = 1.0 - float(given.pop("density"))
    return {p.name: p.check_scalar(given.get(p.name, p.default), f"parameters.{p.name}") for p in MASK_PARAMS}


def localize_expert(expert_set: ExpertSet, expert: str, values: Mapping, task_for: Callable[[Tensors], TaskLoss] | None,
                    progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One expert's mask under checked ``values``; ``task_for(start state)`` builds its task loss (trained only)."""
    names = maskable_tensors(expert_set)
    deltas = {n: expert_set.delta(expert, n).float() for n in names}
    if values["localize"] == "magnitude" or values["steps"] == 0:
        return magnitude_mask(deltas, values["drop_ratio"]), []
    state = body_state(expert_set, expert)
    base = {n: expert_set.base.get(n).float() for n in names}
    task = task_for(state)
    return train_mask(task, base, deltas, drop_ratio=values["drop_ratio"], steps=values["steps"],
                      lr=values["mask_lr"], l1=values["l1"], init_logit=values["init_logit"], progress=progress)


def compute_masks(expert_set: ExpertSet, examples: Mapping[str, Sequence[Example]] | None, tokenizer, *,
                  params: Mapping | None = None, device: str = "cpu", progress: Progress | None = None,
                  max_length: int = MAX_LENGTH, example_loss_fn: ExampleLoss | Mapping[str, ExampleLoss] | None = None,
                  n_examples: int | None = None, cache: bool = True) -> LocalizeResult:
    """Every expert's mask. ``example_loss_fn(state, i)`` with ``n_examples`` replaces the transformers
    classifier (tests, custom models); such runs are not cached (a function has no content to key by)."""
    values = mask_params(params)
    result = LocalizeResult({})
    experts = list(expert_set.experts)
    for index, expert in enumerate(experts):
        clock = time.perf_counter()
        step = None if progress is None else (
            lambda f, m, i=index, e=expert: progress((i + f) / len(experts), f"localize {e}: {m}"))

        def task_for(state, e=expert):
            return expert_task_loss(expert_set, e, state, examples, tokenizer, device=device,
                                    purpose="Localize-and-Stitch's trained masks", max_length=max_length,
                                    example_loss_fn=example_loss_fn, n_examples=n_examples, build=classifier_task_loss)

        key = _cache_key(expert, examples, values, device, max_length) if cache and example_loss_fn is None else None
        found = _cached(expert_set, key)
        if found is None:
            found = localize_expert(expert_set, expert, values, task_for, step)
            _store(expert_set, key, found)
        result.masks[expert], result.losses[expert] = found
        total = sum(m.numel() for m in found[0].values())
        result.kept[expert] = sum(int(m.sum()) for m in found[0].values()) / max(total, 1)
        result.seconds[expert] = time.perf_counter() - clock
    return result


# ---- the mask cache: per expert set (dropped with it), expert, few-shot draw and mask parameters --------

_CACHE: dict[int, dict[str, tuple[dict[str, torch.Tensor], list[float]]]] = {}
_PER_SET = 8  # masks kept per expert set (one byte an entry each: 23 MB for MiniLM); the oldest go first


def _cache_key(expert: str, examples, values: Mapping, device: str, max_length: int) -> str:
    if values["localize"] == "magnitude" or values["steps"] == 0:  # a function of the weights alone
        return content_hash("magnitude", expert, values["drop_ratio"])
    draw = [list(x) for x in (examples or {}).get(expert, ())]
    return content_hash("trained", expert, draw, dict(values), device, max_length)


def _cached(expert_set: ExpertSet, key: str | None):
    return None if key is None else _CACHE.get(id(expert_set), {}).get(key)


def _store(expert_set: ExpertSet, key: str | None, value) -> None:
    if key is None:
        return
    if id(expert_set) not in _CACHE:
        _CACHE[id(expert_set)] = {}
        weakref.finalize(expert_set, _CACHE.pop, id(expert_set), None)
    entries = _CACHE[id(expert_set)]
    entries[key] = value
    while len(entries) > _PER_SET:
        entries.pop(next(iter(entries)))


def prepare_localize(expert_set: ExpertSet, examples: Mapping[str, Sequence[Example]] | None = None, tokenizer=None,
                     *, params: Mapping | None = None, progress: Progress | None = None, **kwargs) -> dict:
    """The ``localize_stitch`` method's inputs: ``{"expert_params": {}, "extras": …, "localize": LocalizeResult}``.

    The few-shot ``examples`` arrive as an input (the magnitude variant ignores them); this measures,
    it never looks for files."""
    result = compute_masks(expert_set, examples, tokenizer, params=params, progress=progress, **kwargs)
    return {"expert_params": {}, "extras": result.extras(), "localize": result}
