"""The merge engine: executes a merge tensor by tensor.

Peak memory is about one tensor per input (tensors over 64 MB go in row chunks, for the
methods that declare themselves row-separable; the others are merged whole) plus the
output. Each merged tensor is cached under a fingerprint of everything that determines it
(method, the parameters resolved at its layer, seed, method inputs), so moving one
per-layer slider re-merges only that layer and reuses the rest.

Device (``MergeEngine(device=...)``): tensors are read on the CPU (safetensors, mmap), each job's inputs
moved to the device, merged there by the method's kernel and moved back to the CPU before anything
keeps or writes them (the cache, the shard writer): only the tensors in flight live on a GPU.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .cancel import cancellable, checkpoint, current_token
from .devices import resolve_device
from .errors import MergeLabError
from .hashing import content_hash
from .io.experts import ExpertSet
from .io.integrity import all_finite
from .io.layout import ROLE_COPY, ROLE_MERGE, TensorInfo
from .methods import MethodSpec, PerTensor, TensorJob, Threshold, get_method, kernels
from .params import ParamResolver, validate_params

CHUNK_BYTES = 64 * 1024 * 1024
Progress = Callable[[float, str], None]


@dataclass
class MergeSettings:
    """A merge, resolved: method, validated parameters, seed, method-specific inputs."""

    method: MethodSpec
    shared: dict[str, Any]
    per_expert: dict[str, dict[str, Any]]
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, expert_set: ExpertSet, method: str | MethodSpec, params: Mapping[str, Any] | None = None,
              expert_params: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
              extras: Mapping[str, Any] | None = None) -> MergeSettings:
        spec = method if isinstance(method, MethodSpec) else get_method(method)
        spec.check_expert_count(len(expert_set.experts))
        layers = expert_set.layout.layers
        shared = validate_params(spec.params, params or {}, "parameters", layers)
        per_expert = {}
        for name, values in (expert_params or {}).items():
            if name not in expert_set.experts:
                raise MergeLabError(f"parameters given for unknown expert '{name}' "
                                    f"(experts: {', '.join(expert_set.experts)})", field=f"experts.{name}")
            per_expert[name] = validate_params(spec.params, values, f"experts.{name}.parameters", layers,
                                               per_expert=True)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise MergeLabError(f"seed must be a whole number, got {seed!r}", field="seed")
        for key, value in (extras or {}).items():
            if key.startswith("per_tensor:") and not isinstance(value, PerTensor):
                raise MergeLabError(f"method input '{key}' is keyed by tensor name the old way: wrap it as "
                                    "merging.methods.PerTensor({tensor: value}, row_axis=...) so the engine "
                                    "knows which axis holds the rows", field=f"extras.{key}")
        settings = cls(spec, shared, per_expert, seed, dict(extras or {}))
        settings.check_trim_scope(expert_set)
        return settings

    def resolver(self, expert_set: ExpertSet) -> ParamResolver:
        return ParamResolver(self.method.params, self.shared, self.per_expert, expert_set.layout.layers)

    def trim_scope(self) -> str:
        name = self.method.trim_scope_param
        return str(self.shared.get(name, self.method.param(name).default)) if name else "tensor"

    def check_trim_scope(self, expert_set: ExpertSet) -> None:
        if self.trim_scope() == "model" and self.resolver(expert_set).varies_by_layer("drop_ratio"):
            raise MergeLabError("trim_scope 'model' takes one model-wide drop_ratio per expert; "
                                "per-layer drop ratios need trim_scope 'layer' or 'tensor'", field="parameters.trim_scope")


@dataclass
class MergeResult:
    """Merged body tensors (base names), per-expert task heads, and what was recomputed.

    A method with ``per_task_bodies`` (EMR) makes one body per expert: ``task_bodies[expert]`` (full bodies,
    base names; ``{}`` for every other method). Its ``tensors`` are then a labelled stand-in —
    ``tensors_label`` says what they are (EMR: θ_0 + τ_uni, the unified vector) — never a task's model:
    use :meth:`body_for` wherever a task is scored or written."""

    tensors: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    recomputed: list[str]
    changed_layers: list[str]
    seconds: float
    task_bodies: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    tensors_label: str = "merged body"

    def body_for(self, task: str) -> dict[str, torch.Tensor]:
        """The body task ``task`` runs on: its own body for a per-task-body method, else the merged one."""
        return self.task_bodies[task] if self.task_bodies else self.tensors

    def first_changed_layer(self, layers: list[str]) -> str | None:
        for layer in layers:
            if layer in self.changed_layers:
                return layer
        return None


class MergeEngine:
    """Merges an :class:`ExpertSet`, caching merged tensors by fingerprint.

    ``device`` (``cpu`` by default; ``auto``, ``cuda``, ``cuda:N`` or a ``torch.device``, checked by the one
    resolver, :func:`merging.devices.resolve_device`): where kernels run. Each job's inputs (the base's and
    experts' tensor or row chunk, its per-tensor method inputs) are read on the CPU and moved there; the
    merged tensor is converted to the export dtype there and moved back to the CPU. So on a GPU only the
    tensors in flight occupy its memory — about ``workers + 1`` tensors (or 64 MB row chunks) at once,
    each with its inputs and the kernel's temporaries — and the cache and the shard writer hold CPU
    tensors. Scope thresholds (layer / model trim) stream their deltas through the device the same way.
    Deterministic methods give the same result on any device within float rounding; a random drop draws
    from a generator on the kernel's device, so a seed gives another (equally valid) mask on CUDA than on
    the CPU."""

    def __init__(self, expert_set: ExpertSet, *, cache: bool = True, check_finite: bool = True,
                 workers: int | None = None, device: str | torch.device = "cpu"):
        self.experts = expert_set
        self.device = torch.device(resolve_device(str(device)))
        self.use_cache = cache
        self.check_finite = check_finite
        self.workers = workers  # tensors merged at once (None: one per torch thread, see default_workers)
        self._lock = threading.Lock()
        self._threshold_locks: dict[tuple, threading.Lock] = {}  # one per scope threshold (workers share them)
        self._cache: dict[tuple[str, str | None], tuple[str, torch.Tensor]] = {}  # (tensor, task) → (key, merged)
        self._thresholds: dict[tuple, tuple[float, dict[str, list[int]]]] = {}
        self._checked: set[tuple[str, str]] = set()
        self._model_stats: dict[str, Any] = {}  # settings key → the method's ModelStat total

    # ---- public -------------------------------------------------------------
    def merge(self, settings: MergeSettings, progress: Progress | None = None) -> MergeResult:
        """Merge every body tensor in memory (re-using cached tensors whose inputs did not change).

        A per-task-body method is merged once per expert too (``task_bodies``), after its unified body."""
        start = time.perf_counter()
        recomputed: list[str] = []
        seen: set[str] = set()
        changed: set[str] = set()
        tasks: list[str | None] = [None]
        if settings.method.per_task_bodies:
            tasks += list(self.experts.experts)
        total = max(1, len(self.experts.layout.tensors) * len(tasks))
        bodies: dict[str | None, dict[str, torch.Tensor]] = {}
        for step, task in enumerate(tasks):
            body = bodies.setdefault(task, {})
            for index, (name, tensor, fresh) in enumerate(self.iter_merged(settings, task=task)):
                body[name] = tensor
                if fresh:
                    if name not in seen:  # a tensor recomputed for several bodies is listed once
                        seen.add(name)
                        recomputed.append(name)
                    changed.add(self.experts.layout[name].layer)
                if progress and index % 16 == 0:
                    done = step * len(self.experts.layout.tensors) + index
                    progress(done / total, f"merging {name}" + (f" for {task}" if task else ""))
        heads = {name: expert.head() for name, expert in self.experts.experts.items()}
        layers = [layer for layer in self.experts.layout.layers if layer in changed]
        result = MergeResult(bodies.pop(None), heads, recomputed, layers, time.perf_counter() - start)
        if settings.method.per_task_bodies:
            result.task_bodies = {task: body for task, body in bodies.items() if task is not None}
            result.tensors_label = (f"{settings.method.pretty_name}: the unified body shared by the tasks, not a "
                                    "task's model (each task's model is task_bodies[task])")
        return result

    def iter_merged(self, settings: MergeSettings, dtype: torch.dtype | None = None,
                    task: str | None = None) -> Iterator[tuple[str, torch.Tensor, bool]]:
        """Yield (name, merged tensor, recomputed?) for every body tensor, in the base's order.

        ``dtype`` (export): merged tensors come out in that dtype, converted chunk by chunk for
        tensors merged in row chunks, so no whole float32 copy of them is held (the cache, if on,
        keeps float32). Copied tensors come as stored. ``task``: the expert whose body to merge, for a
        method with ``per_task_bodies`` (None: its labelled unified body)."""
        if task is not None and not settings.method.per_task_bodies:
            raise MergeLabError(f"{settings.method.pretty_name} makes one body for every task: merge it without "
                                "a task", field="task")
        if task is not None and task not in self.experts.experts:
            raise MergeLabError(f"no expert named '{task}' to merge a body for (experts: "
                                f"{', '.join(self.experts.experts)})", field="task")
        resolver = settings.resolver(self.experts)
        layout = self.experts.layout
        stat = self._model_stat_for(settings, resolver)
        todo = [(name, info) for name, info in layout.tensors.items() if info.role in (ROLE_COPY, ROLE_MERGE)]

        def one(name: str, info: TensorInfo) -> tuple[torch.Tensor, bool]:
            checkpoint()  # Stop ends the merge here, not after the last tensor
            if info.role == ROLE_COPY:
                return self.experts.base.get(name), False
            return self._merge_one(name, info, settings, resolver, dtype, task, stat)

        workers = resolve_workers(self.workers)
        if workers <= 1 or len(todo) <= 1 or not getattr(settings.method.kernel, "thread_count_invariant", False):
            # one tensor at a time, torch's threads inside each op: a kernel with float reductions (an angle,
            # an SVD, a solve) rounds them by thread count, so its tensors keep the caller's threads
            for name, info in todo:
                merged, fresh = one(name, info)
                yield name, merged, fresh
                del merged
        else:
            yield from _in_order(todo, one, workers)
        # tied lm_head aliases are written by the exporter from the embeddings

    def clear_cache(self) -> int:
        """Forget every cached merged tensor (memory pressure); returns how many were dropped. The next
        merge recomputes them; results are unchanged."""
        dropped = len(self._cache)
        self._cache.clear()
        return dropped

    def cached_bytes(self) -> int:
        """Bytes held by the merged-tensor cache."""
        return sum(t.numel() * t.element_size() for _, t in self._cache.values())

    # ---- one tensor -----------------------------------------------------------
    def _merge_one(self, name: str, info: TensorInfo, settings: MergeSettings, resolver: ParamResolver,
                   dtype: torch.dtype | None = None, task: str | None = None,
                   stat: Any = None) -> tuple[torch.Tensor, bool]:
        params = {e: resolver.for_layer(e, info.layer) for e in self.experts.experts}
        shared = resolver.for_layer(None, info.layer)
        thresholds = self._thresholds_for(name, info, settings, resolver, params)
        extras = _tensor_extras(settings.extras, name)
        key = _fingerprint(settings, name, params, shared, thresholds, extras, task, stat) if self.use_cache else None
        cached = self._cache.get((name, task))
        if self.use_cache and cached is not None and cached[0] == key:
            return _to_dtype(cached[1], dtype), False
        jobs = self._jobs(name, info, settings, params, shared, thresholds, extras, task, stat)
        merged = self._compute(info, settings, jobs, None if self.use_cache else dtype)
        if self.use_cache:
            self._cache[(name, task)] = (key, merged)
        return _to_dtype(merged, dtype), True

    def _jobs(self, name, info, settings, params, shared, thresholds, extras, task=None,
              stat=None) -> Iterator[tuple[tuple[int, int] | None, TensorJob]]:
        """The jobs merging one tensor: ``(None, job)`` for the whole tensor, or ``((r0, r1), job)`` per row
        chunk when it is large and the method is row-separable (the merge and a ModelStat pre-pass alike).

        ``thresholds[expert]`` is (cut, tie quota per row chunk); each chunk gets its own quota."""
        base_entry_shape = info.shape
        numel = math.prod(base_entry_shape) if base_entry_shape else 1
        rows = base_entry_shape[0] if base_entry_shape else 1
        chunk_rows = _chunk_rows(info)
        if not _is_chunked(info) or not settings.method.is_row_separable(shared):
            whole = {e: Threshold(cut, sum(quota)) for e, (cut, quota) in thresholds.items()}
            yield None, self._job(name, info, settings, params, shared, whole, _chunk_extras(extras, None),
                                  self.experts.base.get(name), {e: x.get(name) for e, x in self.experts.experts.items()},
                                  numel, 0, task, stat)
            return
        for index, r0 in enumerate(range(0, rows, chunk_rows)):
            r1 = min(rows, r0 + chunk_rows)
            base = self.experts.base.get_rows(name, r0, r1)
            experts = {e: x.source.get_rows(x.body_key(name), r0, r1) for e, x in self.experts.experts.items()}
            chunk_thresholds = {e: Threshold(cut, quota[index]) for e, (cut, quota) in thresholds.items()}
            yield (r0, r1), self._job(name, info, settings, params, shared, chunk_thresholds,
                                      _chunk_extras(extras, (r0, r1, rows), name), base, experts, numel,
                                      r0 * (numel // rows), task, stat)
            del base, experts

    def _compute(self, info, settings, jobs, dtype=None) -> torch.Tensor:
        """Merge one tensor from its jobs, chunk by chunk into one output (no list of pieces plus a copy)."""
        out = None
        for rows, job in jobs:
            piece = self._run(settings, job, dtype)
            if rows is None:
                return piece
            if out is None:
                out = torch.empty((info.shape[0], *piece.shape[1:]), dtype=piece.dtype)
            out[rows[0]:rows[1]] = piece
            del piece
        return out

    def _job(self, name, info, settings, params, shared, thresholds, extras, base, experts, numel, start,
             task=None, stat=None) -> TensorJob:
        if self.check_finite and not _nonfinite_reaches_output(settings.method):
            self._check_finite(name, base, experts)
        device = self.device
        return TensorJob(name, info, to_device(base, device), {e: to_device(t, device) for e, t in experts.items()},
                         params, shared, settings.seed, numel, start, thresholds, _extras_to(extras, device),
                         task, stat, n_blocks=self.experts.layout.n_blocks)

    def _run(self, settings, job: TensorJob, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The kernel on ``job`` (on the engine's device), checked finite, in ``dtype``, back on the CPU."""
        merged = settings.method.kernel(job)
        if not all_finite(merged):
            if self.check_finite and _nonfinite_reaches_output(settings.method):
                self._check_finite(job.name, job.base, job.experts, recheck=True)  # a broken input, by name
            raise MergeLabError(f"merging '{job.name}' produced NaN or Inf: check the parameters "
                                "(a weight sum of zero with normalize, or extreme λ)")
        return to_host(_to_dtype(merged, dtype))

    # ---- a model-wide statistic (EMR's rescalers), one pre-pass per settings ------------------
    def _model_stat_for(self, settings: MergeSettings, resolver: ParamResolver) -> Any:
        """The method's :class:`~merging.methods.base.ModelStat` total (None without one), computed once per
        settings over every merged tensor, in layout order and row chunks where the merge chunks."""
        declared = settings.method.model_stat
        if declared is None:
            return None
        key = content_hash(settings.method.name, settings.shared, settings.per_expert, settings.seed,
                           {k: [v.row_axis, dict(v.values)] if isinstance(v, PerTensor) else v
                            for k, v in settings.extras.items()})
        if key not in self._model_stats:
            partials = []
            for name, info in self.experts.layout.tensors.items():
                if info.role != ROLE_MERGE:
                    continue
                checkpoint()
                params = {e: resolver.for_layer(e, info.layer) for e in self.experts.experts}
                shared = resolver.for_layer(None, info.layer)
                thresholds = self._thresholds_for(name, info, settings, resolver, params)
                extras = _tensor_extras(settings.extras, name)
                for _, job in self._jobs(name, info, settings, params, shared, thresholds, extras):
                    partials.append((name, _map_tensors(declared.partial(job), to_host)))  # kept on the CPU
            self._model_stats[key] = declared.total(partials, settings.shared)
        return self._model_stats[key]

    def _check_finite(self, name: str, base: torch.Tensor, experts: dict[str, torch.Tensor],
                      recheck: bool = False) -> None:
        for model, tensor in [("base", base), *experts.items()]:
            if (model, name) in self._checked and not recheck:
                continue
            if tensor.is_floating_point() and not all_finite(tensor):
                bad = int((~torch.isfinite(tensor)).sum())
                raise MergeLabError(
                    f"model '{model}' has {bad} NaN/Inf value(s) in tensor '{name}': the checkpoint is broken; "
                    "re-export it or pick another expert")
            self._checked.add((model, name))

    # ---- magnitude thresholds for chunked tensors and layer / model trim scopes -------------
    def _thresholds_for(self, name, info, settings, resolver, params) -> dict[str, tuple[float, list[int]]]:
        """expert → (cut, tie quota of each row chunk of this tensor) where the top-k spans more than one
        job: a layer or the model (trim scope), or a tensor merged in row chunks. Empty otherwise (the
        kernel takes its exact top-k over the whole tensor)."""
        scope = settings.trim_scope()
        if not info.droppable or settings.method.trim_scope_param is None:
            return {}
        if scope == "tensor" and not _is_chunked(info):
            return {}
        out = {}
        for expert in self.experts.experts:
            density = 1.0 - float(params[expert]["drop_ratio"])
            group = {"tensor": name, "layer": info.layer, "model": "*"}[scope]
            key = (expert, group, round(density, 12))
            with self._lock:
                lock = self._threshold_locks.setdefault(key, threading.Lock())
            with lock:  # workers needing one scope's threshold wait for one computation of it
                if key not in self._thresholds:
                    self._thresholds[key] = self._scope_threshold(expert, group, scope, density)
            cut, quotas = self._thresholds[key]
            out[expert] = (cut, quotas[name])
        return out

    def _scope_threshold(self, expert: str, group: str, scope: str,
                         density: float) -> tuple[float, dict[str, list[int]]]:
        """The exact top-k over the scope's droppable tensors: the cut, and each tensor's (each row chunk's)
        share of the entries tied at it, handed out in the layout's tensor order and row order — so the
        scope keeps round(density · entries) exactly, and a chunked tensor what it keeps merged whole."""
        layout = self.experts.layout
        names = [n for n, i in layout.tensors.items() if i.droppable and (
            scope == "model" or (scope == "layer" and i.layer == group) or n == group)]
        total = sum(math.prod(layout[n].shape) for n in names)
        k = int(round(density * total))
        top = kernels.streaming_topk(lambda: self._delta_chunks(expert, names), k)
        shares = iter(kernels.share_ties(top.tied, top.ties) if top.tied else [])
        quotas = {n: [next(shares, 0) for _ in range(_chunk_count(layout[n]))] for n in names}
        return top.cut, quotas

    def _delta_chunks(self, expert: str, names: list[str]) -> Iterator[torch.Tensor]:
        """Δ of ``expert`` for each tensor in ``names``, tensors over 64 MB in row chunks (bounded memory)."""
        source, device = self.experts.experts[expert], self.device
        for n in names:
            info = self.experts.layout[n]
            if not _is_chunked(info):
                yield to_device(source.get(n), device).float() - to_device(self.experts.base.get(n), device).float()
                continue
            rows, chunk_rows = info.shape[0], _chunk_rows(info)
            for r0 in range(0, rows, chunk_rows):
                r1 = min(rows, r0 + chunk_rows)
                yield to_device(source.source.get_rows(source.body_key(n), r0, r1), device).float() - \
                    to_device(self.experts.base.get_rows(n, r0, r1), device).float()


