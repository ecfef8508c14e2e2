"""APL calibration: importance → per-layer drop ratios (τ1) and merge weights (τ2).

Exactly the rules of docs/ARCHITECTURE.md ("Calibration"), per expert t over S = the layer partitions
whose droppable delta is non-zero:

- Ĩ_k = I_k / mean_S I (all 1 when that mean is 0), s = softmax_S(Ĩ / τ1);
- keep rate q_k = clip(c · |S| · s_k, q_min, 1), the scalar c found by bisection so the
  parameter-weighted mean keep rate Σ n_k q_k / Σ n_k is 1 − p̄ (n_k: droppable entries, norms
  excluded); drop ratio p_k = 1 − q_k;
- weights per layer k over the T experts with a non-zero delta there: w_t^k = T · softmax_t(Ĩ_t^k / τ2).

τ = ∞ makes every softmax uniform: drops are all p̄ and weights all 1, so APL reduces to
DARE / task arithmetic with the same seed. With ``within_layer="hidden"`` each matrix's
hidden-state units get their own keep rates by the same rule, applied to *percentiles* of the
unit scores (raw unit scores are heavy-tailed; a softmax over them sends most units to q_min)
and centred so the matrix's mean keep rate is its layer's q_l. The merge kernel redistributes
units around whatever q_l it is given, so overriding one layer's drop ratio is one map entry.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import MergeLabError
from ..io.experts import ExpertSet
from ..io.layout import ROLE_MERGE, Layout
from ..methods.base import PerTensor
from .defaults import DEFAULTS, MEAN_DROP, Q_MIN, TAU1, TAU2, UNIT_EXTRAS, WITHIN, WITHIN_LAYER  # noqa: F401

if TYPE_CHECKING:
    from .importance import ImportanceMap

TOLERANCE = 1e-12


# ---- the rules, on plain numbers -------------------------------------------------------------

def normalise(values: Sequence[float]) -> np.ndarray:
    """Ĩ = I / mean(I); all ones if the mean is 0 (nothing measured: no reason to prefer any part)."""
    array = np.abs(np.asarray(values, dtype=float))
    mean = array.mean() if array.size else 0.0
    return np.ones_like(array) if mean == 0 or not np.isfinite(mean) else array / mean


def softmax(values: Sequence[float], tau: float) -> np.ndarray:
    """softmax(values / τ); exactly uniform for τ = ∞ (or values all equal)."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return array
    if not math.isfinite(tau) or np.ptp(array) == 0:
        return np.full(array.shape, 1.0 / array.size)
    if tau <= 0:
        raise MergeLabError(f"temperature τ must be positive, got {tau}")
    z = array / tau
    z = np.exp(z - z.max())
    return z / z.sum()


def solve_keep_rates(counts: Sequence[float], shares: Sequence[float], mean_keep: float, q_min: float) -> np.ndarray:
    """q_k = clip(c · |S| · s_k, q_min, 1) with c such that Σ n_k q_k / Σ n_k = ``mean_keep``.

    The weighted mean is continuous and non-decreasing in c, from q_min (c = 0) to 1, so bisection
    finds c; equal shares give q = mean_keep exactly (the uniform case must equal DARE bitwise).
    """
    n = np.asarray(counts, dtype=float)
    a = len(n) * np.asarray(shares, dtype=float)
    if mean_keep < q_min - TOLERANCE:
        raise MergeLabError(f"mean keep rate {mean_keep:.6g} is below q_min {q_min:.6g}: lower the drop ratio "
                            f"to at most {1 - q_min:.6g} or lower q_min")
    if np.ptp(a) == 0 or mean_keep >= 1.0:
        return np.full(n.shape, min(max(mean_keep, q_min), 1.0))

    def mean(c: float) -> float:
        return float((n * np.clip(c * a, q_min, 1.0)).sum() / n.sum())

    low, high = 0.0, 1.0 / max(a[a > 0].min(), 1e-300)
    for _ in range(200):
        mid = 0.5 * (low + high)
        if mean(mid) < mean_keep:
            low = mid
        else:
            high = mid
        if high - low <= TOLERANCE * high:
            break
    return np.clip(0.5 * (low + high) * a, q_min, 1.0)


