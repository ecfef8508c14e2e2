"""The seed band: a randomised merge run over a few seeds, probed each time, so the page shows its spread.

DARE's run-to-run spread is a top complaint of mergekit users: one seed's probe says little when the next
seed scores points apart. Whether a merge depends on its seed is read from the method's declaration alone
(``MethodSpec.randomised`` — a random drop — or a seeded few-shot draw: a data-aware method that needs
few-shot data but no importance map draws its examples with the merge's seed), never from its name.

The band runs the page's own Merge and Run probe steps (:func:`.merge.merge`, :func:`.probe.run_probe`) for
seeds s+1, …, s+n−1 and then s, so each seed's row is exactly what pressing Merge and Run probe with that seed
gives, and the merge the session keeps afterwards (for Export and Try a sentence) is seed s's. The history
keeps one row for the band: seed s's, with every seed and the band recorded in it and in its recipe's notes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..cancel import checkpoint
from ..errors import MergeLabError
from ..methods.base import NEEDS_FEW_SHOT, NEEDS_IMPORTANCE
from .estimates import record
from .limits import MAX_SEED, Progress, check_method, check_seed, check_shared, method_spec, no_progress
from .session import Session

DEFAULT_BAND_SEEDS = 3


def seed_dependence(method: str, shared: Mapping[str, Any]) -> str | None:
    """Why another seed gives another merge of ``method`` at these shared values (None: it does not)."""
    spec = method_spec(method)
    if spec.is_randomised(shared):
        return f"{spec.pretty_name} drops entries at random from its seed"
    if spec.prepare is not None and NEEDS_FEW_SHOT in spec.needs and NEEDS_IMPORTANCE not in spec.needs:
        return f"{spec.pretty_name} draws its few-shot examples with the merge's seed"
    return None


@dataclass(frozen=True)
class SeedBand:
    """Per task, one probe score per seed of one merge setting; seed ``seeds[0]`` is the merge kept."""

    method: str
    label: str  # the kept merge's label (seed seeds[0])
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    metric: str  # "accuracy" (classifier) or "perplexity" (causal LM)
    scores: dict[str, tuple[float, ...]] = field(default_factory=dict)  # task → score per seed, seeds order

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"

    def mean(self, task: str) -> float:
        values = self.scores[task]
        return sum(values) / len(values)

    def low(self, task: str) -> float:
        return min(self.scores[task])

    def high(self, task: str) -> float:
        return max(self.scores[task])

    def overall(self) -> tuple[float, ...]:
        """The mean over tasks, one per seed (what the page's "mean" column shows for one merge)."""
        return tuple(sum(self.scores[t][i] for t in self.tasks) / len(self.tasks) for i in range(len(self.seeds)))

    def table(self) -> tuple[list[str], list[list]]:
        """(headers, rows): per task and overall, each seed's score, then mean and min–max."""
        headers = ["task"] + [f"seed {s}" for s in self.seeds] + ["mean", "min", "max", "range"]
        rows = []
        for task, values in [(t, self.scores[t]) for t in self.tasks] + [("mean over tasks", self.overall())]:
            mean = sum(values) / len(values)
            rows.append([task] + [round(v, 4) for v in values]
                        + [round(mean, 4), round(min(values), 4), round(max(values), 4),
                           round(max(values) - min(values), 4)])
        return headers, rows

    def to_json(self) -> dict:
        return {"method": self.method, "label": self.label, "seeds": list(self.seeds), "metric": self.metric,
                "scores": {t: list(v) for t, v in self.scores.items()}}


def band_seeds(seed: int, n: int = DEFAULT_BAND_SEEDS) -> tuple[int, ...]:
    """Seeds s, s+1, …, s+n−1 (an error if they leave the allowed seed range)."""
    seed = check_seed(seed)
    if not 2 <= int(n) <= 5:
        raise MergeLabError(f"a seed band runs 2 to 5 seeds, not {n}", field="seeds")
    if seed + n - 1 > MAX_SEED:
        raise MergeLabError(f"seeds {seed}…{seed + n - 1} pass the largest seed {MAX_SEED}: choose a seed of at "
                            f"most {MAX_SEED - n + 1}", field="seed")
    return tuple(seed + i for i in range(int(n)))


def _metric_of(report) -> str:
    from ..zoo.probe import CAUSAL_LM

    return "perplexity" if report.kind == CAUSAL_LM else "accuracy"


def run_seed_band(session: Session, method: str, shared: Mapping[str, Any], seed: int = 0,
                  n: int = DEFAULT_BAND_SEEDS, progress: Progress | None = None) -> tuple[SeedBand, Any]:
    """Merge and probe ``method`` with seeds s…s+n−1; returns (band, seed s's full probe report).

    Stop (a cancelled job) between or inside the runs leaves the session as it was before the band."""
    from .merge import merge
    from .probe import run_probe

    progress = progress or no_progress
    method = check_method(method)
    shared = check_shared(method, shared)
    why = seed_dependence(method, shared)
    if why is None:
        raise MergeLabError(f"{method_spec(method).pretty_name} does not depend on its seed at these settings: every "
                            "seed gives the same merge, so there is no spread to show (choose DARE, DELLA or APL "
                            "with the random drop)", field="method")
    seeds = band_seeds(seed, n)
    order = list(seeds[1:]) + [seeds[0]]  # seed s last: the merge the session keeps is seed s's
    saved = _saved(session)
    started = time.perf_counter()
    metrics: dict[int, dict[str, dict[str, float]]] = {}
    report = None
    try:
        for i, s in enumerate(order):
            checkpoint()

            def sub(fraction: float, message: str, _i=i, _s=s) -> None:
                progress((_i + min(max(fraction, 0.0), 1.0)) / len(order),
                         f"seed band · seed {_s} ({_i + 1} of {len(order)}) · {message}")

            session.merges = saved["merges"]  # the extra seeds use up no merge numbers: the kept one is #n+1
            merge(session, method, shared, s, progress=sub)
            report = run_probe(session, progress=sub)
            metrics[s] = report.row(session.last_label).metrics
            if s != seeds[0]:
                session.history.pop()  # one history row for the band: seed s's, below
    except BaseException:
        _restore(session, saved)
        raise
    tasks = tuple(t for t in report.tasks if all(t in metrics[s] for s in seeds))
    metric = _metric_of(report)
    scores = {t: tuple(float(metrics[s][t][metric]) for s in seeds) for t in tasks}
    band = SeedBand(method, session.last_label, seeds, tasks, metric, scores)
    _record(session, band)
    record("sweep", time.perf_counter() - started, len(seeds), "the last seed band")  # a merge + a probe each
    progress(1.0, f"seed band done: {len(seeds)} seeds")
    return band, report


_KEPT = ("history", "merges", "merge_key", "merge_inputs", "last_recipe", "last_label", "method", "shared", "seed")


def _saved(session: Session) -> dict[str, Any]:
    out = {k: getattr(session, k) for k in _KEPT}
    out["history"] = list(session.history)
    return out


def _restore(session: Session, saved: Mapping[str, Any]) -> None:
    for key, value in saved.items():
        setattr(session, key, value)


def _record(session: Session, band: SeedBand) -> None:
    """The kept row says which seeds ran and what they scored; its recipe's notes say it too (the JSON
    history and an exported recipe keep them)."""
    seeds = ", ".join(str(s) for s in band.seeds)
    note = f"run over seeds {seeds} (this recipe is seed {band.seeds[0]}, the merge kept)"
    item = session.history[-1]
    item["seeds"] = list(band.seeds)
    item["band"] = band.to_json()
    item["settings"] = f"{item['settings']}; seeds {seeds} (kept: {band.seeds[0]})"
    if isinstance(item.get("recipe"), dict):
        item["recipe"]["notes"] = f"{item['recipe'].get('notes') or ''}; {note}".lstrip("; ")
    if session.last_recipe is not None and hasattr(session.last_recipe, "notes"):
        session.last_recipe.notes = f"{session.last_recipe.notes or ''}; {note}".lstrip("; ")


def band_summary(band: SeedBand) -> str:
    """The band's text twin: per task mean and min–max over the seeds, the widest spread named."""
    unit = "accuracy" if band.metric == "accuracy" else "perplexity (lower is better)"
    parts = [f"{t} {band.mean(t):.3f} ({band.low(t):.3f}–{band.high(t):.3f})" for t in band.tasks]
    widest = max(band.tasks, key=lambda t: band.high(t) - band.low(t)) if band.tasks else None
    overall = band.overall()
    seeds = ", ".join(str(s) for s in band.seeds)
    text = (f"Over seeds {seeds}, {band.label} scores {unit}: " + "; ".join(parts)
            + f". Mean over tasks {sum(overall) / len(overall):.3f} ({min(overall):.3f}–{max(overall):.3f}).")
    if widest is not None and not math.isclose(band.high(widest), band.low(widest)):
        text += f" The widest run-to-run spread is {widest}'s: {band.high(widest) - band.low(widest):.3f}."
    elif widest is not None:
        text += " Every seed scored the same on every task."
    return text + (f" The merge kept for Export and Try a sentence is seed {band.seeds[0]}'s.")


def band_of(session: Session) -> dict | None:
    """The last band recorded in the session's history (its JSON record), or None."""
    for item in reversed(session.history):
        if item.get("band"):
            return item["band"]
    return None
