"""The per-layer plan: APL's suggestion, the user's overrides, presets, tables, and the recipe they make."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import MergeLabError
from ..params import ParamResolver
from .limits import DROP, WEIGHT, check_cell, method_spec
from .session import Session


def layer_values(method: str, experts: Sequence[str], layers: Sequence[str], shared: Mapping[str, Any],
                 prepared_params: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per-layer drop ratio and weight of every expert before overrides: what the method's ``prepare``
    returned per expert (a scalar, list or layer map, resolved like any parameter), else the shared value,
    else the declared default. A key the method does not declare shows the shared value (or 0.5 / 1)."""
    spec = method_spec(method)
    declared = {p.name for p in spec.params}
    resolver = ParamResolver(spec.params, {k: v for k, v in shared.items() if k in declared},
                             dict(prepared_params or {}), list(layers))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for expert in experts:
        out[expert] = {}
        for key, fallback in ((DROP, 0.5), (WEIGHT, 1.0)):
            if key in declared:
                out[expert][key] = {k: float(resolver.value(key, expert, k)) for k in layers}
            else:
                value = float(shared.get(key, fallback))
                out[expert][key] = {k: value for k in layers}
    return out


def with_overrides(values: dict[str, dict[str, dict[str, float]]],
                   overrides: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """``values`` with the user's per-cell overrides laid over them (in place; returned)."""
    for expert, keys in overrides.items():
        for key, layers in keys.items():
            for layer, value in layers.items():
                if expert in values and layer in values[expert].get(key, {}):
                    values[expert][key][layer] = float(value)
    return values


def _prepared_params(session: Session, method: str, shared: Mapping[str, Any]) -> dict | None:
    from .prepare import view_prepared

    found = view_prepared(session, method, shared)
    return (found or {}).get("expert_params") or None


def suggestion(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None
               ) -> dict[str, dict[str, dict[str, float]]]:
    """The per-layer values before overrides: the method's prepared values where it has them (APL's
    calibration once importance exists), uniform globals otherwise."""
    method = method or session.method
    shared = dict(shared if shared is not None else session.shared)
    return layer_values(method, session.experts, session.layers, shared, _prepared_params(session, method, shared))


def suggestion_source(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None) -> str:
    """Words for where the suggestion comes from (the page's "every cell follows …")."""
    method = method or session.method
    shared = dict(shared if shared is not None else session.shared)
    if _prepared_params(session, method, shared):
        return f"{method_spec(method).pretty_name}'s suggestion"
    return "the global controls"


def plan(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None
         ) -> dict[str, dict[str, dict[str, float]]]:
    """Effective per-layer drop ratio and weight of every expert (suggestion + overrides)."""
    return with_overrides(suggestion(session, method, shared), session.overrides)


def set_cell(session: Session, expert: str, layer: str, key: str, value: float, method: str | None = None) -> Session:
    """Override one expert × layer value (what a slider or a table edit does), checked against the range
    ``method`` (default: the session's) declares for it."""
    if expert not in session.refs:
        raise MergeLabError(f"no expert named '{expert}' is loaded")
    if layer not in session.layers:
        raise MergeLabError(f"layer '{layer}' does not exist (layers: {', '.join(session.layers)})")
    value = check_cell(key, value, layer, method or session.method)
    session.overrides.setdefault(expert, {}).setdefault(key, {})[layer] = value
    return session


def is_overridden(session: Session, expert: str, key: str, layer: str) -> bool:
    return layer in session.overrides.get(expert, {}).get(key, {})


def override_list(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None) -> list[dict]:
    return listed_overrides(session.overrides, suggestion(session, method, shared))


def listed_overrides(overrides: Mapping[str, Mapping[str, Mapping[str, float]]],
                     sugg: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[dict]:
    """Each override beside the value it replaced (what a recipe records under ``suggested.overrides``)."""
    out = []
    for expert, keys in overrides.items():
        for key, layers in keys.items():
            for layer, value in layers.items():
                suggested = sugg.get(expert, {}).get(key, {}).get(layer)
                out.append({"expert": expert, "key": key, "layer": layer, "value": value, "suggested": suggested})
    return out


def reset_overrides(session: Session) -> Session:
    """Back to the suggestion (the method's prepared values, e.g. APL's calibration once importance exists)."""
    session.overrides = {}
    return session


def preset_uniform(session: Session, drop_ratio: float = 0.5, weight: float = 1.0) -> Session:
    """Every cell: the same drop ratio and weight (DARE-like for APL)."""
    session.overrides = {e: {DROP: {k: float(drop_ratio) for k in session.layers},
                             WEIGHT: {k: float(weight) for k in session.layers}} for e in session.refs}
    return session


def layer_swap_groups(layers: Sequence[str]) -> tuple[list[str], list[str]]:
    """(outer, middle) layers for a layer swap: the bottom and top third of the blocks (plus embeddings
    and head) are outer, the rest middle."""
    blocks = [k for k in layers if k not in ("embeddings", "head")]
    n = len(blocks)
    edge = max(1, n // 3) if n >= 3 else 1 if n == 2 else 0
    outer_blocks = set(blocks[:edge]) | set(blocks[n - edge:]) if edge else set()
    if n and len(outer_blocks) == n:  # keep at least one middle block
        outer_blocks.discard(blocks[n // 2])
    outer = [k for k in layers if k in ("embeddings", "head") or k in outer_blocks]
    middle = [k for k in layers if k not in outer]
    return outer, middle


def preset_layer_swap(session: Session, outer: str | None = None, middle: str | None = None) -> Session:
    """Layer swapping (Bandarkar et al. 2024): bottom and top layers from one expert, middle from another
    (weight 1 for the chosen expert, 0 for the others, no dropping)."""
    experts = session.experts
    if len(experts) < 2:
        raise MergeLabError("layer swap needs two experts")
    outer = outer if outer in experts else experts[0]
    middle = middle if middle in experts and middle != outer else next(e for e in experts if e != outer)
    outer_layers, _ = layer_swap_groups(session.layers)
    session.overrides = {}
    for expert in experts:
        for layer in session.layers:
            owner = outer if layer in outer_layers else middle
            set_cell(session, expert, layer, WEIGHT, 1.0 if expert == owner else 0.0)
            set_cell(session, expert, layer, DROP, 0.0)
    return session


def table_rows(session: Session, key: str, method: str | None = None, shared: Mapping[str, Any] | None = None
               ) -> tuple[list[str], list[list]]:
    """Expert × layer table of one per-layer value (effective values)."""
    values = plan(session, method, shared)
    headers = ["expert", *session.layers]
    return headers, [[e, *(round(values[e][key][k], 4) for k in session.layers)] for e in session.refs]


def apply_table(session: Session, key: str, rows: Sequence[Sequence[Any]], method: str | None = None,
                shared: Mapping[str, Any] | None = None) -> Session:
    """Record every cell of an edited table that differs from the effective value as an override."""
    current = plan(session, method, shared)
    changes: list[tuple[str, str, float]] = []
    for row in rows:
        if not row:
            continue
        expert = str(row[0])
        if expert not in session.refs:
            continue
        for layer, cell in zip(session.layers, list(row[1:])):
            label = f"table cell {expert}/{layer} ({key.replace('_', ' ')})"
            value = check_cell(key, cell, layer, method or session.method, label=label)
            if not math.isclose(value, current[expert][key][layer], abs_tol=5e-5):
                changes.append((expert, layer, value))
    for expert, layer, value in changes:  # all cells checked first: a bad cell changes nothing
        set_cell(session, expert, layer, key, value, method)
    return session


