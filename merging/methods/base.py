"""Method declarations and the registry.

A method is a declaration (:class:`MethodSpec`: id, pretty name, paper, typed parameters
with range, default and scope, the inputs it needs) plus a kernel that merges one tensor
(:class:`TensorJob`). The declarations drive validation, the CLI, recipes and the app's
controls; nothing else lists method parameters by hand.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MergeLabError
from ..io.layout import TensorInfo
from ..params import ParamSpec

NEEDS_BASE = "base"
NEEDS_FEW_SHOT = "few_shot"  # task examples for each expert (Fisher, APL)
NEEDS_IMPORTANCE = "importance"  # prepare takes importance= (an ImportanceMap the caller already computed)
#: what a per-task-body merge's label says wherever it is listed beside single-model merges
PER_TASK_LABEL = "one body per task"


@dataclass(frozen=True)
class PerTensor:
    """A method input that travels with the tensors: ``values[tensor name]`` is a tensor or a mapping
    (e.g. per expert) of tensors belonging to that tensor alone.

    The engine hands a kernel only its tensor's entry (``job.extras[key]``, None where there is none)
    and, when it merges the tensor in row chunks, narrows every tensor of the entry to the chunk's rows
    along ``row_axis``: the axis of the input that runs over the merged tensor's rows (axis 0). A Fisher
    diagonal has the merged tensor's shape, so ``row_axis=0``. ``row_axis=None`` says the input is a
    whole-tensor statistic the kernel needs in full even for a chunk (APL's unit percentiles: every
    unit's keep rate depends on all of them); the kernel then locates the chunk with
    :meth:`TensorJob.row_range`. Declared, because guessing "a first axis as long as the row count is
    per row" mistakes any input that happens to be that long.
    """

    values: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]]
    row_axis: int | None = 0

    def for_tensor(self, name: str) -> Any:
        """The entry of tensor ``name`` (None if the input has none)."""
        return self.values.get(name)

    def narrow(self, value: Any, r0: int, r1: int, rows: int, tensor: str = "") -> Any:
        """``value`` (an entry of :meth:`for_tensor`) cut to rows ``r0:r1`` of a tensor of ``rows`` rows."""
        if self.row_axis is None or value is None:
            return value
        if isinstance(value, Mapping):
            return {k: self.narrow(v, r0, r1, rows, tensor) for k, v in value.items()}
        if not torch.is_tensor(value) or value.dim() <= self.row_axis or value.shape[self.row_axis] != rows:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise MergeLabError(f"a per-tensor method input for '{tensor}' has shape {shape}, but it declares axis "
                                f"{self.row_axis} as the tensor's {rows} rows: give it the tensor's rows along "
                                "that axis, or declare row_axis=None if the kernel needs it whole")
        return value.narrow(self.row_axis, r0, r1 - r0)


@dataclass(frozen=True)
class Threshold:
    """A magnitude cut for one job, from a whole-tensor (or layer- or model-wide) top-k: keep the entries
    with |Δ| > ``cut`` and the first ``ties`` entries (lowest flat index first) with |Δ| == ``cut``.

    The tie quota makes the kept count exact where a bare cut keeps only the entries strictly above it
    (fp16/bf16 deltas tie by the thousand): the engine splits the ties to keep over the row chunks and
    tensors of the scope in order, so a chunked merge keeps what the whole-tensor top-k keeps."""

    cut: float
    ties: int = 0


@dataclass
class TensorJob:
    """Everything needed to merge one tensor (or one row chunk of it).

    ``params[expert]`` are that expert's parameter values resolved at this tensor's layer;
    ``shared`` the values resolved without an expert. ``numel``/``start`` locate a row chunk
    inside the full tensor so random masks match a whole-tensor merge. ``thresholds[expert]``
    is the :class:`Threshold` of a magnitude top-k taken over more than this job sees (a chunked
    tensor, or a layer- or model-wide trim scope).
    ``extras`` carries method-specific inputs (per-unit keep rates, Fisher diagonals…), each
    :class:`PerTensor` input already narrowed to this tensor (and chunk).
    """

    name: str
    info: TensorInfo
    base: torch.Tensor
    experts: dict[str, torch.Tensor]
    params: dict[str, dict[str, Any]]
    shared: dict[str, Any]
    seed: int
    numel: int
    start: int = 0
    thresholds: dict[str, Threshold] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    #: the expert whose body this job merges, for a method with ``per_task_bodies`` (None: the one
    #: merged body, or for such a method its labelled single-body stand-in, e.g. EMR's unified vector)
    task: str | None = None
    #: the method's :class:`ModelStat` total over every merged tensor (None for methods without one)
    model_stat: Any = None
    #: blocks of the model (``Layout.n_blocks``): a per-layer shape counted from the top (layer swapping's
    #: top k layers) needs the depth, which one tensor's layer name does not tell
    n_blocks: int = 0

    def deltas(self) -> dict[str, torch.Tensor]:
        base = self.base.float()
        return {name: t.float() - base for name, t in self.experts.items()}

    def row_range(self) -> tuple[int, int]:
        """Rows ``(r0, r1)`` of the whole tensor this job merges (``(0, rows)`` unless a row chunk)."""
        if self.base.dim() < 2 or self.numel == self.base.numel():
            return 0, (self.base.shape[0] if self.base.dim() else 1)
        row = self.numel // self.info.shape[0]
        first = self.start // row
        return first, first + self.base.shape[0]


Kernel = Callable[[TensorJob], torch.Tensor]


@dataclass(frozen=True)
class ModelStat:
    """A model-wide statistic a kernel needs before it can merge any one tensor (EMR's per-task
    rescalers are sums over the whole model), computed by the engine in one pre-pass per settings.

    ``partial(job)`` runs on every merged tensor (on each row chunk where the method is row-separable and
    the tensor large; ``job.task`` is None); ``total([(tensor name, partial), ...], shared)`` — in layout
    order, chunks in row order, with the validated shared parameters — returns the value every job then
    sees as ``job.model_stat``. Return per-row
    pieces from ``partial`` when ``total`` sums them, so a chunked pre-pass adds in the same order as a
    whole one (chunked == whole, bit for bit)."""

    partial: Callable[[TensorJob], Any]
    total: Callable[[list[tuple[str, Any]], Mapping[str, Any]], Any]


@dataclass(frozen=True)
class MethodSpec:
    """A merge method's declaration."""

    name: str
    pretty_name: str
    paper_url: str
    summary: str
    params: tuple[ParamSpec, ...]
    kernel: Kernel
    needs: frozenset[str] = frozenset({NEEDS_BASE})
    min_experts: int = 1
    max_experts: int | None = None
    mergekit_name: str | None = None
    #: name of the choice parameter selecting a magnitude-trim scope (tensor/layer/model), if any
    trim_scope_param: str | None = None
    #: prepares method-specific inputs before merging (e.g. Fisher diagonals, APL calibration):
    #: ``prepare(expert_set, examples, tokenizer, *, params, progress=None[, importance=])`` with each
    #: expert's few-shot ``examples`` given in (a method never looks for files) returns
    #: ``{"expert_params": {expert: {param: value}}, "extras": {...}, "suggestion": JSON-able}``; the app,
    #: the CLI and replay call it the same way, and a caller's per-cell overrides win over expert_params.
    #: Import measurement code inside it, not at module level: declaring must stay light.
    prepare: Callable[..., dict[str, Any]] | None = None
    #: part of the contract with the engine, which merges tensors over ``CHUNK_BYTES`` in row chunks:
    #: True when a chunk of rows merged alone equals those rows of the whole-tensor merge (given the
    #: engine's whole-tensor magnitude thresholds and narrowed :class:`PerTensor` inputs). A method
    #: that is not (an angle over the whole tensor, a top-k it takes itself) is merged whole, costing
    #: memory on large tensors but never correctness; a function of the shared parameters where it
    #: depends on a choice. False by default, so a new method is correct before it is fast.
    row_separable: bool | Callable[[Mapping[str, Any]], bool] = False
    #: the method's result is not one model but one body per expert (EMR-Merging): the engine merges
    #: each tensor once per expert (``job.task``), ``MergeResult.task_bodies`` holds the bodies, exports
    #: write each expert's folder with its own body and the probe scores each task on its own body.
    per_task_bodies: bool = False
    #: a model-wide statistic the kernel reads as ``job.model_stat`` (see :class:`ModelStat`)
    model_stat: ModelStat | None = None
    #: one paragraph in plain words of what the method does to the task vectors (the page, `merge-lab
    #: methods` and the README show it beside the paper link); ``summary`` stays the one-line version
    explanation: str = ""
    #: the kernel draws random numbers from the merge's seed (DARE's random drop): another seed is another
    #: merge, so the page offers to run it over several seeds and show the spread; a function of the shared
    #: parameters where a choice decides (APL's drop: random or magnitude)
    randomised: bool | Callable[[Mapping[str, Any]], bool] = False

    def is_randomised(self, shared: Mapping[str, Any]) -> bool:
        """:attr:`randomised` at these shared parameter values."""
        declared = self.randomised
        return bool(declared(shared) if callable(declared) else declared)

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def is_row_separable(self, shared: Mapping[str, Any]) -> bool:
        """:attr:`row_separable` at these shared parameter values."""
        declared = self.row_separable
        return bool(declared(shared) if callable(declared) else declared)

    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def check_expert_count(self, count: int) -> None:
        if count < self.min_experts:
            raise MergeLabError(f"{self.pretty_name} needs at least {self.min_experts} experts, got {count}",
                                field="experts")
        if self.max_experts is not None and count > self.max_experts:
            raise MergeLabError(f"{self.pretty_name} merges exactly {self.max_experts} experts, got {count}: "
                                "pick two experts or another method", field="experts")

    def describe(self) -> dict[str, Any]:
        """JSON-ready declaration (CLI `methods --json`, the app)."""
        return {
            "name": self.name, "pretty_name": self.pretty_name, "paper": self.paper_url,
            "summary": self.summary, "explanation": self.explanation, "needs": sorted(self.needs),
            "min_experts": self.min_experts, "max_experts": self.max_experts,
            "mergekit": self.mergekit_name, "per_task_bodies": self.per_task_bodies,
            "params": [
                {"name": p.name, "type": p.kind, "default": p.default, "scope": p.scope, "help": p.help,
                 "min": p.low, "max": p.high, "choices": list(p.choices) or None}
                for p in self.params
            ],
        }


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise MergeLabError(
            f"unknown merge method '{name}'; available: {', '.join(_REGISTRY)}", field="method")
    return _REGISTRY[name]


def available() -> list[str]:
    """Ids of every registered method, in registration order."""
    _ensure_loaded()
    return list(_REGISTRY)


def all_specs() -> list[MethodSpec]:
    _ensure_loaded()
    return list(_REGISTRY.values())


#: modules that register methods on import, in the order the methods are listed
METHOD_MODULES = ("classic", "fisher", "apl", "model_stock", "consensus", "pcb", "tsv", "regmean",
                  "emr", "localize_stitch", "layer_swap")


def _ensure_loaded() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(f"{__package__}.{module}")
