"""How long will it take? Measured seconds per unit of work on this machine × the units a step needs.

A long step (exact importance, the restore/ablate comparison, the drop-ratio sweep, the first probe) is
said in advance in time, not in "this may take a while": the page shows ``rate × units`` where the rate
is what this process measured — the last run of the same kind of work, or, before any, one calibration
forward (and backward) pass of the session's first expert on its few-shot examples. Nothing here is a
constant seconds figure: a shared 2-core Space and a laptop get their own numbers.

Units: ``forward`` — one forward pass of one expert over its few-shot set (an exact intervention);
``gradient`` — one forward + backward pass of one expert (a gradient importance run);
``example`` — one probe example through one model body; ``sweep`` — one merge + probe of the sweep.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .limits import DEFAULT_FEWSHOT
from .session import Session

UNITS = {"forward": ("forward pass", "forward passes"), "gradient": ("backward pass", "backward passes"),
         "example": ("probe example", "probe examples"), "sweep": ("merge and probe", "merges and probes")}


@dataclass(frozen=True)
class Rate:
    seconds: float  # per unit
    source: str  # where it was measured, in words
    examples: int | None = None  # few-shot examples per forward pass when it was measured (None: not per example)


_RATES: dict[str, Rate] = {}
_LOCK = threading.Lock()


def record(kind: str, seconds: float, units: float, source: str, examples: int | None = None) -> Rate | None:
    """Remember ``seconds / units`` as the rate of ``kind`` on this machine (the newest measurement wins:
    the machine's load changes, and the last run is the best guess of the next). ``examples``: the few-shot
    examples each pass carried, so an estimate for another few-shot size scales the pass time."""
    if kind not in UNITS:
        raise ValueError(f"unknown unit of work {kind!r} (known: {', '.join(UNITS)})")
    if units <= 0 or seconds <= 0:
        return None
    rate = Rate(float(seconds) / float(units), source, int(examples) if examples else None)
    with _LOCK:
        _RATES[kind] = rate
    return rate


def rate_of(kind: str) -> Rate | None:
    with _LOCK:
        return _RATES.get(kind)


def forget_rates() -> None:
    """Drop every measured rate (tests; a machine whose load changed completely)."""
    with _LOCK:
        _RATES.clear()


@dataclass(frozen=True)
class Estimate:
    kind: str
    units: float
    rate: Rate | None
    examples: int | None = None  # few-shot examples per pass of the step estimated

    @property
    def per_unit(self) -> float | None:
        """The measured seconds per unit, scaled to this step's few-shot size (a pass over 64 examples takes
        about twice one over 32 on a CPU)."""
        if self.rate is None:
            return None
        if self.rate.examples and self.examples:
            return self.rate.seconds * self.examples / self.rate.examples
        return self.rate.seconds

    @property
    def seconds(self) -> float | None:
        return None if self.rate is None else self.per_unit * self.units

    def text(self) -> str:
        """"about 4 min on this machine (250 forward passes × 0.96 s, measured on the last exact run)"."""
        one, many = UNITS[self.kind]
        count = f"{self.units:,.0f} {one if round(self.units) == 1 else many}"
        if self.rate is None:
            return f"{count}; the time is measured on the first run"
        took = duration_text(self.seconds)
        took = took if took == "under a second" else f"about {took}"
        scaled = (f", scaled from {self.rate.examples} to {self.examples} examples"
                  if self.rate.examples and self.examples and self.examples != self.rate.examples else "")
        return (f"{took} on this machine ({count} × {self.per_unit:.3g} s, measured on {self.rate.source}"
                f"{scaled})")


def estimate(kind: str, units: float, examples: int | None = None) -> Estimate:
    return Estimate(kind, float(units), rate_of(kind), int(examples) if examples else None)


def duration_text(seconds: float | None) -> str:
    """Seconds in the words a person reads at a glance: "40 s", "3 min", "1 h 5 min"."""
    if seconds is None:
        return "unknown"
    seconds = max(0.0, float(seconds))
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(round(minutes % 60))} min"


def time_left(started: float, done: float, total: float, now: float | None = None) -> str:
    """", about 2 min left" from the pace of this run so far (nothing before the first unit is done)."""
    if done <= 0 or total <= done:
        return ""
    elapsed = (time.perf_counter() if now is None else now) - started
    return f", about {duration_text(elapsed / done * (total - done))} left"


# ---------------------------------------------------------------- units of each long step


def exact_forwards(session: Session, levels: list[str], experts: int | None = None) -> int:
    """Forward passes of an exact run: per expert, one at the start point plus one per partition of every
    level (a partition whose delta is zero costs none, so this is the upper bound the page promises)."""
    from .experts import models_for

    layout = models_for(session).expert_set.layout
    per_expert = 1 + sum(len(layout.partitions(lv)) for lv in levels if lv != "hidden")
    return per_expert * (len(session.refs) if experts is None else experts)


def probe_examples(session: Session) -> int:
    """Probe examples the first probe runs: the merge on every probe set, and base and each expert too unless
    their rows are done already (the zoo wrote them when it was built, or an earlier probe did)."""
    from .probe import reference_ready

    total = sum(len(d.probe) for e, d in session.data.items() if e in session.refs)
    return total if reference_ready(session) else total * (len(session.refs) + 2)


# ---------------------------------------------------------------- calibration


def calibrate(session: Session, n_fewshot: int = DEFAULT_FEWSHOT) -> None:
    """Measure one forward and one backward pass of the session's first expert with task data on ``n``
    of its few-shot examples, unless both rates are known already (a second of work on the default zoo)."""
    if rate_of("forward") and rate_of("gradient") and rate_of("example"):
        return
    from ..apl.importance import draw_fewshot, gradient_scores
    from ..apl.taskloss import body_state, task_loss
    from .experts import models_for, tokenizer_for

    expert = next((e for e in session.refs if e in session.data and session.data[e].fewshot), None)
    if expert is None:
        return
    models = models_for(session)
    tokenizer = tokenizer_for(models)
    examples, _ = draw_fewshot(session.data[expert].fewshot, int(n_fewshot), session.seed)
    with models.lock:
        base, own = body_state(models.expert_set, "base"), body_state(models.expert_set, expert)
        task = task_loss(models.expert_set, expert, {expert: examples}, tokenizer, base,  # LM text or labels
                         purpose="the time estimate")
        task.loss()  # the first pass pays one-off costs (allocations, kernels): not a unit of work
        clock = time.perf_counter()
        task.loss()
        forward = time.perf_counter() - clock
        clock = time.perf_counter()
        gradient_scores(task, models.expert_set.layout, base, own)
        backward = time.perf_counter() - clock
    source = f"a calibration pass of {expert}"
    if not rate_of("forward"):
        record("forward", forward, 1, source, len(examples))
    if not rate_of("gradient"):
        record("gradient", backward, 1, source, len(examples))
    if not rate_of("example"):
        record("example", forward, max(1, len(examples)), source)


# ---------------------------------------------------------------- what the page says before each long step

EXACT_SCOPES = {"layers (quick)": ["model", "layer"], "layers and modules": ["model", "layer", "module"]}
QUICK_SCOPE = "layers (quick)"
FULL_SCOPE = "layers and modules"


def exact_levels(scope: str | None) -> list[str]:
    """The levels an exact run measures for the page's scope choice (the full one by default)."""
    from ..errors import MergeLabError

    scope = scope or FULL_SCOPE
    if scope not in EXACT_SCOPES:
        raise MergeLabError(f"Exact scope must be one of {', '.join(EXACT_SCOPES)}, got {scope!r}", field="scope")
    return list(EXACT_SCOPES[scope])


