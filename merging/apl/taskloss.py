"""A task loss whose parameters can be patched in place: what APL and Fisher measure.

APL's exact intervention runs one forward pass per partition with a few parameters
switched between base and expert values, and its gradient mode one backward pass; Fisher
needs per-example gradients. All three need the same thing: *live* parameter tensors
addressed by the base's tensor names, plus a loss over a fixed few-shot batch. Two
implementations share that interface:

- :class:`ClassifierLoss` — a transformers sequence classifier built from the expert's
  config (body + that expert's own task head), evaluated in eval mode (no dropout) on a
  batch tokenised once;
- :class:`FunctionLoss` — any ``loss_fn(state) -> scalar`` over a plain state dict (tests,
  non-transformers models).

Patching goes through :meth:`TaskLoss.assign` under ``torch.no_grad`` — no model copies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import MergeLabError
from ..io.experts import ExpertSet
from ..io.layout import ROLE_MERGE
from ..io.taskdata import tokenizer_of  # noqa: F401  (re-exported: the one tokenizer finder)

Example = tuple[str, int]
StateLoss = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
ExampleLoss = Callable[[Mapping[str, torch.Tensor], int], torch.Tensor]

MAX_LENGTH = 32


class TaskLoss:
    """Live parameters (keyed by base tensor name) and the mean loss they give on a fixed batch."""

    live: dict[str, torch.Tensor]
    n_examples: int

    def loss(self) -> torch.Tensor:
        """Mean loss over the whole few-shot batch (scalar; differentiable if grads are on)."""
        raise NotImplementedError

    def example_loss(self, index: int) -> torch.Tensor:
        """Loss of one example (for per-example gradients)."""
        raise NotImplementedError

    def parameter(self, name: str) -> torch.Tensor:
        """The tensor whose ``.grad`` receives the gradient of ``live[name]``."""
        return self.live[name]

    @torch.no_grad()
    def assign(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy values into the live tensors (names not given keep their values)."""
        for name, value in state.items():
            self.live[name].copy_(value)

    def set_requires_grad(self, names: Sequence[str]) -> None:
        """Track gradients for exactly ``names``: untracked tensors cost no backward work."""
        wanted = set(names)
        for name in self.live:
            self.parameter(name).requires_grad_(name in wanted)
            self.parameter(name).grad = None

    def gradient(self, names: Sequence[str], index: int | None = None) -> tuple[float, dict[str, torch.Tensor]]:
        """(loss, ∂L/∂θ for ``names``) at the current values: one forward and one backward pass
        (of one example if ``index`` is given)."""
        self.set_requires_grad(names)
        with torch.enable_grad():
            loss = self.loss() if index is None else self.example_loss(index)
            if loss.requires_grad:
                loss.backward()
        grads = {}
        for name in names:
            grad = self.parameter(name).grad
            grads[name] = torch.zeros_like(self.live[name]) if grad is None else grad.detach()
        self.set_requires_grad([])
        return float(loss.detach()), grads


# ---- a plain function of a state dict ---------------------------------------------------

class FunctionLoss(TaskLoss):
    """``loss_fn(state)`` over a private copy of a state dict (tests, custom models).

    ``example_loss_fn(state, i)`` is only needed for Fisher diagonals.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], loss_fn: StateLoss,
                 example_loss_fn: ExampleLoss | None = None, n_examples: int = 1):
        self.live = {n: t.detach().float().clone() for n, t in state.items()}
        self.loss_fn = loss_fn
        self.example_loss_fn = example_loss_fn
        self.n_examples = n_examples

    def loss(self) -> torch.Tensor:
        return self.loss_fn(self.live)

    def example_loss(self, index: int) -> torch.Tensor:
        if self.example_loss_fn is None:
            raise MergeLabError("per-example losses need example_loss_fn(state, index)")
        return self.example_loss_fn(self.live, index)


# ---- a transformers sequence classifier ---------------------------------------------------

def encode_examples(tokenizer, examples: Sequence[Example], max_length: int = MAX_LENGTH) -> dict[str, torch.Tensor]:
    """Tokenise once (padded to the longest example), with labels: every pass reuses this batch."""
    if not examples:
        raise MergeLabError("no few-shot examples: attach task data (text, label) to the expert")
    texts = [str(text) for text, _ in examples]
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    batch["labels"] = torch.tensor([int(label) for _, label in examples], dtype=torch.long)
    return batch


def classifier_from_config(config: Mapping, expert: str):
    """A randomly initialised sequence classifier of the expert's architecture (weights loaded after)."""
    if not config or "model_type" not in config:
        raise MergeLabError(
            f"expert '{expert}' has no usable config.json (model_type missing): importance and Fisher "
            "build the model from it — use an expert folder saved with save_pretrained")
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    settings = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        hf_config = AutoConfig.for_model(config["model_type"], **settings)
        return AutoModelForSequenceClassification.from_config(hf_config)
    except (ValueError, KeyError) as exc:
        raise MergeLabError(f"expert '{expert}': transformers cannot build a sequence classifier "
                            f"from its config ({exc})") from exc


