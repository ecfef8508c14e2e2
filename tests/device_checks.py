"""Helpers for the device tests: a simulated device that needs no GPU, small expert sets, every method's
parameter variants and fabricated method inputs.

Why a simulated device: the bug class "a kernel makes a helper tensor on the CPU while its inputs are on
a GPU" only shows on a second device, and the only other device a CPU machine has, ``meta``, holds no
values — fine for kernels that never read one (``meta_job``), useless for a top-k, a seeded draw or a
``float(...)``. :class:`DeviceLedger` runs a kernel on real CPU values while pretending its inputs live
on another device: every tensor the inputs report ``.device`` ``meta``, factory calls and ``.to`` given
that device make "device" tensors (really CPU ones, so values flow), and the ledger records

- an op that mixes a device tensor with a CPU tensor of one or more dimensions (CUDA refuses those; a
  0-dim CPU tensor is allowed, as CUDA allows it as a scalar),
- a random draw into a device tensor from a generator not made on the device, or the other way round,
- ``.numpy()`` of a device tensor,

and whether the kernel's output is a device tensor. A kernel that forgets ``device=`` somewhere makes a
CPU tensor there and trips one of these, as it would on a GPU.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
from apl_fixtures import regmean_extras
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from merging import MergeEngine, MergeLabError, MergeSettings
from merging.io.experts import check_homology
from merging.io.sources import ModelSource
from merging.methods import PerTensor, available, get_method

FAKE = torch.device("meta")  # what device tensors report; never really used for storage
_REAL_GENERATOR = torch.Generator
_DEVICE = torch.Tensor.device  # its __get__ is a fresh method-wrapper at each access: compared by __self__
_TO_HOST = {"cpu", "numpy", "tolist", "item"}


def _is_fake(value) -> bool:
    return (isinstance(value, torch.device) and value.type == "meta") or value == "meta"


def _is_cpu(value) -> bool:
    return (isinstance(value, torch.device) and value.type == "cpu") or value == "cpu"


_LEDGERS = threading.local()  # this thread's ledger (the engine runs kernels on several threads at once)
_INSTALLED = [0]
_INSTALL_LOCK = threading.Lock()


def _generator(device=None):
    """``torch.Generator`` while a ledger runs anywhere: the ledger of the calling thread, if any, makes it."""
    ledger = getattr(_LEDGERS, "current", None)
    if ledger is None:
        return _REAL_GENERATOR() if device is None else _REAL_GENERATOR(device=device)
    return ledger._generator(device)


def _install_generator(ledger) -> None:
    _LEDGERS.current = ledger
    with _INSTALL_LOCK:
        _INSTALLED[0] += 1
        torch.Generator = _generator


def _uninstall_generator() -> None:
    _LEDGERS.current = None
    with _INSTALL_LOCK:
        _INSTALLED[0] -= 1
        if not _INSTALLED[0]:
            torch.Generator = _REAL_GENERATOR


class DeviceLedger(TorchFunctionMode):
    """Run code on CPU values as if ``inputs`` were on another device (see the module docstring)."""

    def __init__(self, inputs):
        super().__init__()
        self._tracked: dict[int, torch.Tensor] = {}  # id → tensor (held, so an id is never reused)
        self._device_generators: dict[int, torch.Generator] = {}
        self.violations: list[str] = []
        for tensor in inputs:
            self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        self._tracked[id(tensor)] = tensor

    def on_device(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and id(tensor) in self._tracked

    def _generator(self, device=None):
        """``torch.Generator`` for this ledger's thread: one made for the device is recorded as such."""
        fake = device is not None and _is_fake(device)
        generator = _REAL_GENERATOR(device="cpu" if fake or device is None else device)
        if fake:
            self._device_generators[id(generator)] = generator
        return generator

    def __enter__(self):
        _install_generator(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _uninstall_generator()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is _DEVICE:
            return FAKE if self.on_device(args[0]) else func(*args, **kwargs)
        if func is torch.device:  # torch.device(x.device) stays the device
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        leaves = tree_leaves((args, kwargs))
        wants_device = any(_is_fake(x) for x in leaves if isinstance(x, (torch.device, str)))
        to_host = name in _TO_HOST or (name == "to" and any(_is_cpu(x) for x in leaves
                                                            if isinstance(x, (torch.device, str))))
        if wants_device:
            args, kwargs = tree_map(lambda x: torch.device("cpu") if isinstance(x, (torch.device, str))
                                    and _is_fake(x) else x, (args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        on_device = [t for t in tensors if self.on_device(t)]
        if on_device and name == "numpy":
            self.violations.append("numpy() of a device tensor (move it to the CPU first)")
        if on_device and not wants_device and not to_host:
            stray = [tuple(t.shape) for t in tensors if not self.on_device(t) and t.dim() > 0]
            if stray:
                self.violations.append(f"{name}: device tensors mixed with CPU tensor(s) of shape {stray}")
        lands_on_device = (bool(on_device) or wants_device) and not to_host
        for generator in (x for x in leaves if isinstance(x, _REAL_GENERATOR)):
            if lands_on_device and id(generator) not in self._device_generators:
                self.violations.append(f"{name}: a draw on the device from a CPU generator")
            if not lands_on_device and id(generator) in self._device_generators:
                self.violations.append(f"{name}: a draw on the CPU from the device's generator")
        result = func(*args, **kwargs)
        if to_host and isinstance(result, torch.Tensor) and self.on_device(result):
            result = result.view(result.shape)  # the CPU's .cpu() returns the tensor itself: a new one stands for the copy
        if lands_on_device:
            for tensor in tree_leaves(result):
                if isinstance(tensor, torch.Tensor):
                    self._track(tensor)
        return result


def job_tensors(job) -> list[torch.Tensor]:
    """Every tensor a kernel receives in a job: base, experts, and those inside its method inputs."""
    return [job.base, *job.experts.values(), *(x for x in tree_leaves(job.extras) if isinstance(x, torch.Tensor))]


def meta_job(job):
    """``job`` with every tensor on the meta device (shapes and dtypes, no values)."""
    def meta(value):
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    return dataclasses.replace(job, base=meta(job.base), experts={e: meta(t) for e, t in job.experts.items()},
                               extras=tree_map(meta, job.extras))


_NEEDS_VALUES = ("meta tensor", "meta device", "data-dependent", "item() cannot be called", "not an accelerator")


def values_reason(exc: BaseException) -> str:
    """What a kernel that failed on meta needed: a seeded draw (meta has no generator), an op whose output
    shape depends on values (nonzero, bincount), or a value read back (float(), int(), .item())."""
    text = str(exc).lower()
    if "not an accelerator" in text:
        return "seeded-draw"
    if isinstance(exc, NotImplementedError):
        return "data-dependent-op"
    return "reads-a-value"


def needs_values(exc: BaseException) -> bool:
    """An error of running on meta because the kernel needs values (a selection, a draw, a float), not a
    device mix-up (which says "same device")."""
    text = str(exc).lower()
    return "same device" not in text and (isinstance(exc, NotImplementedError) or any(k in text for k in _NEEDS_VALUES))


# ---- a small expert set, every method's variants, fabricated method inputs --------------------------------

SHAPES = {
    "embeddings.word_embeddings.weight": (20, 8),
    "embeddings.LayerNorm.weight": (8,),
    "encoder.layer.0.attention.self.query.weight": (12, 8),
    "encoder.layer.0.attention.self.query.bias": (12,),
    "encoder.layer.0.output.dense.weight": (8, 12),
    "encoder.layer.0.output.LayerNorm.weight": (8,),
    "encoder.layer.1.attn.c_attn.weight": (8, 24),  # GPT-2 Conv1D [in, out]: units along axis 1
}


def expert_set(n_experts: int, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=generator).to(dtype) for n, s in SHAPES.items()}
    experts = {f"e{i}": {n: (b.float() + 0.1 * torch.randn(b.shape, generator=generator)).to(dtype)
                         for n, b in base.items()} for i in range(n_experts)}
    return check_homology(ModelSource.from_state_dict("base", base),
                          {e: ModelSource.from_state_dict(e, sd) for e, sd in experts.items()})


def fabricated_extras(method: str, experts, seed: int = 1) -> dict:
    """The inputs a data-aware method's ``prepare`` would give, made up with the right shapes."""
    from merging.apl.defaults import FISHER_EXTRAS, SALIENCY_EXTRAS, UNIT_EXTRAS
    from merging.methods.localize_stitch import MASKS_EXTRAS

    generator = torch.Generator().manual_seed(seed)
    layout = experts.layout
    merged = {n: layout[n] for n in layout.merged_names()}
    per_entry = {n: {e: torch.rand(i.shape, generator=generator) for e in experts.experts} for n, i in merged.items()}
    if method == "fisher":
        return {FISHER_EXTRAS: PerTensor(per_entry, row_axis=0)}
    if method == "localize_stitch":
        return {MASKS_EXTRAS: PerTensor({n: {e: v < 0.4 for e, v in values.items()} for n, values in per_entry.items()
                                         if merged[n].droppable}, row_axis=0)}
    if method == "apl":
        units = {n: {e: torch.rand(1, i.n_units, generator=generator, dtype=torch.float64) for e in experts.experts}
                 for n, i in merged.items() if i.droppable and i.unit_axis is not None}
        return {UNIT_EXTRAS: PerTensor(units, row_axis=None), SALIENCY_EXTRAS: PerTensor(per_entry, row_axis=0)}
    if method == "regmean":
        return regmean_extras(merged, experts.experts, generator)
    return {}


def expert_count(spec) -> int:
    return 2 if spec.max_experts == 2 else 3


def _one_at_a_time(spec) -> list[dict]:
    """The defaults, then each declared shared choice / bool parameter moved off its default, one at a time."""
    out = [{}]
    for param in spec.params:
        if param.scope != "shared" or param.kind not in ("choice", "bool"):
            continue
        values = param.choices if param.kind == "choice" else (True, False)
        out += [{param.name: value} for value in values if value != param.default]
    return out


def _merges(spec, params: dict) -> bool:
    try:
        merge(spec.name, params)
        return True
    except MergeLabError:
        return False


def variants(spec) -> list[dict]:
    """Settings of ``spec`` worth running: every declared choice and flag value (from the registry, not a
    list typed here). A value valid only beside another one (APL's drop=locate needs within_layer=hidden)
    is paired with the first other choice that makes it merge."""
    out = []
    others = [p for p in spec.params if p.scope == "shared" and p.kind == "choice"]
    for params in _one_at_a_time(spec):
        if _merges(spec, params):
            out.append(params)
            continue
        for other, value in ((o, v) for o in others if o.name not in params for v in o.choices):
            if _merges(spec, {**params, other.name: value}):
                out.append({**params, other.name: value})
                break
    return out


def cases():
    """(method, params, id) for every registered method and variant."""
    for method in available():
        spec = get_method(method)
        for params in variants(spec):
            label = "-".join(f"{k}={v}" for k, v in params.items()) or "defaults"
            yield method, params, f"{method}-{label}"


def settings_for(method: str, params: dict, experts=None, seed: int = 7):
    spec = get_method(method)
    experts = experts or expert_set(expert_count(spec))
    return experts, MergeSettings.build(experts, spec, params, None, seed, fabricated_extras(method, experts))


def with_kernel(settings, wrap):
    """``settings`` whose method's kernel is ``wrap(real kernel)`` (its declared attributes kept, so the
    engine takes the same paths: worker pool, finite checks)."""
    kernel = settings.method.kernel
    wrapped = wrap(kernel)
    for attr in ("thread_count_invariant", "nonfinite_reaches_output"):
        if hasattr(kernel, attr):
            setattr(wrapped, attr, getattr(kernel, attr))
    return dataclasses.replace(settings, method=dataclasses.replace(settings.method, kernel=wrapped))


def merge(method: str, params: dict, engine_kwargs: dict | None = None, wrap=None):
    """(merged body, task bodies) of ``method`` at ``params`` on the small expert set."""
    experts, settings = settings_for(method, params)
    if wrap is not None:
        settings = with_kernel(settings, wrap)
    result = MergeEngine(experts, cache=False, **(engine_kwargs or {})).merge(settings)
    return result.tensors, result.task_bodies
