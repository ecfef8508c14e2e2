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


def path_exists(path: Path) -> bool:
    """``exists() or is_symlink()``, False for a name the OS cannot even look up (too long, invalid)."""
    try:
        return path.exists() or path.is_symlink()
    except (OSError, ValueError):
        return False


def looks_local(text: str) -> bool:
    """A reference written as a path (absolute, ``./``, ``../`` or ``~``), never a hub id."""
    return str(text).startswith(("/", ".", "~")) or os.sep != "/" and os.sep in str(text)[:3]


def check_local_path(path: Path, shown: str) -> Path:
    """Resolve ``path`` and refuse it when it lies outside the allowed roots."""
    roots = allowed_roots()
    try:
        resolved = path.expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a name too long, a symlink loop
        raise MergeLabError(f"path '{str(shown)[:80]}…' cannot be used: the name is too long or loops through "
                            "symlinks") from None
    if roots is None:
        return resolved
    if any(resolved == root or resolved.is_relative_to(root) for root in roots):
        return resolved
    reason = "it leads outside them (through '..' or a symlink)" if ".." in Path(shown).parts or path.is_symlink() \
        else "it lies outside them"
    raise MergeLabError(  # neither the roots nor whether the path exists: both are the server's business
        f"path '{str(shown)[:200]}' is not allowed here: this deployment reads models only from its allowed "
        f"folders (MERGE_LAB_ALLOWED_ROOTS), and {reason}. Upload a .safetensors file or use a hub id instead."
    )


def check_file_inside(file: Path, model: str) -> Path:
    """A file a model folder names (a weight shard, a tokenizer file, config.json), resolved and checked on
    its own: the folder being allowed says nothing about a symlinked file in it (an export once carried an
    outside file's contents), or a shard named ``../../outside/x.safetensors`` in the index."""
    resolved = Path(file).resolve()
    roots = allowed_roots()
    if roots is None or any(resolved == root or resolved.is_relative_to(root) for root in roots + _hub_cache()):
        return resolved
    raise MergeLabError(
        f"model '{model}': file '{Path(file).name[:80]}' leads outside the allowed folders (through a symlink or "
        "a '..' in a shard name), and this deployment reads only files inside them. Copy the real file into the "
        "model folder, or upload the model as .safetensors")


def _hub_cache() -> list[Path]:
    """The hub download cache: hub snapshots are symlinks into its blobs, and the server itself fills it."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return []
    return [Path(HF_HUB_CACHE).expanduser().resolve()]


def public_host_warning(host: str | None) -> str | None:
    """The warning to log at start-up when the app is served publicly (0.0.0.0 or a Hugging Face Space) with no
    MERGE_LAB_ALLOWED_ROOTS: every visitor could then make the server read any local path it can."""
    public = (host or "") in ("0.0.0.0", "::") or bool(os.environ.get("SPACE_ID"))
    if public and allowed_roots() is None:
        return ("Merge Lab is served publicly but MERGE_LAB_ALLOWED_ROOTS is not set: visitors can load models "
                "from any local path this server can read. Set MERGE_LAB_ALLOWED_ROOTS to the folders models may "
                "come from.")
    return None


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
