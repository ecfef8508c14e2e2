"""Method declarations and the registry.

A method is a declaration (:class:`MethodSpec`: id, pretty name, paper, typed parameters
with range, default and scope, the inputs it needs) plus a kernel that merges one tensor
(:class:`TensorJob`). The declarations drive validation, the CLI, recipes and the app's
controls; nothing else lists method parameters by hand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import MergeLabError
from ..io.layout import TensorInfo
from ..params import ParamSpec

NEEDS_BASE = "base"
NEEDS_FEW_SHOT = "few_shot"  # task examples for each expert (Fisher, APL)
NEEDS_IMPORTANCE = "importance"  # prepare takes importance= (an ImportanceMap the caller already computed)


@dataclass
class TensorJob:
    """Everything needed to merge one tensor (or one row chunk of it).

    ``params[expert]`` are that expert's parameter values resolved at this tensor's layer;
    ``shared`` the values resolved without an expert. ``numel``/``start`` locate a row chunk
    inside the full tensor so random masks match a whole-tensor merge. ``thresholds[expert]``
    is a magnitude threshold precomputed for a layer- or model-wide trim scope.
    ``extras`` carries method-specific inputs (per-unit keep rates, Fisher diagonals…).
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
    thresholds: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def deltas(self) -> dict[str, torch.Tensor]:
        base = self.base.float()
        return {name: t.float() - base for name, t in self.experts.items()}


Kernel = Callable[[TensorJob], torch.Tensor]


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

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(name)

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
            "summary": self.summary, "needs": sorted(self.needs),
            "min_experts": self.min_experts, "max_experts": self.max_experts,
            "mergekit": self.mergekit_name,
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
METHOD_MODULES = ("classic", "fisher", "apl")


def _ensure_loaded() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(f"{__package__}.{module}")
