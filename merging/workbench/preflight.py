"""Broken files found before use: corrupt safetensors, NaN/Inf weights, uploads."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..errors import MergeLabError
from ..io.integrity import MAX_HEADER_BYTES, check_safetensors  # noqa: F401  (re-exported)
from ..io.names import safe_join
from .cache import Models, content_hash
from .limits import max_upload_bytes


def preflight_ref(ref: str, name: str) -> None:
    """Check the safetensors files behind a local ref before opening it (after the allowed-roots check, so
    nothing outside them is read). Hub ids are left to the library."""
    from ..io.access import allowed_roots, check_local_path, looks_local, path_exists
    from ..io.sources import resolve_scheme_ref

    text = str(ref)
    path = resolve_scheme_ref(text)
    if path is None:
        path = Path(text).expanduser()
        if looks_local(text) and allowed_roots() is not None:
            path = check_local_path(path, text)  # refused before exists(): no answer to "is it there?"
        if not path_exists(path):
            return  # a hub id, or missing: the library says which
        path = check_local_path(path, text)
    if path.is_file():
        if path.suffix == ".safetensors":
            check_safetensors(path, f"{name}: {path.name}")
        return
    if path.is_dir():
        files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() \
            else sorted(path.glob("*.safetensors"))
        for file in files:
            check_safetensors(file, f"{name}: {file.name}")


def scan_nonfinite(models: Models) -> dict[str, list[tuple[str, int]]]:
    """Every float tensor of the base and the experts checked for NaN/Inf once per selection
    (:func:`merging.io.integrity.nonfinite_tensors`), kept with the selection's models."""
    from ..io.integrity import nonfinite_tensors

    with models.lock:
        if models.nonfinite is not None:
            return models.nonfinite
        models.nonfinite = nonfinite_tensors(models.expert_set)
        models.close_files()  # every page was touched once: unmap them rather than keep them resident
        return models.nonfinite


# ---------------------------------------------------------------- uploads


def accept_upload(path: str | os.PathLike, shown: str | None = None) -> str:
    """Check an uploaded expert file (.safetensors only, under the size cap, header consistent) and place it
    under the cache root (always readable, even when MERGE_LAB_ALLOWED_ROOTS limits local paths).
    Returns the path to use as the expert's ref."""
    source = Path(path)
    shown = shown or source.name
    if source.suffix.lower() != ".safetensors":
        raise MergeLabError(f"'{shown}' is not a .safetensors file: upload experts as .safetensors (pickled "
                            ".bin/.pt/.pth files can run code and are refused)")
    try:
        size = source.stat().st_size
    except OSError:
        raise MergeLabError(f"the upload '{shown}' is gone (uploads are kept for a limited time): upload it again") \
            from None
    cap = max_upload_bytes()
    if size > cap:
        raise MergeLabError(f"'{shown}' is {size / 1024**2:.1f} MB, over this server's upload limit of "
                            f"{cap / 1024**2:.0f} MB (MERGE_LAB_MAX_UPLOAD_MB)")
    check_safetensors(source, shown)
    from ..paths import cache_root

    digest = content_hash(str(source.resolve()), size, source.stat().st_mtime_ns)[:12]
    folder = safe_join(cache_root(), "uploads", digest)
    folder.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.stem)[:80] or "expert"
    target = safe_join(folder, f"{stem}.safetensors")
    if target.exists():
        os.utime(target)  # in use again: the retention sweep keeps uploads by when they were last used
    if not target.exists():
        tmp = safe_join(folder, f".{stem}.{uuid.uuid4().hex[:6]}.part")
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return str(target)


