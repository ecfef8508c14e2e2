"""Exact importance without re-running what a patch cannot change.

An exact intervention patches one partition, runs the loss and restores the start values, so on every pass
everything the forward computes *before* the first patched module runs is what it computed at the start
point: the same modules on the same batch with the same weights. :class:`BlockReplay` records those outputs
once, on the start point's own forward, and swaps in stand-ins that return them:

- every block below the partition's first block (a patch in block k replays blocks 0…k−1);
- inside block k, every sub-module that *finished* before the first patched module of block k started —
  for a patch of BERT's ``output.dense`` the whole attention and the intermediate projection with its GELU,
  for Llama's ``mlp.down_proj`` the attention and the gate and up projections. An ancestor of a patched
  module never qualifies (it finishes after the patched module started), and neither does a module called
  more than once in the block's forward (its one recorded output would not stand for every call).

The model's own forward still runs embeddings, masks, heads and each block's own glue, so nothing depends
on a family's private signatures — only on its blocks being one ``ModuleList`` called in order (BERT's
``encoder.layer``, GPT-2's ``h``, Llama's ``layers``). What runs, runs the very same modules on the very
same tensors as a full pass, so a score is the full pass's. A loss without such a list (a plain function of
a state dict) runs in full. A patch that touches the embeddings (which run before block 0) replays nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..io.layout import Layout
from .taskloss import TaskLoss

BLOCK_BYTES = 512 * 2**20  # block outputs held for replay
INNER_BYTES = 256 * 2**20  # sub-module outputs held for replay (a block's are kept whole or not at all)


@dataclass
class _InnerRecord:
    """One block's sub-modules on the start point's forward, by path inside the block: when each started and
    finished (a step counter over the block's calls), what each returned, and which were called twice."""

    started: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, object] = field(default_factory=dict)
    repeated: set[str] = field(default_factory=set)
    nbytes: int = 0
    steps: int = 0

    def replayable_before(self, first_patched_start: int) -> list[str]:
        """The outermost sub-modules that finished before ``first_patched_start``, each called once."""
        done = [p for p, end in self.finished.items() if end < first_patched_start and p not in self.repeated]
        done_set = set(done)
        return [p for p in done if not any(_parent_paths(p) & done_set)]


def _parent_paths(path: str) -> set[str]:
    parts = path.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _nbytes(output) -> int:
    parts = output if isinstance(output, (tuple, list)) else (output,)
    return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))