def _nonfinite_reaches_output(method: MethodSpec) -> bool:
    """The method's kernel turns any NaN/Inf input entry into a non-finite output entry (its kernel says so,
    as the classic pipeline does: IEEE arithmetic keeps NaN through ×0, +, ÷). Then the inputs need no pass of
    their own: the output's check, which runs anyway, finds a broken input, and only then are the inputs
    scanned to name the model — one read of every input fewer, the same errors."""
    return bool(getattr(method.kernel, "nonfinite_reaches_output", False))


_ALLOCATOR_TUNED = False
_HUGE_PAGES_SWITCH = "THP_MEM_ALLOC_ENABLE"  # torch's (c10's CPU allocator) switch for transparent huge pages
_KEEP_BELOW = 32 * 1024 * 1024  # glibc's largest mmap threshold: blocks up to it come from the heap
_TRIM_ABOVE = 32 * 1024 * 1024  # free memory the heap keeps at its top before giving it back


def keep_freed_memory() -> None:
    """Ask glibc's allocator to reuse freed tensor memory instead of returning it to the OS.

    Why: by default glibc serves every block over ~128 KB-32 MB with a fresh mmap and unmaps it on free,
    so each temporary a merge makes (a delta, a mask, |Δ|) is page-faulted in and zeroed again: on a
    1.5M-entry tensor ``x.abs()`` cost 3.2 ms of CPU, 0.8 ms with the memory reused. Blocks up to 32 MB
    now come from the heap, which keeps up to 32 MB free at its top (256 MB let the app's peak RSS grow
    past its cache budget with two workers' arenas, tests/test_concurrency.py). Process-wide, once; a
    no-op off glibc. Called by one-shot processes only (``python -m merging``, the merge benchmarks): a
    long-lived server that holds a cache budget gives freed memory back instead. It also turns on torch's
    huge pages (:func:`_use_huge_pages`)."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    _use_huge_pages()
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, _KEEP_BELOW)
    mallopt(m_trim_threshold, _TRIM_ABOVE)


def _use_huge_pages() -> None:
    """Have torch's CPU allocator ask the kernel for transparent huge pages for its blocks of 2 MB and more.

    Why: a merge's outputs and large temporaries land in fresh memory, whose first touch costs one page
    fault per 4 KB page; with 2 MB pages those faults cost less than half (440 MB: 0.07 → 0.03 s). Merging
    a 125M-parameter model from disk (base + 3, three interleaved runs): SLERP 2.66 → 2.18 s, TIES 3.76 →
    3.46 s, Model Stock 3.10 → 2.89 s, DARE-TIES 3.63 → 3.55 s; linear and task arithmetic, which reuse
    their buffers, unchanged (benchmarks/RESULTS-merge.md).

    torch reads its switch once, at its first CPU allocation, so the switch is set for one allocation and
    then removed: this process keeps huge pages, the processes it starts do not. A user's own setting of the
    variable wins (``THP_MEM_ALLOC_ENABLE=0`` turns it off); after torch has allocated, this changes nothing.
    The kernel may refuse (transparent huge pages set to ``never``)."""
    if _HUGE_PAGES_SWITCH in os.environ:
        return
    os.environ[_HUGE_PAGES_SWITCH] = "1"
    try:
        torch.empty(1)  # the first CPU allocation reads the switch
    finally:
        del os.environ[_HUGE_PAGES_SWITCH]


def default_workers() -> int:
    """Tensors merged at once by default: one per torch thread, at most the cores this process may use.
    Each worker then runs torch ops on one thread, so the total stays at the cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, torch.get_num_threads()))


