"""A task loss whose parameters can be patched in place: what APL and Fisher measure.

APL's exact intervention runs one forward pass per partition with a few parameters
switched between base and expert values, and its gradient mode one backward pass; Fisher
needs per-example gradients. All three need the same thing: *live* parameter tensors
addressed by the base's tensor names, plus a loss over a fixed few-shot batch. Two
implementations share that interface:

- :class:`ClassifierLoss` — a transformers sequence classifier built from the expert's
  config (body + that expert's own task head), evaluated in eval mode (no dropout) on a
  batch tokenised once;
- :class:`CausalLMLoss` — a transformers causal LM built from the expert's config, its LM head
  (tied or untied) part of the body, scored by the mean next-token cross-entropy over the completion
  tokens of :class:`~merging.io.taskdata.LMExample` rows (:mod:`merging.lm.model`);
- :class:`FunctionLoss` — any ``loss_fn(state) -> scalar`` over a plain state dict (tests,
  non-transformers models).

:func:`task_loss` picks the kind from the task data itself (labelled rows → classifier, text or
prompt/completion rows → causal LM), so importance, calibration and Fisher have one code path.

Patching goes through :meth:`TaskLoss.assign` under ``torch.no_grad`` — no model copies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping, Sequence

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


class Body(MutableMapping):
    """A model's merged body tensors by base name, each read from its source (memory-mapped) and made float32
    on access, never held: importance keeps the base's and an expert's bodies beside the live model, and two
    float32 copies of a 0.5B model are 4 GB that a CPU Space does not have. Reading again costs a copy per
    access, which the forward and backward passes that follow dwarf. A tensor assigned (a caller's edited
    body) is held and returned from then on, as a dict would."""

    def __init__(self, read: Callable[[str], torch.Tensor], names: Sequence[str]):
        self._read = read
        self._names = list(names)
        self._known = set(self._names)
        self._assigned: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._assigned:
            return self._assigned[name]
        if name not in self._known:
            raise KeyError(name)
        return self._read(name).float()

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if name not in self._known:
            self._known.add(name)
            self._names.append(name)
        self._assigned[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self._known:
            raise KeyError(name)
        self._known.discard(name)
        self._names.remove(name)
        self._assigned.pop(name, None)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._known


def body_state(expert_set: ExpertSet, which: str) -> Body:
    """Float32 merged body tensors of the base (``which == "base"``) or of an expert, by base name (read on
    access: see :class:`Body`)."""
    layout = expert_set.layout
    names = [n for n, i in layout.tensors.items() if i.role == ROLE_MERGE]
    if which == "base":
        return Body(expert_set.base.get, names)
    return Body(expert_set.experts[which].get, names)


class CausalLMLoss(TaskLoss):
    """Mean next-token cross-entropy of a causal LM on a tokenised batch of (prompt, completion) rows.

    The model is built from the expert's config (never remote code) and every merged base tensor —
    embeddings, blocks, the final norm and an untied LM head — is bound to its parameter, so assigning
    a body is a ``copy_`` per tensor; a tied LM head *is* the embedding parameter (one tensor, whose
    gradient sums both uses). ``loss`` pools the batch's target tokens; ``example_loss`` is one row's mean.
    """

    def __init__(self, expert_set: ExpertSet, expert: str, batch: Mapping[str, torch.Tensor],
                 device: str = "cpu"):
        from ..lm.model import bind_body, causal_lm_from_config, has_own_lm_head

        spec = expert_set.experts[expert]
        self.model = causal_lm_from_config(spec.source.config, expert,
                                           untie=has_own_lm_head(expert_set.layout)).to(device)
        self._params = bind_body(self.model, expert_set.layout, spec.body_key, expert)
        self.live = {name: p.data for name, p in self._params.items()}
        self.device = device
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.n_examples = int(self.batch["input_ids"].shape[0])

    def parameter(self, name: str) -> torch.Tensor:
        return self._params[name]

    def loss(self) -> torch.Tensor:
        from ..lm.model import lm_mean_loss

        return lm_mean_loss(self.model, self.batch)

    def example_loss(self, index: int) -> torch.Tensor:
        from ..lm.model import lm_mean_loss

        return lm_mean_loss(self.model, self.batch, slice(index, index + 1))


def task_loss(expert_set: ExpertSet, expert: str, examples, tokenizer, start, *, purpose: str,
              device: str = "cpu", max_length: int = MAX_LENGTH) -> TaskLoss:
    """The few-shot loss of ``expert`` on its own task data, with parameters set to ``start``: the
    classifier loss (its own head) for labelled rows, the causal-LM loss for text or prompt/completion
    rows. The data decides; a mismatch with the model (LM text for a classifier, labels for an LM with
    no task head) is refused with what to attach instead."""
    from ..io.taskdata import is_lm_data
    from ..lm.model import is_causal_lm

    rows = (examples or {}).get(expert)
    spec = expert_set.experts[expert]
    if not rows or not is_lm_data(rows):
        if rows and is_causal_lm(spec.source.config) and not spec.head_names:
            raise MergeLabError(f"{purpose}: expert '{expert}' is a causal LM but its task data has labels: give it "
                                'text instead (a .txt file, or JSONL rows {"text": …} or {"prompt": …, "completion": …})')
        return classifier_task_loss(expert_set, expert, examples, tokenizer, start, purpose=purpose,
                                    device=device, max_length=max_length)
    if spec.head_names and not is_causal_lm(spec.source.config):
        raise MergeLabError(f"{purpose}: expert '{expert}' has a task head ({', '.join(spec.head_names[:2])}) but its "
                            "task data has no labels: attach its labelled data (JSONL rows with text and label)")
    if tokenizer is None:
        raise MergeLabError(f"{purpose} needs the LM's tokenizer: add tokenizer files to the base model folder")
    from ..lm.model import encode_lm_examples

    task = CausalLMLoss(expert_set, expert, encode_lm_examples(tokenizer, rows, max_length), device)
    task.assign(start)
    return task


def classifier_task_loss(expert_set: ExpertSet, expert: str, examples, tokenizer, start, *, purpose: str,
                         device: str = "cpu", max_length: int = MAX_LENGTH) -> ClassifierLoss:
    """The few-shot classification loss of ``expert`` (its own head), with parameters set to ``start``.

    ``purpose`` names what needs it ("APL importance", "Fisher merging") in the error messages."""
    if examples is None or not examples.get(expert):
        raise MergeLabError(f"{purpose} needs few-shot examples for expert '{expert}': attach task data "
                            "(a CSV/JSONL file with text and label; text or prompt/completion rows for a causal "
                            "LM) to it, or pick a weight-only method")
    if tokenizer is None:
        raise MergeLabError(f"{purpose} needs a tokenizer: add tokenizer files to the base model folder")
    task = ClassifierLoss(expert_set, expert, encode_examples(tokenizer, examples[expert], max_length), device)
    task.assign(start)
    return task


def expert_task_loss(expert_set: ExpertSet, expert: str, state, examples, tokenizer, *, purpose: str, device: str,
                     max_length: int, example_loss_fn=None, n_examples: int | None = None,
                     build: Callable[..., TaskLoss] | None = None) -> TaskLoss:
    """The loss a data-aware method measures ``expert`` on: a caller's ``example_loss_fn(state, i)`` (one
    function, or one per expert) averaged over ``n_examples``, else ``build`` (default :func:`task_loss`) on
    the expert's few-shot ``examples``. One place for Fisher, Localize-and-Stitch and whatever comes next."""
    if example_loss_fn is not None:
        fn = example_loss_fn[expert] if isinstance(example_loss_fn, Mapping) else example_loss_fn
        if not n_examples:
            raise MergeLabError("example_loss_fn needs n_examples (how many examples to average over)")
        return FunctionLoss(state, lambda s: torch.stack([fn(s, i) for i in range(n_examples)]).mean(), fn, n_examples)
    return (build or task_loss)(expert_set, expert, examples, tokenizer, state, purpose=purpose, device=device,
                                max_length=max_length)
