"""The app's session logic, free of any UI toolkit: what each button of the page does.

A :class:`Session` is the small, per-browser-tab state (which experts, their task data, the
importance map, APL's calibration, the per-layer plan with the user's overrides, the merge
history). Heavy objects — the :class:`ExpertSet`, its :class:`MergeEngine`, the prober, the
last merged tensors — live in a bounded process-wide cache keyed by the expert selection
(:func:`models_for`), so two tabs that pick the same experts share them and a tab never
holds model weights itself.

Every user-facing failure is a :class:`MergeLabError` with a plain-language message.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import MergeLabError

Progress = Callable[[float, str], None]

DROP, WEIGHT = "drop_ratio", "weight"
PER_LAYER_KEYS = (DROP, WEIGHT)
DEFAULT_FEWSHOT = 32
MAX_PROBE_ROWS = 200
EXPORT_MAX_AGE = 3600.0  # seconds an export zip is kept
SWEEP_METHODS = ("apl", "dare_linear", "magnitude")


def _noop(fraction: float, message: str) -> None:  # a progress sink that ignores everything
    return None


# ============================================================================ heavy-object cache


@dataclass
class Models:
    """Everything heavy for one expert selection, shared by every session that picked it."""

    key: str
    expert_set: Any
    engine: Any
    lock: threading.RLock = field(default_factory=threading.RLock)
    stats: Any = None  # TaskVectorStats (computed on first use)
    support: Any = None  # calibration.DeltaSupport
    tokenizer: Any = None
    prober: Any = None
    prober_key: str | None = None
    predictor: Any = None  # a base-architecture model for "try a sentence"
    merged: "OrderedDict[str, Any]" = field(default_factory=OrderedDict)  # session id → MergeResult


class ModelCache:
    """A small LRU of :class:`Models` (experts are ~100 MB each, so a few entries at most)."""

    def __init__(self, max_entries: int | None = None):
        self.max_entries = max_entries or int(os.environ.get("MERGE_LAB_APP_CACHE_ENTRIES", "2"))
        self._items: "OrderedDict[str, Models]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Models | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, item: Models) -> Models:
        with self._lock:
            self._items[item.key] = item
            self._items.move_to_end(item.key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
            return item

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


CACHE = ModelCache()
MAX_MERGES_KEPT = 4  # merged bodies kept per selection (one per recent session)


def selection_key(base_ref: str, refs: Mapping[str, str]) -> str:
    return json.dumps({"base": str(base_ref), "experts": sorted((k, str(v)) for k, v in refs.items())})


# ============================================================================ session state


@dataclass
class TaskData:
    """Few-shot and probe examples of one expert's task."""

    fewshot: list[tuple[str, int]]
    probe: list[tuple[str, int]]
    labels: list[str]
    source: str  # "zoo", "folder" or the uploaded file's name