def layer_drop_ratios(importance: Mapping[str, float], counts: Mapping[str, int], drop_ratio: float,
                      tau1: float, q_min: float) -> dict[str, float]:
    """Drop ratio per layer of one expert; ``importance``/``counts`` cover exactly its set S."""
    if drop_ratio > 1.0 - q_min + TOLERANCE:
        raise MergeLabError(f"drop_ratio {drop_ratio:g} cannot be reached with q_min {q_min:g}: every layer keeps "
                            f"at least q_min, so the mean drop ratio is at most {1 - q_min:g}. Lower drop_ratio "
                            "or q_min.", field="parameters.drop_ratio")
    layers = [k for k in importance if counts.get(k, 0) > 0]
    if not layers:
        return {}
    shares = softmax(normalise([importance[k] for k in layers]), tau1)
    keep = solve_keep_rates([counts[k] for k in layers], shares, 1.0 - drop_ratio, q_min)
    # where q is exactly 1 − p̄ (uniform case) return p̄ itself, so the kernel's 1 − p equals DARE's keep rate
    return {k: float(drop_ratio) if q == 1.0 - drop_ratio else 1.0 - float(q) for k, q in zip(layers, keep)}


def layer_weights(importance: Mapping[str, Mapping[str, float]], active: Mapping[str, set[str]],
                  tau2: float) -> dict[str, dict[str, float]]:
    """w_t^k = T · softmax_t(Ĩ_t^k / τ2) over the experts active (non-zero delta) in layer k; 1 elsewhere.

    ``importance[t][k]`` must already be normalised per expert (Ĩ)."""
    layers = sorted({k for values in importance.values() for k in values})
    out = {t: {k: 1.0 for k in layers} for t in importance}
    for layer in layers:
        experts = [t for t in importance if layer in active.get(t, set())]
        if not experts:
            continue
        weights = len(experts) * softmax([importance[t][layer] for t in experts], tau2)
        for t, w in zip(experts, weights):
            out[t][layer] = float(w)
    return out


def unit_percentiles(scores: np.ndarray) -> np.ndarray:
    """Unit scores → percentiles in [0, 1] (average ranks for ties; a single unit sits at 0.5)."""
    from scipy.stats import rankdata  # only hidden-level calibration needs scipy (≈ 1 s to import)

    scores = np.abs(np.asarray(scores, dtype=float))
    if scores.size == 1:
        return np.array([0.5])
    return (rankdata(scores) - 1.0) / (scores.size - 1)


def unit_keep_rates(percentiles: np.ndarray, layer_keep: float, tau1: float, q_min: float) -> np.ndarray:
    """Per-unit keep rates by the layer rule on percentiles, with mean ``layer_keep`` over the units
    (every unit of a matrix has the same number of entries); uniform if layer_keep ≤ q_min."""
    percentiles = np.asarray(percentiles, dtype=float)
    if layer_keep <= q_min or layer_keep >= 1.0:
        return np.full(percentiles.shape, float(layer_keep))
    shares = softmax(normalise(percentiles), tau1)
    return solve_keep_rates(np.ones_like(percentiles), shares, layer_keep, q_min)


# ---- the table ---------------------------------------------------------------------------

