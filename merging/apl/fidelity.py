"""How far to trust APL's gradient scores, and how stable any APL ranking is.

Three numbers, each a lesson in itself (docs/ARCHITECTURE.md, "APL"):

- **fidelity** — Spearman rank correlation per expert between exact and gradient scores at module
  level, layer level and on a seeded sample of hidden units, always like with like (``restore``
  against the gradient at the base, ``ablate`` against the gradient at the expert);
- **stability** — mean pairwise Spearman of one kind of ranking over several few-shot draws;
- **cost** — exact seconds over gradient seconds (hidden level extrapolated to every unit).

Partitions whose delta is zero score exactly 0 in every mode; they are left out of each
correlation, since agreeing on them says nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import rankdata

from ..errors import MergeLabError
from ..io.experts import ExpertSet
from .importance import ImportanceMap, compute_importance, draw_fewshot
from .taskloss import Example

Progress = Callable[[float, str], None]
RANK_LEVELS = ("module", "layer")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman ρ of ``a`` and ``b``: the Pearson correlation of their ranks, tied values sharing their
    average rank (so a tie counts as a tie, not as an order picked by position).

    Pairs where either value is NaN or ±Inf are left out (an unmeasured entry says nothing about the
    ranking). NaN when ρ is undefined: fewer than 3 pairs remain, or either side is constant (every rank
    equal: no ordering to correlate) — callers show NaN as "not measured", never as 0.
    """
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if a.shape != b.shape:
        raise MergeLabError(f"Spearman needs two equally long sequences, got {a.size} and {b.size} values")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)  # average ranks for ties
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / np.sqrt((ra @ ra) * (rb @ rb)))


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """:func:`spearman` of |a| and |b| over entries not both zero (importance scores: the sign is the
    direction of the effect, not its size; partitions both modes score 0 are unchanged ones)."""
    a, b = np.abs(np.asarray(a, float)), np.abs(np.asarray(b, float))
    keep = ~((a == 0) & (b == 0))
    return spearman(a[keep], b[keep])


def compare_maps(exact: ImportanceMap, gradient: ImportanceMap) -> dict[str, dict[str, float]]:
    """level → expert → Spearman(exact, gradient), for module, layer and the measured hidden units."""
    out: dict[str, dict[str, float]] = {}
    for level in RANK_LEVELS:
        if level in exact.signed and level in gradient.signed:
            out[level] = {t: rank_correlation(exact.matrix(level)[i], gradient.matrix(level)[i])
                          for i, t in enumerate(exact.experts)}
    if exact.units and gradient.units:
        out["hidden"] = {}
        for i, t in enumerate(exact.experts):
            e = np.concatenate([exact.units[m][i] for m in exact.units])
            g = np.concatenate([gradient.units[m][i] for m in exact.units])
            measured = np.isfinite(e)
            out["hidden"][t] = rank_correlation(e[measured], g[measured])
    return out


def stability(maps: Sequence[ImportanceMap], level: str) -> dict[str, float]:
    """expert → mean pairwise Spearman of one ranking across maps from different few-shot draws."""
    out = {}
    for i, expert in enumerate(maps[0].experts):
        pairs = [rank_correlation(a.matrix(level)[i], b.matrix(level)[i]) for a, b in itertools.combinations(maps, 2)]
        finite = [p for p in pairs if np.isfinite(p)]
        out[expert] = float(np.mean(finite)) if finite else float("nan")
    return out


@dataclass
class FidelityReport:
    """Fidelity, stability and cost per intervention; plain dicts, ready for a table or JSON.

    ``spearman[intervention][level][expert]``; ``stability[f"{mode}/{intervention}"][level][expert]``;
    ``cost[intervention]`` holds seconds and ratios summed over experts.
    """

    experts: list[str]
    spearman: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    stability: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    cost: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> list[str]:
        """One line per measurement, written from the numbers."""
        lines = []
        for iv, levels in self.spearman.items():
            parts = [f"{lv} ρ {_mean(v):.2f}" for lv, v in levels.items()]
            lines.append(f"{iv}: exact vs gradient " + ", ".join(parts) + " (mean over experts)")
        for key, levels in self.stability.items():
            parts = [f"{lv} ρ {_mean(v):.2f}" for lv, v in levels.items()]
            lines.append(f"stability {key} over {self.settings.get('draws')} draws: " + ", ".join(parts))
        for iv, cost in self.cost.items():
            lines.append(f"{iv}: exact module level costs {cost['ratio_module']:.1f}× the gradient; every hidden "
                         f"unit would cost {cost['ratio_hidden_all_units']:.0f}×")
        return lines


