"""Limits and validation: every number, choice and seed a handler receives is checked here,
whatever sent it — the browser's sliders enforce ranges, the HTTP API does not."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import MergeLabError
from ..io.recipe import MAX_SEED  # one constant for the app and the CLI

Progress = Callable[[float, str], None]

DROP, WEIGHT = "drop_ratio", "weight"
PER_LAYER_KEYS = (DROP, WEIGHT)
DEFAULT_FEWSHOT = 32
MAX_PROBE_ROWS = 200
EXPORT_MAX_AGE = 3600.0  # seconds an export zip is kept
UPLOAD_MAX_AGE = 6 * 3600.0  # seconds an uploaded expert is kept unused (a tab's state lives 6 hours)
SWEEP_METHODS = ("apl", "dare_linear", "magnitude")  # the drop sweep's default methods (page configuration)
DEFAULT_METHOD = "apl"  # the method the page opens with (configuration; no logic depends on it)
MAX_SENTENCE_CHARS = 2000


def no_progress(fraction: float, message: str) -> None:  # a progress sink that ignores everything
    return None


#
# Every number that reaches a handler is checked here, whatever sent it: the browser's sliders
# enforce their ranges, but the HTTP API (gradio_client, curl) bypasses them. Messages name the
# field as the page labels it.

MIN_FEWSHOT, MAX_FEWSHOT = 4, 128
MODES = ("gradient", "exact")
INTERVENTIONS = ("restore", "ablate")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
MAX_HISTORY_ENTRIES = 200  # merges a session keeps (restores add to it): each restore stays fast
MAX_HISTORY_BYTES = 5 * 1024 * 1024  # a session history JSON file is tiny; refuse anything much larger


def max_upload_bytes() -> int:
    """Upload cap from ``MERGE_LAB_MAX_UPLOAD_MB`` (default 2048 MB)."""
    raw = os.environ.get("MERGE_LAB_MAX_UPLOAD_MB", "").strip()
    try:
        mb = float(raw) if raw else 2048.0
    except ValueError:
        mb = float("nan")
    if not (mb > 0 and math.isfinite(mb)):
        warnings.warn(f"MERGE_LAB_MAX_UPLOAD_MB={raw!r} is not a positive number of megabytes; using 2048",
                      stacklevel=2)
        mb = 2048.0
    return max(1, int(mb * 1024 * 1024))


def shorten_list(items: Sequence[Any], limit: int = 10, chars: int = 40) -> str:
    """``a, b, c … and 4990 more``: lists inside messages stay short (a 5000-label file once gave a 34 KB
    error), and each item is cut to ``chars`` characters."""
    shown = [str(i) if len(str(i)) <= chars else str(i)[:chars] + "…" for i in list(items)[:limit]]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" … and {more} more" if more > 0 else "")


def check_number(field_name: str, value: Any, low: float | None = None, high: float | None = None,
                 integer: bool = False) -> float | int:
    """``value`` as a finite number in [low, high] (a whole number if ``integer``), else a MergeLabError
    naming ``field_name``."""
    if isinstance(value, bool) or value is None:
        raise MergeLabError(f"{field_name} must be a number, got {value!r}", field=field_name)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise MergeLabError(f"{field_name} must be a number, got {value!r}", field=field_name) from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MergeLabError(f"{field_name} must be a number, got {value!r}", field=field_name) from None
    if not math.isfinite(number):
        raise MergeLabError(f"{field_name} must be a finite number, got {value!r}", field=field_name)
    if integer and number != int(number):
        raise MergeLabError(f"{field_name} must be a whole number, got {value!r}", field=field_name)
    if (low is not None and number < low) or (high is not None and number > high):
        raise MergeLabError(f"{field_name} must lie in [{_fmt(low)}, {_fmt(high)}], got {value!r}", field=field_name)
    return int(number) if integer else number


def _fmt(bound: float | None) -> str:
    if bound is None:
        return "…"
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def check_choice(field_name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise MergeLabError(f"{field_name} must be one of {', '.join(map(str, choices))}, got {value!r}",
                            field=field_name)
    return value


def check_fewshot(value: Any) -> int:
    return int(check_number("Few-shot examples per expert", value, MIN_FEWSHOT, MAX_FEWSHOT, integer=True))


def check_seed(value: Any) -> int:
    return int(check_number("Seed", 0 if value is None or value == "" else value, 0, MAX_SEED, integer=True))


def check_method(value: Any) -> str:
    from ..methods import all_specs

    return check_choice("Method", value, [s.name for s in all_specs()])


def method_spec(method: str):
    """The declaration of a registered merge method (its parameters, ranges and needs)."""
    from ..methods import get_method

    return get_method(method)


def check_shared(method: str, shared: Mapping[str, Any]) -> dict[str, Any]:
    """The method's declared global parameters, each checked against its declared kind and range."""
    from ..params import PER_LAYER

    spec = method_spec(check_method(method))
    by_name = {p.name: p for p in spec.params}
    out = {}
    for name, value in shared.items():
        p = by_name.get(name)
        if p is None or value is None:
            continue
        if p.scope == PER_LAYER and isinstance(value, Mapping):  # {layer: value, "default": value} (layer swap's take)
            out[name] = {str(layer): _checked(p, v) for layer, v in value.items()}
        else:
            out[name] = _checked(p, value)
    return out


def _checked(p, value: Any) -> Any:
    """One value of declared parameter ``p``, checked against its kind, range or choices."""
    label = p.name.replace("_", " ")
    if p.kind in ("int", "float"):
        return check_number(label, value, p.low, p.high, integer=p.kind == "int")
    if p.kind == "bool" and not isinstance(value, bool):
        raise MergeLabError(f"{label} must be true or false, got {value!r}", field=p.name)
    if p.kind == "choice":
        return check_choice(label, value, p.choices)
    return value


def cell_param(key: str, method: str | None = None):
    """The declaration that bounds a per-layer cell (drop ratio or weight): the method's own when it
    declares the key, else the first registered method that does — the sliders, the table and the
    server's check all read it, so no range is typed twice."""
    if key not in PER_LAYER_KEYS:
        raise MergeLabError(f"per-layer value must be drop_ratio or weight, got {key!r}", field="key")
    from ..methods import all_specs

    specs = ([method_spec(method)] if method else []) + all_specs()
    for spec in specs:
        if key in spec.param_names():
            return spec.param(key)
    raise MergeLabError(f"no merge method declares '{key}'", field="key")


def check_cell(key: str, value: Any, layer: str | None = None, method: str | None = None,
               label: str | None = None) -> float:
    """One per-layer drop ratio or weight, within the range its method parameter declares."""
    spec = cell_param(key, method)
    where = label or (f"layer {layer} " if layer is not None else "") + key.replace("_", " ")
    return float(check_number(where, value, spec.low, spec.high, integer=spec.kind == "int"))


def check_dtype(value: Any) -> str:
    return check_choice("dtype", value, DTYPE_CHOICES)


