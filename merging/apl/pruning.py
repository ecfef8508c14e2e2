"""Pruning one expert: its own-task score after dropping a fraction p of its delta, per strategy.

The APL paper's first analysis asks whether an importance signal separates from random and magnitude
dropping when one expert alone is sparsified. Each strategy here is a *registered merge method* applied
to one expert (``Strategy.method`` with ``Strategy.params``) at drop fraction p, so nothing re-implements
a drop: the curve measures exactly what the page and CLI would merge.

This module is the core library (no gradio, plotly or demo-zoo knowledge); the workbench
(``merging/workbench/analyses.py``) and the benchmark drive it with a session's or a zoo's models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import MergeLabError


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
