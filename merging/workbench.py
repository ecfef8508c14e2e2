"""The app's session logic, free of any UI toolkit: what each button of the page does.

A :class:`Session` is the small, per-browser-tab state (which experts, their task data, the
importance map, APL's calibration, the per-layer plan with the user's overrides, the merge
history). Heavy objects — the :class:`ExpertSet`, its :class:`MergeEngine`, the prober, the
merged bodies — live in a process-wide cache keyed by the expert selection (:func:`models_for`),
bounded by bytes (``MERGE_LAB_CACHE_BYTES``), so two tabs that pick the same experts share them
and a tab never holds model weights itself.

Results that are a pure function of their inputs — an importance map, a merge, a probe of a merge,
an export — are cached across sessions under a content hash of those inputs (:class:`ResultCache`,
:func:`merge_key`): a class of 30 pressing the same buttons waits for the work once. A merged body
evicted under memory pressure is rebuilt from what the session recorded when it merged.

Everything a user can send is checked here (``check_*``: numbers, choices, uploads, safetensors
headers), whatever the route — the browser's widgets or the HTTP API. Every user-facing failure is
a :class:`MergeLabError` with a plain-language message that names the field or the tensor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
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
MAX_SENTENCE_CHARS = 2000


def _noop(fraction: float, message: str) -> None:  # a progress sink that ignores everything
    return None


# ============================================================================ limits and validation
#
# Every number that reaches a handler is checked here, whatever sent it: the browser's sliders
# enforce their ranges, but the HTTP API (gradio_client, curl) bypasses them. Messages name the
# field as the page labels it.

MIN_FEWSHOT, MAX_FEWSHOT = 4, 128
MAX_SEED = 2**31 - 1
MODES = ("gradient", "exact")
INTERVENTIONS = ("restore", "ablate")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
MAX_HISTORY_BYTES = 5 * 1024 * 1024  # a session history JSON file is tiny; refuse anything much larger


def max_upload_bytes() -> int:
    """Upload cap from ``MERGE_LAB_MAX_UPLOAD_MB`` (default 2048 MB)."""
    raw = os.environ.get("MERGE_LAB_MAX_UPLOAD_MB", "").strip()
    try:
        mb = float(raw) if raw else 2048.0
    except ValueError:
        mb = 2048.0
    return max(1, int(mb * 1024 * 1024))


def check_number(field_name: str, value: Any, low: float | None = None, high: float | None = None,
                 integer: bool = False) -> float | int:
    """``value`` as a finite number in [low, high] (a whole number if ``integer``), else a MergeLabError
    naming ``field_name``."""
    if isinstance(value, bool) or value is None:
        raise MergeLabError(f"{field_name} must be a number, got {value!r}", field=field_name)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise MergeLabError(f"{field_name} must be a number, got {value!r}", field=field_name) from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MergeLabError(f"{field_name} must be a number, got {value!r}", field=field_name) from None
    if not math.isfinite(number):
        raise MergeLabError(f"{field_name} must be a finite number, got {value!r}", field=field_name)
    if integer and number != int(number):
        raise MergeLabError(f"{field_name} must be a whole number, got {value!r}", field=field_name)
    if (low is not None and number < low) or (high is not None and number > high):
        raise MergeLabError(f"{field_name} must lie in [{_fmt(low)}, {_fmt(high)}], got {value!r}", field=field_name)
    return int(number) if integer else number


def _fmt(bound: float | None) -> str:
    if bound is None:
        return "…"
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def check_choice(field_name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise MergeLabError(f"{field_name} must be one of {', '.join(map(str, choices))}, got {value!r}",
                            field=field_name)
    return value


def check_fewshot(value: Any) -> int:
    return int(check_number("Few-shot examples per expert", value, MIN_FEWSHOT, MAX_FEWSHOT, integer=True))


def check_seed(value: Any) -> int:
    return int(check_number("Seed", 0 if value is None or value == "" else value, 0, MAX_SEED, integer=True))


def check_method(value: Any) -> str:
    from .methods import all_specs

    return check_choice("Method", value, [s.name for s in all_specs()])


def check_shared(method: str, shared: Mapping[str, Any]) -> dict[str, Any]:
    """The method's declared global parameters, each checked against its declared kind and range."""
    spec = method_spec(check_method(method))
    by_name = {p.name: p for p in spec.params}
    out = {}
    for name, value in shared.items():
        p = by_name.get(name)
        if p is None or value is None:
            continue
        label = name.replace("_", " ")
        if p.kind in ("int", "float"):
            value = check_number(label, value, p.low, p.high, integer=p.kind == "int")
        elif p.kind == "bool":
            if not isinstance(value, bool):
                raise MergeLabError(f"{label} must be true or false, got {value!r}", field=name)
        elif p.kind == "choice":
            value = check_choice(label, value, p.choices)
        out[name] = value
    return out


def check_cell(key: str, value: Any, layer: str | None = None) -> float:
    """One per-layer drop ratio or weight, within the range its method parameter declares."""
    if key not in PER_LAYER_KEYS:
        raise MergeLabError(f"per-layer value must be drop_ratio or weight, got {key!r}", field="key")
    where = f"layer {layer} " if layer is not None else ""
    if key == DROP:
        return float(check_number(f"{where}drop ratio", value, 0.0, 0.999))
    return float(check_number(f"{where}weight", value, -5.0, 5.0))


def check_dtype(value: Any) -> str:
    return check_choice("dtype", value, DTYPE_CHOICES)


# ============================================================================ heavy-object cache


def _parse_bytes(text: str) -> int | None:
    text = text.strip().upper().replace("IB", "").rstrip("B")
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        return None


