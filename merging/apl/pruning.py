"""Pruning one expert: its own-task score after dropping a fraction p of its delta, per strategy.

The APL paper's first analysis asks whether an importance signal separates from random and magnitude
dropping when one expert alone is sparsified. Each strategy here is a *registered merge method* applied
to one expert (``Strategy.method`` with ``Strategy.params``) at drop fraction p, so nothing re-implements
a drop: the curve measures exactly what the page and CLI would merge.

This module is the core library (no gradio, plotly or demo-zoo knowledge); the workbench
(``merging/workbench/analyses.py``) and the benchmark drive it with a session's or a zoo's models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cancel import checkpoint
from ..engine import MergeEngine, MergeSettings
from ..errors import MergeLabError
from ..io.experts import ExpertSet


@dataclass(frozen=True)
class Strategy:
    """One way to drop a fraction of one expert's delta, as a registered method and fixed parameters."""

    id: str
    label: str  # plain words for charts
    method: str  # the registered merge method that does it on ONE expert
    params: dict = field(default_factory=dict)  # fixed parameters beyond the drop fraction
    randomised: bool = True  # whether seeds matter


STRATEGIES: tuple[Strategy, ...] = (
    Strategy("dare", "random drop + rescale (DARE)", "dare_linear", {"rescale": True}, True),
    Strategy("magnitude", "magnitude (keep largest |Δ|)", "magnitude", {"trim_scope": "tensor"}, False),
    Strategy("apl_layer", "APL per-layer rates", "apl", {"within_layer": "uniform", "drop": "random"}, True),
    Strategy("apl_hidden", "APL hidden-unit rates", "apl", {"within_layer": "hidden", "drop": "random"}, True),
    Strategy("apl_locate", "APL locate (keep most important units)", "apl",
             {"within_layer": "hidden", "drop": "locate"}, False),
)


def strategy(strategy_id: str) -> Strategy:
    """The strategy named ``strategy_id``, or an error listing the known ones."""
    for s in STRATEGIES:
        if s.id == strategy_id:
            return s
    raise MergeLabError(f"unknown pruning strategy '{strategy_id}': choose one of "
                        f"{', '.join(s.id for s in STRATEGIES)}", field="strategies")


@dataclass(frozen=True)
class CurvePoint:
    """One measured score: strategy at drop fraction p with one seed."""

    strategy: str  # Strategy.id
    fraction: float  # p, share of the expert's delta dropped
    seed: int
    score: float  # own-task probe score: accuracy (classifier) or perplexity (LM)


