"""What a public deployment may read: local paths inside allowed roots, hub models that fit the machine.

On a laptop every path is fair game. On a public Space, ``MERGE_LAB_ALLOWED_ROOTS`` (an
``os.pathsep`` list of folders) limits local model paths to those roots — plus the cache root,
which holds the zoo — after resolving ``..`` and symlinks, so neither can lead outside.
Hub models are sized before download and refused with the figures when they cannot fit.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import MergeLabError
from ..paths import cache_root

ALLOWED_ROOTS_ENV = "MERGE_LAB_ALLOWED_ROOTS"


def allowed_roots() -> list[Path] | None:
    """The roots local paths must lie in, or None when no restriction is configured."""
    raw = os.environ.get(ALLOWED_ROOTS_ENV, "").strip()
    if not raw:
        return None
    roots = [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]
    return roots + [cache_root().resolve()]


def check_local_path(path: Path, shown: str) -> Path:
    """Resolve ``path`` and refuse it when it lies outside the allowed roots."""
    roots = allowed_roots()
    resolved = path.expanduser().resolve()
    if roots is None:
        return resolved
    if any(resolved == root or resolved.is_relative_to(root) for root in roots):
        return resolved
    reason = "it leads outside them (through '..' or a symlink)" if ".." in Path(shown).parts or path.is_symlink() \
        else "it lies outside them"
    raise MergeLabError(
        f"path '{shown}' is not allowed here: this deployment reads models only from "
        f"{', '.join(str(r) for r in roots)}, and {reason}. Upload a .safetensors file or use a hub id instead."
    )


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(name: str, size_bytes: int, download_dir: Path, n_models: int = 1) -> None:
    """Refuse a model whose weights cannot fit in free disk (download) or memory (merging ~3 tensors at once
    is small, but probing and importance load whole models)."""
    download_dir.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(download_dir).free
    if size_bytes > free_disk:
        raise MergeLabError(
            f"model '{name}' needs {size_bytes / 1e9:.2f} GB of disk but only {free_disk / 1e9:.2f} GB are free: "
            "pick a smaller model or free some space")
    memory = available_memory_bytes()
    if memory is not None and size_bytes * 2 > memory:
        raise MergeLabError(
            f"model '{name}' has {size_bytes / 1e9:.2f} GB of weights; loading it for importance and probes needs "
            f"about {2 * size_bytes / 1e9:.2f} GB but only {memory / 1e9:.2f} GB of memory are available: "
            "pick a smaller model")