def cache_budget_bytes() -> int:
    """``MERGE_LAB_CACHE_BYTES`` (bytes, or with a K/M/G suffix), default 4 GiB: what the model cache may hold
    (a CPU-basic Space has 16 GB; importance and probes need working memory beside the cache)."""
    raw = os.environ.get("MERGE_LAB_CACHE_BYTES", "")
    value = _parse_bytes(raw) if raw.strip() else None
    return value if value and value > 0 else 4 * 1024**3


def estimate_bytes(*objects: Any) -> int:
    """Bytes of the tensors and arrays reachable from ``objects`` (each storage counted once, so tensors
    shared between the engine's cache and merge results are not double-counted). Walks containers,
    torch modules and Merge Lab's own objects; ignores tokenizers and file handles (memory-mapped)."""
    seen_ids: set[int] = set()
    seen_storage: set[int] = set()
    return sum(_walk_bytes(o, seen_ids, seen_storage, 0) for o in objects)


def _walk_bytes(obj: Any, seen_ids: set[int], seen_storage: set[int], depth: int) -> int:
    if obj is None or isinstance(obj, (str, int, float, bool, bytes)) or depth > 10 or id(obj) in seen_ids:
        return 0
    seen_ids.add(id(obj))
    if torch.is_tensor(obj):
        try:
            storage = obj.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return obj.element_size() * obj.numel()
        if ptr in seen_storage:
            return 0
        seen_storage.add(ptr)
        return int(size)
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, torch.nn.Module):
        return sum(_walk_bytes(t, seen_ids, seen_storage, depth + 1) for t in obj.state_dict(keep_vars=True).values())
    if isinstance(obj, Mapping):
        return sum(_walk_bytes(v, seen_ids, seen_storage, depth + 1) for v in list(obj.values()))
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_walk_bytes(v, seen_ids, seen_storage, depth + 1) for v in list(obj))
    module = type(obj).__module__ or ""
    if module.startswith("merging") and hasattr(obj, "__dict__"):
        return sum(_walk_bytes(v, seen_ids, seen_storage, depth + 1) for k, v in list(vars(obj).items())
                   if k not in ("lock", "_handles", "tokenizer"))
    return 0


@dataclass
class Models:
    """Everything heavy for one expert selection, shared by every session that picked it."""

    key: str
    expert_set: Any
    engine: Any
    lock: threading.RLock = field(default_factory=threading.RLock)
    fingerprint: str = ""  # content identity of the selection's files (path, size, mtime)
    stats: Any = None  # TaskVectorStats (computed on first use)
    support: Any = None  # calibration.DeltaSupport
    tokenizer: Any = None
    prober: Any = None
    prober_key: str | None = None
    predictor: Any = None  # a base-architecture model for "try a sentence"
    nonfinite: dict[str, list[tuple[str, int]]] | None = None  # model → [(tensor, bad values)]
    results: "OrderedDict[str, Any]" = field(default_factory=OrderedDict)  # merge key → MergeResult
    owners: dict[str, set[str]] = field(default_factory=dict)  # merge key → ids of sessions showing it

    def nbytes(self) -> int:
        """Tensors this entry holds: merged results and the engine's tensor cache (shared storages counted
        once), the prober (its model, base copy and hidden-state cache), the predictor, delta support."""
        return estimate_bytes(self.engine, self.results, self.prober, self.predictor, self.support, self.stats,
                              self.expert_set)

    def drop_result(self, key: str) -> None:
        self.results.pop(key, None)
        self.owners.pop(key, None)

    def close_files(self) -> None:
        """Unmap the safetensors files between jobs (they reopen lazily, reading only the header): mapped
        pages a job touched would otherwise stay in the process's RSS for as long as the entry lives."""
        if self.expert_set is None or not self.lock.acquire(timeout=0):
            return
        try:
            for source in [self.expert_set.base, *(e.source for e in self.expert_set.experts.values())]:
                source.close()
        finally:
            self.lock.release()

    def shrink(self) -> None:
        """Drop what can be recomputed: merge results nobody shows, then the engine's tensor cache."""
        if not self.lock.acquire(timeout=0):
            return  # busy: try again after its work
        try:
            for key in [k for k in self.results if not self.owners.get(k)]:
                self.drop_result(key)
            if getattr(self.engine, "_cache", None):
                self.engine._cache.clear()
            self.predictor = None
        finally:
            self.lock.release()