class BlockReplay:
    """Replays what a patch cannot change (the module docstring says what and why): build it on the task,
    call :meth:`start_loss` at the start point, then :meth:`loss` once per patched partition."""

    def __init__(self, task: TaskLoss, layout: Layout, max_bytes: int = BLOCK_BYTES, inner_bytes: int = INNER_BYTES):
        from ..lm.probe import _block_list

        self.task, self.layout, self.max_bytes, self.inner_bytes = task, layout, max_bytes, inner_bytes
        self.blocks = None
        model = getattr(task, "model", None)
        if isinstance(model, torch.nn.Module) and layout.n_blocks:
            paths = {id(p): n for n, p in model.named_parameters()}
            self.blocks = _block_list(model, layout, lambda name: paths.get(id(task.parameter(name)), ""))
        self.outputs: list = []  # block i's output at the start point, for i < len(outputs)
        self.inner: dict[int, _InnerRecord] = {}  # block index → its sub-modules at the start point
        self._owner: dict[int, tuple[int, str]] = {}  # id(parameter) → (block index, owning module's path)
        if self.blocks is not None:
            for index, block in enumerate(self.blocks):
                for path, module in block.named_modules():
                    for parameter in module.parameters(recurse=False):
                        self._owner[id(parameter)] = (index, path)

    def first_block(self, names: Sequence[str]) -> int:
        """Blocks a patch of ``names`` leaves untouched below it: 0 for embeddings, k for block k, all of them
        for the head (final norm, pooler, an untied LM head)."""
        lowest = self.layout.n_blocks
        for name in names:
            layer = self.layout[name].layer
            lowest = min(lowest, int(layer) if layer.isdigit() else 0 if layer == "embeddings" else lowest)
        return lowest

    def start_loss(self) -> float:
        """L(start), recording every block's output and its sub-modules' outputs on the way (within budget)."""
        if self.blocks is None:
            return float(self.task.loss())
        self.outputs, self.inner = [], {}
        held = [0, 0]  # bytes of block outputs, of sub-module outputs
        hooks = []
        for index, block in enumerate(self.blocks):
            hooks.append(block.register_forward_hook(self._block_recorder(index, held)))
            record = _InnerRecord()
            for path, module in block.named_modules():
                if path:
                    hooks.append(module.register_forward_pre_hook(self._start_recorder(record, path)))
                    hooks.append(module.register_forward_hook(self._finish_recorder(record, path)))
            self.inner[index] = record
        try:
            return float(self.task.loss())
        finally:
            for hook in hooks:
                hook.remove()

    def _block_recorder(self, index: int, held: list[int]):
        def record(_module, _inputs, output):
            held[0] += _nbytes(output)
            if index == len(self.outputs) and held[0] <= self.max_bytes:
                self.outputs.append(output)
            inner = self.inner.get(index)
            if inner is not None:
                held[1] += inner.nbytes
                if held[1] > self.inner_bytes:
                    held[1] -= inner.nbytes
                    del self.inner[index]
        return record

    @staticmethod
    def _start_recorder(record: _InnerRecord, path: str):
        def started(_module, _inputs):
            if path in record.started:
                record.repeated.add(path)
            record.started[path] = record.steps
            record.steps += 1
        return started

    @staticmethod
    def _finish_recorder(record: _InnerRecord, path: str):
        def finished(_module, _inputs, output):
            record.finished[path] = record.steps
            record.steps += 1
            if path not in record.outputs:
                record.outputs[path] = output
                record.nbytes += _nbytes(output)
        return finished

    def loss(self, names: Sequence[str]) -> float:
        """L with ``names`` patched (the caller patched them): what runs before the first patched module replays."""
        from ..lm.probe import _Replay

        if self.blocks is None:
            return float(self.task.loss())
        skip = min(self.first_block(names), len(self.outputs))
        below = [(self.blocks, str(i), _Replay(self.outputs[i])) for i in range(skip)]
        inner = self._inner_swaps(skip, names)
        try:
            return _run_swapped(self.task, below + inner)
        except AttributeError:  # a block's glue reads an attribute of a sub-module the stand-in lacks
            if not inner:
                raise
            self.inner = {}  # this family's blocks run whole from now on
            return _run_swapped(self.task, below)

    def _inner_swaps(self, index: int, names: Sequence[str]) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
        """Stand-ins for block ``index``'s sub-modules that finished before its first patched module started;
        none when something before the block is patched, or the block's record is missing or incomplete."""
        from ..lm.probe import _Replay

        record = self.inner.get(index)
        if record is None or index >= len(self.blocks):
            return []
        starts = []
        for name in names:
            owner = self._owner.get(id(self.task.parameter(name)))
            if owner is None:
                if self.first_block([name]) <= index:  # patched before or in the block, outside its modules
                    return []
                continue
            block, path = owner
            if block != index:
                continue
            if path == "" or path not in record.started or path in record.repeated:
                return []
            starts.append(record.started[path])
        if not starts:
            return []
        block = self.blocks[index]
        swaps = []
        for path in record.replayable_before(min(starts)):
            parent_path, _, child = path.rpartition(".")
            swaps.append((block.get_submodule(parent_path) if parent_path else block, child,
                          _Replay(record.outputs[path])))
        return swaps


def _run_swapped(task: TaskLoss, swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> float:
    """The task's loss with each (parent, child name) module swapped for its stand-in, put back afterwards."""
    originals = [(parent, name, parent._modules[name]) for parent, name, _ in swaps]
    for parent, name, stand_in in swaps:
        parent._modules[name] = stand_in
    try:
        return float(task.loss())
    finally:
        for parent, name, original in originals:
            parent._modules[name] = original
