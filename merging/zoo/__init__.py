"""The demo zoo: built experts of the packaged base, their tasks, training and the probe.

Importing this package registers the ``zoo:`` reference scheme with the I/O layer
(``zoo:NAME/TASK`` → that expert's folder, ``zoo:NAME/base`` → the zoo's base), so every caller
that accepts ``zoo:`` refs — the CLI, the workbench — only needs to import it; the I/O layer
itself never imports the zoo.
"""

from __future__ import annotations

from pathlib import Path

from ..io.sources import register_scheme


def resolve_zoo_ref(ref: str) -> Path:
    """``zoo:NAME/TASK`` → that expert's folder; ``zoo:NAME/base`` → the zoo's base folder."""
    from ..errors import MergeLabError
    from .zoo import open_zoo

    zoo_name, _, member = ref[len("zoo:"):].partition("/")
    zoo = open_zoo(zoo_name or "default")
    if member in ("", "base"):
        return Path(zoo.base_path)
    if member not in zoo.experts:
        raise MergeLabError(
            f"zoo '{zoo.name}' has no expert '{member}'; it has: {', '.join(sorted(zoo.experts)) or 'none'}"
        )
    return Path(zoo.experts[member])


register_scheme("zoo", resolve_zoo_ref)
