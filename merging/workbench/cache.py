"""Heavy objects shared across sessions: the byte-bounded model cache (``MERGE_LAB_CACHE_BYTES``)
and the content-hashed result cache, so identical requests from many tabs do the work once."""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..hashing import content_hash  # noqa: F401  (re-exported: the one content hasher)


def _parse_bytes(text: str) -> int | None:
    text = text.strip().upper().replace("IB", "").rstrip("B")
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        return None


def _env_entries() -> int:
    """``MERGE_LAB_APP_CACHE_ENTRIES`` (default 8); a bad value warns and falls back instead of stopping the app."""
    raw = os.environ.get("MERGE_LAB_APP_CACHE_ENTRIES", "").strip()
    if not raw:
        return 8
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        warnings.warn(f"MERGE_LAB_APP_CACHE_ENTRIES={raw!r} is not a whole number ≥ 1; using 8", stacklevel=3)
        return 8
    return value


def cache_budget_bytes() -> int:
    """``MERGE_LAB_CACHE_BYTES`` (bytes, or with a K/M/G suffix), default 4 GiB: what the model cache may hold
    (a CPU-basic Space has 16 GB; importance and probes need working memory beside the cache)."""
    raw = os.environ.get("MERGE_LAB_CACHE_BYTES", "")
    value = _parse_bytes(raw) if raw.strip() else None
    if raw.strip() and not (value and value > 0):
        warnings.warn(f"MERGE_LAB_CACHE_BYTES={raw!r} is not a positive size (examples: 2G, 512M, 1500000000); "
                      "using the default 4 GiB", stacklevel=2)
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
    tokenizer: Any = None
    prober: Any = None
    prober_key: str | None = None
    predictor: Any = None  # a base-architecture model for "try a sentence"
    nonfinite: dict[str, list[tuple[str, int]]] | None = None  # model → [(tensor, bad values)]
    results: OrderedDict[str, Any] = field(default_factory=OrderedDict)  # merge key → MergeResult
    owners: dict[str, set[str]] = field(default_factory=dict)  # merge key → ids of sessions showing it

    def nbytes(self) -> int:
        """Tensors this entry holds: merged results and the engine's tensor cache (shared storages counted
        once), the prober (its model, base copy and hidden-state cache), the predictor, statistics."""
        return estimate_bytes(self.engine, self.results, self.prober, self.predictor, self.stats,
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
            if self.engine is not None:
                self.engine.clear_cache()
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
        self.max_entries = max_entries or _env_entries()
        self._max_bytes = max_bytes
        self._items: OrderedDict[str, Models] = OrderedDict()
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
        self._items: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
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
    vocab = getattr(expert_set, "vocab", None)  # the same files aligned to another vocabulary are other tensors
    return content_hash(parts) if vocab is None else content_hash(parts, vocab.choice)


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


