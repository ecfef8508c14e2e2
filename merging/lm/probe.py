"""The probe for causal LMs: loss and perplexity per task of base, each expert and each merge.

Each task's held-out text (:class:`~merging.io.taskdata.LMExample` rows, disjoint from its few-shot
data) is scored by the same loss the APL measurement uses — mean next-token cross-entropy over the
completion tokens, pooled over the task's target tokens — and perplexity is ``exp(loss)``.

Built for repetition like the classifier probe: the texts are tokenised once; one model, built from
the experts' config, is loaded body by body in place; the rows of the base and of every expert are
computed once per prober (and kept on disk under ``cache_dir``, keyed by a content hash of the
weight files and the texts); a body equal to the one loaded is not run again; and for a body whose
first changed tensor sits in block k, blocks 0…k−1 are not run: each is swapped, for that forward,
for a stand-in that returns the output it gave on the same batch last time (recorded by a forward
hook). The model's own forward still builds embeddings, masks and rotary tables, so nothing depends
on a family's private layer signature — only on the blocks being a ``ModuleList`` called in order,
which holds for GPT-2, Llama, Qwen2 and Mistral. Where no such list is found, every row runs in full.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cancel import checkpoint
from ..errors import MergeLabError
from ..hashing import cached_text, content_hash, file_digest
from ..io.experts import ExpertSet
from ..io.taskdata import LMExample
from .model import bind_body, causal_lm_from_config, encode_lm_examples, has_own_lm_head, lm_loss_terms

KIND = "causal_lm"
CACHE_VERSION = 1
REUSE_BYTES = 512 * 2**20  # recorded block outputs a prober keeps for reuse
_BLOCK_PATH = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|blocks|block))\.0\.")


@dataclass
class LMProbeReport:
    """Rows (``base``, each expert, each merge label) of ``{task: {"loss", "perplexity"}}``; the JSON has
    the classifier report's shape (tasks, rows of name/metrics/kind, kind, meta) with ``kind: causal_lm``."""

    tasks: list[str]
    rows: list[dict] = field(default_factory=list)
    kind: str = KIND
    meta: dict = field(default_factory=dict)

    def row(self, name: str) -> dict[str, dict[str, float]]:
        for r in self.rows:
            if r["name"] == name:
                return r["metrics"]
        raise KeyError(name)

    def add(self, name: str, metrics: Mapping[str, Mapping[str, float]]) -> LMProbeReport:
        """Add a row, replacing one of the same name (a session keeps one row per merge label)."""
        self.rows = [r for r in self.rows if r["name"] != name]
        self.rows.append({"name": name, "metrics": {t: dict(m) for t, m in metrics.items()}, "kind": KIND})
        return self

    def table(self) -> tuple[list[str], list[list]]:
        """Headers and rows (task loss and perplexity, then their means), floats rounded to 4 places."""
        headers = ["model"] + [f"{t} {m}" for t in self.tasks for m in ("loss", "ppl")] + ["mean loss", "mean ppl"]
        out = []
        for r in self.rows:
            cells = [r["metrics"].get(t, {}).get(m, float("nan")) for t in self.tasks for m in ("loss", "perplexity")]
            losses, ppls = cells[0::2], cells[1::2]
            cells += [sum(losses) / len(losses), sum(ppls) / len(ppls)]
            out.append([r["name"]] + [round(c, 4) for c in cells])
        return headers, out

    def markdown(self) -> str:
        headers, rows = self.table()
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join([str(r[0])] + [f"{c:.3f}" for c in r[1:]]) + " |" for r in rows]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LMProbeReport:
        return cls(**json.loads(text))


def _nbytes(output) -> int:
    tensors = output if isinstance(output, (tuple, list)) else (output,)
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _Replay(torch.nn.Module):
    """Stands in for an unchanged block for one forward: returns what the block returned on this batch."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


def _block_list(model, layout, key_of) -> torch.nn.ModuleList | None:
    """The model's ``ModuleList`` of blocks (``transformer.h``, ``model.layers``), found from the module path
    of block 0's tensors; None where the blocks are not one list in layer order."""
    names = [n for n, i in layout.tensors.items() if i.layer == "0"]
    if not names:
        return None
    match = _BLOCK_PATH.match(key_of(names[0]))
    if match is None:
        return None
    try:
        blocks = model.get_submodule(match.group(1))
    except AttributeError:
        return None
    return blocks if isinstance(blocks, torch.nn.ModuleList) and len(blocks) == layout.n_blocks else None


