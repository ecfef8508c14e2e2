"""Names that become file names, and the one way writers join paths.

Expert and task names end up as folder names (an export writes one folder per task, the zoo one per
expert). A name such as ``x/../../zoo/default/experts/language`` once let a public request write a model
over the shared demo zoo. So names are identifiers, checked by :func:`check_name` at every entry (the
page, the API, recipes, history files, the CLI), and every writer joins paths with :func:`safe_join`,
which refuses a result outside its root even if a bad name slipped past the first check.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import MergeLabError

MAX_NAME_CHARS = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid identifier, or None when it is."""
    if not isinstance(name, str) or not name:
        return "must be non-empty text"
    if name in (".", "..") or not _NAME.fullmatch(name):
        return (f"may only hold letters, digits, '.', '_' and '-' (at most {MAX_NAME_CHARS}, starting with a "
                "letter or digit)")
    return None


def check_name(name: object, what: str = "expert name", *, field: str | None = None) -> str:
    """``name`` if it is an identifier (``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``, not ``.``/``..``), else a
    MergeLabError naming it (shortened, so a hostile name cannot flood the message) and saying how to fix it."""
    problem = name_problem(name)
    if problem is None:
        return name  # type: ignore[return-value]
    shown = repr(name) if not isinstance(name, str) else f"'{name[:80]}{'…' if len(name) > 80 else ''}'"
    raise MergeLabError(f"{what} {shown} {problem}: rename it", field=field)


def derive_name(text: str, fallback: str = "expert") -> str:
    """A valid identifier made from a file or model name the user did not type as a name (an upload's file
    name, a path's last part): other characters become '_', the result is cut to 64 characters."""
    clean = re.sub(r"[^A-Za-z0-9_.\-]", "_", text or "").lstrip("._-")[:MAX_NAME_CHARS].rstrip(".")
    return clean if name_problem(clean) is None else fallback


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts…`` resolved, refused when it leaves ``root`` (``..``, an absolute part, a symlink out).

    Every writer joins with this, so a name that escaped validation still cannot write elsewhere. The
    message never shows the server's paths."""
    base = Path(root).resolve()
    path = base.joinpath(*[str(p) for p in parts]).resolve()
    if path != base and not path.is_relative_to(base):
        shown = "/".join(str(p) for p in parts)[:80]
        raise MergeLabError(f"'{shown}' would be written outside its folder: names may only hold letters, "
                            "digits, '.', '_' and '-' (rename it)")
    return path