def resolve_workers(workers: int | None) -> int:
    """``workers`` checked (None: :func:`default_workers`)."""
    if workers is None:
        return default_workers()
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise MergeLabError(f"workers must be a whole number ≥ 1, got {workers!r}", field="workers")
    return workers


def _in_order(todo: list[tuple[str, TensorInfo]], one: Callable[[str, TensorInfo], tuple[torch.Tensor, bool]],
              workers: int) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``one(name, info)`` for every tensor of ``todo`` on ``workers`` threads, yielded in ``todo``'s order
    (for kernels declaring ``thread_count_invariant``).

    Why threads: torch releases the GIL in its kernels, and safetensors' reads are page faults, so two
    tensors merge on two cores at once while the caller writes the previous one. Each worker runs torch
    ops on ``torch threads // workers`` threads (the total stays at the cores; many small parallel ops on
    a busy machine cost more in synchronisation than they gain). At most ``workers + 1`` tensors are in
    flight, bounding memory. Every tensor's result depends only on its own inputs (generators are
    seeded per seed, expert and tensor; scratch buffers are per thread), so the output is the same
    whatever the worker count. The caller's cancel token is carried into the workers; the first error
    in layout order is raised, as the sequential loop would raise it, and nothing is left running."""
    token = current_token()
    threads = torch.get_num_threads()
    intra = max(1, threads // workers)

    def start() -> None:
        torch.set_num_threads(intra)  # this worker thread's own intra-op count

    def run(name: str, info: TensorInfo) -> tuple[torch.Tensor, bool]:
        if token is None:
            return one(name, info)
        with cancellable(token):
            return one(name, info)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge-tensor", initializer=start)
    pending: deque = deque()
    items = iter(todo)
    try:
        for name, info in items:
            pending.append((name, pool.submit(run, name, info)))
            if len(pending) > workers:
                break
        while pending:
            name, future = pending.popleft()
            merged, fresh = future.result()
            for next_name, next_info in items:  # keep the pool busy while the caller handles this one
                pending.append((next_name, pool.submit(run, next_name, next_info)))
                break
            yield name, merged, fresh
            del merged, future
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(threads)  # what the workers set may reach process-wide settings (MKL's)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (itself when already there): the one way a job's inputs reach the kernels'
    device. A plain blocking copy: correct first; reads from mmap are pageable memory, which a pinned
    staging buffer would have to copy once more."""
    return tensor.to(device)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU, where the cache and the shard writer keep it (itself when already there). A
    blocking copy, so the writer never reads a buffer a GPU is still filling."""
    return tensor.to("cpu")


def _extras_to(extras: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A job's method inputs with every tensor in them (in dicts, lists, tuples) moved to ``device``."""
    return {key: _map_tensors(value, lambda t: to_device(t, device)) for key, value in extras.items()}