class ModelCache:
    """An LRU of :class:`Models` bounded by bytes (``MERGE_LAB_CACHE_BYTES``) and, loosely, by count.

    Entries grow after they are put (merges, probes), so every heavy step calls :meth:`trim`
    when it is done. The most recently used entry is never evicted (the user is working with
    it); when it alone is over budget it is shrunk instead (recomputable caches dropped).
    """

    def __init__(self, max_entries: int | None = None, max_bytes: int | None = None):
        self.max_entries = max_entries or int(os.environ.get("MERGE_LAB_APP_CACHE_ENTRIES", "8"))
        self._max_bytes = max_bytes
        self._items: "OrderedDict[str, Models]" = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def max_bytes(self) -> int:
        return self._max_bytes if self._max_bytes is not None else cache_budget_bytes()

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
        self.trim()
        return item

    def items(self) -> list[Models]:
        with self._lock:
            return list(self._items.values())

    def total_bytes(self) -> int:
        return sum(item.nbytes() for item in self.items())

    def trim(self) -> int:
        """Evict least-recently-used entries until the estimate fits the budget; returns the bytes held."""
        budget = self.max_bytes
        with self._lock:
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
                self.evictions += 1
            items = list(self._items.values())
        sizes = {item.key: item.nbytes() for item in items}
        total = sum(sizes.values())
        for item in items[:-1]:  # oldest first; never the newest
            if total <= budget:
                break
            with self._lock:
                if self._items.pop(item.key, None) is not None:
                    self.evictions += 1
            total -= sizes[item.key]
        if total > budget and items:
            newest = items[-1]
            newest.shrink()
            total = total - sizes[newest.key] + newest.nbytes()
        for item in self.items():
            item.close_files()
        _release_freed_memory()
        return total

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _release_freed_memory() -> None:
    """Ask glibc to hand freed heap pages back to the OS (else RSS stays at its peak after evictions)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


CACHE = ModelCache()
MAX_MERGES_KEPT = 4  # merged bodies kept per selection (the latest of the sessions using it)


class ResultCache:
    """Results that are a pure function of their inputs, shared by every session, keyed by a content hash:
    importance maps, probe rows, intervention comparisons, export zips. Bounded by count and bytes;
    ``stats[kind]`` counts hits and misses (tests and the benchmark read them)."""

    def __init__(self, max_entries: int = 64, max_bytes: int = 256 * 1024**2):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: "OrderedDict[tuple[str, str], tuple[Any, int]]" = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self.stats: dict[str, dict[str, int]] = {}

    def get(self, kind: str, key: str) -> Any:
        with self._lock:
            hit = self._items.get((kind, key))
            if hit is not None:
                self._items.move_to_end((kind, key))
            return None if hit is None else hit[0]

    def put(self, kind: str, key: str, value: Any) -> Any:
        size = estimate_bytes(value)
        with self._lock:
            self._items[(kind, key)] = (value, size)
            self._items.move_to_end((kind, key))
            total = sum(s for _, s in self._items.values())
            while len(self._items) > 1 and (len(self._items) > self.max_entries or total > self.max_bytes):
                _, (_, dropped) = self._items.popitem(last=False)
                total -= dropped
        return value

    def get_or_compute(self, kind: str, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, was it a hit). One computation per key at a time: a second identical request waits for
        the first and then hits."""
        with self._lock:
            key_lock = self._key_locks.setdefault((kind, key), threading.Lock())
        with key_lock:
            value = self.get(kind, key)
            counts = self.stats.setdefault(kind, {"hits": 0, "misses": 0})
            if value is not None:
                counts["hits"] += 1
                return value, True
            counts["misses"] += 1
            value = compute()
            self.put(kind, key, value)
        with self._lock:
            if len(self._key_locks) > 4 * self.max_entries:
                self._key_locks = {k: v for k, v in self._key_locks.items() if v.locked()}
        return value, False

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.stats.clear()

    def __len__(self) -> int:
        return len(self._items)


RESULTS = ResultCache()
MERGE_STATS = {"hits": 0, "misses": 0}


def content_hash(*parts: Any) -> str:
    """A stable hash of JSON-able parts; tensors and arrays by their bytes."""
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()[:32]


def _feed(digest, value: Any) -> None:
    if torch.is_tensor(value):
        digest.update(str((tuple(value.shape), str(value.dtype))).encode())
        digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(str((value.shape, str(value.dtype))).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for k in sorted(value, key=str):
            digest.update(json.dumps(str(k)).encode())
            _feed(digest, value[k])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())


def selection_key(base_ref: str, refs: Mapping[str, str]) -> str:
    return json.dumps({"base": str(base_ref), "experts": sorted((k, str(v)) for k, v in refs.items())})


def files_fingerprint(expert_set) -> str:
    """Identity of the files behind a selection (path, size, modification time): results cached by content
    hash are reused only while the models on disk are unchanged."""
    sources = [("base", expert_set.base), *((n, e.source) for n, e in expert_set.experts.items())]
    parts = []
    for name, source in sources:
        files = sorted({str(entry.file) for entry in source.tensors.values()})
        for file in files:
            try:
                st = os.stat(file)
                parts.append([name, file, st.st_size, st.st_mtime_ns])
            except OSError:
                parts.append([name, file, None, None])
    return content_hash(parts)


# Sessions of connected browser tabs: gradio session hash → Session.id (to free a closed tab's merges at once).
CLIENTS: dict[str, str] = {}


def release_session(session_or_id: Any) -> int:
    """Forget what a closed session kept in the shared caches (its merged bodies, unless another session
    shows the same merge). Returns how many merged bodies were freed."""
    sid = getattr(session_or_id, "id", session_or_id)
    if not sid:
        return 0
    freed = 0
    for models in CACHE.items():
        with models.lock:
            for key in list(models.owners):
                owners = models.owners[key]
                if sid in owners:
                    owners.discard(sid)
                    if not owners:
                        models.drop_result(key)
                        freed += 1
    for client, owner in list(CLIENTS.items()):
        if owner == sid:
            CLIENTS.pop(client, None)
    if freed:
        _release_freed_memory()
    return freed


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
    merge_key: str | None = None  # content hash of the last merge (its body lives in the shared cache)
    merge_inputs: dict[str, Any] | None = None  # what that merge was built from, to rebuild it if evicted
    comparison: Any = None  # the last "compare interventions and draws" result

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
    return CACHE.put(Models(key, expert_set, MergeEngine(expert_set), fingerprint=files_fingerprint(expert_set)))