@dataclass
class CalibrationTable:
    """APL's suggestion: drop ratio and weight per expert × layer (plus per-unit profiles).

    ``drop[expert][layer]`` and ``weight[expert][layer]`` are plain floats;
    :meth:`to_expert_params` gives them as layer maps for ``MergeSettings`` and
    :meth:`extras` the per-unit percentiles the ``apl`` kernel centres on each layer's rate.
    """

    experts: list[str]
    layers: list[str]
    drop: dict[str, dict[str, float]]
    weight: dict[str, dict[str, float]]
    settings: dict[str, object]
    unit_percentiles: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    module_tensors: dict[str, list[str]] = field(default_factory=dict)

    def to_expert_params(self) -> dict[str, dict[str, dict[str, float]]]:
        return {t: {"drop_ratio": dict(self.drop[t]), "weight": dict(self.weight[t])} for t in self.experts}

    def extras(self) -> dict[str, PerTensor]:
        """Engine extras: ``{UNIT_EXTRAS: PerTensor({tensor: {expert: percentiles [1, units]}})}`` (empty if
        uniform). Declared ``row_axis=None``: every unit's keep rate depends on all the matrix's
        percentiles (they are centred on the layer's rate), so a row chunk needs them whole and cuts the
        rates it computes to its rows (``TensorJob.row_range``)."""
        if not self.unit_percentiles:
            return {}
        per_tensor: dict[str, dict[str, torch.Tensor]] = {}
        for expert, modules in self.unit_percentiles.items():
            for module, pct in modules.items():
                for name in self.module_tensors[module]:
                    per_tensor.setdefault(name, {})[expert] = torch.tensor(pct, dtype=torch.float64).reshape(1, -1)
        return {UNIT_EXTRAS: PerTensor(per_tensor, row_axis=None)}

    def unit_keep(self, expert: str, module: str, layer: str) -> np.ndarray:
        """Per-unit keep rates of one matrix at the table's drop ratio for its layer."""
        return unit_keep_rates(self.unit_percentiles[expert][module], 1.0 - self.drop[expert][layer],
                               float(self.settings["tau1"]), float(self.settings["q_min"]))

    def rows(self, what: str = "drop") -> tuple[list[str], list[list]]:
        """(header, rows) of an expert × layer table of ``drop`` or ``weight``."""
        table = {"drop": self.drop, "weight": self.weight}[what]
        return ["expert", *self.layers], [[t, *(round(table[t][k], 4) for k in self.layers)] for t in self.experts]

    def mean_keep(self, expert: str, layout: Layout, layers: Sequence[str] | None = None) -> float:
        """Parameter-weighted mean keep rate over the droppable entries of ``layers`` (default: all
        layers; pass the expert's set S to check the calibration constraint)."""
        counts = droppable_counts(layout)
        layers = [k for k in (self.drop[expert] if layers is None else layers) if counts.get(k, 0) > 0]
        total = sum(counts[k] for k in layers)
        return sum(counts[k] * (1.0 - self.drop[expert][k]) for k in layers) / total

    def recipe_suggestion(self) -> dict:
        """What a recipe records under ``suggested.apl``: the calibration's settings and every cell, so a
        reader sees APL's suggestion beside any overrides."""
        return {"settings": dict(self.settings), "drop_ratio": self.drop, "weight": self.weight}

    def to_json(self) -> str:
        return json.dumps({"experts": self.experts, "layers": self.layers, "drop": self.drop,
                           "weight": self.weight, "settings": self.settings,
                           "unit_percentiles": {t: {m: v.tolist() for m, v in ms.items()}
                                                for t, ms in self.unit_percentiles.items()}})


# ---- from an importance map ----------------------------------------------------------------

def droppable_counts(layout: Layout) -> dict[str, int]:
    """n_k: droppable entries per layer (norms and task heads excluded)."""
    out: dict[str, int] = {}
    for info in layout.tensors.values():
        if info.droppable:
            out[info.layer] = out.get(info.layer, 0) + math.prod(info.shape)
    return out


@dataclass
class DeltaSupport:
    """Which layers each expert changed: ``droppable`` (the sets S for drops) and ``changed`` (any merged
    tensor, norms included: who takes part in each layer's weights)."""

    droppable: dict[str, set[str]]
    changed: dict[str, set[str]]

    @classmethod
    def of(cls, expert_set: ExpertSet) -> DeltaSupport:
        droppable: dict[str, set[str]] = {t: set() for t in expert_set.experts}
        changed: dict[str, set[str]] = {t: set() for t in expert_set.experts}
        for name, info in expert_set.layout.tensors.items():
            if info.role != ROLE_MERGE:
                continue
            for expert in expert_set.experts:
                if info.layer in changed[expert] and (not info.droppable or info.layer in droppable[expert]):
                    continue
                if bool(torch.count_nonzero(expert_set.delta(expert, name))):
                    changed[expert].add(info.layer)
                    if info.droppable:
                        droppable[expert].add(info.layer)
        return cls(droppable, changed)

    @classmethod
    def cached(cls, expert_set: ExpertSet) -> DeltaSupport:
        """:meth:`of`, computed once per expert set: it reads every delta, while calibration itself is
        arithmetic on a few numbers per layer — the app recalibrates at every parameter change."""
        key = id(expert_set)
        found = _SUPPORT.get(key)
        if found is None:
            found = _SUPPORT[key] = cls.of(expert_set)
            weakref.finalize(expert_set, _SUPPORT.pop, key, None)
        return found


