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
