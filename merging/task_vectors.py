"""Task vectors Δ_t = Θ_t − Θ_base, in float32, with the statistics that explain interference.

Per layer × module kind: the L2 norm of each expert's delta, the sign-conflict rate (the
fraction of entries where experts' non-zero deltas disagree in sign — what TIES fixes),
and pairwise cosine similarity between experts, globally and per layer (orthogonal task
vectors merge easily; aligned or opposed ones interfere).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from .io.experts import ExpertSet
from .io.layout import MODULE_KINDS as _KIND_ORDER
from .io.sources import row_slices


@dataclass
class TaskVectorStats:
    """Statistics of an expert set's task vectors (JSON-ready via :meth:`to_dict`)."""

    experts: list[str]
    layers: list[str]
    kinds: list[str]
    norm: dict[str, dict[str, dict[str, float]]]  # expert → layer → kind → L2 norm
    conflict: dict[str, dict[str, float]]  # layer → kind → sign-conflict rate
    cosine: dict[str, dict[str, float]]  # "a|b" → layer ("model" for all) → cosine
    parameters: dict[str, int] = field(default_factory=dict)  # expert → total body parameters

    def layer_norms(self, expert: str) -> dict[str, float]:
        return {layer: math.sqrt(sum(v * v for v in kinds.values())) for layer, kinds in self.norm[expert].items()}

    def cosine_matrix(self, layer: str = "model") -> list[list[float]]:
        out = []
        for a in self.experts:
            row = []
            for b in self.experts:
                row.append(1.0 if a == b else self.cosine[_pair(a, b)][layer])
            out.append(row)
        return out

    def model_norm(self, expert: str) -> float:
        return math.sqrt(sum(v * v for v in self.layer_norms(expert).values()))

    def to_dict(self) -> dict:
        return {"experts": self.experts, "layers": self.layers, "kinds": self.kinds, "norm": self.norm,
                "conflict": self.conflict, "cosine": self.cosine, "parameters": self.parameters}


def _pair(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


class TaskVectors:
    """Deltas of every expert, computed on demand and cached (float32)."""

    def __init__(self, expert_set: ExpertSet, cache: bool = True):
        self.expert_set = expert_set
        self.cache = cache
        self._deltas: dict[tuple[str, str], torch.Tensor] = {}

    def delta(self, expert: str, name: str) -> torch.Tensor:
        key = (expert, name)
        if key in self._deltas:
            return self._deltas[key]
        value = self.expert_set.delta(expert, name)
        if self.cache:
            self._deltas[key] = value
        return value

    def _part(self, expert: str, name: str, rows: slice) -> torch.Tensor:
        """The delta's ``rows``: the (cached) whole delta for ``slice(None)``, else read row by row, never cached —
        what keeps the statistics pass at one chunk per expert for tensors of any size."""
        if rows == slice(None):
            return self.delta(expert, name)
        cached = self._deltas.get((expert, name))
        return cached[rows] if cached is not None else self.expert_set.delta(expert, name, rows)

    def stats(self) -> TaskVectorStats:
        """One streaming pass over the merged tensors, tensors over ``ROW_CHUNK_BYTES`` in row chunks."""
        layout = self.expert_set.layout
        experts = list(self.expert_set.experts)
        kinds: list[str] = []
        sq: dict[str, dict[str, dict[str, float]]] = {e: {} for e in experts}
        conflicts: dict[str, dict[str, list[int]]] = {}
        dots: dict[str, dict[str, float]] = {_pair(a, b): {} for a, b in itertools.combinations(experts, 2)}
        for name in layout.merged_names():
            info = layout[name]
            if info.kind not in kinds:
                kinds.append(info.kind)
            bucket = conflicts.setdefault(info.layer, {}).setdefault(info.kind, [0, 0])
            for rows in row_slices(info.shape):  # a large tensor (a 0.5B model's embedding) in row chunks
                deltas = {e: self._part(e, name, rows) for e in experts}
                for e, d in deltas.items():
                    _add(sq[e].setdefault(info.layer, {}), info.kind, float((d * d).sum()))
                stacked = torch.stack([d.reshape(-1) for d in deltas.values()])
                bucket[0] += int(((stacked > 0).any(0) & (stacked < 0).any(0)).sum())
                bucket[1] += stacked.shape[1]
                for a, b in itertools.combinations(experts, 2):
                    _add(dots[_pair(a, b)], info.layer, float((deltas[a] * deltas[b]).sum()))
                del deltas, stacked
        norm = {e: {layer: {k: math.sqrt(v) for k, v in ks.items()} for layer, ks in sq[e].items()} for e in experts}
        conflict = {layer: {k: c / max(n, 1) for k, (c, n) in ks.items()} for layer, ks in conflicts.items()}
        cosine = _cosines(experts, sq, dots)
        params = {e: sum(math.prod(layout[n].shape) for n in layout.merged_names()) for e in experts}
        ordered_kinds = [k for k in _KIND_ORDER if k in kinds] + [k for k in kinds if k not in _KIND_ORDER]
        return TaskVectorStats(experts, list(layout.layers), ordered_kinds, norm, conflict, cosine, params)


def _add(bucket: dict[str, float], key: str, value: float) -> None:
    bucket[key] = bucket.get(key, 0.0) + value


def _cosines(experts, sq, dots) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for a, b in itertools.combinations(experts, 2):
        pair = _pair(a, b)
        out[pair] = {}
        total_dot = total_a = total_b = 0.0
        for layer, dot in dots[pair].items():
            na = sum(sq[a].get(layer, {}).values())
            nb = sum(sq[b].get(layer, {}).values())
            out[pair][layer] = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0
            total_dot, total_a, total_b = total_dot + dot, total_a + na, total_b + nb
        out[pair]["model"] = total_dot / math.sqrt(total_a * total_b) if total_a > 0 and total_b > 0 else 0.0
    return out

