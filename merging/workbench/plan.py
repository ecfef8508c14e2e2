"""The per-layer plan: APL's suggestion, the user's overrides, presets, tables, and the recipe they make."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import MergeLabError
from .limits import DROP, WEIGHT, check_cell, check_number
from .session import Session


def suggestion(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None
               ) -> dict[str, dict[str, dict[str, float]]]:
    """The per-layer values before overrides: APL's calibration for ``apl``, uniform globals otherwise."""
    method = method or session.method
    shared = dict(shared if shared is not None else session.shared)
    if method == "apl" and session.calibration is not None:
        table = session.calibration
        return {e: {DROP: dict(table.drop[e]), WEIGHT: dict(table.weight[e])} for e in session.refs}
    drop = float(shared.get(DROP, 0.5))
    weight = float(shared.get(WEIGHT, 1.0))
    return {e: {DROP: {k: drop for k in session.layers}, WEIGHT: {k: weight for k in session.layers}}
            for e in session.refs}


def plan(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None
         ) -> dict[str, dict[str, dict[str, float]]]:
    """Effective per-layer drop ratio and weight of every expert (suggestion + overrides)."""
    out = suggestion(session, method, shared)
    for expert, keys in session.overrides.items():
        for key, layers in keys.items():
            for layer, value in layers.items():
                if expert in out and layer in out[expert][key]:
                    out[expert][key][layer] = float(value)
    return out


def set_cell(session: Session, expert: str, layer: str, key: str, value: float) -> Session:
    """Override one expert × layer value (what a slider or a table edit does)."""
    if expert not in session.refs:
        raise MergeLabError(f"no expert named '{expert}' is loaded")
    if layer not in session.layers:
        raise MergeLabError(f"layer '{layer}' does not exist (layers: {', '.join(session.layers)})")
    value = check_cell(key, value, layer)
    session.overrides.setdefault(expert, {}).setdefault(key, {})[layer] = value
    return session


def is_overridden(session: Session, expert: str, key: str, layer: str) -> bool:
    return layer in session.overrides.get(expert, {}).get(key, {})


def override_list(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None) -> list[dict]:
    sugg = suggestion(session, method, shared)
    out = []
    for expert, keys in session.overrides.items():
        for key, layers in keys.items():
            for layer, value in layers.items():
                suggested = sugg.get(expert, {}).get(key, {}).get(layer)
                out.append({"expert": expert, "key": key, "layer": layer, "value": value, "suggested": suggested})
    return out


def reset_overrides(session: Session) -> Session:
    """Back to the suggestion (APL's calibration when importance exists)."""
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
            if key == DROP:
                value = float(check_number(label, cell, 0.0, 0.999))
            else:
                value = float(check_number(label, cell, -5.0, 5.0))
            if not math.isclose(value, current[expert][key][layer], abs_tol=5e-5):
                changes.append((expert, layer, value))
    for expert, layer, value in changes:  # all cells checked first: a bad cell changes nothing
        set_cell(session, expert, layer, key, value)
    return session


