"""How much one request may cost: experts per load, and memory before a heavy step.

A public Space has 16 GB for everyone. One request loading many experts, or a model whose importance
needs several copies of its weights, could take the whole machine down for every visitor; these checks
refuse such a request up front, with the numbers, instead of letting the kernel kill the server.
"""

from __future__ import annotations

import math
import os
import warnings

from ..errors import MergeLabError

DEFAULT_MAX_EXPERTS = 8
DEFAULT_BUDGET_FRACTION = 0.6  # of the machine's RAM, when MERGE_LAB_MEMORY_BUDGET is not set

# Working memory of each heavy step in copies of the base body in float32 (n = number of experts):
# merge holds the merged body beside the engine's cached deltas; importance builds a model, its gradients and
# each expert's delta; the probe builds the base, each expert and the merge one after the other (two at once).
# Measured with 8 experts of the 90 MB MiniLM base: a TIES merge added 1.3 GB to the process (≈ 2 + 1.5 n copies).
STEP_COPIES = {
    "merge": lambda n: 2.0 + 1.5 * n,
    "importance": lambda n: 4.0 + n,
    "probe": lambda n: 3.0,
}


def _env_number(name: str, default: int, low: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low:
        warnings.warn(f"{name}={raw!r} is not a whole number ≥ {low}; using {default}", stacklevel=3)
        return default
    return value


def max_experts() -> int:
    """``MERGE_LAB_MAX_EXPERTS`` (default 8): experts one load may open."""
    return _env_number("MERGE_LAB_MAX_EXPERTS", DEFAULT_MAX_EXPERTS)


def check_expert_count(count: int) -> None:
    cap = max_experts()
    if count > cap:
        raise MergeLabError(f"{count} experts is more than this server merges at once (MERGE_LAB_MAX_EXPERTS "
                            f"= {cap}): pick at most {cap}")


def machine_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def memory_budget_bytes() -> int:
    """``MERGE_LAB_MEMORY_BUDGET`` (bytes, or with K/M/G), default 60% of the machine's RAM (16 GiB if unknown)."""
    from .cache import _parse_bytes

    raw = os.environ.get("MERGE_LAB_MEMORY_BUDGET", "")
    if raw.strip():
        value = _parse_bytes(raw)
        if value and value > 0:
            return value
        warnings.warn(f"MERGE_LAB_MEMORY_BUDGET={raw!r} is not a positive size (examples: 8G, 512M); "
                      "using the default", stacklevel=2)
    total = machine_memory_bytes() or 16 * 1024**3
    return int(total * DEFAULT_BUDGET_FRACTION)


def body_bytes(expert_set) -> int:
    """Bytes of the base's tensors in float32 (what every heavy step works in)."""
    return sum(4 * math.prod(e.shape) for e in expert_set.base.tensors.values())


def estimate_step_bytes(expert_set, step: str) -> int:
    """Working memory a heavy step needs, from tensor sizes × experts (see STEP_COPIES)."""
    return int(body_bytes(expert_set) * STEP_COPIES[step](len(expert_set.experts)))


def check_memory(models, step: str) -> None:
    """Refuse ``step`` (merge, importance, probe) when its estimate is over the memory budget, with both numbers."""
    need = estimate_step_bytes(models.expert_set, step)
    budget = memory_budget_bytes()
    if need > budget:
        raise MergeLabError(
            f"{step} of these {len(models.expert_set.experts)} experts needs about {need / 1e9:.2f} GB of memory, "
            f"over this server's budget of {budget / 1e9:.2f} GB (MERGE_LAB_MEMORY_BUDGET): pick fewer or smaller "
            "experts, or run it on your own machine with the CLI")
