"""Localize-and-Stitch (He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task
Arithmetic", TMLR 2025, arXiv 2408.13656) as a registered, data-aware merge method.

What it does to the task vectors: each expert t keeps only a tiny region γ_t of its task vector τ_t (by
default 1 % of the entries, chosen model-wide), everything else is thrown away; the kept regions are then
stitched onto the base, and where several experts kept the same entry their values are averaged:
``Θ = Θ_base + λ · Σ_t (γ_t / Σ_s γ_s) ⊙ τ_t`` (an entry no expert kept stays at the base). The regions
come from one of two *localize* steps, both computed once by ``prepare``
(:func:`merging.apl.localize.prepare_localize`) and cached per expert, few-shot draw and mask parameters:

- ``trained`` (the paper's, few-shot labelled data): a relaxed mask σ(S) on real-valued logits S,
  trained by Adam for a fixed number of steps on the expert's few-shot loss L(θ0 + σ(S) ⊙ τ) plus an L1
  penalty on σ(S), starting from logits ±``init_logit`` that switch on the largest-|τ| entries, then
  rounded to exactly the declared kept count (the top-k logits);
- ``magnitude`` (the paper's data-free variant): the top-k |τ_t| entries of each expert.

Facts from the authors' code (uiuctml/Localize-and-Stitch, ``localize_utils.py``): the logits start at
``±sigmoid_bias = ±5`` from a model-wide top-k of |τ|; the gradient of the loss in S is ``(∇L ⊙ τ) ·
σ'(S)`` (what APL's gradient mode computes, times σ'); the update there is plain gradient descent with a
learning rate of 1e7 over 10 epochs, and the mask is ``round(σ(S))``. Merge Lab uses Adam (scale-free, so
one learning rate serves every model) for a fixed step count, and rounds to the top-k logits instead of
σ > 0.5 so the kept fraction is exactly ``1 − drop_ratio`` — the paper's headline budget is 1 %. Norms
are never masked (as everywhere in Merge Lab): every expert keeps them, so they are averaged.

Given the masks the merge is entry by entry, so the method is row-separable: the masks travel as a
:class:`~.base.PerTensor` input cut to a chunk's rows (``row_axis=0``). mergekit has no such method.
"""

from __future__ import annotations

import torch

from ..errors import MergeLabError
from ..params import SHARED, ParamSpec
from .base import NEEDS_BASE, NEEDS_FEW_SHOT, MethodSpec, TensorJob, register
from .classic import LAMBDA

LOCALIZE_STITCH_URL = "https://arxiv.org/abs/2408.13656"
#: engine extras key of the masks: PerTensor({tensor: {expert: bool mask of the tensor's shape}}, row_axis=0)
MASKS_EXTRAS = "localize_stitch_masks"
LOCALIZE_CHOICES = ("trained", "magnitude")

DROP_RATIO = ParamSpec("drop_ratio", "float", 0.99,
                       "Share of each expert's task-vector entries thrown away, model-wide (the paper keeps 1 %: "
                       "0.99); exactly round((1 − drop_ratio) · entries) are kept per expert.", SHARED, 0.0, 1.0)
LOCALIZE = ParamSpec("localize", "choice", "trained",
                     "How each expert's region is found: 'trained' learns a mask on its few-shot data (the paper); "
                     "'magnitude' keeps its largest |task vector| entries (the data-free variant).",
                     SHARED, choices=LOCALIZE_CHOICES)
STEPS = ParamSpec("steps", "int", 40,
                  "Adam steps of mask training (each one forward and backward pass over the few-shot batch); "
                  "0 gives the magnitude mask.", SHARED, 0, 1000)
LEARNING_RATE = ParamSpec("mask_lr", "float", 0.5,
                          "Adam learning rate on the mask logits: about how far a logit moves per step (an entry "
                          "starting off at −5 can overtake one starting on at +5 after 10 steps of 0.5).",
                          SHARED, 1e-4, 10.0)
L1 = ParamSpec("l1", "float", 0.1,
               "Strength of the L1 penalty l1 · Σ σ(S) / k (k the kept count) that pushes entries the task "
               "loss does not need out of the mask.", SHARED, 0.0, 100.0)
INIT_LOGIT = ParamSpec("init_logit", "float", 5.0,
                       "Starting logits ±init_logit (the reference's sigmoid_bias): the largest-|τ| entries "
                       "start on (σ ≈ 0.99), the rest off.", SHARED, 0.1, 20.0)

#: the parameters the masks depend on (λ is not one: moving it re-stitches, it never retrains)
MASK_PARAMS = (DROP_RATIO, LOCALIZE, STEPS, LEARNING_RATE, L1, INIT_LOGIT)