@dataclass(frozen=True)
class PruningCurve:
    """Every point of one expert's pruning analysis, with the base and unpruned expert for reference."""

    expert: str
    task: str
    metric: str  # "accuracy" | "perplexity"
    higher_is_better: bool
    base_score: float
    expert_score: float
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    points: tuple[CurvePoint, ...]

    def scores(self, strategy_id: str, fraction: float) -> list[float]:
        """The scores of ``strategy_id`` at ``fraction``, one per seed measured (seed order)."""
        found = [pt for pt in self.points if pt.strategy == strategy_id and abs(pt.fraction - fraction) < 1e-9]
        return [pt.score for pt in sorted(found, key=lambda pt: pt.seed)]

    def strategies(self) -> tuple[str, ...]:
        """The strategy ids measured, in STRATEGIES order (unknown ids last, in first-seen order)."""
        seen = list(dict.fromkeys(pt.strategy for pt in self.points))
        order = {s.id: i for i, s in enumerate(STRATEGIES)}
        return tuple(sorted(seen, key=lambda sid: (order.get(sid, len(order)), seen.index(sid))))

    def at(self, strategy: str, fraction: float) -> tuple[float, float, float]:
        """Mean, min and max over seeds of ``strategy`` at ``fraction``."""
        values = self.scores(strategy, fraction)
        if not values:
            raise MergeLabError(f"the pruning curve of '{self.expert}' has no point for strategy '{strategy}' at "
                                f"p={fraction}: measured strategies {list(self.strategies())}, fractions "
                                f"{list(self.fractions)}", field="fraction")
        return sum(values) / len(values), min(values), max(values)

    def to_json(self) -> dict:
        """A JSON-ready dict (lists, floats, strings) that ``from_json`` reads back exactly."""
        return {"expert": self.expert, "task": self.task, "metric": self.metric,
                "higher_is_better": self.higher_is_better, "base_score": self.base_score,
                "expert_score": self.expert_score, "fractions": list(self.fractions), "seeds": list(self.seeds),
                "points": [[pt.strategy, pt.fraction, pt.seed, pt.score] for pt in self.points]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PruningCurve:
        """The curve ``to_json`` wrote; a missing key is an error naming it."""
        try:
            points = tuple(CurvePoint(str(s), float(f), int(seed), float(score)) for s, f, seed, score in d["points"])
            return cls(str(d["expert"]), str(d["task"]), str(d["metric"]), bool(d["higher_is_better"]),
                       float(d["base_score"]), float(d["expert_score"]), tuple(float(f) for f in d["fractions"]),
                       tuple(int(s) for s in d["seeds"]), points)
        except (KeyError, TypeError, ValueError) as exc:
            raise MergeLabError(f"not a pruning curve record ({type(exc).__name__}: {exc}): expected the keys "
                                "expert, task, metric, higher_is_better, base_score, expert_score, fractions, "
                                "seeds, points", field="pruning") from exc


# ---- the computation -------------------------------------------------------------------------

#: a function of a merged body (base tensor names) → the expert's own-task score
Scorer = Callable[[dict[str, torch.Tensor]], float]
Progress = Callable[[float, str], None]


def one_expert_set(expert_set: ExpertSet, expert: str) -> ExpertSet:
    """The same base and layout with ``expert`` alone: a 'merge' of one expert is that expert pruned.

    No file is reopened (the sources are shared); keep the returned set alive while merging, since
    APL's delta support is cached per expert-set object."""
    if expert not in expert_set.experts:
        raise MergeLabError(f"no expert '{expert}' in this selection: choose one of {', '.join(expert_set.experts)}",
                            field="expert")
    return ExpertSet(base=expert_set.base, experts={expert: expert_set.experts[expert]}, layout=expert_set.layout,
                     warnings=list(expert_set.warnings), vocab=expert_set.vocab)


def unavailable_reason(s: Strategy) -> str | None:
    """Why ``s`` cannot run in this checkout (its method or a fixed parameter value is not declared), or None."""
    from ..methods import available, get_method

    if s.method not in available():
        return f"{s.label}: method '{s.method}' is not registered in this checkout"
    spec = get_method(s.method)
    for key, value in s.params.items():
        try:
            param = spec.param(key)
        except KeyError:
            return f"{s.label}: method '{s.method}' declares no parameter '{key}'"
        if param.choices and value not in param.choices:
            return (f"{s.label}: method '{s.method}' has no {key} = {value!r} in this checkout "
                    f"(declared: {', '.join(map(str, param.choices))})")
    return None


def needs_importance(s: Strategy) -> bool:
    """Whether the strategy's method calibrates from APL importance (its declaration says so)."""
    from ..methods import get_method
    from ..methods.base import NEEDS_IMPORTANCE

    return NEEDS_IMPORTANCE in get_method(s.method).needs


def strategy_settings(s: Strategy, one: ExpertSet, fraction: float, seed: int, importance=None,
                      apl_params: Mapping[str, Any] | None = None) -> MergeSettings:
    """The engine settings that drop ``fraction`` of the single expert's delta the way ``s`` does.

    λ and the weight stay 1 (nothing is merged: the curve shows what dropping alone costs). A method that
    needs importance is prepared through its declared ``prepare`` with the importance map (mean drop p̄ =
    ``fraction``), exactly as the page and recipe replay prepare it; ``apl_params`` (τ1, q_min…) override
    its declared defaults."""
    from ..methods import get_method

    spec = get_method(s.method)
    params = {**(apl_params or {}), **s.params, "drop_ratio": float(fraction)}
    if "lambda" in spec.param_names():
        params["lambda"] = 1.0
    params = {k: v for k, v in params.items() if k in spec.param_names()}
    if spec.prepare is None:
        return MergeSettings.build(one, spec, params, seed=seed)
    if importance is None:
        raise MergeLabError(f"{s.label} calibrates from APL importance: compute importance of the expert first",
                            field="importance")
    out = spec.prepare(one, None, None, params=params, importance=importance, progress=None)
    return MergeSettings.build(one, spec, params, expert_params=out.get("expert_params") or {}, seed=seed,
                               extras=out.get("extras") or {})


def prune(s: Strategy, one: ExpertSet, fraction: float, seed: int, importance=None, engine=None,
          apl_params: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The pruned expert's body tensors (base names), merged by the engine."""
    engine = engine or MergeEngine(one, cache=False)
    return engine.merge(strategy_settings(s, one, fraction, seed, importance, apl_params)).tensors


def measure_points(one: ExpertSet, score: Scorer, fractions: Sequence[float], seeds: Sequence[int],
                   strategies: Sequence[Strategy], importance_for: Callable[[int], Any] | None = None,
                   engine=None, apl_params: Mapping[str, Any] | None = None,
                   progress: Progress | None = None, log: Callable[[str], None] | None = None) -> list[CurvePoint]:
    """Every (strategy, fraction, seed) point; a strategy whose seeds do not matter is measured once, at the
    first seed. ``importance_for(seed)`` gives the importance map APL strategies calibrate from for that
    seed (the caller caches it per expert and few-shot draw). Checks Stop between merges."""
    engine = engine or MergeEngine(one, cache=False)
    runnable = []
    for s in strategies:
        reason = unavailable_reason(s)
        if reason is None and needs_importance(s) and importance_for is None:
            reason = f"{s.label}: no importance given (it calibrates from APL importance)"
        if reason is not None:
            (log or print)(f"  (skipping {reason})")
            continue
        runnable.append(s)
    jobs = [(s, p, seed) for s in runnable for p in fractions for seed in (seeds if s.randomised else seeds[:1])]
    points = []
    for done, (s, p, seed) in enumerate(jobs):
        checkpoint()
        if progress is not None:
            progress(done / max(1, len(jobs)), f"pruning · {s.label} · p = {p:g} · seed {seed} "
                     f"({done + 1} of {len(jobs)})")
        importance = importance_for(seed) if needs_importance(s) else None
        tensors = prune(s, one, p, seed, importance, engine, apl_params)
        points.append(CurvePoint(s.id, float(p), int(seed), float(score(tensors))))
        del tensors
    return points


DEFAULT_FRACTIONS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def check_grid(fractions: Sequence[float], seeds: Sequence[int], strategies: Sequence[str] | None
               ) -> tuple[tuple[float, ...], tuple[int, ...], tuple[Strategy, ...]]:
    """The curve's grid, checked: fractions in [0, 1), at least one integer seed, known strategy ids."""
    fr = tuple(float(f) for f in fractions)
    if not fr or any(not (0.0 <= f < 1.0) for f in fr):
        raise MergeLabError(f"pruning fractions must be at least one number in [0, 1), got {list(fractions)}",
                            field="fractions")
    sd = tuple(int(s) for s in seeds)
    if not sd:
        raise MergeLabError("pruning needs at least one seed (e.g. 0, 1, 2)", field="seeds")
    chosen = STRATEGIES if strategies is None else tuple(strategy(s) for s in strategies)
    return fr, sd, chosen


def measure_curve(one: ExpertSet, expert: str, task: str, score: Scorer, *, metric: str, higher_is_better: bool,
                  base_score: float, expert_score: float, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  seeds: Sequence[int] = (0, 1, 2), strategies: Sequence[str] | None = None,
                  importance_for: Callable[[int], Any] | None = None, engine=None,
                  apl_params: Mapping[str, Any] | None = None, progress: Progress | None = None,
                  log: Callable[[str], None] | None = None) -> PruningCurve:
    """The pruning curve of one expert (``one`` holds it alone, see :func:`one_expert_set`)."""
    fr, sd, chosen = check_grid(fractions, seeds, strategies)
    points = measure_points(one, score, fr, sd, chosen, importance_for, engine, apl_params, progress, log)
    return PruningCurve(expert, task, metric, higher_is_better, float(base_score), float(expert_score), fr, sd,
                        tuple(points))
