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