def stitch(deltas: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Σ_t (γ_t / Σ_s γ_s) ⊙ τ_t, with 0 where no mask holds the entry."""
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for delta, mask in zip(deltas, masks):
        gamma = mask.to(delta.dtype)
        total += gamma * delta
        count += gamma
    return total / count.clamp(min=1.0)


def _job_masks(job: TensorJob, deltas: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
    """The experts' masks for this job (all-on for tensors never masked); None if there is nothing to stitch."""
    if not job.info.droppable:
        return [torch.ones_like(d, dtype=torch.bool) for d in deltas.values()]
    masks = job.extras.get(MASKS_EXTRAS)
    if masks is None:
        if all(not bool(torch.count_nonzero(d)) for d in deltas.values()):
            return None
        raise MergeLabError(f"Localize-and-Stitch has no masks for tensor '{job.name}': localize first "
                            "(merging.apl.localize.prepare_localize, or the method's prepare)")
    out = []
    for expert, delta in deltas.items():
        mask = masks.get(expert)
        if mask is None:
            raise MergeLabError(f"Localize-and-Stitch has no mask of '{job.name}' for expert '{expert}': "
                                "prepare it with every expert of the merge")
        if tuple(mask.shape) != tuple(delta.shape):
            raise MergeLabError(f"the mask of '{job.name}' for expert '{expert}' has shape {tuple(mask.shape)}, "
                                f"the tensor {tuple(delta.shape)}: localize again for these models")
        out.append(mask.bool())
    return out


def _localize_stitch_kernel(job: TensorJob) -> torch.Tensor:
    """Θ_base + λ · Σ_t (γ_t / Σ_s γ_s) ⊙ τ_t (overlaps averaged, entries nobody kept at the base)."""
    deltas = job.deltas()
    base = job.base.float()
    masks = _job_masks(job, deltas)
    if masks is None:
        return base
    return base + float(job.shared.get("lambda", 1.0)) * stitch(list(deltas.values()), masks)


class _Stateless(torch.nn.Module):
    """A model called with other parameter values (``torch.func.functional_call``), so a loss is a function
    of the state the mask training differentiates through."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.model, self.params = model, params

    def forward(self, **kwargs):
        from torch.func import functional_call

        return functional_call(self.model, self.params, args=(), kwargs=kwargs)


def _lm_mask_losses(expert_set, examples, tokenizer, max_length: int) -> dict:
    """Per expert of a causal LM: ``fn(state, 0)`` = the pooled next-token loss of its whole few-shot batch at
    body ``state`` (base tensor names). The mask training's default loss is a classifier's (a task head and
    labels); passed as ``example_loss_fn`` with ``n_examples=1``, this is the same loss
    :class:`~merging.apl.taskloss.CausalLMLoss` gives (one batched forward per step, as for a classifier)."""
    from ..apl.taskloss import CausalLMLoss
    from ..lm.model import encode_lm_examples, lm_mean_loss

    fns = {}
    for expert in expert_set.experts:
        task = CausalLMLoss(expert_set, expert, encode_lm_examples(tokenizer, examples[expert], max_length))
        key_of = {id(p): k for k, p in task.model.named_parameters(remove_duplicate=False)}
        keys = {name: key_of[id(task.parameter(name))] for name in task.live}

        def fn(state, _index, task=task, keys=keys):
            return lm_mean_loss(_Stateless(task.model, {keys[n]: v for n, v in state.items() if n in keys}),
                                task.batch)
        fns[expert] = fn
    return fns


def _prepare_localize(expert_set, examples=None, tokenizer=None, **kwargs) -> dict:
    """Every expert's mask (trained on its few-shot data, or by magnitude); the training loads only now.
    Causal-LM few-shot text trains the mask on the LM loss (:func:`_lm_mask_losses`)."""
    from ..apl.localize import prepare_localize
    from ..apl.taskloss import MAX_LENGTH
    from ..io.taskdata import is_lm_data

    if examples and is_lm_data(examples) and "example_loss_fn" not in kwargs and tokenizer is not None \
            and all(examples.get(e) for e in expert_set.experts):
        kwargs = {**kwargs, "example_loss_fn": _lm_mask_losses(expert_set, examples, tokenizer,
                                                               kwargs.get("max_length", MAX_LENGTH)),
                  "n_examples": 1}
    return prepare_localize(expert_set, examples, tokenizer, **kwargs)


register(MethodSpec(
    "localize_stitch", "Localize-and-Stitch", LOCALIZE_STITCH_URL,
    "Keeps a tiny region of each task vector (1 % by default: a mask trained on the expert's few-shot loss, "
    "or its largest entries) and stitches the regions onto the base, averaging where regions overlap; "
    "entries no expert kept stay at the base, λ scales the result.",
    (LAMBDA, *MASK_PARAMS), _localize_stitch_kernel, needs=frozenset({NEEDS_BASE, NEEDS_FEW_SHOT}),
    prepare=_prepare_localize, row_separable=True,  # entry by entry, the masks cut to the chunk's rows
    explanation=(
        "Most of a fine-tune's change is thought to be redundant: a small region of each task vector carries "
        "the skill. Localize finds that region per expert — either its largest entries (data-free) or a mask "
        "trained for a fixed number of steps to keep the expert's few-shot loss low while keeping as few "
        "entries as possible, then rounded to exactly the declared share. Stitch adds the kept regions onto "
        "the base: where two experts kept the same entry their values are averaged, entries no expert kept "
        "stay at the base, and λ scales the result. Because regions rarely overlap, tasks interfere less "
        "than when whole task vectors are added."),
))