class LMProber:
    """Probe base, experts and merged bodies of a causal-LM expert set on held-out text per task.

    ``probe_sets[task]`` are the task's held-out examples; every task must be an expert of the set
    (its row is that expert's body on every task). ``tokenizer`` is the models' own.
    """

    def __init__(self, expert_set: ExpertSet, probe_sets: Mapping[str, Sequence[LMExample]], tokenizer, *,
                 tasks: Iterable[str] | None = None, max_length: int = 64, batch_size: int = 16,
                 cache_dir: str | Path | None = None, reuse_bytes: int = REUSE_BYTES, device: str = "cpu"):
        self.expert_set = expert_set
        self.device = device  # the model and every batch live there; bodies are copied in
        self.tasks = list(tasks or probe_sets)
        missing = [t for t in self.tasks if t not in probe_sets or not probe_sets[t]]
        if missing:
            raise MergeLabError(f"task '{missing[0]}' has no held-out text to probe: give it with --probe-data "
                                f"{missing[0]}=FILE (or more rows in its --data file than the few-shot draw takes)")
        unknown = [t for t in self.tasks if t not in expert_set.experts]
        if unknown:
            raise MergeLabError(f"probe task '{unknown[0]}' is not an expert of this set (experts: "
                                f"{', '.join(expert_set.experts)}): name each task after its expert")
        self.sets = {t: list(probe_sets[t]) for t in self.tasks}
        self.max_length, self.cache_dir = max_length, Path(cache_dir) if cache_dir is not None else None
        first = next(iter(expert_set.experts.values()))
        self.model = causal_lm_from_config(first.source.config or expert_set.base.config, first.name,
                                           untie=has_own_lm_head(expert_set.layout)).to(device)
        self.params = bind_body(self.model, expert_set.layout, first.body_key, first.name)
        self.batches = {t: [{k: v.to(device) for k, v in encode_lm_examples(tokenizer, rows[i:i + batch_size],
                                                                           max_length).items()}
                            for i in range(0, len(rows), batch_size)] for t, rows in self.sets.items()}
        self.blocks = _block_list(self.model, expert_set.layout, first.body_key)
        self.n_blocks = expert_set.layout.n_blocks
        self._outputs: dict[tuple[str, int], dict[int, object]] = {}  # (task, batch) → block → its last output
        self._sizes: dict[tuple[str, int, int], int] = {}
        self.reuse_bytes = reuse_bytes  # recorded outputs beyond this are not kept (those blocks rerun)
        self._current: tuple[str, int] | None = None
        for index, block in enumerate(self.blocks or []):
            block.register_forward_hook(self._recorder(index))
        self._last: dict[str, dict[str, float]] | None = None
        self._reference: LMProbeReport | None = None

    # ---- loading and scoring ----------------------------------------------------------------
    def _stage(self, name: str) -> int:
        """0 for embeddings, k + 1 for block k, n_blocks + 1 for the head (final norm, LM head)."""
        layer = self.expert_set.layout[name].layer
        return int(layer) + 1 if layer.isdigit() else 0 if layer == "embeddings" else self.n_blocks + 1

    @torch.no_grad()
    def _load(self, body: Mapping[str, torch.Tensor]) -> int:
        """Copy a body (base names) into the model; the first stage whose tensors changed
        (``n_blocks + 2`` when none did)."""
        missing = [n for n in self.params if n not in body]
        if missing:
            raise MergeLabError(f"the merged body lacks {len(missing)} tensor(s) of the base, e.g. '{missing[0]}': "
                                "pass every merged body tensor, keyed by the base's names")
        first = self.n_blocks + 2
        for name, param in self.params.items():
            value = body[name]
            if tuple(value.shape) != tuple(param.shape):
                raise MergeLabError(f"tensor '{name}' of the merged body has shape {tuple(value.shape)}, the base "
                                    f"has {tuple(param.shape)}")
            value = value.to(param.device, param.dtype)
            if not torch.equal(value, param.data):
                param.data.copy_(value)
                first = min(first, self._stage(name))
        return first

    def _recorder(self, index: int):
        def record(_module, _inputs, output):
            if self._current is None:
                return
            where = (*self._current, index)
            size = _nbytes(output)
            held = sum(self._sizes.values()) - self._sizes.get(where, 0)
            if held + size <= self.reuse_bytes:
                self._outputs.setdefault(self._current, {})[index] = output
                self._sizes[where] = size
            else:  # over the budget: forget this block's output, so it and every later block rerun
                self._outputs.get(self._current, {}).pop(index, None)
                self._sizes.pop(where, None)
        return record

    @torch.no_grad()
    def _score(self, start: int) -> dict[str, dict[str, float]]:
        """Every task's loss; blocks before ``start - 1`` replay their recorded outputs."""
        metrics = {}
        for task, batches in self.batches.items():
            total, count = 0.0, 0
            for index, batch in enumerate(batches):
                checkpoint()  # Stop ends a probe between batches
                loss_sum, n = self._batch_terms((task, index), batch, start)
                total, count = total + float(loss_sum), count + n
            loss = total / max(count, 1)
            metrics[task] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(count)}
        return metrics

    def _batch_terms(self, key: tuple[str, int], batch, start: int):
        recorded = self._outputs.get(key, {})
        # blocks 0 … skip−1 are unchanged since they were recorded (none without a block list)
        skip = min(max(start - 1, 0), self.n_blocks) if self.blocks is not None else 0
        skip = next((i for i in range(skip) if i not in recorded), skip)  # the recorded prefix only
        originals = [self.blocks[i] for i in range(skip)]
        for i in range(skip):
            self.blocks[i] = _Replay(recorded[i])
        self._current = key
        try:
            return lm_loss_terms(self.model, batch)
        finally:
            self._current = None
            for i, block in enumerate(originals):
                self.blocks[i] = block

    def _eval(self, body: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        try:
            start = self._load(body)
            if start <= self.n_blocks + 1 or self._last is None:
                self._last = self._score(start if self._last is not None else 0)
        except BaseException:
            self._last = None  # weights and the remembered outputs may disagree now: forget them
            self._outputs.clear()
            self._sizes.clear()
            raise
        return self._last

    def _body(self, which: str) -> dict[str, torch.Tensor]:
        source = self.expert_set.base if which == "base" else self.expert_set.experts[which]
        return {n: source.get(n) for n in self.params}

    # ---- public -----------------------------------------------------------------------------
    def reference(self) -> LMProbeReport:
        """Rows ``base`` and one per expert; computed once (and read from the disk cache when present)."""
        if self._reference is not None:
            return self._reference
        self._reference = cached_text(self._cache_file(), self._compute_reference, LMProbeReport.from_json,
                                      LMProbeReport.to_json)
        return self._reference

    def _compute_reference(self) -> LMProbeReport:
        report = LMProbeReport(list(self.tasks), meta={"n_probe": {t: len(s) for t, s in self.sets.items()},
                                                       "max_length": self.max_length})
        for which in ["base", *self.expert_set.experts]:
            report.add(which, self._eval(self._body(which)))
        return report

    def probe_body(self, body: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        """``{task: {loss, perplexity, tokens}}`` of a merged body keyed by base names."""
        return self._eval(body)

    def probe_task_bodies(self, bodies: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
        """A merge of one body per task (EMR-Merging): task t scored on ``bodies[t]`` alone — never one of the
        bodies, or the unified vector, for every task."""
        missing = [t for t in self.tasks if t not in bodies]
        if missing:
            raise MergeLabError(f"no body for task {missing[0]!r}: a merge of one body per task needs a body for "
                                f"every probed task ({', '.join(self.tasks)})")
        return {t: self._eval(bodies[t])[t] for t in self.tasks}

    def report(self, merged: Mapping[str, Any] | None = None) -> LMProbeReport:
        """Reference rows plus one row per ``{label: body}``; a value with ``task_bodies`` (a
        :class:`~merging.engine.MergeResult`) is scored task by task on its own bodies when it has them."""
        ref = self.reference()
        out = LMProbeReport(list(ref.tasks), [dict(r) for r in ref.rows], meta=dict(ref.meta))
        for label, merge in (merged or {}).items():
            bodies = getattr(merge, "task_bodies", None)
            out.add(label, self.probe_task_bodies(bodies) if bodies else
                    self.probe_body(getattr(merge, "tensors", merge)))
        return out

    def _cache_file(self) -> Path | None:
        if self.cache_dir is None:
            return None
        sources = [self.expert_set.base, *(e.source for e in self.expert_set.experts.values())]
        if any(s.memory is not None or s.pickled for s in sources):
            return None  # in-memory models have no files to key a disk cache on
        files = sorted({str(entry.file) for s in sources for entry in s.tensors.values()})
        key = content_hash({"v": CACHE_VERSION, "tasks": self.tasks, "sets": self.sets, "max_length": self.max_length,
                            "experts": list(self.expert_set.experts)}, [file_digest(f) for f in files])
        return self.cache_dir / f"lm-{key}.json"
