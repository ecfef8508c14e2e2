"""Input Gram matrices of each expert's linear layers on its few-shot set (RegMean's measurement).

For every merged 2-D weight that belongs to a linear layer (``nn.Linear``, stored ``[out, in]``, or GPT-2's
``Conv1D``, stored ``[in, out]``), a forward hook on the expert's own model (body at the expert's weights,
its own head) collects the layer's inputs x on the few-shot batch, one forward pass in eval mode, and the
Gram matrix is their mean outer product ``G = Σ_tokens x xᵀ / #tokens`` — the reference's ``regmean_mean``
(bloomberg/dataless-model-merging: ``xᵀx`` summed over the flattened batch and divided by its rows). Padding
positions (attention mask 0) are left out: the batch is padded to its longest example, and padding is not
data the expert saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..io.experts import ExpertSet
from ..methods.base import PerTensor
from ..methods.regmean import REGMEAN_GRAMS, REGMEAN_INPUT_AXIS
from .taskloss import MAX_LENGTH, Example, body_state, task_loss

Progress = Callable[[float, str], None]


@dataclass
class GramResult:
    """Per expert and base tensor name, the mean input outer product of its linear layer; the input axis of
    each weight (1 for ``[out, in]`` Linear, 0 for ``[in, out]`` Conv1D)."""

    grams: dict[str, dict[str, torch.Tensor]]
    input_axis: dict[str, int] = field(default_factory=dict)
    n_tokens: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def extras(self) -> dict[str, PerTensor]:
        per_tensor: dict[str, dict[str, torch.Tensor]] = {}
        for expert, tensors in self.grams.items():
            for name, gram in tensors.items():
                per_tensor.setdefault(name, {})[expert] = gram
        axes = {name: torch.tensor(axis) for name, axis in self.input_axis.items()}
        return {REGMEAN_GRAMS: PerTensor(per_tensor, row_axis=None),
                REGMEAN_INPUT_AXIS: PerTensor(axes, row_axis=None)}


def linear_layers(model: torch.nn.Module, expert_set: ExpertSet, expert: str) -> dict[str, tuple[torch.nn.Module, int]]:
    """Base tensor name → (its linear module in ``model``, the weight's input axis), for merged 2-D weights."""
    from transformers.pytorch_utils import Conv1D

    spec = expert_set.experts[expert]
    modules = dict(model.named_modules())
    out = {}
    for name in expert_set.layout.merged_names():
        key = spec.body_key(name)
        if not key.endswith(".weight") or len(expert_set.layout[name].shape) != 2:
            continue
        module = modules.get(key[: -len(".weight")])
        if isinstance(module, torch.nn.Linear):
            out[name] = (module, 1)
        elif isinstance(module, Conv1D):
            out[name] = (module, 0)
    return out


def compute_grams(expert_set: ExpertSet, examples: Mapping[str, Sequence[Example]] | None, tokenizer, *,
                  device: str = "cpu", progress: Progress | None = None, max_length: int = MAX_LENGTH) -> GramResult:
    """Every expert's input Gram matrices on its few-shot examples (one forward pass each)."""
    result = GramResult({})
    experts = list(expert_set.experts)
    for index, expert in enumerate(experts):
        clock = time.perf_counter()
        task = task_loss(expert_set, expert, examples, tokenizer, body_state(expert_set, expert),
                         purpose="RegMean", device=device, max_length=max_length)
        mask = task.batch.get("attention_mask")
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        handles = []
        for name, (module, axis) in linear_layers(task.model, expert_set, expert).items():
            result.input_axis[name] = axis

            def hook(_module, inputs, _output, name=name, mask=mask, sums=sums, counts=counts):
                x = inputs[0].detach().float()
                if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                    x = x[mask.bool()]  # real tokens only
                x = x.reshape(-1, x.shape[-1])
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]

            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                task.loss()
        finally:
            for handle in handles:
                handle.remove()
        result.grams[expert] = {n: (s / max(counts[n], 1)).cpu() for n, s in sums.items()}
        result.n_tokens[expert] = int(mask.sum()) if mask is not None else 0
        result.seconds[expert] = time.perf_counter() - clock
        if progress:
            progress((index + 1) / len(experts), f"RegMean Gram matrices of {expert}")
    return result


def prepare_regmean(expert_set: ExpertSet, examples: Mapping[str, Sequence[Example]] | None = None, tokenizer=None,
                    *, params: Mapping | None = None, progress: Progress | None = None, **kwargs) -> dict:
    """The ``regmean`` method's inputs: ``{"expert_params": {}, "extras": …, "grams": GramResult}``."""
    result = compute_grams(expert_set, examples, tokenizer, progress=progress, **kwargs)
    return {"expert_params": {}, "extras": result.extras(), "grams": result}