def fewshot_size(session: Session, n: int) -> int:
    """Examples a pass carries for a request of ``n``: no expert's pool gives more than it holds."""
    pools = [len(d.fewshot) for e, d in session.data.items() if e in session.refs and d.fewshot]
    return min([int(n), *pools]) if pools else int(n)


def importance_estimate(session: Session, mode: str, scope: str | None = None, n: int = DEFAULT_FEWSHOT
                        ) -> Estimate:
    size = fewshot_size(session, n)
    if mode == "exact":
        return estimate("forward", exact_forwards(session, exact_levels(scope)), size)
    return estimate("gradient", len(session.refs), size)


def compare_estimate(session: Session, n: int = DEFAULT_FEWSHOT, draws: int = 3) -> Estimate:
    """Restore and ablate on ``draws`` draws: 2 × draws gradient runs of every expert, each on a draw of at most
    half the smallest pool (so the draws differ; see compare_interventions)."""
    pools = [len(d.fewshot) for e, d in session.data.items() if e in session.refs and d.fewshot]
    smallest = min(pools) if pools else int(n)
    size = max(2, min(int(n), smallest // 2)) if smallest >= 4 else smallest
    rate = rate_of("gradient")  # a pass on half the examples is not half the time: each run builds the model
    if rate is not None and rate.examples and size < rate.examples:  # first, and small batches pay fixed costs
        return Estimate("gradient", float(2 * draws * len(session.refs)),
                        Rate(rate.seconds * (0.5 + 0.5 * size / rate.examples), rate.source))
    return estimate("gradient", 2 * draws * len(session.refs), size)


def probe_estimate(session: Session) -> Estimate:
    return estimate("example", probe_examples(session))


def sweep_estimate(session: Session, steps: int) -> Estimate:
    """``steps`` merges + probes: the last sweep's pace, else the last merge's seconds plus one merged body
    through the sweep's probe examples (at most SWEEP_PROBE_ROWS per task) at the measured probe rate."""
    from .probe import SWEEP_PROBE_ROWS

    measured = rate_of("sweep")
    if measured is None:
        merged = next((float(h["seconds"]) for h in reversed(session.history) if h.get("seconds")), None)
        example = rate_of("example")
        if merged is not None and example is not None:
            probe = example.seconds * sum(min(len(d.probe), SWEEP_PROBE_ROWS) for e, d in session.data.items()
                                          if e in session.refs)
            measured = Rate(merged + probe, "the last merge and the probe rate")
    return Estimate("sweep", float(steps), measured)


SWEEP_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


def sweep_steps(session: Session, ratios=SWEEP_RATIOS) -> int:
    """Merges + probes of the drop-ratio sweep: every sweep method available to these experts × ratios."""
    from .limits import SWEEP_METHODS
    from .merge import method_available

    return sum(1 for m in SWEEP_METHODS if method_available(session, m) is None) * len(ratios)


def step_estimates(session: Session, mode: str, scope: str | None, steps: int | None = None,
                   n: int = DEFAULT_FEWSHOT) -> dict[str, str]:
    """step → the line the page shows under its button, before it is pressed (``steps``: of the sweep; ``n``:
    the few-shot examples per expert asked for)."""
    if not session.refs:
        return {k: "" for k in ("importance", "compare", "probe", "sweep")}
    what = f"{mode} importance" + (f", {scope or FULL_SCOPE}" if mode == "exact" else "")
    lines = {"importance": f"**Time** · {what}: {importance_estimate(session, mode, scope, n).text()}.",
             "compare": f"**Time** · restore and ablate on 3 draws: {compare_estimate(session, n).text()}.",
             "probe": ""}
    if session.reference is None:  # later probes reuse base and experts: only the merge is new
        lines["probe"] = f"**Time** · first probe (base, experts and the merge): {probe_estimate(session).text()}."
    steps = sweep_steps(session) if steps is None else steps
    lines["sweep"] = f"**Time** · sweep: {sweep_estimate(session, steps).text()}."
    return lines
