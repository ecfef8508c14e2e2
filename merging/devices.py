"""Where tensors are computed: the one resolver of a ``--device`` value (auto, cpu, cuda, cuda:N).

Importance, probes and the merge engine all take their device through :func:`resolve_device`, so the
CLI's ``--device``, the page (auto: CUDA when present) and library callers mean the same thing by it.
A light module (torch and the error type only): the engine imports it without loading the LM code.
"""

from __future__ import annotations

import torch

from .errors import MergeLabError

AUTO_DEVICE = "auto"
DEVICE_HELP = "where models and batches run: auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


def resolve_device(value: str | None = AUTO_DEVICE) -> str:
    """The torch device importance, probes and their models run on: ``auto`` (or None) is CUDA when a CUDA
    device is present, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` are taken as given once checked (a
    CUDA device asked for where none is present is refused in words, not left to fail mid-run)."""
    text = AUTO_DEVICE if value is None else str(value).strip().lower()
    if text == AUTO_DEVICE:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise MergeLabError(f"device {value!r}: no CUDA device is available here (torch.cuda.is_available() is "
                                "False): use --device cpu, or auto", field="device")
        if ":" in text and int(text[5:]) >= torch.cuda.device_count():
            raise MergeLabError(f"device {value!r}: only {torch.cuda.device_count()} CUDA device(s) here",
                                field="device")
        return text
    raise MergeLabError(f"device must be auto, cpu, cuda or cuda:N, got {str(value)[:40]!r}", field="device")