def load_experts(session: Session, base_ref: str, refs: Mapping[str, str], zoo=None,
                 progress: Progress | None = None) -> Session:
    """Run the homology check and open the experts; returns a fresh session for this selection (keeping the
    session's merge history, which is the user's record)."""
    progress = progress or _noop
    refs = {str(k): str(v) for k, v in refs.items() if str(v).strip()}
    if not base_ref:
        raise MergeLabError("pick a base model (the model every expert was fine-tuned from)")
    if len(refs) < 2:
        raise MergeLabError(f"pick at least two experts to merge (got {len(refs)})")
    for name, ref in [("base", base_ref), *refs.items()]:
        preflight_ref(ref, name)
    new = Session(id=session.id if session else uuid.uuid4().hex[:12], base_ref=str(base_ref), refs=dict(refs))
    if session is not None:
        new.history, new.merges = list(session.history), session.merges
    cached = CACHE.get(new.key)
    if cached is not None and cached.fingerprint != files_fingerprint(cached.expert_set):
        with CACHE._lock:  # the files changed on disk since they were opened: open them again
            CACHE._items.pop(new.key, None)
    models = models_for(new, progress)
    expert_set = models.expert_set
    new.refs = {name: refs.get(name, expert_set.experts[name].source.ref) for name in expert_set.experts}
    new.layers = list(expert_set.layout.layers)
    progress(0.3, "scanning the weights for NaN/Inf")
    scan_nonfinite(models)
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
    CACHE.trim()
    progress(1.0, "experts loaded")
    return new


def load_warnings(session: Session) -> list[str]:
    """What the page should warn about after loading: the library's warnings and broken (NaN/Inf) weights."""
    models = models_for(session)
    out = list(models.expert_set.warnings)
    for model, bad in (models.nonfinite or {}).items():
        shown = ", ".join(f"'{t}' ({n} value{'s' if n != 1 else ''})" for t, n in bad[:3])
        more = f" and {len(bad) - 3} more tensor(s)" if len(bad) > 3 else ""
        out.append(f"model '{model}' has NaN/Inf weights in {shown}{more}: the checkpoint is broken. Merging it "
                   "will fail and importance is blocked; replace it with a good copy")
    return out


# ---------------------------------------------------------------- broken files, found before use

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def check_safetensors(path: str | os.PathLike, shown: str | None = None) -> None:
    """Read a safetensors header and check it against the file: truncated files, headers that are not JSON,
    and headers that lie about a tensor's shape (declaring more or fewer bytes than its data holds) get
    a message naming the file and the tensor. Reads the header only."""
    path = Path(path)
    shown = shown or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise MergeLabError(f"'{shown}' is only {size} bytes: not a safetensors file (empty or truncated)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise MergeLabError(f"'{shown}' is not a safetensors file, or is truncated: its first bytes announce a "
                                    f"{n}-byte header but the file has {size} bytes")
            raw = fh.read(n)
    except OSError as exc:
        raise MergeLabError(f"cannot read '{shown}': {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise MergeLabError(f"'{shown}' has a corrupt safetensors header (not valid JSON): download or export it "
                            "again") from None
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MergeLabError(f"'{shown}': the header entry of tensor '{name}' is malformed (needs dtype, shape "
                                "and data_offsets)") from None
        itemsize = _ITEMSIZE.get(str(dtype))
        if itemsize is None:
            raise MergeLabError(f"'{shown}': tensor '{name}' has unknown dtype {dtype!r}")
        need = math.prod(shape) * itemsize
        if int(end) - int(start) != need:
            raise MergeLabError(
                f"'{shown}': the header says tensor '{name}' is {dtype} of shape {tuple(shape)} ({need} bytes) but "
                f"its data holds {int(end) - int(start)} bytes: the header lies about the shape, so the file is corrupt")
        if int(end) > data_bytes:
            raise MergeLabError(
                f"'{shown}' is truncated: tensor '{name}' needs data up to byte {int(end)} but the file holds "
                f"{data_bytes} bytes of data (an interrupted download or copy?): download or export it again")


def preflight_ref(ref: str, name: str) -> None:
    """Check the safetensors files behind a local ref before opening it (after the allowed-roots check, so
    nothing outside them is read). Hub ids are left to the library."""
    from .access import check_local_path

    text = str(ref)
    if text.startswith("zoo:"):
        from .sources import resolve_zoo_ref

        path = resolve_zoo_ref(text)
    else:
        path = Path(text).expanduser()
        if not (path.exists() or path.is_symlink()):
            return  # a hub id, or missing: the library says which
        path = check_local_path(path, text)
    if path.is_file():
        if path.suffix == ".safetensors":
            check_safetensors(path, f"{name}: {path.name}")
        return
    if path.is_dir():
        files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() \
            else sorted(path.glob("*.safetensors"))
        for file in files:
            check_safetensors(file, f"{name}: {file.name}")


def scan_nonfinite(models: Models) -> dict[str, list[tuple[str, int]]]:
    """Every float tensor of the base and the experts checked for NaN/Inf once per selection (one min/max
    pass per tensor, large tensors in row chunks)."""
    with models.lock:
        if models.nonfinite is not None:
            return models.nonfinite
        expert_set = models.expert_set
        found: dict[str, list[tuple[str, int]]] = {}
        for model, source in [("base", expert_set.base), *((n, e.source) for n, e in expert_set.experts.items())]:
            for name, entry in source.tensors.items():
                if not entry.dtype.startswith(("float", "bfloat")):
                    continue
                bad = _count_nonfinite(source, name, entry.shape)
                if bad:
                    found.setdefault(model, []).append((name, bad))
        models.nonfinite = found
        models.close_files()  # every page was touched once: unmap them rather than keep them resident
        return found


