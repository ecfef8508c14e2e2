"""Content hashes: the one hasher of JSON-able values, tensors and arrays, and of files.

Results cached by content (importance maps, merges, probe rows, the probe's reference rows on disk)
are keyed by these, so two callers that hash the same inputs always agree on the key. Light on
purpose (no merging imports): the zoo, the workbench and the library all use it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def content_hash(*parts: Any) -> str:
    """A stable hash of JSON-able parts; tensors and arrays by their bytes."""
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()[:32]


def _feed(digest, value: Any) -> None:
    if torch.is_tensor(value):
        digest.update(str((tuple(value.shape), str(value.dtype))).encode())
        flat = value.detach().contiguous().cpu().reshape(-1)
        if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same bytes as 16-bit integers
            flat = flat.view(torch.int16)
        digest.update(flat.numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(str((value.shape, str(value.dtype))).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for k in sorted(value, key=str):
            digest.update(json.dumps(str(k)).encode())
            _feed(digest, value[k])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())


def file_digest(path: str | Path, chunk: int = 1 << 20, algorithm: str = "blake2b") -> str:
    """A hash of a file's bytes, read in 1 MiB chunks (a model file never sits in memory at once).
    ``algorithm``: blake2b (16 bytes, for cache keys) or sha256 (the zoo's recorded checksums)."""
    digest = hashlib.blake2b(digest_size=16) if algorithm == "blake2b" else hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(chunk), b""):
            digest.update(piece)
    return digest.hexdigest()


def cached_text(path, compute, parse, render):
    """``parse(text of path)`` when that file exists and parses; else ``compute()``, written to ``path``
    with ``render`` (a folder that cannot be written keeps the result in memory only). The probes' disk
    cache of reference rows, keyed by a content hash in the file name: one copy of its read-or-recompute rule."""
    from pathlib import Path

    if path is not None and Path(path).is_file():
        try:
            return parse(Path(path).read_text(encoding="utf-8"))
        except (ValueError, TypeError, KeyError):
            pass  # unreadable cache: recompute and overwrite
    value = compute()
    if path is not None:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(render(value), encoding="utf-8")
        except OSError:
            pass  # a read-only folder still works, without the disk cache
    return value