@dataclass
class Session:
    """Per-tab state: small, picklable, no tensors."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    base_ref: str | None = None
    refs: dict[str, str] = field(default_factory=dict)  # expert name → model ref
    tasks: dict[str, str | None] = field(default_factory=dict)  # expert → zoo task it came from
    folders: dict[str, str | None] = field(default_factory=dict)  # expert → its HF folder (probe heads)
    data: dict[str, TaskData] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    summary: list[list] = field(default_factory=list)
    importance: Any = None  # ImportanceMap
    importance_runs: dict[str, Any] = field(default_factory=dict)  # "gradient/restore" → ImportanceMap
    fewshot_n: int = DEFAULT_FEWSHOT
    calibration: Any = None  # CalibrationTable
    apl_params: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # expert → key → layer → v
    method: str = "apl"
    shared: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    last_recipe: Any = None
    last_label: str | None = None
    merges: int = 0
    history: list[dict] = field(default_factory=list)
    reference: Any = None  # ProbeReport of base and experts

    @property
    def key(self) -> str:
        return selection_key(self.base_ref or "", self.refs)

    @property
    def experts(self) -> list[str]:
        return list(self.refs)

    def missing_data(self) -> list[str]:
        return [e for e in self.refs if e not in self.data]


# ============================================================================ zoo


def open_default_zoo(name: str | None = None):
    """The configured zoo, or None if it is not built yet."""
    from .zoo import default_zoo_name, open_zoo

    try:
        return open_zoo(name or default_zoo_name())
    except MergeLabError:
        return None


def ensure_zoo(name: str | None = None, progress: Progress | None = None):
    """Open the zoo, building it first (minutes: one short fine-tune per task) if it is missing."""
    from .zoo import build_zoo, default_zoo_name

    name = name or default_zoo_name()
    zoo = open_default_zoo(name)
    if zoo is not None:
        return zoo
    return build_zoo(name, progress=progress)


def zoo_refs(zoo, tasks: Sequence[str] | None = None) -> tuple[str, dict[str, str]]:
    tasks = list(tasks if tasks is not None else zoo.tasks)
    return f"zoo:{zoo.name}/base", {t: f"zoo:{zoo.name}/{t}" for t in tasks}


# ============================================================================ experts


def parse_extra_refs(text: str | None) -> dict[str, str]:
    """``name=ref`` or bare ``ref`` lines → {name: ref} (names derived from the ref's last part)."""
    out: dict[str, str] = {}
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line and not line.startswith(("/", ".", "hf:", "zoo:")):
            name, _, ref = line.partition("=")
            name, ref = name.strip(), ref.strip()
        else:
            ref = line
            name = Path(ref.split("@")[0].rstrip("/")).stem or ref
        if not name or not ref:
            raise MergeLabError(f"cannot read expert line {raw!r}: write one per line as name=path or just a path")
        out[name] = ref
    return out


def models_for(session: Session, progress: Progress | None = None) -> Models:
    """The heavy objects of the session's selection (loaded once, shared, bounded)."""
    if not session.refs:
        raise MergeLabError("no experts loaded yet: pick experts and press Load experts")
    key = session.key
    item = CACHE.get(key)
    if item is not None:
        return item
    from .engine import MergeEngine
    from .experts import ExpertSet

    (progress or _noop)(0.05, "checking the experts against the base (homology check)")
    expert_set = ExpertSet.load(session.base_ref, dict(session.refs))
    return CACHE.put(Models(key, expert_set, MergeEngine(expert_set)))


def load_experts(session: Session, base_ref: str, refs: Mapping[str, str], zoo=None,
                 progress: Progress | None = None) -> Session:
    """Run the homology check and open the experts; returns a fresh session for this selection."""
    progress = progress or _noop
    refs = {str(k): str(v) for k, v in refs.items() if str(v).strip()}
    if not base_ref:
        raise MergeLabError("pick a base model (the model every expert was fine-tuned from)")
    if len(refs) < 2:
        raise MergeLabError(f"pick at least two experts to merge (got {len(refs)})")
    new = Session(id=session.id if session else uuid.uuid4().hex[:12], base_ref=str(base_ref), refs=dict(refs))
    models = models_for(new, progress)
    expert_set = models.expert_set
    new.refs = {name: refs.get(name, expert_set.experts[name].source.ref) for name in expert_set.experts}
    new.layers = list(expert_set.layout.layers)
    progress(0.5, "measuring task vectors (delta norms, sign conflicts, cosines)")
    stats = task_vector_stats(models)
    for name, expert in expert_set.experts.items():
        ref = new.refs[name]
        task = ref.split("/", 1)[1] if ref.startswith("zoo:") and zoo is not None and ref.split("/", 1)[1] in zoo.experts \
            else None
        new.tasks[name] = task
        root = getattr(expert.source, "root", None)
        new.folders[name] = str(root) if root is not None and Path(root).is_dir() else None
        data = _task_data_for(zoo, task, root)
        if data is not None:
            new.data[name] = data
    new.summary = expert_rows(new, models, stats)
    progress(1.0, "experts loaded")
    return new


def _task_data_for(zoo, task: str | None, root) -> TaskData | None:
    if zoo is not None and task is not None:
        try:
            labels = zoo.label_names(task)
        except (MergeLabError, KeyError, OSError, ValueError):
            labels = []
        return TaskData(list(zoo.fewshot(task)), list(zoo.probe(task))[:MAX_PROBE_ROWS], labels, "zoo")
    if root is not None and Path(root).is_dir():  # a folder laid out like a zoo expert carries its data
        folder = Path(root)
        few, probe = folder / "fewshot.jsonl", folder / "probe.jsonl"
        if few.is_file():
            from .training import read_examples

            labels: list[str] = []
            task_file = folder / "merge_lab_task.json"
            if task_file.is_file():
                try:
                    labels = list(json.loads(task_file.read_text(encoding="utf-8")).get("label_names", []))
                except (OSError, ValueError):
                    labels = []
            probe_rows = read_examples(probe)[:MAX_PROBE_ROWS] if probe.is_file() else []
            return TaskData(read_examples(few), probe_rows, labels, "folder")
    return None


def head_size(models: Models, expert: str) -> int | None:
    """Number of classes of an expert's task head (None if it has no classifier head)."""
    expert_obj = models.expert_set.experts[expert]
    for name in expert_obj.head_names:
        if name.endswith("weight"):
            shape = expert_obj.source.tensors[name].shape
            return int(shape[0])
    return None


def attach_task_data(session: Session, expert: str, path: str | os.PathLike, n_fewshot: int | None = None) -> Session:
    """Attach a user's CSV/JSONL (text, label) file to an expert that has no task data."""
    from .tasks import load_user_task, split_task

    if expert not in session.refs:
        raise MergeLabError(f"no expert named '{expert}' is loaded (experts: {', '.join(session.refs) or 'none'})")
    task = load_user_task(path, name=expert)
    models = models_for(session)
    classes = head_size(models, expert)
    if classes is not None and classes != len(task.label_names):
        raise MergeLabError(f"{Path(path).name} has {len(task.label_names)} labels ({', '.join(task.label_names)}) "
                            f"but expert '{expert}' has a {classes}-class head: give the file of its own task")
    n_few = int(n_fewshot or session.fewshot_n)
    total = len(task.examples())
    n_few = max(1, min(n_few, total // 2))
    split = split_task(task, seed=session.seed, n_fewshot=n_few, n_probe=min(MAX_PROBE_ROWS, total - n_few), n_train=0)
    session.data[expert] = TaskData(list(split.fewshot_examples), list(split.probe_examples), list(task.label_names),
                                    Path(path).name)
    return session


def data_status(session: Session) -> str:
    """Markdown: which experts have task data, and what is unavailable without it."""
    if not session.refs:
        return "No experts loaded yet."
    lines = []
    for name in session.refs:
        data = session.data.get(name)
        if data is not None:
            lines.append(f"- **{name}**: {len(data.fewshot)} few-shot + {len(data.probe)} probe examples "
                         f"({data.source})")
        else:
            lines.append(f"- **{name}**: no task data — APL, Fisher and the probe are unavailable for it until you "
                         "attach a CSV/JSONL file with `text` and `label` columns")
    return "\n".join(lines)


def task_vector_stats(models: Models):
    with models.lock:
        if models.stats is None:
            from .task_vectors import TaskVectors

            models.stats = TaskVectors(models.expert_set, cache=False).stats()
        return models.stats


def expert_rows(session: Session, models: Models, stats) -> list[list]:
    """The experts table: name, task, parameters, delta norm, task data."""
    rows = []
    for name in models.expert_set.experts:
        data = session.data.get(name)
        rows.append([name, session.tasks.get(name) or (data.source if data else "—"),
                     f"{stats.parameters.get(name, 0) / 1e6:.2f} M", round(stats.model_norm(name), 4),
                     f"{len(data.fewshot)} few-shot" if data else "none: attach a file"])
    return rows


EXPERT_HEADERS = ["expert", "task", "parameters", "delta norm", "task data"]


# ============================================================================ importance


def tokenizer_for(models: Models):
    with models.lock:
        if models.tokenizer is None:
            from transformers import AutoTokenizer

            sources = [models.expert_set.base, *(e.source for e in models.expert_set.experts.values())]
            for source in sources:
                root = getattr(source, "root", None)
                if root is not None and source.has_tokenizer():
                    models.tokenizer = AutoTokenizer.from_pretrained(str(root))
                    break
            else:
                raise MergeLabError("no tokenizer found in the base or the experts: importance, Fisher and the "
                                    "probe need one (add tokenizer files to the base folder)")
        return models.tokenizer


def compute_importance(session: Session, n_fewshot: int = DEFAULT_FEWSHOT, mode: str = "gradient",
                       intervention: str = "restore", level: str = "all", sample: int | None = None,
                       progress: Progress | None = None) -> Session:
    """APL importance of every expert on its own few-shot data, then APL's calibration."""
    from .importance import compute_importance as _compute
    from .importance import draw_fewshot

    progress = progress or _noop
    missing = session.missing_data()
    if missing:
        raise MergeLabError(f"expert(s) {', '.join(missing)} have no task data: importance needs a few labelled "
                            "examples of every expert's task — attach a CSV/JSONL file to each")
    models = models_for(session)
    tokenizer = tokenizer_for(models)
    examples, indices = {}, {}
    for name in session.refs:
        examples[name], indices[name] = draw_fewshot(session.data[name].fewshot, int(n_fewshot), session.seed)
    levels = ["model", "layer", "module", "hidden"] if level == "all" else [level] if isinstance(level, str) else level
    if mode == "exact" and level == "all":  # one forward pass per unit is far too slow for a page: no units
        levels = ["model", "layer", "module"]
    with models.lock:
        result = _compute(models.expert_set, examples, tokenizer, mode=mode, level=levels, intervention=intervention,
                          sample=sample if mode == "exact" else None, seed=session.seed, progress=progress,
                          fewshot_indices=indices)
    session.importance = result
    session.importance_runs[f"{mode}/{intervention}"] = result
    session.fewshot_n = int(n_fewshot)
    recalibrate(session, **(session.apl_params or {}))
    return session


def recalibrate(session: Session, drop_ratio: float = 0.5, tau1: float = 2.0, tau2: float = 2.0,
                q_min: float = 0.01, within_layer: str = "uniform") -> Session:
    """APL's suggested drop ratio and weight per expert × layer from the current importance."""
    from .calibration import DeltaSupport, calibrate

    if session.importance is None:
        return session
    models = models_for(session)
    with models.lock:
        if models.support is None:
            models.support = DeltaSupport.of(models.expert_set)
    session.apl_params = {"drop_ratio": float(drop_ratio), "tau1": float(tau1), "tau2": float(tau2),
                          "q_min": float(q_min), "within_layer": within_layer}
    session.calibration = calibrate(session.importance, models.expert_set, support=models.support,
                                    **session.apl_params)
    return session


# ============================================================================ per-layer plan


def suggestion(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None
               ) -> dict[str, dict[str, dict[str, float]]]:
    """The per-layer values before overrides: APL's calibration for ``apl``, uniform globals otherwise."""
    method = method or session.method
    shared = dict(shared if shared is not None else session.shared)
    if method == "apl" and session.calibration is not None:
        table = session.calibration
        return {e: {DROP: dict(table.drop[e]), WEIGHT: dict(table.weight[e])} for e in session.refs}
    drop = float(shared.get(DROP, 0.5))
    weight = float(shared.get(WEIGHT, 1.0))
    return {e: {DROP: {k: drop for k in session.layers}, WEIGHT: {k: weight for k in session.layers}}
            for e in session.refs}


def plan(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None
         ) -> dict[str, dict[str, dict[str, float]]]:
    """Effective per-layer drop ratio and weight of every expert (suggestion + overrides)."""
    out = suggestion(session, method, shared)
    for expert, keys in session.overrides.items():
        for key, layers in keys.items():
            for layer, value in layers.items():
                if expert in out and layer in out[expert][key]:
                    out[expert][key][layer] = float(value)
    return out


def set_cell(session: Session, expert: str, layer: str, key: str, value: float) -> Session:
    """Override one expert × layer value (what a slider or a table edit does)."""
    if expert not in session.refs:
        raise MergeLabError(f"no expert named '{expert}' is loaded")
    if layer not in session.layers:
        raise MergeLabError(f"layer '{layer}' does not exist (layers: {', '.join(session.layers)})")
    if key not in PER_LAYER_KEYS:
        raise MergeLabError(f"per-layer value must be drop_ratio or weight, got {key!r}")
    value = float(value)
    if key == DROP and not 0.0 <= value < 1.0:
        raise MergeLabError(f"a drop ratio must lie in [0, 1), got {value}")
    session.overrides.setdefault(expert, {}).setdefault(key, {})[layer] = value
    return session


def is_overridden(session: Session, expert: str, key: str, layer: str) -> bool:
    return layer in session.overrides.get(expert, {}).get(key, {})


def override_list(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None) -> list[dict]:
    sugg = suggestion(session, method, shared)
    out = []
    for expert, keys in session.overrides.items():
        for key, layers in keys.items():
            for layer, value in layers.items():
                suggested = sugg.get(expert, {}).get(key, {}).get(layer)
                out.append({"expert": expert, "key": key, "layer": layer, "value": value, "suggested": suggested})
    return out


def reset_overrides(session: Session) -> Session:
    """Back to the suggestion (APL's calibration when importance exists)."""
    session.overrides = {}
    return session


def preset_uniform(session: Session, drop_ratio: float = 0.5, weight: float = 1.0) -> Session:
    """Every cell: the same drop ratio and weight (DARE-like for APL)."""
    session.overrides = {e: {DROP: {k: float(drop_ratio) for k in session.layers},
                             WEIGHT: {k: float(weight) for k in session.layers}} for e in session.refs}
    return session


def layer_swap_groups(layers: Sequence[str]) -> tuple[list[str], list[str]]:
    """(outer, middle) layers for a layer swap: the bottom and top third of the blocks (plus embeddings
    and head) are outer, the rest middle."""
    blocks = [k for k in layers if k not in ("embeddings", "head")]
    n = len(blocks)
    edge = max(1, n // 3) if n >= 3 else 1 if n == 2 else 0
    outer_blocks = set(blocks[:edge]) | set(blocks[n - edge:]) if edge else set()
    if n and len(outer_blocks) == n:  # keep at least one middle block
        outer_blocks.discard(blocks[n // 2])
    outer = [k for k in layers if k in ("embeddings", "head") or k in outer_blocks]
    middle = [k for k in layers if k not in outer]
    return outer, middle


def preset_layer_swap(session: Session, outer: str | None = None, middle: str | None = None) -> Session:
    """Layer swapping (Bandarkar et al. 2024): bottom and top layers from one expert, middle from another
    (weight 1 for the chosen expert, 0 for the others, no dropping)."""
    experts = session.experts
    if len(experts) < 2:
        raise MergeLabError("layer swap needs two experts")
    outer = outer if outer in experts else experts[0]
    middle = middle if middle in experts and middle != outer else next(e for e in experts if e != outer)
    outer_layers, middle_layers = layer_swap_groups(session.layers)
    session.overrides = {}
    for expert in experts:
        for layer in session.layers:
            owner = outer if layer in outer_layers else middle
            set_cell(session, expert, layer, WEIGHT, 1.0 if expert == owner else 0.0)
            set_cell(session, expert, layer, DROP, 0.0)
    return session


def table_rows(session: Session, key: str, method: str | None = None, shared: Mapping[str, Any] | None = None
               ) -> tuple[list[str], list[list]]:
    """Expert × layer table of one per-layer value (effective values)."""
    values = plan(session, method, shared)
    headers = ["expert", *session.layers]
    return headers, [[e, *(round(values[e][key][k], 4) for k in session.layers)] for e in session.refs]


def apply_table(session: Session, key: str, rows: Sequence[Sequence[Any]], method: str | None = None,
                shared: Mapping[str, Any] | None = None) -> Session:
    """Record every cell of an edited table that differs from the effective value as an override."""
    current = plan(session, method, shared)
    for row in rows:
        if not row:
            continue
        expert = str(row[0])
        if expert not in session.refs:
            continue
        for layer, cell in zip(session.layers, list(row[1:])):
            try:
                value = float(cell)
            except (TypeError, ValueError):
                raise MergeLabError(f"table cell {expert}/{layer} must be a number, got {cell!r}") from None
            if not math.isclose(value, current[expert][key][layer], abs_tol=5e-5):
                set_cell(session, expert, layer, key, value)
    return session


# ============================================================================ merge


def method_spec(method: str):
    from .methods import get_method

    return get_method(method)


def method_available(session: Session, method: str) -> str | None:
    """Why a method cannot run for this session (None if it can)."""
    spec = method_spec(method)
    needs = set(spec.needs)
    n = len(session.refs)
    if n and n < spec.min_experts or spec.max_experts is not None and n > spec.max_experts:
        return f"{spec.pretty_name} merges {spec.min_experts}–{spec.max_experts or 'any'} experts; {n} are loaded"
    if "few_shot" in needs and session.missing_data():
        return (f"{spec.pretty_name} needs few-shot task data for every expert; missing for "
                f"{', '.join(session.missing_data())}")
    if "importance" in needs and session.importance is None:
        return f"{spec.pretty_name} needs importance: press Compute importance first"
    return None


def clean_shared(method: str, shared: Mapping[str, Any]) -> dict[str, Any]:
    """Only the method's declared parameters, typed (ints as ints), without per-layer weight."""
    spec = method_spec(method)
    out = {}
    for p in spec.params:
        if p.name == WEIGHT or p.name not in shared or shared[p.name] is None:
            continue
        value = shared[p.name]
        if p.kind == "int":
            value = int(value)
        elif p.kind == "float":
            value = float(value)
        elif p.kind == "bool":
            value = bool(value)
        out[p.name] = value
    return out


def expert_parameters(session: Session, method: str, shared: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-expert layer maps for the method's declared drop_ratio / weight (only what differs from the
    shared value, except for APL whose per-layer values are the whole point)."""
    spec = method_spec(method)
    declared = {p.name for p in spec.params}
    values = plan(session, method, shared)
    out: dict[str, dict[str, Any]] = {}
    for expert in session.refs:
        params: dict[str, Any] = {}
        for key in PER_LAYER_KEYS:
            if key not in declared:
                continue
            default = float(shared.get(key, spec.param(key).default))
            layer_map = {k: float(v) for k, v in values[expert][key].items()}
            if method == "apl" or any(not math.isclose(v, default, abs_tol=1e-12) for v in layer_map.values()):
                params[key] = layer_map
        if params:
            out[expert] = params
    return out


def build_recipe(session: Session, method: str, shared: Mapping[str, Any], seed: int = 0, dtype: str = "float32"):
    """The recipe of the merge the page describes (what Export writes and the CLI replays)."""
    from .recipe import ExpertRef, Recipe

    shared_clean = clean_shared(method, shared)
    if method == "apl" and session.calibration is not None:
        shared_clean.setdefault(DROP, session.apl_params.get(DROP, 0.5))
    per_expert = expert_parameters(session, method, shared)
    experts = [ExpertRef(name, ref, per_expert.get(name, {})) for name, ref in session.refs.items()]
    suggested: dict[str, Any] = {}
    if session.calibration is not None:
        suggested["apl"] = {"settings": dict(session.calibration.settings),
                            "drop_ratio": session.calibration.drop, "weight": session.calibration.weight}
    overrides = override_list(session, method, shared)
    if overrides:
        suggested["overrides"] = overrides
    few_shot = {}
    if session.importance is not None:
        few_shot = {e: {"n": len(ix), "seed": session.seed, "indices": list(ix)}
                    for e, ix in session.importance.fewshot.items()}
    return Recipe(method=method, base=str(session.base_ref), experts=experts, parameters=shared_clean, seed=int(seed),
                  dtype=dtype, suggested=suggested, few_shot=few_shot, notes="made with the Merge Lab app")


def build_settings(session: Session, method: str, shared: Mapping[str, Any], seed: int = 0,
                   progress: Progress | None = None):
    """Engine settings for the page's values (data-aware methods get their inputs prepared)."""
    from .engine import MergeSettings

    why = method_available(session, method)
    if why:
        raise MergeLabError(why)
    models = models_for(session)
    recipe = build_recipe(session, method, shared, seed)
    spec = method_spec(method)
    extras: dict[str, Any] = {}
    expert_params = recipe.expert_params()
    if method == "apl" and session.calibration is not None:
        extras.update(session.calibration.extras() or {})
    elif spec.prepare is not None:
        examples = {e: session.data[e].fewshot[: session.fewshot_n] for e in session.refs}
        prepared = spec.prepare(models.expert_set, examples, tokenizer_for(models), params=recipe.parameters,
                                progress=progress)
        extras.update(prepared.get("extras", {}))
        for name, values in prepared.get("expert_params", {}).items():
            expert_params[name] = {**values, **expert_params.get(name, {})}
    settings = MergeSettings.build(models.expert_set, spec, recipe.parameters, expert_params, int(seed), extras)
    return settings, recipe


@dataclass
class MergeSummary:
    label: str
    method: str
    seconds: float
    recomputed: int
    changed_layers: list[str]
    settings: str


def key_settings(recipe, session: Session) -> str:
    """A one-line description of a merge for the history."""
    parts = [f"{k}={_short(v)}" for k, v in recipe.parameters.items()]
    n_over = len(override_list(session, recipe.method, recipe.parameters))
    if n_over:
        parts.append(f"{n_over} override(s)")
    return ", ".join(parts) or "defaults"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "per-layer"
    return str(value)


def merge(session: Session, method: str, shared: Mapping[str, Any], seed: int = 0,
          progress: Progress | None = None) -> MergeSummary:
    """Merge with the page's settings; keeps the merged body in the shared cache for probe and export."""
    progress = progress or _noop
    models = models_for(session)
    settings, recipe = build_settings(session, method, shared, seed, progress)
    with models.lock:
        result = models.engine.merge(settings, progress)
        models.merged[session.id] = result
        models.merged.move_to_end(session.id)
        while len(models.merged) > MAX_MERGES_KEPT:
            models.merged.popitem(last=False)
    session.method, session.shared, session.seed = method, dict(shared), int(seed)
    session.merges += 1
    label = f"#{session.merges} {method}"
    session.last_recipe, session.last_label = recipe, label
    summary = MergeSummary(label, method, result.seconds, len(result.recomputed), list(result.changed_layers),
                           key_settings(recipe, session))
    session.history.append({"label": label, "method": method, "settings": summary.settings, "metrics": None,
                            "seconds": round(result.seconds, 3)})
    return summary


def merged_tensors(session: Session) -> dict[str, torch.Tensor]:
    models = models_for(session)
    result = models.merged.get(session.id)
    if result is None:
        raise MergeLabError("no merge yet in this session (or it was evicted): press Merge first")
    return result.tensors


# ============================================================================ probe


def _probe_zoo(session: Session, models: Models):
    """A zoo-like view (name, root, base_path, experts) of the session's experts that have folders and data."""
    from types import SimpleNamespace

    base_root = getattr(models.expert_set.base, "root", None)
    if base_root is None or not Path(base_root).is_dir():
        raise MergeLabError("the probe needs the base as a model folder (config.json + model.safetensors)")
    experts, unavailable = {}, []
    for name in session.refs:
        folder = session.folders.get(name)
        if folder and (Path(folder) / "model.safetensors").is_file() and name in session.data \
                and session.data[name].probe:
            experts[name] = Path(folder)
        else:
            unavailable.append(name)
    if not experts:
        raise MergeLabError("no expert can be probed: the probe needs each expert as a folder with "
                            "model.safetensors and a classifier head, plus task data")
    root = Path(tempfile.gettempdir()) / "merge-lab-probe"
    root.mkdir(exist_ok=True)
    view = SimpleNamespace(name="session", root=root, base_path=Path(base_root), experts=experts,
                           tasks=list(experts))
    return view, unavailable


def prober_for(session: Session, models: Models):
    from .probe import Prober

    view, unavailable = _probe_zoo(session, models)
    key = json.dumps(sorted(view.experts)) + str(session.fewshot_n)
    with models.lock:
        if models.prober is None or models.prober_key != key:
            sets = {t: list(session.data[t].probe) for t in view.experts}
            models.prober = Prober(view, tasks=list(view.experts), probe_sets=sets)
            models.prober_key = key
    return models.prober, unavailable


def run_probe(session: Session, progress: Progress | None = None):
    """Probe base, experts and the latest merge; returns the report with every merge of the session."""
    from .probe import ProbeReport

    progress = progress or _noop
    models = models_for(session)
    body = merged_tensors(session)
    prober, unavailable = prober_for(session, models)
    progress(0.1, "base and experts (computed once, then cached)")
    with models.lock:
        reference = prober.reference()
        progress(0.6, "the merged model")
        row = prober.probe_body(body, name=session.last_label or "merged")
    session.reference = reference
    if session.history:
        session.history[-1]["metrics"] = row.metrics
    report = ProbeReport(tasks=list(reference.tasks), rows=list(reference.rows), meta=dict(reference.meta))
    for item in session.history:
        if item.get("metrics"):
            report.add(type(row)(name=item["label"], metrics=item["metrics"]))
    report.meta["unavailable"] = unavailable
    progress(1.0, "probe done")
    return report


def history_rows(session: Session) -> tuple[list[str], list[list]]:
    headers = ["merge", "method", "settings", "mean accuracy", "seconds"]
    rows = []
    for item in session.history:
        metrics = item.get("metrics") or {}
        accs = [m.get("accuracy") for m in metrics.values() if m.get("accuracy") is not None]
        rows.append([item["label"], item["method"], item["settings"],
                     round(sum(accs) / len(accs), 4) if accs else None, item.get("seconds")])
    return headers, rows


def drop_sweep(session: Session, ratios: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
               methods: Sequence[str] = SWEEP_METHODS, progress: Progress | None = None) -> dict[str, list[float]]:
    """Mean probe accuracy vs drop ratio for a few sparsifying methods (no overrides; APL recalibrated)."""
    progress = progress or _noop
    models = models_for(session)
    prober, _ = prober_for(session, models)
    methods = [m for m in methods if method_available(session, m) is None]
    out: dict[str, list[float]] = {}
    saved = (session.overrides, session.calibration, dict(session.apl_params))
    total = max(1, len(methods) * len(ratios))
    done = 0
    from .engine import MergeEngine

    engine = MergeEngine(models.expert_set, cache=False)
    try:
        session.overrides = {}
        for method in methods:
            out[method] = []
            for ratio in ratios:
                progress(done / total, f"{method} at drop ratio {ratio}")
                shared = {DROP: float(ratio)}
                if method == "apl":
                    recalibrate(session, **{**saved[2], DROP: float(ratio)})
                settings, _ = build_settings(session, method, shared, session.seed)
                with models.lock:
                    result = engine.merge(settings)
                    row = prober.probe_body(result.tensors, name=f"sweep {method} {ratio}")
                out[method].append(row.mean("accuracy"))
                done += 1
    finally:
        session.overrides, session.calibration, session.apl_params = saved
    progress(1.0, "sweep done")
    return out


# ============================================================================ try a sentence


def predict(session: Session, text: str, expert: str | None = None) -> list[list]:
    """Rows (task, model, predicted label, confidence) for base, the task's expert and the merge."""
    from transformers import AutoModel

    text = (text or "").strip()
    if not text:
        raise MergeLabError("type a sentence first")
    models = models_for(session)
    tokenizer = tokenizer_for(models)
    base_root = getattr(models.expert_set.base, "root", None)
    if base_root is None:
        raise MergeLabError("predictions need the base as a model folder")
    merged = merged_tensors(session)
    tasks = [expert] if expert else list(session.refs)
    rows = []
    with models.lock:
        if models.predictor is None:
            models.predictor = AutoModel.from_pretrained(str(base_root)).eval()
        model = models.predictor
        names = dict(model.state_dict())
        encoded = tokenizer([text], return_tensors="pt", truncation=True, max_length=64)
        encoded = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

        def pooled(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                for name, tensor in names.items():
                    if name in state:
                        tensor.copy_(state[name].to(tensor.dtype))
                out = model(**encoded)
                return out.pooler_output if getattr(out, "pooler_output", None) is not None \
                    else out.last_hidden_state[:, 0]

        base_state = {n: models.expert_set.base.get(n) for n in names if n in models.expert_set.base.tensors}
        bodies = {"base": base_state, "merged": merged}
        pools = {"base": pooled(base_state), "merged": pooled(merged)}
        for task in tasks:
            expert_obj = models.expert_set.experts[task]
            head = expert_obj.head()
            weight = next((v for k, v in head.items() if k.endswith("classifier.weight") or k.endswith("weight")), None)
            bias = next((v for k, v in head.items() if k.endswith("bias")), None)
            if weight is None or weight.dim() != 2:
                rows.append([task, "—", "no classifier head", None])
                continue
            own = {n: expert_obj.get(n) for n in names if n in models.expert_set.layout.tensors}
            pools[task] = pooled(own)
            labels = session.data[task].labels if task in session.data else []
            for which in ("base", task, "merged"):
                logits = pools[which] @ weight.float().T + (bias.float() if bias is not None else 0)
                prob = torch.softmax(logits, -1)[0]
                k = int(prob.argmax())
                label = labels[k] if k < len(labels) else f"label {k}"
                rows.append([task, "expert" if which == task else which, label, round(float(prob[k]), 3)])
        del bodies
    return rows


# ============================================================================ export


def exports_root() -> Path:
    from .paths import cache_root

    root = cache_root() / "exports"
    root.mkdir(parents=True, exist_ok=True)
    return root


def clean_old_exports(max_age: float = EXPORT_MAX_AGE, now: float | None = None) -> int:
    """Delete exports older than ``max_age`` seconds; returns how many were removed."""
    now = time.time() if now is None else now
    removed = 0
    for path in exports_root().iterdir():
        try:
            if now - path.stat().st_mtime > max_age:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def export(session: Session, tasks: Sequence[str] | None = None, dtype: str = "float32",
           progress: Progress | None = None) -> Path:
    """Write the last merge (HF folders, recipe, mergekit YAML, model card, importance) into a stored zip."""
    from .export import export_recipe

    progress = progress or _noop
    if session.last_recipe is None:
        raise MergeLabError("nothing to export yet: press Merge first")
    clean_old_exports()
    models = models_for(session)
    recipe = session.last_recipe
    recipe.dtype = dtype
    settings_recipe = recipe
    importance_json = session.importance.to_json() if session.importance is not None else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix=f"merge-{stamp}-", dir=exports_root()))
    out_dir = work / "merge"
    chosen = list(tasks) if tasks else None
    with models.lock:
        _export_with_settings(session, models, settings_recipe, out_dir, chosen, dtype, importance_json, progress)
    zip_path = work / f"merge-lab-{session.method}-{stamp}.zip"
    progress(0.95, "zipping (stored, not recompressed)")
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(out_dir.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(out_dir).as_posix())
    shutil.rmtree(out_dir, ignore_errors=True)
    progress(1.0, "export ready")
    return zip_path


def _export_with_settings(session: Session, models: Models, recipe, out_dir: Path, tasks, dtype: str,
                          importance_json: str | None, progress: Progress) -> None:
    """export_recipe with the settings the session already prepared (data-aware methods' inputs: few-shot
    data, calibration), so Export writes exactly what Merge built."""
    from .export import export_recipe

    settings, _ = build_settings(session, recipe.method, session.shared, session.seed)
    export_recipe(recipe, out_dir, expert_set=models.expert_set, engine=models.engine, tasks=tasks, dtype=dtype,
                  importance_json=importance_json, progress=progress, settings=settings)


def read_zip_names(path: str | Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def zip_is_stored(path: str | Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())


# ============================================================================ chart data (no plotting here)


def importance_maps(session: Session) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """expert → (layers, module kinds, |importance| matrix) for the layer × module heatmaps."""
    imp = session.importance
    if imp is None or "module" not in imp.signed:
        return {}
    out = {}
    for expert in imp.experts:
        heat = imp.layer_module_matrix(expert)
        out[expert] = (list(heat.rows), list(heat.cols), np.asarray(heat.values, float))
    return out


def unit_module_choices(session: Session) -> dict[str, list[str]]:
    """layer → modules with hidden-state scores."""
    imp = session.importance
    if imp is None or not imp.units:
        return {}
    out: dict[str, list[str]] = {}
    for module in imp.units:
        out.setdefault(imp.modules[module][0], []).append(module)
    return out


def hidden_view(session: Session, expert: str, module: str) -> tuple[np.ndarray, list[str], list[np.ndarray]]:
    """(unit scores of one module, layers, same-kind modules' unit scores per layer)."""
    imp = session.importance
    if imp is None or module not in imp.units:
        raise MergeLabError("no hidden-state scores for that module: compute importance (gradient mode scores "
                            "every unit)")
    kind = imp.modules[module][1]
    same = [(imp.modules[m][0], m) for m in imp.units if imp.modules[m][1] == kind
            and module.split(".")[-1] == m.split(".")[-1]]
    order = {k: i for i, k in enumerate(imp.layers)}
    same.sort(key=lambda lm: order.get(lm[0], 0))
    return (imp.unit_scores(expert, module), [lm[0] for lm in same],
            [imp.unit_scores(expert, m) for _, m in same])


def fidelity_data(session: Session, level: str = "module") -> tuple[list[float], list[float], list[str]] | None:
    """Exact and gradient scores of the same partitions (same intervention), if both were computed."""
    for intervention in ("restore", "ablate"):
        exact = session.importance_runs.get(f"exact/{intervention}")
        grad = session.importance_runs.get(f"gradient/{intervention}")
        if exact is not None and grad is not None and level in exact.signed and level in grad.signed:
            x = [float(v) for v in exact.matrix(level).ravel()]
            y = [float(v) for v in grad.matrix(level).ravel()]
            labels = [f"{e}: {p}" for e in exact.experts for p in exact.partitions[level]]
            return x, y, labels
    return None


def magnitude_data(session: Session) -> tuple[list[str], dict[str, list[float]], dict[str, list[float]]]:
    """(layers, importance per layer per expert, delta norm per layer per expert)."""
    imp = session.importance
    models = models_for(session)
    stats = task_vector_stats(models)
    layers = [k for k in session.layers if k in imp.partitions.get("layer", [])]
    importance = {e: [imp.scores(e, "layer")[k] for k in layers] for e in imp.experts}
    norms = {e: [stats.layer_norms(e).get(k, 0.0) for k in layers] for e in imp.experts}
    return layers, importance, norms


def conflict_data(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None
                  ) -> tuple[list[str], list[float], list[float]]:
    """Per layer: sign-conflict rate of the deltas, and its expected value after the planned drop.

    After independent random drops, a disagreeing entry stays a conflict only if both disagreeing
    experts keep it: the estimate multiplies the rate by the two largest keep rates of the layer.
    """
    models = models_for(session)
    stats = task_vector_stats(models)
    values = plan(session, method, shared)
    layers, before, after = [], [], []
    for layer in session.layers:
        kinds = stats.conflict.get(layer)
        if not kinds:
            continue
        counts = {k: 1 for k in kinds}  # equal weight per module kind is misleading: weight by entries
        sizes: dict[str, int] = {}
        for name in models.expert_set.layout.merged_names():
            info = models.expert_set.layout[name]
            if info.layer == layer and info.kind in kinds:
                sizes[info.kind] = sizes.get(info.kind, 0) + math.prod(info.shape)
        total = sum(sizes.get(k, counts[k]) for k in kinds)
        rate = sum(kinds[k] * sizes.get(k, counts[k]) for k in kinds) / max(total, 1)
        keeps = sorted((1.0 - values[e][DROP][layer] for e in values), reverse=True)
        factor = keeps[0] * keeps[1] if len(keeps) >= 2 else 1.0
        layers.append(layer)
        before.append(rate)
        after.append(rate * factor)
    return layers, before, after


def cosine_data(session: Session) -> tuple[list[str], list[list[float]]]:
    stats = task_vector_stats(models_for(session))
    return list(stats.experts), stats.cosine_matrix("model")


def default_zoo_name_safe() -> str:
    from .zoo import default_zoo_name

    return default_zoo_name()