def _count_nonfinite(source, name: str, shape) -> int:
    rows = shape[0] if shape else 1
    numel = math.prod(shape) if shape else 1
    step = max(1, rows * (16 * 1024 * 1024) // max(numel, 1)) if len(shape) >= 2 else rows
    bad = 0
    for r0 in range(0, rows, step):
        piece = source.get(name) if step >= rows else source.get_rows(name, r0, min(rows, r0 + step))
        if piece.numel():
            low, high = torch.aminmax(piece.float())
            if not (math.isfinite(float(low)) and math.isfinite(float(high))):
                bad += int((~torch.isfinite(piece)).sum())
        if step >= rows:
            break
    return bad


# ---------------------------------------------------------------- uploads


def accept_upload(path: str | os.PathLike, shown: str | None = None) -> str:
    """Check an uploaded expert file (.safetensors only, under the size cap, header consistent) and place it
    under the cache root (always readable, even when MERGE_LAB_ALLOWED_ROOTS limits local paths).
    Returns the path to use as the expert's ref."""
    source = Path(path)
    shown = shown or source.name
    if source.suffix.lower() != ".safetensors":
        raise MergeLabError(f"'{shown}' is not a .safetensors file: upload experts as .safetensors (pickled "
                            ".bin/.pt/.pth files can run code and are refused)")
    try:
        size = source.stat().st_size
    except OSError:
        raise MergeLabError(f"the upload '{shown}' is gone (uploads are kept for a limited time): upload it again") \
            from None
    cap = max_upload_bytes()
    if size > cap:
        raise MergeLabError(f"'{shown}' is {size / 1024**2:.1f} MB, over this server's upload limit of "
                            f"{cap / 1024**2:.0f} MB (MERGE_LAB_MAX_UPLOAD_MB)")
    check_safetensors(source, shown)
    from .paths import cache_root

    digest = content_hash(str(source.resolve()), size, source.stat().st_mtime_ns)[:12]
    folder = cache_root() / "uploads" / digest
    folder.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.stem)[:80] or "expert"
    target = folder / f"{stem}.safetensors"
    if not target.exists():
        tmp = folder / f".{stem}.{uuid.uuid4().hex[:6]}.part"
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return str(target)


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
    if n_fewshot is not None:
        n_fewshot = check_fewshot(n_fewshot)
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
    """APL importance of every expert on its own few-shot data, then APL's calibration.

    The map is a pure function of (models, few-shot examples, mode, intervention, levels, sample, seed), so it
    is cached across sessions by a hash of those: a second identical request is a cache hit."""
    progress = progress or _noop
    n_fewshot = check_fewshot(n_fewshot)
    mode = check_choice("Mode", mode, MODES)
    intervention = check_choice("Intervention", intervention, INTERVENTIONS)
    missing = session.missing_data()
    if missing:
        raise MergeLabError(f"expert(s) {', '.join(missing)} have no task data: importance needs a few labelled "
                            "examples of every expert's task — attach a CSV/JSONL file to each")
    models = models_for(session)
    _refuse_nonfinite(models, "importance")
    levels = ["model", "layer", "module", "hidden"] if level == "all" else [level] if isinstance(level, str) else level
    if mode == "exact" and level == "all":  # one forward pass per unit is far too slow for a page: no units
        levels = ["model", "layer", "module"]
    result, _ = _importance(session, models, n_fewshot, mode, intervention, list(levels), session.seed,
                            sample if mode == "exact" else None, progress)
    session.importance = result
    session.importance_runs[f"{mode}/{intervention}"] = result
    session.fewshot_n = int(n_fewshot)
    recalibrate(session, **(session.apl_params or {}))
    CACHE.trim()
    return session


def _refuse_nonfinite(models: Models, what: str) -> None:
    bad = scan_nonfinite(models)
    if bad:
        model, tensors = next(iter(bad.items()))
        raise MergeLabError(f"model '{model}' has NaN/Inf values in tensor '{tensors[0][0]}' "
                            f"({len(tensors)} tensor(s) affected): {what} cannot use a broken checkpoint; replace it")


def _importance(session: Session, models: Models, n: int, mode: str, intervention: str, levels: list[str],
                seed: int, sample: int | None, progress: Progress, draw_seed: int | None = None):
    """(ImportanceMap, cache hit?) for the session's experts on a seeded few-shot draw."""
    from .importance import compute_importance as _compute
    from .importance import draw_fewshot

    tokenizer = tokenizer_for(models)
    examples, indices = {}, {}
    for name in session.refs:
        examples[name], indices[name] = draw_fewshot(session.data[name].fewshot, int(n),
                                                     seed if draw_seed is None else draw_seed)
    key = content_hash("importance", models.fingerprint, sorted(session.refs), examples, mode, intervention,
                       levels, sample, seed)

    def compute():
        with models.lock:
            return _compute(models.expert_set, examples, tokenizer, mode=mode, level=levels,
                            intervention=intervention, sample=sample, seed=seed, progress=progress,
                            fewshot_indices=indices)

    return RESULTS.get_or_compute("importance", key, compute)


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
    value = check_cell(key, value, layer)
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
    changes: list[tuple[str, str, float]] = []
    for row in rows:
        if not row:
            continue
        expert = str(row[0])
        if expert not in session.refs:
            continue
        for layer, cell in zip(session.layers, list(row[1:])):
            label = f"table cell {expert}/{layer} ({key.replace('_', ' ')})"
            if key == DROP:
                value = float(check_number(label, cell, 0.0, 0.999))
            else:
                value = float(check_number(label, cell, -5.0, 5.0))
            if not math.isclose(value, current[expert][key][layer], abs_tol=5e-5):
                changes.append((expert, layer, value))
    for expert, layer, value in changes:  # all cells checked first: a bad cell changes nothing
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
    reused: bool = False  # an identical merge was already in memory (made by this or another session)


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


