"""The demo zoo built in the background from server start-up, and what the page says while it builds.

Building the default zoo trains one short fine-tune per task (minutes on a CPU). The server starts it once
per process and per zoo name (:func:`start_zoo_build`), in a daemon thread, so the first visitor does not
wait for it and every tab reads the same progress (:func:`zoo_status`). ``MERGE_LAB_ZOO_BUILD=off``
turns the build off (a zoo that is already built is still opened); ``MERGE_LAB_ZOO`` names the zoo.

The page can switch to the LM demo zoo (``MERGE_LAB_LM_ZOO``, default ``lm``: a tokenizer, a pretrained
base and four experts, about 15 minutes on two shared cores). That one is never started with the server:
it is built on first use, when a tab switches to it (:func:`demo_zoos` names both, in the page's words),
with the same one progress line; its build reports no steps, so the line says how long it has run.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .limits import Progress
from .session import ensure_zoo, open_default_zoo

_STEP = re.compile(r"^(?P<task>[\w.-]+): step (?P<step>\d+)/(?P<steps>\d+)")


@dataclass(frozen=True)
class ZooStatus:
    """What the page shows about the demo zoo: ``state`` is ready / building / failed / off."""

    state: str
    line: str  # the one progress line ("expert 2 of 4 · topic · step 15/40 · about 1 min left")
    zoo: object | None = None
    expert: int = 0
    experts: int = 0
    seconds_left: float | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def not_ready_message(self) -> str:
        """Why a zoo-dependent button cannot act yet, and what to do."""
        if self.state == "building":
            where = f" (expert {self.expert} of {self.experts})" if self.experts else ""
            return f"the demo zoo is still being built{where}: try again in {_eta_words(self.seconds_left)}"
        if self.state == "failed":
            return self.line[0].lower() + self.line[1:]
        return ("the demo zoo is not built on this server: give experts as folders or paths, or build it with "
                "`python -m merging zoo build`")


def _eta_words(seconds: float | None) -> str:
    if seconds is None:
        return "a minute or two"
    if seconds < 45:
        return "a few seconds" if seconds < 15 else "less than a minute"
    if seconds < 90:
        return "about a minute"
    return f"about {round(seconds / 60)} minutes"


class ZooBuild:
    """One background build of one zoo, with its progress as the page reports it."""

    def __init__(self, name: str, build: Callable | None = None, total_experts: int | None = None):
        self.name = name
        self.kind = LM if is_lm_zoo_name(name) else CLASSIFIER
        self._build = build or (ensure_lm_zoo if self.kind == LM else ensure_zoo)
        self._total = total_experts
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.zoo = None
        self.error: str | None = None
        self._started = 0.0
        self._fraction = 0.0
        self._fraction_at = 0.0
        self._message = ""
        self._tasks: list[str] = []

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._run, name=f"zoo-build-{self.name}", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the build to end (tests); True when it did."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def _run(self) -> None:
        try:
            self.zoo = self._build(self.name, progress=self._progress)
        except Exception as exc:  # noqa: BLE001 - the page says what went wrong; the log keeps the rest
            import logging

            logging.getLogger("merge_lab.app").exception("building the demo zoo %r failed", self.name)
            self.error = str(exc)[:300] or type(exc).__name__

    def _progress(self, fraction: float, message: str) -> None:
        with self._lock:
            self._fraction, self._fraction_at, self._message = float(fraction), time.monotonic(), message
            found = _STEP.match(message or "")
            if found and found["task"] not in self._tasks:
                self._tasks.append(found["task"])

    def status(self) -> ZooStatus:
        if self.zoo is not None:
            return ready_status(self.zoo)
        if self.error is not None:
            return ZooStatus("failed", f"The demo zoo '{self.name}' could not be built ({self.error}): give "
                             "experts as folders or paths; the server log has the details.")
        if self.kind == LM and not self._message:
            return self._lm_status()
        with self._lock:
            fraction, message, tasks = self._fraction, self._message, list(self._tasks)
            elapsed = (self._fraction_at or time.monotonic()) - self._started
        order = _default_tasks() if self.kind == CLASSIFIER else lm_zoo_tasks(self.name)
        total = self._total or len(order)
        found = _STEP.match(message or "")
        if found and found["task"] in order:  # its place in the zoo (experts an earlier build finished are skipped)
            index = order.index(found["task"]) + 1
        else:
            index = (tasks.index(found["task"]) + 1) if found else max(1, len(tasks))
        parts = [f"expert {index} of {total}" if total else f"expert {index}"]
        if found:
            parts += [found["task"], f"step {found['step']}/{found['steps']}"]
        left = None
        if fraction > 0.01 and elapsed > 0:  # from the measured rate (training steps dominate)
            left = elapsed * (1.0 - fraction) / fraction
            parts.append(f"{_eta_words(left)} left")
        else:
            parts.append("starting…")
        line = (f"**Building the demo zoo '{self.name}'** (once per server, one short fine-tune per task; "
                f"the zoo buttons wait for it): {' · '.join(parts)}")
        return ZooStatus("building", line, expert=index, experts=total or 0, seconds_left=left)

    def _lm_status(self) -> ZooStatus:
        """The LM build reports no steps: its line says how long it has run against the measured build time."""
        elapsed = time.monotonic() - self._started
        left = max(LM_BUILD_SECONDS - elapsed, 30.0)
        tasks = lm_zoo_tasks(self.name)
        line = (f"**Building the LM demo zoo '{self.name}'** (on first use, once per server: a tokenizer, a base "
                f"pretrained on fortunes and {len(tasks)} experts; the zoo buttons wait for it): running for "
                f"{_minutes(elapsed)} · {_eta_words(left)} left (a build measured about "
                f"{round(LM_BUILD_SECONDS / 60)} min on two shared cores)")
        return ZooStatus("building", line, seconds_left=left)  # no "expert i of N": the build does not say


CLASSIFIER, LM = "classifier", "causal_lm"
LM_BUILD_SECONDS = 15 * 60  # measured: 15.6 min wall at load 6-7 on 2 cores (README, "The LM demo zoo")


def _minutes(seconds: float) -> str:
    return f"{int(seconds)} s" if seconds < 90 else f"{round(seconds / 60)} min"


def lm_zoo_name() -> str:
    """The LM demo zoo the page switches to: ``MERGE_LAB_LM_ZOO`` or ``lm``."""
    return os.environ.get("MERGE_LAB_LM_ZOO") or "lm"


def is_lm_zoo_name(name: str) -> bool:
    """Whether ``name`` is an LM demo zoo (the page's LM zoo, or one ``tasks.yaml`` describes)."""
    if name == lm_zoo_name():
        return True
    try:
        from ..zoo.lm_zoo import lm_zoo_names

        return name in lm_zoo_names()
    except Exception:  # noqa: BLE001 - a broken manifest makes it a classifier zoo name, said when it is opened
        return False


def lm_zoo_tasks(name: str) -> list[str]:
    """The experts of LM zoo ``name``, for the progress line and the switch: the built zoo's own (a zoo built
    by hand or by a test has its own experts), else those a build would make (its ``tasks.yaml`` entry)."""
    from ..zoo.zoo import recorded_tasks

    built = recorded_tasks(name)
    if built is not None:
        return built
    try:
        from ..zoo.lm_zoo import lm_zoo_spec

        return list(lm_zoo_spec(name)["experts"])
    except Exception:  # noqa: BLE001 - an unreadable tasks.yaml: the count is unknown (said when it is built)
        return []


def ensure_lm_zoo(name: str, progress: Progress | None = None):
    """Open LM zoo ``name``, building it first (about 15 minutes on a CPU) if it is missing."""
    zoo = open_default_zoo(name)
    if zoo is not None:
        return zoo
    from ..zoo.lm_zoo import build_lm_zoo

    return build_lm_zoo(name)


def demo_zoos() -> list[tuple[str, str]]:
    """(label, zoo name) of the page's two demo zoos: the classifier zoo first (the default at start-up),
    then the LM zoo, each label counting its experts (the built zoo's own, else those its build makes)."""
    from ..zoo.zoo import recorded_tasks

    classifier = _zoo_name(None)
    n_tasks = len(recorded_tasks(classifier) or _default_tasks())
    n_lm = len(lm_zoo_tasks(lm_zoo_name()))
    return [(f"classifiers ({n_tasks} tasks)" if n_tasks else "classifiers", classifier),
            (f"language models ({n_lm} experts)" if n_lm else "language models", lm_zoo_name())]


def _default_tasks() -> list[str]:
    try:
        from ..zoo.tasks import default_task_names

        return default_task_names()
    except Exception:  # noqa: BLE001 - only the progress line's "expert i of N" needs it
        return []


def ready_status(zoo) -> ZooStatus:
    from .views import base_model_name

    line = (f"Demo zoo **{zoo.name}** is ready: {len(zoo.tasks)} experts ({', '.join(zoo.tasks)}) "
            f"fine-tuned from the base model `{base_model_name(zoo.base_path)}`.")
    return ZooStatus("ready", line, zoo=zoo)


_BUILDS: dict[str, ZooBuild] = {}
_BUILDS_LOCK = threading.Lock()
BUILDER: Callable | None = None  # what builds a zoo (None: ensure_zoo); tests put a slowed one here


def build_enabled() -> bool:
    return os.environ.get("MERGE_LAB_ZOO_BUILD", "on").strip().lower() not in ("0", "off", "false", "no")


def _zoo_name(name: str | None) -> str:
    from ..zoo.zoo import default_zoo_name

    return name or default_zoo_name()


def start_zoo_build(name: str | None = None) -> ZooBuild | None:
    """Start building zoo ``name`` (default: MERGE_LAB_ZOO or ``default``) in the background, once per process;
    None when building is turned off. A zoo already built is opened at once, without a thread."""
    name = _zoo_name(name)
    with _BUILDS_LOCK:
        build = _BUILDS.get(name)
        if build is not None:
            return build
        zoo = open_default_zoo(name)
        if zoo is None and not build_enabled():
            return None
        build = _BUILDS[name] = ZooBuild(name, BUILDER)
        if zoo is not None:
            build.zoo = zoo
            if build_enabled() and zoo.kind == "classifier":  # a zoo built before it wrote reference rows
                threading.Thread(target=_reference_rows, args=(zoo,), name=f"zoo-reference-{name}",
                                 daemon=True).start()
            return build
    build.start()
    return build


def _reference_rows(zoo) -> None:
    """Write the zoo's probe reference rows if it has none yet (read at once when it has)."""
    try:
        from ..zoo.probe import write_zoo_reference

        write_zoo_reference(zoo)
    except Exception:  # noqa: BLE001 - only a first probe's speed depends on it; it computes them itself
        import logging

        logging.getLogger("merge_lab.app").exception("writing the probe reference rows of zoo %r failed", zoo.name)


def zoo_status(name: str | None = None) -> ZooStatus:
    """Where the demo zoo stands, in the page's words (starts the build if the server did not)."""
    name = _zoo_name(name)
    build = _BUILDS.get(name) or start_zoo_build(name)
    if build is None:
        zoo = open_default_zoo(name)
        return ready_status(zoo) if zoo is not None else ZooStatus(
            "off", f"The demo zoo '{name}' is not built on this server: give experts as folders or paths.")
    return build.status()


def forget_zoo_builds() -> None:
    """Drop the record of started builds (tests; running threads finish on their own)."""
    with _BUILDS_LOCK:
        _BUILDS.clear()
