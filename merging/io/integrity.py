"""Why a safetensors file is broken, in words: the header read and checked against the file.

safetensors itself reports a truncated or lying file as an opaque error; this reads only the
8-byte length and the JSON header (never the tensor data) and names the tensor and the byte
counts, so a user knows which file to fetch again. The library calls it when safetensors refuses
a file, the app before it opens one.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from ..errors import MergeLabError

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_ITEMSIZE_OF = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}  # by ModelSource's dtype names
MAX_HEADER_BYTES = 100 * 1024 * 1024


def check_safetensors(path: str | os.PathLike, shown: str | None = None) -> None:
    """Read a safetensors header and check it against the file: truncated files, headers that are not JSON,
    and headers that lie about a tensor's shape (declaring more or fewer bytes than its data holds) get
    a message naming the file and the tensor. Reads the header only."""
    path = Path(path)
    shown = shown or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise MergeLabError(f"'{shown}' is only {size} bytes: not a safetensors file (empty or truncated)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise MergeLabError(f"'{shown}' is not a safetensors file, or is truncated: its first bytes announce a "
                                    f"{n}-byte header but the file has {size} bytes")
            raw = fh.read(n)
    except OSError as exc:
        raise MergeLabError(f"cannot read '{shown}': {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # deeply nested JSON: corrupt, not a crash
        header = None
    if not isinstance(header, dict):
        raise MergeLabError(f"'{shown}' has a corrupt safetensors header (not a valid JSON object): download or export "
                            "it again")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MergeLabError(f"'{shown}': the header entry of tensor '{name}' is malformed (needs dtype, shape "
                                "and data_offsets)") from None
        itemsize = _ITEMSIZE.get(str(dtype))
        if itemsize is None:
            raise MergeLabError(f"'{shown}': tensor '{name}' has unknown dtype {dtype!r}")
        need = math.prod(shape) * itemsize
        if int(end) - int(start) != need:
            raise MergeLabError(
                f"'{shown}': the header says tensor '{name}' is {dtype} of shape {tuple(shape)} ({need} bytes) but "
                f"its data holds {int(end) - int(start)} bytes: the header lies about the shape, so the file is corrupt")
        if int(end) > data_bytes:
            raise MergeLabError(
                f"'{shown}' is truncated: tensor '{name}' needs data up to byte {int(end)} but the file holds "
                f"{data_bytes} bytes of data (an interrupted download or copy?): download or export it again")


def all_finite(tensor) -> bool:
    """No NaN or Inf in ``tensor``: one min/max pass (NaN propagates, ±Inf shows), not an isfinite mask. The
    one NaN/Inf test: the engine checks its inputs and outputs with it, the load check counts with it."""
    import torch

    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def count_nonfinite(source, name: str, chunk_bytes: int | None = None) -> int:
    """NaN/Inf values in one tensor of a model source: one min/max pass per row chunk (large tensors are
    read ``chunk_bytes`` at a time, default ``sources.ROW_CHUNK_BYTES``), an exact count only where a chunk
    is not finite."""
    import torch

    from .sources import row_slices

    bad = 0
    entry = source.tensors[name]
    for rows in row_slices(entry.shape, chunk_bytes, itemsize=_ITEMSIZE_OF.get(entry.dtype, 4)):
        piece = source.read(name, rows)
        if not all_finite(piece.float()):
            bad += int((~torch.isfinite(piece)).sum())
    return bad


def nonfinite_tensors(expert_set) -> dict[str, list[tuple[str, int]]]:
    """Every float tensor of the base and the experts checked for NaN/Inf: model → [(tensor, bad values)]
    (the app's load check and ``python -m merging inspect`` both read this)."""
    found: dict[str, list[tuple[str, int]]] = {}
    for model, source in [("base", expert_set.base), *((n, e.source) for n, e in expert_set.experts.items())]:
        for name, entry in source.tensors.items():
            if not entry.dtype.startswith(("float", "bfloat")):
                continue
            bad = count_nonfinite(source, name)
            if bad:
                found.setdefault(model, []).append((name, bad))
    return found