def merge_key(session: Session, models: Models, method: str, recipe) -> str:
    """Content hash of everything a merge's tensors depend on: the models' files, method, global and
    per-expert per-layer parameters, seed, and the method's prepared inputs (APL's unit keep-rate
    percentiles; the few-shot data of data-aware methods)."""
    spec = method_spec(method)
    inputs: Any = None
    if method == "apl" and session.calibration is not None:
        inputs = session.calibration.extras() or None
    elif spec.prepare is not None:
        inputs = [[e, session.data[e].fewshot[: session.fewshot_n]] for e in session.refs if e in session.data]
    experts = [[e.name, str(e.model), e.parameters] for e in recipe.experts]
    return content_hash("merge", models.fingerprint, method, recipe.parameters, experts, recipe.seed, inputs)


def _merge_result(session: Session, models: Models, method: str, shared: Mapping[str, Any], seed: int,
                  progress: Progress):
    """(key, recipe, MergeResult, reused?) — an identical merge already in memory is reused, whoever made it."""
    recipe = build_recipe(session, method, shared, seed)
    why = method_available(session, method)
    if why:
        raise MergeLabError(why)
    key = merge_key(session, models, method, recipe)
    with models.lock:
        result = models.results.get(key)
        if result is not None:
            MERGE_STATS["hits"] += 1
            models.results.move_to_end(key)
            return key, recipe, result, True
        MERGE_STATS["misses"] += 1
        settings, recipe = build_settings(session, method, shared, seed, progress)
        result = models.engine.merge(settings, progress)
        models.results[key] = result
        models.owners.setdefault(key, set())
        while len(models.results) > MAX_MERGES_KEPT:
            unowned = [k for k in models.results if not models.owners.get(k) and k != key]
            models.drop_result(unowned[0] if unowned else next(iter(models.results)))
    return key, recipe, result, False


def _own(session: Session, models: Models, key: str) -> None:
    with models.lock:
        if session.merge_key and session.merge_key != key:
            owners = models.owners.get(session.merge_key)
            if owners is not None:
                owners.discard(session.id)
        models.owners.setdefault(key, set()).add(session.id)
    session.merge_key = key


def merge(session: Session, method: str, shared: Mapping[str, Any], seed: int = 0,
          progress: Progress | None = None) -> MergeSummary:
    """Merge with the page's settings; keeps the merged body in the shared cache for probe and export."""
    progress = progress or _noop
    method = check_method(method)
    shared = check_shared(method, shared)
    seed = check_seed(seed)
    models = models_for(session)
    key, recipe, result, reused = _merge_result(session, models, method, shared, seed, progress)
    _own(session, models, key)
    session.merge_inputs = {"method": method, "shared": dict(shared), "seed": seed,
                            "overrides": copy.deepcopy(session.overrides), "calibration": session.calibration,
                            "apl_params": dict(session.apl_params), "fewshot_n": session.fewshot_n}
    session.method, session.shared, session.seed = method, dict(shared), int(seed)
    session.merges += 1
    label = f"#{session.merges} {method}"
    session.last_recipe, session.last_label = recipe, label
    seconds = 0.0 if reused else result.seconds
    summary = MergeSummary(label, method, seconds, 0 if reused else len(result.recomputed),
                           [] if reused else list(result.changed_layers), key_settings(recipe, session))
    summary.reused = reused
    session.history.append({"label": label, "method": method, "settings": summary.settings, "metrics": None,
                            "seconds": round(seconds, 3), "key": key, "recipe": recipe.to_dict()})
    CACHE.trim()
    return summary


def merged_tensors(session: Session) -> dict[str, torch.Tensor]:
    """The session's last merged body; rebuilt from what it was made of if memory pressure evicted it."""
    models = models_for(session)
    result = models.results.get(session.merge_key) if session.merge_key else None
    if result is not None:
        if session.id not in models.owners.get(session.merge_key, set()):
            _own(session, models, session.merge_key)
        return result.tensors
    snap = session.merge_inputs
    if snap is None:
        raise MergeLabError("no merge yet in this session: press Merge first")
    saved = (session.overrides, session.calibration, session.apl_params, session.fewshot_n)
    try:
        session.overrides, session.calibration = snap["overrides"], snap["calibration"]
        session.apl_params, session.fewshot_n = snap["apl_params"], snap["fewshot_n"]
        key, _, result, _ = _merge_result(session, models, snap["method"], snap["shared"], snap["seed"], _noop)
    finally:
        session.overrides, session.calibration, session.apl_params, session.fewshot_n = saved
    _own(session, models, key)
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


def _probe_sets(session: Session, view) -> dict[str, list]:
    return {t: list(session.data[t].probe) for t in view.experts}


def prober_for(session: Session, models: Models):
    from .probe import Prober

    view, unavailable = _probe_zoo(session, models)
    sets = _probe_sets(session, view)
    key = content_hash(sorted((t, str(p)) for t, p in view.experts.items()), sets)
    with models.lock:
        if models.prober is None or models.prober_key != key:
            models.prober = Prober(view, tasks=list(view.experts), probe_sets=sets)
            models.prober_key = key
    return models.prober, unavailable


