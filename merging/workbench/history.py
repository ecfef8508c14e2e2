"""Nothing lost: the session's merge history as JSON, downloaded and restored."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from ..errors import MergeLabError
from ..io.names import safe_join
from .export import clean_old_exports, exports_root
from .limits import MAX_HISTORY_BYTES, MAX_HISTORY_ENTRIES
from .plan import set_cell
from .session import Session

HISTORY_FORMAT = "merge-lab-history/1"


def history_json(session: Session) -> str:
    """The session's merges (label, method, settings, probe metrics, seconds, full recipe) as JSON."""
    merges = [{k: item.get(k) for k in ("label", "method", "settings", "metrics", "seconds", "recipe")}
              for item in session.history]
    return json.dumps({"format": HISTORY_FORMAT, "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "base": session.base_ref, "experts": dict(session.refs), "merges": merges}, indent=1)


def save_history(session: Session) -> Path:
    """Write :func:`history_json` to a file under the exports folder (deleted with old exports)."""
    if not session.history:
        raise MergeLabError("no merges in this session yet: press Merge first (the history holds every merge)")
    clean_old_exports()
    folder = Path(tempfile.mkdtemp(prefix="history-", dir=exports_root()))
    path = safe_join(folder, f"merge-lab-history-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.write_text(history_json(session), encoding="utf-8")
    return path


def restore_history(session: Session, path: str | os.PathLike) -> tuple[Session, str]:
    """Load a history file saved by :func:`save_history`: its merges join the comparison table (with their
    recipes); when the same experts are loaded, the last merge's per-layer overrides come back too."""
    from ..io.recipe import Recipe

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise MergeLabError("the history file is gone (uploads are kept for a limited time): upload it again") \
            from None
    if size > MAX_HISTORY_BYTES:
        raise MergeLabError(f"'{path.name}' is {size / 1024**2:.1f} MB: a session history file is far smaller "
                            "(is it the right file?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise MergeLabError(f"'{path.name[:80]}' is not a Merge Lab history file (not valid JSON, or nested far "
                            "too deeply)") from None
    if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT or not isinstance(data.get("merges"), list):
        raise MergeLabError(f"'{path.name}' is not a Merge Lab history file (expected format {HISTORY_FORMAT!r}, "
                            "saved with Download history)")
    restored = []
    taken = {item["label"] for item in session.history}
    for index, item in enumerate(data["merges"][-MAX_HISTORY_ENTRIES:]):  # only the newest are kept anyway
        if not isinstance(item, dict) or not isinstance(item.get("label"), str) \
                or not isinstance(item.get("method"), str):
            raise MergeLabError(f"history entry {index + 1} of '{path.name}' has no label or method")
        recipe = item.get("recipe")
        if recipe is not None:
            try:
                Recipe.from_dict(recipe)
            except MergeLabError as exc:
                raise MergeLabError(f"history entry {index + 1} ({item['label']}) has an invalid recipe: {exc}") \
                    from None
        metrics = _clean_metrics(item.get("metrics"))
        label = item["label"] if item["label"] not in taken else f"{item['label']} (restored)"
        taken.add(label)
        restored.append({"label": label, "method": item["method"], "settings": str(item.get("settings", "")),
                         "metrics": metrics, "seconds": item.get("seconds"), "recipe": recipe, "restored": True})
    session.history = (restored + list(session.history))[-MAX_HISTORY_ENTRIES:]  # the newest, capped
    session.merges = max(session.merges, len(session.history))
    note = f"Restored {len(restored)} merge(s) from `{path.name}`: the comparison table and their recipes are back."
    last = next((r["recipe"] for r in reversed(restored) if r.get("recipe")), None)
    same = session.refs and data.get("experts") == session.refs and data.get("base") == session.base_ref
    if last and same:
        overrides = (last.get("suggested") or {}).get("overrides") or []
        session.overrides = {}
        for o in overrides:
            try:
                set_cell(session, o["expert"], str(o["layer"]), o["key"], o["value"])
            except (MergeLabError, KeyError, TypeError):
                continue
        note += (f" The same experts are loaded, so the last merge's {len(overrides)} per-layer override(s) are "
                 "restored too: press Merge to rebuild it.")
    elif last:
        note += " Load the same experts to rebuild any of them (each recipe replays with `python -m merging merge`)."
    return session, note


def _clean_metrics(raw) -> dict[str, dict[str, float]] | None:
    """Probe metrics from a history file, keeping only {task: {name: finite number}}: a hand-edited file
    must not break the comparison table."""
    if not isinstance(raw, dict):
        return None
    clean = {}
    for task, values in raw.items():
        if isinstance(task, str) and isinstance(values, dict):
            numbers = {k: float(v) for k, v in values.items() if isinstance(k, str) and isinstance(v, (int, float))
                       and not isinstance(v, bool) and math.isfinite(v)}
            if numbers:
                clean[task] = numbers
    return clean or None


# ---------------------------------------------------------------- what changed from one merge to the next

SHORT_KEYS = {"drop_ratio": "drop", "weight": "weight"}


def _layer(layer: str) -> str:
    return f"L{layer}" if str(layer).isdigit() else str(layer)


def recipe_values(recipe: dict | None) -> dict[str, object]:
    """A recipe's settings flattened to "what" → value: the method, each shared parameter and every
    expert's value at every layer ("topic L5 drop"), so two merges compare cell by cell."""
    if not isinstance(recipe, dict):
        return {}
    out: dict[str, object] = {"method": recipe.get("method")}
    for key, value in (recipe.get("parameters") or {}).items():
        if isinstance(value, dict):
            for layer, v in value.items():
                out[f"{key} {_layer(layer)}"] = v
        else:
            out[key] = value
    for entry in recipe.get("experts") or []:
        name = entry.get("name") if isinstance(entry, dict) else None
        for key, value in ((entry.get("parameters") or {}) if name else {}).items():
            short = SHORT_KEYS.get(key, key)
            if isinstance(value, dict):
                for layer, v in value.items():
                    out[f"{name} {_layer(layer)} {short}" if layer != "default" else f"{name} {short}"] = v
            else:
                out[f"{name} {short}"] = value
    return out


def _unset(recipe: dict | None, what: str):
    """The value a recipe gives ``what`` without naming it: an expert's cell falls back to the expert's own
    value, then the shared parameter, then the method's declared default (so a first override reads
    "weight 1.00 → 0.40", not "— → 0.40" for every layer the recipe now lists)."""
    values = recipe_values(recipe)
    words = what.split(" ")
    long = {v: k for k, v in SHORT_KEYS.items()}
    key = long.get(words[-1], words[-1])
    if len(words) == 3 and f"{words[0]} {words[2]}" in values:
        return values[f"{words[0]} {words[2]}"]
    if len(words) >= 2 and key in values and key != "method":
        return values[key]
    try:
        from .limits import method_spec

        spec = {p.name: p for p in method_spec(str((recipe or {}).get("method"))).params}
    except Exception:  # noqa: BLE001 - an unknown or restored method: no default to show
        return None
    return spec[key].default if key in spec else None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "—" if value is None else str(value)


def merge_changes(previous: dict | None, recipe: dict | None, limit: int = 4) -> str:
    """What changed from the previous merge's recipe: the method and shared parameters first, then the
    per-layer cells, largest move first — "method apl → ties; topic L5 drop 0.30 → 0.91; …"."""
    if previous is None:
        return "first merge"
    before, after = recipe_values(previous), recipe_values(recipe)
    shared = {k for r in (previous, recipe) for k in ((r or {}).get("parameters") or {})}
    changes = []
    for what in dict.fromkeys([*before, *after]):
        a = before[what] if what in before else _unset(previous, what)
        b = after[what] if what in after else _unset(recipe, what)
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
        if a == b or (numbers and abs(a - b) < 5e-4):
            continue
        group = 0 if what == "method" else 1 if what in shared or what.split(" L")[0] in shared else 2
        changes.append(((group, -abs(b - a) if numbers else 0.0), f"{what} {_fmt(a)} → {_fmt(b)}"))
    if not changes:
        return "same settings"
    changes.sort(key=lambda c: c[0])
    text = "; ".join(c for _, c in changes[:limit])
    return text + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")


def accuracy(metrics: dict | None) -> dict[str, float]:
    return scores(metrics, "accuracy")


def scores(metrics: dict | None, metric: str) -> dict[str, float]:
    """``{task: value}`` of one probe metric (accuracy, perplexity) from ``{task: {metric: value}}``."""
    return {t: float(m[metric]) for t, m in (metrics or {}).items()
            if isinstance(m, dict) and isinstance(m.get(metric), (int, float))}


def metric_of(*metrics: dict | None) -> str:
    """The metric a probe reports: perplexity for causal-LM experts (lower is better), accuracy otherwise."""
    lm = any(isinstance(m, dict) and "perplexity" in m for item in metrics for m in (item or {}).values())
    return "perplexity" if lm else "accuracy"


def accuracy_changes(previous: dict | None, metrics: dict | None) -> str:
    """Per-task change in the probe metric from the previous probed merge: "topic +0.031, mood −0.012"
    (accuracy; perplexity for LM experts)."""
    metric = metric_of(previous, metrics)
    before, after = scores(previous, metric), scores(metrics, metric)
    common = [t for t in after if t in before]
    if not common:
        return ""
    return ", ".join(f"{t} {after[t] - before[t]:+.3f}".replace("-", "−") for t in common)


def below_base(metrics: dict | None, base: dict | None) -> list[tuple[str, float, float]]:
    """(task, merge value, base value) for every task the merge leaves worse than the base: the number a
    mean over tasks hides. Worse is a lower accuracy, or for LM experts a perplexity above the base's."""
    metric = metric_of(metrics, base)
    mine, ref = scores(metrics, metric), scores(base, metric)
    worse = (lambda a, b: a > b) if metric == "perplexity" else (lambda a, b: a < b)
    return [(t, mine[t], ref[t]) for t in mine if t in ref and worse(mine[t], ref[t])]


def below_base_text(rows: list[tuple[str, float, float]], metric: str = "accuracy") -> str:
    if metric == "perplexity":
        return "; ".join(f"⚠ {t} perplexity {v:.3f} above the base {b:.3f}" for t, v, b in rows)
    return "; ".join(f"⚠ {t} {acc:.3f} < base {b:.3f}" for t, acc, b in rows)


def base_metrics(session: Session) -> dict | None:
    """The base model's probe metrics, once a probe ran."""
    reference = session.reference
    for row in getattr(reference, "rows", None) or []:
        if row.name == "base":
            return dict(row.metrics)
    return None


def history_table(session: Session) -> tuple[list[str], list[list]]:
    """The session's merges side by side: label, method, mean and per-task accuracy (perplexity for LM
    experts), what changed from the previous merge, the per-task change from the previous probed merge,
    tasks below the base, merge seconds, then the settings (last: the longest column)."""
    tasks = list(dict.fromkeys(t for item in session.history for t in (item.get("metrics") or {})))
    metric = metric_of(*(item.get("metrics") for item in session.history))
    short = "ppl" if metric == "perplexity" else "acc"
    headers = ["merge", "method", f"mean {metric}", *(f"{t} {short}" for t in tasks), "changed from previous",
               f"Δ {metric} vs previous", "below base", "seconds", "settings"]
    base = base_metrics(session)
    rows, previous_recipe, previous_metrics = [], None, None
    for item in session.history:
        metrics = item.get("metrics") or {}
        values = scores(metrics, metric)
        per_task = [None if t not in values else round(values[t], 4) for t in tasks]
        mean = round(sum(values.values()) / len(values), 4) if values else None
        rows.append([item["label"], item["method"], mean, *per_task,
                     merge_changes(previous_recipe, item.get("recipe")) if item.get("recipe") else "",
                     accuracy_changes(previous_metrics, metrics), below_base_text(below_base(metrics, base), metric),
                     item.get("seconds"), item["settings"]])
        previous_recipe = item.get("recipe") or previous_recipe
        previous_metrics = metrics or previous_metrics
    return headers, rows
