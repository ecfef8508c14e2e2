"""The probe for causal LMs: loss and perplexity per task of base, each expert and each merge.

Each task's held-out text (:class:`~merging.io.taskdata.LMExample` rows, disjoint from its few-shot
data) is scored by the same loss the APL measurement uses — mean next-token cross-entropy over the
completion tokens, pooled over the task's target tokens — and perplexity is ``exp(loss)``.

Built for repetition like the classifier probe: the texts are tokenised once; one model, built from
the experts' config, is loaded body by body in place; the rows of the base and of every expert are
computed once per prober (and kept on disk under ``cache_dir``, keyed by a content hash of the
weight files and the texts); a body equal to the one loaded is not run again.

Hidden states below the first changed layer are *not* reused: a decoder layer's inputs (rotary
position embeddings, the causal mask, cache objects) are built inside each family's ``forward`` with
private signatures that differ between GPT-2, Llama and Qwen2 and between transformers versions, so a
layer-by-layer restart would tie the probe to those internals. Every merged row runs one full forward
over the probe texts instead (a tiny cost next to a merge at probe sizes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..cancel import checkpoint
from ..errors import MergeLabError
from ..hashing import content_hash, file_digest
from ..io.experts import ExpertSet
from ..io.taskdata import LMExample
from .model import bind_body, causal_lm_from_config, encode_lm_examples, has_own_lm_head, lm_loss_terms

KIND = "causal_lm"
CACHE_VERSION = 1


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


class LMProber:
    """Probe base, experts and merged bodies of a causal-LM expert set on held-out text per task.

    ``probe_sets[task]`` are the task's held-out examples; every task must be an expert of the set
    (its row is that expert's body on every task). ``tokenizer`` is the models' own.
    """

    def __init__(self, expert_set: ExpertSet, probe_sets: Mapping[str, Sequence[LMExample]], tokenizer, *,
                 tasks: Iterable[str] | None = None, max_length: int = 64, batch_size: int = 16,
                 cache_dir: str | Path | None = None):
        self.expert_set = expert_set
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
                                           untie=has_own_lm_head(expert_set.layout))
        self.params = bind_body(self.model, expert_set.layout, first.body_key, first.name)
        self.batches = {t: [encode_lm_examples(tokenizer, rows[i:i + batch_size], max_length)
                            for i in range(0, len(rows), batch_size)] for t, rows in self.sets.items()}
        self._loaded: str | None = None  # what the live parameters hold ("base", an expert, or None: a merge)
        self._last: dict[str, dict[str, float]] | None = None
        self._reference: LMProbeReport | None = None

    # ---- loading and scoring ----------------------------------------------------------------
    @torch.no_grad()
    def _load(self, body: Mapping[str, torch.Tensor]) -> bool:
        """Copy a body (base names) into the model; whether any tensor changed."""
        missing = [n for n in self.params if n not in body]
        if missing:
            raise MergeLabError(f"the merged body lacks {len(missing)} tensor(s) of the base, e.g. '{missing[0]}': "
                                "pass every merged body tensor, keyed by the base's names")
        changed = False
        for name, param in self.params.items():
            value = body[name]
            if tuple(value.shape) != tuple(param.shape):
                raise MergeLabError(f"tensor '{name}' of the merged body has shape {tuple(value.shape)}, the base "
                                    f"has {tuple(param.shape)}")
            value = value.to(param.dtype)
            if not torch.equal(value, param.data):
                param.data.copy_(value)
                changed = True
        return changed

    @torch.no_grad()
    def _score(self) -> dict[str, dict[str, float]]:
        metrics = {}
        for task, batches in self.batches.items():
            total, count = 0.0, 0
            for batch in batches:
                checkpoint()  # Stop ends a probe between batches
                loss_sum, n = lm_loss_terms(self.model, batch)
                total, count = total + float(loss_sum), count + n
            loss = total / max(count, 1)
            metrics[task] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(count)}
        return metrics

    def _eval(self, body: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        try:
            if self._load(body) or self._last is None:
                self._last = self._score()
        except BaseException:
            self._last = None  # weights and the remembered row may disagree now
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
        cache = self._cache_file()
        if cache is not None and cache.is_file():
            try:
                self._reference = LMProbeReport.from_json(cache.read_text(encoding="utf-8"))
                return self._reference
            except (ValueError, TypeError, KeyError):
                pass  # unreadable cache: recompute and overwrite
        report = LMProbeReport(list(self.tasks), meta={"n_probe": {t: len(s) for t, s in self.sets.items()},
                                                       "max_length": self.max_length})
        for which in ["base", *self.expert_set.experts]:
            report.add(which, self._eval(self._body(which)))
        self._reference = report
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(report.to_json(), encoding="utf-8")
            except OSError:
                pass  # a read-only folder still probes, without the disk cache
        return report

    def probe_body(self, body: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        """``{task: {loss, perplexity, tokens}}`` of a merged body keyed by base names."""
        return self._eval(body)

    def report(self, merged: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> LMProbeReport:
        """Reference rows plus one row per ``{label: body}``."""
        ref = self.reference()
        out = LMProbeReport(list(ref.tasks), [dict(r) for r in ref.rows], meta=dict(ref.meta))
        for label, body in (merged or {}).items():
            out.add(label, self.probe_body(body))
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