def run_probe(session: Session, progress: Progress | None = None):
    """Probe base, experts and the latest merge; returns the report with every merge of the session.

    The merged row is a pure function of (merge, probe sets): cached across sessions by content hash."""
    from .probe import ProbeReport, ProbeRow

    progress = progress or _noop
    models = models_for(session)
    if session.merge_key is None:
        raise MergeLabError("no merge yet in this session: press Merge first")
    view, _ = _probe_zoo(session, models)
    probe_key = content_hash("probe", session.merge_key, sorted((t, str(p)) for t, p in view.experts.items()),
                             _probe_sets(session, view))
    prober, unavailable = prober_for(session, models)
    progress(0.1, "base and experts (computed once, then cached)")

    def probe_merge():
        body = merged_tensors(session)
        with models.lock:
            progress(0.6, "the merged model")
            return dict(prober.probe_body(body, name=session.last_label or "merged").metrics)

    with models.lock:
        reference = prober.reference()
    metrics, _ = RESULTS.get_or_compute("probe", probe_key, probe_merge)
    session.reference = reference
    for item in reversed(session.history):
        if item.get("key") == session.merge_key or "key" not in item:
            item["metrics"] = metrics
            break
    report = ProbeReport(tasks=list(reference.tasks), rows=list(reference.rows), meta=dict(reference.meta))
    for item in session.history:
        if item.get("metrics") and set(item["metrics"]) <= set(reference.tasks):
            report.add(ProbeRow(name=item["label"], metrics=item["metrics"]))
    report.meta["unavailable"] = unavailable
    CACHE.trim()
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
    if len(text) > MAX_SENTENCE_CHARS:
        raise MergeLabError(f"Try a sentence: at most {MAX_SENTENCE_CHARS} characters, got {len(text)}")
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


EXPORTS: dict[str, Path] = {}  # export content hash → zip (identical exports are served from the same file)