def _mean(values: Mapping[str, float]) -> float:
    finite = [v for v in values.values() if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _draws(pools: Mapping[str, Sequence[Example]], size: int, seed: int) -> tuple[dict, dict]:
    drawn = {t: draw_fewshot(pool, size, seed) for t, pool in pools.items()}
    return {t: d[0] for t, d in drawn.items()}, {t: d[1] for t, d in drawn.items()}


def _cost(exact: ImportanceMap, gradient: ImportanceMap, total_units: int) -> dict[str, float]:
    def seconds(m: ImportanceMap, key: str) -> float:
        return float(sum(t.get(key, 0.0) for t in m.timings.values()))

    grad = max(seconds(gradient, "gradient"), 1e-9)
    units = max(seconds(exact, "hidden_units"), 1.0)
    hidden_all = seconds(exact, "hidden") / units * total_units
    return {"gradient_s": grad, "exact_module_s": seconds(exact, "module"), "exact_layer_s": seconds(exact, "layer"),
            "exact_hidden_sample_s": seconds(exact, "hidden"), "exact_hidden_all_units_s": hidden_all,
            "ratio_module": seconds(exact, "module") / grad, "ratio_layer": seconds(exact, "layer") / grad,
            "ratio_hidden_all_units": hidden_all / grad}


def measure_fidelity(expert_set: ExpertSet, pools: Mapping[str, Sequence[Example]], tokenizer, *,
                     n_fewshot: int = 64, hidden_sample: int = 200, draws: int = 3, draw_size: int | None = None,
                     seed: int = 0, interventions: Sequence[str] = ("restore", "ablate"),
                     stability_modes: Sequence[str] = ("exact", "gradient"), device: str = "cpu",
                     progress: Progress | None = None) -> FidelityReport:
    """Exact vs gradient on one draw of ``n_fewshot`` examples per expert, and stability over
    ``draws`` seeded draws of ``draw_size`` examples (default: half the smallest pool, at most
    ``n_fewshot``, so draws differ even when the pool is the few-shot set itself)."""
    if draws < 2 and stability_modes:
        raise MergeLabError("stability needs at least 2 few-shot draws")
    smallest = min(len(p) for p in pools.values())
    draw_size = draw_size or max(2, min(n_fewshot, smallest // 2))
    total_units = sum(expert_set.layout[names[0]].n_units for names in expert_set.layout.unit_modules().values())
    report = FidelityReport(list(expert_set.experts), settings={
        "n_fewshot": min(n_fewshot, smallest), "hidden_sample": hidden_sample, "draws": draws,
        "draw_size": draw_size, "seed": seed, "total_units": total_units})
    steps = len(interventions) * (2 + draws * len(stability_modes))
    done = 0

    def run(mode, iv, examples, indices, level, sample=None):
        nonlocal done
        sub = None if progress is None else (lambda f, m: progress((done + f) / steps, f"{mode}/{iv}: {m}"))
        result = compute_importance(expert_set, examples, tokenizer, mode=mode, level=level, intervention=iv,
                                    sample=sample, seed=seed, device=device, progress=sub, fewshot_indices=indices)
        done += 1
        return result

    examples, indices = _draws(pools, n_fewshot, seed)
    for iv in interventions:
        exact = run("exact", iv, examples, indices, ["layer", "module", "hidden"], hidden_sample)
        gradient = run("gradient", iv, examples, indices, ["layer", "module", "hidden"])
        report.spearman[iv] = compare_maps(exact, gradient)
        report.cost[iv] = _cost(exact, gradient, total_units)
        for mode in stability_modes:
            maps = [run(mode, iv, *_draws(pools, draw_size, seed + 1 + d), list(RANK_LEVELS)) for d in range(draws)]
            report.stability[f"{mode}/{iv}"] = {lv: stability(maps, lv) for lv in RANK_LEVELS}
    return report
