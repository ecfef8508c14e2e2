"""The one exception type the library raises for anything a user can fix.

Every message names what is wrong (which model, which tensor, which field) and
how to fix it, because the app shows it verbatim and the CLI prints it as is.
"""

from __future__ import annotations


class MergeLabError(Exception):
    """A problem with the user's input: models, files, recipes, data or settings.

    ``field`` names the recipe field or argument at fault when there is one, so
    UIs can highlight it; ``line`` is the YAML line where known; ``kind`` is a stable,
    machine-readable category (``"disk_full"``, ``"not_found"``, …) so that callers branch on
    it rather than on message text, which is free to change.
    """

    def __init__(self, message: str, *, field: str | None = None, line: int | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.field = field
        self.line = line
        self.kind = kind

    def __str__(self) -> str:
        text = super().__str__()
        if self.line is not None:
            return f"{text} (line {self.line})"
        return text


DISK_FULL = "disk_full"
_DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or quota. safetensors raises its own error type, not
    OSError, with the OS error only in its text, so the text is checked too (here, and only here)."""
    seen = 0
    while exc is not None and seen < 10:
        if getattr(exc, "kind", None) == DISK_FULL or getattr(exc, "errno", None) in _DISK_FULL_ERRNOS:
            return True
        text = str(exc)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text \
                or "code: 28," in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