def export(session: Session, tasks: Sequence[str] | None = None, dtype: str = "float32",
           progress: Progress | None = None) -> Path:
    """Write the last merge (HF folders, recipe, mergekit YAML, model card, importance) into a stored zip.

    Atomic: on any failure (a full disk, a cancelled export) the half-written folder is removed and
    earlier zips are untouched; a full disk gets a readable message."""
    progress = progress or _noop
    if session.last_recipe is None or session.merge_inputs is None:
        raise MergeLabError("nothing to export yet: press Merge first")
    dtype = check_dtype(dtype)
    chosen = list(tasks) if tasks else None
    unknown = [t for t in chosen or [] if t not in session.refs]
    if unknown:
        raise MergeLabError(f"Export tasks: no loaded expert named {', '.join(map(repr, unknown))} "
                            f"(experts: {', '.join(session.refs)})", field="tasks")
    clean_old_exports()
    models = models_for(session)
    recipe = session.last_recipe
    recipe.dtype = dtype
    importance_json = session.importance.to_json() if session.importance is not None else None
    key = content_hash("export", session.merge_key, recipe.to_dict(), chosen, dtype, importance_json)
    previous = EXPORTS.get(key)
    if previous is not None and previous.is_file():
        os.utime(previous)  # keep it another hour
        progress(1.0, "export ready (identical export reused)")
        return previous
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix=f"merge-{stamp}-", dir=exports_root()))
    out_dir = work / "merge"
    zip_path = work / f"merge-lab-{session.method}-{stamp}.zip"
    try:
        with models.lock:
            _export_with_settings(session, models, recipe, out_dir, chosen, dtype, importance_json, progress)
        progress(0.95, "zipping (stored, not recompressed)")
        partial = work / (zip_path.name + ".part")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
            for path in sorted(out_dir.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(out_dir).as_posix())
        os.replace(partial, zip_path)
    except (OSError, MergeLabError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        full = getattr(exc, "errno", None) in (28, 122) or "disk is full" in str(exc)  # ENOSPC, EDQUOT
        if full:  # the library's message names a server path: a public page gets this one
            raise MergeLabError("export failed: the server's disk is full. Earlier exports are untouched; try "
                                "again later, export fewer tasks or a smaller dtype (fp16)") from None
        if isinstance(exc, MergeLabError):
            raise
        raise MergeLabError(f"export failed while writing files: {exc.strerror or exc}. Earlier exports are "
                            "untouched") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    EXPORTS[key] = zip_path
    progress(1.0, "export ready")
    return zip_path


def _export_with_settings(session: Session, models: Models, recipe, out_dir: Path, tasks, dtype: str,
                          importance_json: str | None, progress: Progress) -> None:
    """export_recipe with the settings the last merge was built from (data-aware methods' inputs: few-shot
    data, calibration; the overrides as they were at Merge), so Export writes exactly what Merge built."""
    from .export import export_recipe

    snap = session.merge_inputs
    saved = (session.overrides, session.calibration, session.apl_params, session.fewshot_n)
    try:
        session.overrides, session.calibration = snap["overrides"], snap["calibration"]
        session.apl_params, session.fewshot_n = snap["apl_params"], snap["fewshot_n"]
        settings, _ = build_settings(session, recipe.method, snap["shared"], snap["seed"])
    finally:
        session.overrides, session.calibration, session.apl_params, session.fewshot_n = saved
    export_recipe(recipe, out_dir, expert_set=models.expert_set, engine=models.engine, tasks=tasks, dtype=dtype,
                  importance_json=importance_json, progress=progress, settings=settings)


def read_zip_names(path: str | Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def zip_is_stored(path: str | Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())


# ============================================================================ nothing lost: session history

HISTORY_FORMAT = "merge-lab-history/1"


def history_json(session: Session) -> str:
    """The session's merges (label, method, settings, probe metrics, seconds, full recipe) as JSON."""
    merges = [{k: item.get(k) for k in ("label", "method", "settings", "metrics", "seconds", "recipe")}
              for item in session.history]
    return json.dumps({"format": HISTORY_FORMAT, "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "base": session.base_ref, "experts": dict(session.refs), "merges": merges}, indent=1)


def save_history(session: Session) -> Path:
    """Write :func:`history_json` to a file under the exports folder (deleted with old exports)."""
    if not session.history:
        raise MergeLabError("no merges in this session yet: press Merge first (the history holds every merge)")
    clean_old_exports()
    folder = Path(tempfile.mkdtemp(prefix="history-", dir=exports_root()))
    path = folder / f"merge-lab-history-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(history_json(session), encoding="utf-8")
    return path


def restore_history(session: Session, path: str | os.PathLike) -> tuple[Session, str]:
    """Load a history file saved by :func:`save_history`: its merges join the comparison table (with their
    recipes); when the same experts are loaded, the last merge's per-layer overrides come back too."""
    from .recipe import Recipe

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise MergeLabError("the history file is gone (uploads are kept for a limited time): upload it again") \
            from None
    if size > MAX_HISTORY_BYTES:
        raise MergeLabError(f"'{path.name}' is {size / 1024**2:.1f} MB: a session history file is far smaller "
                            "(is it the right file?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise MergeLabError(f"'{path.name}' is not a Merge Lab history file (not valid JSON)") from None
    if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT or not isinstance(data.get("merges"), list):
        raise MergeLabError(f"'{path.name}' is not a Merge Lab history file (expected format {HISTORY_FORMAT!r}, "
                            "saved with Download history)")
    restored = []
    taken = {item["label"] for item in session.history}
    for index, item in enumerate(data["merges"]):
        if not isinstance(item, dict) or not isinstance(item.get("label"), str) \
                or not isinstance(item.get("method"), str):
            raise MergeLabError(f"history entry {index + 1} of '{path.name}' has no label or method")
        recipe = item.get("recipe")
        if recipe is not None:
            try:
                Recipe.from_dict(recipe)
            except MergeLabError as exc:
                raise MergeLabError(f"history entry {index + 1} ({item['label']}) has an invalid recipe: {exc}") \
                    from None
        metrics = item.get("metrics") if isinstance(item.get("metrics"), dict) else None
        label = item["label"] if item["label"] not in taken else f"{item['label']} (restored)"
        taken.add(label)
        restored.append({"label": label, "method": item["method"], "settings": str(item.get("settings", "")),
                         "metrics": metrics, "seconds": item.get("seconds"), "recipe": recipe, "restored": True})
    session.history = restored + list(session.history)
    session.merges = max(session.merges, len(session.history))
    note = f"Restored {len(restored)} merge(s) from `{path.name}`: the comparison table and their recipes are back."
    last = next((r["recipe"] for r in reversed(restored) if r.get("recipe")), None)
    same = session.refs and data.get("experts") == session.refs and data.get("base") == session.base_ref
    if last and same:
        overrides = (last.get("suggested") or {}).get("overrides") or []
        session.overrides = {}
        for o in overrides:
            try:
                set_cell(session, o["expert"], str(o["layer"]), o["key"], o["value"])
            except (MergeLabError, KeyError, TypeError):
                continue
        note += (f" The same experts are loaded, so the last merge's {len(overrides)} per-layer override(s) are "
                 "restored too: press Merge to rebuild it.")
    elif last:
        note += " Load the same experts to rebuild any of them (each recipe replays with `python -m merging merge`)."
    return session, note


# ============================================================================ comparing interventions and draws


@dataclass
class Comparison:
    """Layer-level gradient importance with both interventions, and its rank stability over few-shot draws."""

    experts: list[str]
    layers: list[str]
    restore: dict[str, list[float]]  # expert → |importance| per layer (main draw)
    ablate: dict[str, list[float]]
    agreement: dict[str, float]  # expert → Spearman(restore, ablate) over layers
    stability: dict[str, dict[str, float]]  # intervention → expert → mean pairwise Spearman over draws
    draws: int
    draw_size: int
    seconds: float
    hits: int = 0


def compare_interventions(session: Session, n_fewshot: int | None = None, draws: int = 3,
                          progress: Progress | None = None) -> Comparison:
    """Gradient importance at layer level with ``restore`` and ``ablate`` on the same few-shot draw, and the
    layer ranking's stability over ``draws`` seeded draws for each (gradient: one backward pass per expert
    and run, so 2 × draws runs in all; each run cached like any importance)."""
    from .fidelity import rank_correlation, stability

    progress = progress or _noop
    n = check_fewshot(n_fewshot if n_fewshot is not None else session.fewshot_n)
    draws = int(check_number("draws", draws, 2, 5, integer=True))
    missing = session.missing_data()
    if missing:
        raise MergeLabError(f"expert(s) {', '.join(missing)} have no task data: the comparison needs a few "
                            "labelled examples of every expert's task")
    models = models_for(session)
    _refuse_nonfinite(models, "importance")
    smallest = min(len(session.data[e].fewshot) for e in session.refs)
    size = max(2, min(n, smallest // 2)) if smallest >= 4 else smallest  # draws must differ to say anything
    start = time.perf_counter()
    maps: dict[str, list] = {}
    hits = 0
    total = 2 * draws
    done = 0
    for intervention in INTERVENTIONS:
        maps[intervention] = []
        for d in range(draws):
            def step(f, m, done=done, iv=intervention, d=d):
                progress((done + f) / total, f"{iv}, draw {d + 1}/{draws}: {m}")
            result, hit = _importance(session, models, size, "gradient", intervention, ["layer"], session.seed,
                                      None, step, draw_seed=session.seed + d)
            maps[intervention].append(result)
            hits += int(hit)
            done += 1
    first = maps["restore"][0]
    layers = list(first.partitions["layer"])
    restore = {e: [float(v) for v in first.matrix("layer")[i]] for i, e in enumerate(first.experts)}
    abl = maps["ablate"][0]
    ablate = {e: [float(v) for v in abl.matrix("layer")[i]] for i, e in enumerate(abl.experts)}
    agreement = {e: rank_correlation(restore[e], ablate[e]) for e in restore}
    stab = {iv: stability(maps[iv], "layer") for iv in INTERVENTIONS}
    result = Comparison(list(first.experts), layers, restore, ablate, agreement, stab, draws, size,
                        time.perf_counter() - start, hits)
    session.comparison = result
    progress(1.0, "comparison done")
    return result


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
