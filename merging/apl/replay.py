"""Exact importance without re-running what a patch cannot change.

An exact intervention patches one partition, runs the loss and restores the start values, so on every pass
everything the forward computes *before* the first patched module starts is what it computed at the start
point: the same modules on the same batch with the same weights. :class:`BlockReplay` records, on the start
point's own forward, when every module started and finished (one step counter over the whole forward) and
what the blocks and their sub-modules returned, and swaps in stand-ins that return those outputs:

- every block that finished before the first patched module started (a patch in block k replays blocks
  0…k−1; a patch of the head replays them all; a module outside the blocks that runs between them, such as
  DeBERTa-v2's ``encoder.conv`` after block 0, replays only the blocks before it);
- inside the first block that did not, every sub-module that finished before that start — for a patch of
  BERT's ``output.dense`` the whole attention and the intermediate projection with its GELU, for Llama's
  ``mlp.down_proj`` the attention and the gate and up projections. An ancestor of a patched module never
  qualifies (it finishes after the patched module started), and neither does a module called more than once
  in the block's forward (its one recorded output would not stand for every call).

When a patched parameter is first used is when the first module holding it starts (a tied LM head's matrix is
the embeddings', used first by them). A parameter no module call reaches (read directly by a parent, such as
DeBERTa's relative embeddings) has no known start, so its patch replays nothing. The model's own forward still
runs embeddings, masks, heads and each block's own glue, so nothing depends on a family's private signatures —
only on its blocks being one ``ModuleList`` (BERT's ``encoder.layer``, GPT-2's ``h``, Llama's ``layers``). What
runs, runs the very same modules on the very same tensors as a full pass, so a score is the full pass's. A loss
without such a list (a plain function of a state dict) runs in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..io.layout import Layout
from ..lm.probe import _block_list, _nbytes, _Replay
from .taskloss import TaskLoss

BLOCK_BYTES = 512 * 2**20  # block outputs held for replay
INNER_BYTES = 256 * 2**20  # sub-module outputs held for replay (a block's are kept whole or not at all)
Swap = tuple[torch.nn.Module, str, torch.nn.Module]  # (parent, child name, stand-in)


@dataclass
class _InnerRecord:
    """One block's sub-modules on the start point's forward, by path inside the block: when each started and
    finished (on the forward's step counter), what each returned, and which were called twice. Recording stops
    (``overflow``) once the outputs pass ``limit`` bytes, and the record is then dropped whole."""

    limit: int
    started: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, object] = field(default_factory=dict)
    repeated: set[str] = field(default_factory=set)
    nbytes: int = 0
    overflow: bool = False

    def keep(self, path: str, output) -> None:
        if self.overflow or path in self.outputs:
            return
        self.nbytes += _nbytes(output)
        if self.nbytes > self.limit:
            self.overflow = True
            self.outputs.clear()  # freed now, not when the block ends
        else:
            self.outputs[path] = output

    def replayable_before(self, step: int) -> list[str]:
        """The outermost sub-modules that finished before ``step``, each called once."""
        done = {p for p, end in self.finished.items() if end < step and p not in self.repeated}
        return [p for p in self.finished if p in done and not _parent_paths(p) & done]


def _parent_paths(path: str) -> set[str]:
    parts = path.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


class BlockReplay:
    """Replays what a patch cannot change (the module docstring says what and why): build it on the task,
    call :meth:`start_loss` at the start point, then :meth:`loss` once per patched partition."""

    def __init__(self, task: TaskLoss, layout: Layout, max_bytes: int = BLOCK_BYTES, inner_bytes: int = INNER_BYTES):
        self.task, self.layout, self.max_bytes, self.inner_bytes = task, layout, max_bytes, inner_bytes
        self.blocks = None
        model = getattr(task, "model", None)
        if isinstance(model, torch.nn.Module) and layout.n_blocks:
            paths = {id(p): n for n, p in model.named_parameters()}
            self.blocks = _block_list(model, layout, lambda name: paths.get(id(task.parameter(name)), ""))
        self.model = model
        self.outputs: list = []  # block i's output at the start point, for i < len(outputs)
        self.finished: list[int] = []  # the step at which block i finished, for every block
        self.inner: dict[int, _InnerRecord] = {}  # block index → its sub-modules at the start point
        self._first_use: dict[int, int] = {}  # id(parameter) → the step at which the first module holding it started

    def start_loss(self) -> float:
        """L(start), recording when every module ran, and the blocks' and their sub-modules' outputs (within
        budget)."""
        if self.blocks is None:
            return float(self.task.loss())
        self.outputs, self.finished, self.inner, self._first_use = [], [], {}, {}
        step, held = [0], [0, 0]  # the forward's step counter; bytes of block outputs, of sub-module outputs
        in_block = {id(m) for block in self.blocks for m in block.modules()}
        hooks = []
        for module in self.model.modules():
            if id(module) not in in_block and any(True for _ in module.parameters(recurse=False)):
                hooks.append(module.register_forward_pre_hook(self._use_recorder(module, step)))
        for index, block in enumerate(self.blocks):
            record = self.inner[index] = _InnerRecord(limit=self.inner_bytes)
            hooks.append(block.register_forward_pre_hook(self._use_recorder(block, step)))
            hooks.append(block.register_forward_hook(self._block_recorder(index, step, held)))
            for path, module in block.named_modules():
                if path:
                    hooks.append(module.register_forward_pre_hook(self._start_recorder(record, path, module, step)))
                    hooks.append(module.register_forward_hook(self._finish_recorder(record, path, step)))
        try:
            return float(self.task.loss())
        finally:
            for hook in hooks:
                hook.remove()

    def _note_use(self, module: torch.nn.Module, at: int) -> None:
        for parameter in module.parameters(recurse=False):
            self._first_use.setdefault(id(parameter), at)

    def _use_recorder(self, module: torch.nn.Module, step: list[int]):
        def started(_module, _inputs):
            self._note_use(module, step[0])
            step[0] += 1
        return started

    def _block_recorder(self, index: int, step: list[int], held: list[int]):
        def record(_module, _inputs, output):
            self.finished.append(step[0])
            step[0] += 1
            held[0] += _nbytes(output)
            if index == len(self.outputs) and held[0] <= self.max_bytes:
                self.outputs.append(output)
            inner = self.inner.get(index)
            if inner is not None and (inner.overflow or held[1] + inner.nbytes > self.inner_bytes):
                del self.inner[index]
            elif inner is not None:
                held[1] += inner.nbytes
        return record

    def _start_recorder(self, record: _InnerRecord, path: str, module: torch.nn.Module, step: list[int]):
        def started(_module, _inputs):
            if path in record.started:
                record.repeated.add(path)
            else:
                record.started[path] = step[0]
            self._note_use(module, step[0])
            step[0] += 1
        return started

    @staticmethod
    def _finish_recorder(record: _InnerRecord, path: str, step: list[int]):
        def finished(_module, _inputs, output):
            record.finished[path] = step[0]
            step[0] += 1
            record.keep(path, output)
        return finished

    def first_use(self, names: Sequence[str]) -> int | None:
        """The step at which the first of ``names`` is first used on the start point's forward; None when one of
        them has no known start (no module call reaches it, or :meth:`start_loss` has not run)."""
        steps = [self._first_use.get(id(self.task.parameter(name))) for name in names]
        return None if not steps or None in steps else min(steps)

    def loss(self, names: Sequence[str]) -> float:
        """L with ``names`` patched (the caller patched them): what finished before the first of them was used
        returns its start-point output."""
        if self.blocks is None:
            return float(self.task.loss())
        first = self.first_use(names)
        if first is None:
            return float(self.task.loss())
        skip = 0
        while skip < len(self.outputs) and self.finished[skip] < first:
            skip += 1
        below = [(self.blocks, str(i), _Replay(self.outputs[i])) for i in range(skip)]
        inner = self._inner_swaps(skip, first)
        try:
            return _run_swapped(self.task, below + inner)
        except AttributeError:  # a block's glue reads an attribute of a sub-module the stand-in lacks
            if not inner:
                raise
            self.inner = {}  # this family's blocks run whole from now on
            return _run_swapped(self.task, below)

    def _inner_swaps(self, index: int, first: int) -> list[Swap]:
        """Stand-ins for block ``index``'s sub-modules that finished before step ``first``; none when the block
        has no complete record (past the last block, or over the byte budget)."""
        record = self.inner.get(index)
        if record is None or index >= len(self.blocks):
            return []
        block = self.blocks[index]
        swaps = []
        for path in record.replayable_before(first):
            parent_path, _, child = path.rpartition(".")
            swaps.append((block.get_submodule(parent_path) if parent_path else block, child,
                          _Replay(record.outputs[path])))
        return swaps


def _run_swapped(task: TaskLoss, swaps: list[Swap]) -> float:
    """The task's loss with each (parent, child name) module swapped for its stand-in, put back afterwards."""
    originals = [(parent, name, parent._modules[name]) for parent, name, _ in swaps]
    for parent, name, stand_in in swaps:
        parent._modules[name] = stand_in
    try:
        return float(task.loss())
    finally:
        for parent, name, original in originals:
            parent._modules[name] = original