def _map_tensors(value: Any, move: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``move`` applied to every tensor in it (through dicts, lists and tuples)."""
    if torch.is_tensor(value):
        return move(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, move) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, move) for v in value)
    return value


def _to_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _is_chunked(info: TensorInfo) -> bool:
    return len(info.shape) >= 2 and 4 * math.prod(info.shape) > CHUNK_BYTES


def _chunk_rows(info: TensorInfo) -> int:
    """Rows per chunk of a tensor merged in row chunks (float32 rows filling at most ``CHUNK_BYTES``)."""
    return max(1, CHUNK_BYTES // max(4 * math.prod(info.shape[1:]), 1))


def _chunk_count(info: TensorInfo) -> int:
    """Jobs a tensor takes when chunked: the layout every tie quota is handed out over."""
    return math.ceil(info.shape[0] / _chunk_rows(info)) if _is_chunked(info) else 1


@dataclass(frozen=True)
class _Entry:
    """One tensor's entry of a :class:`PerTensor` input, until the job (whole tensor or row chunk) is known."""

    declared: PerTensor
    value: Any


def _tensor_extras(extras: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Method inputs for this tensor: each :class:`PerTensor` input narrowed to its entry; others as given."""
    return {key: _Entry(value, value.for_tensor(name)) if isinstance(value, PerTensor) else value
            for key, value in extras.items()}


def _chunk_extras(extras: dict[str, Any], rows: tuple[int, int, int] | None, name: str = "") -> dict[str, Any]:
    """The inputs a job sees: :class:`PerTensor` entries cut to rows ``r0:r1`` of ``rows`` along their
    declared row axis (``rows=None``: the whole tensor)."""
    out = {}
    for key, value in extras.items():
        if isinstance(value, _Entry):
            value = value.value if rows is None else value.declared.narrow(value.value, *rows, tensor=name)
        out[key] = value
    return out


def _fingerprint(settings: MergeSettings, name: str, params, shared, thresholds, extras, task=None,
                 stat=None) -> str:
    """The cache key of one merged tensor: everything that determines it (the one content hasher), with
    the task whose body it belongs to and the model-wide statistic for a method that has them."""
    inputs = {key: [value.declared.row_axis, value.value] if isinstance(value, _Entry) else value  # entry + cut
              for key, value in extras.items()}
    extra = [] if task is None and stat is None else [task, stat]  # single-body keys unchanged
    return content_hash(settings.method.name, name, params, shared, settings.seed, thresholds, inputs, *extra)


def merge_state_dicts(base: Mapping[str, torch.Tensor], experts, method: str, *, seed: int = 0,
                      expert_params: Mapping[str, Mapping[str, Any]] | None = None,
                      extras: Mapping[str, Any] | None = None, **params: Any) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts (tests, small models). ``experts``: list or ``{name: state dict}``.

    Returns the merged body keyed by the base's names; task heads are not merged (they stay with
    each expert). Per-expert parameters go in ``expert_params``. A per-task-body method (EMR) has no
    one merged body: this refuses it; use ``MergeEngine(...).merge(settings).task_bodies``.
    """
    from .io.experts import check_homology
    from .io.sources import ModelSource

    items = experts.items() if isinstance(experts, Mapping) else [(f"expert{i}", e) for i, e in enumerate(experts)]
    sources = {name: ModelSource.from_state_dict(name, dict(sd)) for name, sd in items}
    expert_set = check_homology(ModelSource.from_state_dict("base", dict(base)), sources)
    settings = MergeSettings.build(expert_set, method, params, expert_params, seed, extras)
    if settings.method.per_task_bodies:
        raise MergeLabError(f"{settings.method.pretty_name} makes one body per task, not one merged body: read "
                            "MergeEngine(expert_set).merge(settings).task_bodies[expert] instead", field="method")
    return MergeEngine(expert_set, cache=False).merge(settings).tensors