class ClassifierLoss(TaskLoss):
    """Cross-entropy of an expert's classifier (body + its own head) on a tokenised batch.

    ``live`` maps each merged base tensor name to the model's parameter data, so assigning
    a base or expert body is a ``copy_`` per tensor. The head stays the expert's throughout.
    """

    def __init__(self, expert_set: ExpertSet, expert: str, batch: Mapping[str, torch.Tensor],
                 device: str = "cpu"):
        spec = expert_set.experts[expert]
        self.model = classifier_from_config(spec.source.config, expert).to(device).eval()
        params = dict(self.model.named_parameters())
        self._params = {}
        for name, info in expert_set.layout.tensors.items():
            if info.role != ROLE_MERGE:
                continue
            key = spec.body_key(name)
            if key not in params:
                raise MergeLabError(f"expert '{expert}': the model built from its config has no parameter "
                                    f"'{key}' (base tensor '{name}'); its config does not match its weights")
            self._params[name] = params[key]
        self._load_head(spec, params)
        self.live = {name: p.data for name, p in self._params.items()}
        self.device = device
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.n_examples = int(self.batch["labels"].shape[0])
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def _load_head(self, spec, params: dict[str, torch.nn.Parameter]) -> None:
        for key in spec.head_names:
            if key in params:
                params[key].data.copy_(spec.source.get(key).to(params[key].dtype))
        body = {id(p) for p in self._params.values()}
        missing = [k for k, p in params.items() if k not in spec.head_names and id(p) not in body]
        if missing:
            raise MergeLabError(f"expert '{spec.name}' has no weights for {', '.join(missing[:3])}: "
                                "the task head is missing from its files")

    def parameter(self, name: str) -> torch.Tensor:
        return self._params[name]

    def _forward(self, rows: slice | None = None) -> torch.Tensor:
        inputs = {k: (v if rows is None else v[rows]) for k, v in self.batch.items() if k != "labels"}
        labels = self.batch["labels"] if rows is None else self.batch["labels"][rows]
        logits = self.model(**inputs).logits
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    def loss(self) -> torch.Tensor:
        return self._forward()

    def example_loss(self, index: int) -> torch.Tensor:
        return self._forward(slice(index, index + 1))


def body_state(expert_set: ExpertSet, which: str) -> dict[str, torch.Tensor]:
    """Float32 merged body tensors of the base (``which == "base"``) or of an expert, by base name."""
    layout = expert_set.layout
    names = [n for n, i in layout.tensors.items() if i.role == ROLE_MERGE]
    if which == "base":
        return {n: expert_set.base.get(n).float() for n in names}
    expert = expert_set.experts[which]
    return {n: expert.get(n).float() for n in names}


def classifier_task_loss(expert_set: ExpertSet, expert: str, examples, tokenizer, start, *, purpose: str,
                         device: str = "cpu", max_length: int = MAX_LENGTH) -> ClassifierLoss:
    """The few-shot classification loss of ``expert`` (its own head), with parameters set to ``start``.

    ``purpose`` names what needs it ("APL importance", "Fisher merging") in the error messages."""
    if examples is None or not examples.get(expert):
        raise MergeLabError(f"{purpose} needs few-shot examples for expert '{expert}': attach task data "
                            "(a CSV/JSONL file with text and label) to it, or pick a weight-only method")
    if tokenizer is None:
        raise MergeLabError(f"{purpose} needs a tokenizer: add tokenizer files to the base model folder")
    task = ClassifierLoss(expert_set, expert, encode_examples(tokenizer, examples[expert], max_length), device)
    task.assign(start)
    return task
