"""Declared method parameters and their per-layer / per-expert values.

A method declares its parameters (:class:`ParamSpec`); the UI builds controls and the CLI
options from the declarations, and :func:`validate_params` checks what a user or a
recipe gives. A value may be

- a scalar (every layer),
- a list — interpolated linearly over depth (embeddings at 0, head at 1), mergekit-style,
- a map ``{layer: value}`` with layers ``embeddings``, ``0``…``N-1``, ``head`` and an optional
  ``default`` for the rest,

and any value may be overridden per expert. ``density = 1 − drop_ratio`` is accepted as
an alias of ``drop_ratio``; giving both is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import MergeLabError

SHARED, PER_EXPERT, PER_LAYER = "shared", "expert", "layer"


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter of a merge method."""

    name: str
    kind: str  # "float" | "int" | "bool" | "choice"
    default: Any
    help: str
    scope: str = SHARED  # the finest natural granularity: shared, expert or layer
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def check_scalar(self, value: Any, where: str) -> Any:
        """Validate one scalar value; return it converted to the declared type."""
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise MergeLabError(f"{where} must be true or false, got {value!r}", field=where)
        if self.kind == "choice":
            if value in self.choices:
                return value
            raise MergeLabError(f"{where} must be one of {', '.join(self.choices)}, got {value!r}", field=where)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeLabError(f"{where} must be a number, got {value!r}", field=where)
        number = float(value)
        if not math.isfinite(number):
            raise MergeLabError(f"{where} must be a finite number, got {value!r}", field=where)
        if self.low is not None and number < self.low or self.high is not None and number > self.high:
            raise MergeLabError(f"{where} must lie in [{self.low}, {self.high}], got {value!r}", field=where)
        return int(number) if self.kind == "int" else number


def _layer_key(key: Any) -> str:
    return str(key).strip()


def validate_value(spec: ParamSpec, value: Any, where: str, layers: Sequence[str] | None = None) -> Any:
    """Validate a scalar, list (interpolated over depth) or layer map."""
    if isinstance(value, (list, tuple)):
        if spec.kind in ("bool", "choice"):
            raise MergeLabError(f"{where} cannot vary over layers", field=where)
        if not value:
            raise MergeLabError(f"{where} is an empty list: give a number or a list of numbers", field=where)
        return [spec.check_scalar(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            name = _layer_key(key)
            if layers is not None and name != "default" and name not in layers:
                raise MergeLabError(
                    f"{where} names layer '{name}', which this model does not have "
                    f"(layers: {', '.join(layers)}, or 'default')", field=where)
            out[name] = spec.check_scalar(item, f"{where}.{name}")
        return out
    return spec.check_scalar(value, where)


def normalize_aliases(params: Mapping[str, Any], where: str = "parameters") -> dict[str, Any]:
    """Turn ``density`` into ``drop_ratio`` (both at once is an error)."""
    out = dict(params)
    if "density" in out:
        if "drop_ratio" in out:
            raise MergeLabError(
                f"{where}: give drop_ratio or density (= 1 − drop_ratio), not both", field=f"{where}.density")
        out["drop_ratio"] = _complement(out.pop("density"))
    return out


def _complement(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_complement(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _complement(v) for k, v in value.items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 1.0 - float(value)
    return value  # left for validation to reject with a clear message


def validate_params(specs: Sequence[ParamSpec], params: Mapping[str, Any], where: str = "parameters",
                    layers: Sequence[str] | None = None, per_expert: bool = False) -> dict[str, Any]:
    """Check names, types and ranges; fill nothing in (defaults apply at resolution)."""
    by_name = {s.name: s for s in specs}
    params = normalize_aliases(params, where)
    out: dict[str, Any] = {}
    for key, value in params.items():
        spec = by_name.get(key)
        if spec is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise MergeLabError(f"{where}: unknown parameter '{key}' (this method takes: {known})",
                                field=f"{where}.{key}")
        if per_expert and spec.scope == SHARED:
            raise MergeLabError(f"{where}: '{key}' is shared by all experts and cannot be set per expert",
                                field=f"{where}.{key}")
        out[key] = validate_value(spec, value, f"{where}.{key}", layers)
    return out


def interpolate(points: Sequence[float], position: float) -> float:
    """Value of a list spread evenly over depth [0, 1] at ``position`` (linear interpolation)."""
    if len(points) == 1:
        return float(points[0])
    scaled = position * (len(points) - 1)
    low = min(int(math.floor(scaled)), len(points) - 2)
    frac = scaled - low
    return float(points[low]) * (1 - frac) + float(points[low + 1]) * frac


@dataclass
class ParamResolver:
    """Resolves the value of every parameter for (expert, layer) from shared and per-expert settings."""

    specs: Sequence[ParamSpec]
    shared: Mapping[str, Any]
    per_expert: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    layers: Sequence[str] = ()

    def value(self, name: str, expert: str | None = None, layer: str | None = None) -> Any:
        """Per-expert setting, else shared, else the declared default; a layer map that does not
        name ``layer`` (and has no ``default``) falls through to the next source."""
        sources = []
        if expert is not None and name in self.per_expert.get(expert, {}):
            sources.append(self.per_expert[expert][name])
        if name in self.shared:
            sources.append(self.shared[name])
        sources.append(self._spec(name).default)
        for raw in sources:
            found, value = self._at_layer(raw, layer)
            if found:
                return value
        return self._spec(name).default

    def for_layer(self, expert: str | None, layer: str) -> dict[str, Any]:
        return {s.name: self.value(s.name, expert, layer) for s in self.specs}

    def _spec(self, name: str) -> ParamSpec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def _at_layer(self, raw: Any, layer: str | None) -> tuple[bool, Any]:
        if isinstance(raw, (list, tuple)):
            position = 0.0 if layer is None else self.layers.index(str(layer)) / max(1, len(self.layers) - 1)
            return True, interpolate(raw, position)
        if isinstance(raw, Mapping):
            if layer is not None and str(layer) in raw:
                return True, raw[str(layer)]
            if "default" in raw:
                return True, raw["default"]
            return False, None
        return True, raw

    def varies_by_layer(self, name: str) -> bool:
        values = [self.shared.get(name)] + [p.get(name) for p in self.per_expert.values()]
        return any(isinstance(v, (list, tuple, Mapping)) for v in values)