_SUPPORT: dict[int, DeltaSupport] = {}  # id(expert set) → its support, dropped when the set is collected


def _check(drop_ratio: float, tau1: float, tau2: float, q_min: float, within_layer: str) -> None:
    """The values against APL's declared parameters (the ranges recipes, the app and the CLI are held to);
    a temperature may also be ∞, the library-only limit where APL is DARE / task arithmetic exactly."""
    MEAN_DROP.check_scalar(drop_ratio, "parameters.drop_ratio")
    Q_MIN.check_scalar(q_min, "parameters.q_min")
    for spec, tau in ((TAU1, tau1), (TAU2, tau2)):
        if not (isinstance(tau, (int, float)) and math.isinf(tau) and tau > 0):
            spec.check_scalar(tau, f"parameters.{spec.name}")
    WITHIN.check_scalar(within_layer, "parameters.within_layer")


def calibrate(importance: ImportanceMap, expert_set: ExpertSet, *, drop_ratio: float = 0.5, tau1: float = 2.0,
              tau2: float = 2.0, q_min: float = 0.01, within_layer: str = "uniform",
              support: DeltaSupport | None = None) -> CalibrationTable:
    """Drop ratios and weights for every expert × layer from layer-level importance (and unit
    scores for ``within_layer="hidden"``). ``support`` may be passed to skip re-reading deltas."""
    _check(drop_ratio, tau1, tau2, q_min, within_layer)
    layout = expert_set.layout
    missing = [t for t in expert_set.experts if t not in importance.experts]
    if missing:
        raise MergeLabError(f"no importance for expert(s) {', '.join(missing)}: compute importance again "
                            "with every expert selected")
    support = support or DeltaSupport.of(expert_set)
    counts = droppable_counts(layout)
    layers = list(layout.layers)
    drop, tilde = {}, {}
    for expert in expert_set.experts:
        scores = importance.scores(expert, "layer")
        in_s = [k for k in layers if k in support.droppable[expert] and counts.get(k, 0) > 0]
        found = layer_drop_ratios({k: scores.get(k, 0.0) for k in in_s}, counts, drop_ratio, tau1, q_min)
        drop[expert] = {k: found.get(k, drop_ratio) for k in layers}  # outside S nothing is dropped anyway
        normed = normalise([scores.get(k, 0.0) for k in in_s])
        tilde[expert] = {k: float(v) for k, v in zip(in_s, normed)}
        tilde[expert].update({k: 1.0 for k in layers if k not in tilde[expert]})
    weight = layer_weights(tilde, support.changed, tau2)
    weight = {t: {k: weight[t].get(k, 1.0) for k in layers} for t in expert_set.experts}
    settings = {"drop_ratio": drop_ratio, "tau1": tau1, "tau2": tau2, "q_min": q_min, "within_layer": within_layer,
                "importance_mode": importance.mode, "intervention": importance.intervention, "seed": importance.seed}
    table = CalibrationTable(list(expert_set.experts), layers, drop, weight, settings,
                             module_tensors=layout.unit_modules())
    if within_layer == "hidden":
        table.unit_percentiles = _unit_percentiles(importance, expert_set)
    return table


def _unit_percentiles(importance: ImportanceMap, expert_set: ExpertSet) -> dict[str, dict[str, np.ndarray]]:
    modules = expert_set.layout.unit_modules()
    out: dict[str, dict[str, np.ndarray]] = {}
    for expert in expert_set.experts:
        out[expert] = {}
        for module in modules:
            if module not in importance.units:
                raise MergeLabError("within_layer='hidden' needs hidden-state scores: compute importance with "
                                    "level 'hidden' or 'all'")
            scores = importance.unit_scores(expert, module)
            if not np.isfinite(scores).all():
                raise MergeLabError(f"within_layer='hidden' needs a score for every unit, but module '{module}' "
                                    "was only sampled (exact mode with a sample): use gradient mode for hidden "
                                    "states, or exact mode without a sample")
            out[expert][module] = unit_percentiles(scores)
    return out
