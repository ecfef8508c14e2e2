"""Quick evaluation of the base, each expert and merged models on held-out probe data.

Classifiers: accuracy and loss per task, using a body plus each task's own head (the
``base`` row uses the base body with each expert's head). Causal LMs: loss and perplexity
on probe texts.

A probe runs after every merge, so :class:`Prober` is built for repetition: every probe
set is tokenised once; all tasks' texts share one body forward (the body is the same for
every task, only the heads differ); base and expert rows are computed once (and cached
on disk under the zoo, keyed by a content hash); and for a merged model only the encoder
layers from the first one whose weights changed are recomputed, starting from the cached
hidden states of the previously evaluated model. The cached path runs the very same
modules on the very same tensors as a full pass, so its results are identical.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..cancel import checkpoint
from ..errors import MergeLabError
from ..hashing import cached_text, content_hash, file_digest
from .tasks import Example

CLASSIFIER = "classifier"
CAUSAL_LM = "causal_lm"
CACHE_VERSION = 1


# --------------------------------------------------------------------------- report


@dataclass
class ProbeRow:
    """One evaluated model: ``metrics[task] = {"accuracy", "loss"}`` (or ``{"loss", "perplexity"}``)."""

    name: str
    metrics: dict[str, dict[str, float]]
    kind: str = CLASSIFIER

    def mean(self, metric: str) -> float:
        values = [m[metric] for m in self.metrics.values() if metric in m]
        return sum(values) / len(values) if values else float("nan")


@dataclass
class ProbeReport:
    """Rows named ``base``, each expert's task, ``merged`` or a user label, over the same tasks.

    Adding a row with an existing name replaces it, so a session can keep one row per merge.
    """

    tasks: list[str]
    rows: list[ProbeRow] = field(default_factory=list)
    kind: str = CLASSIFIER
    meta: dict = field(default_factory=dict)

    def row(self, name: str) -> ProbeRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def add(self, row: ProbeRow) -> ProbeReport:
        self.rows = [r for r in self.rows if r.name != row.name] + [row]
        return self

    def _metrics(self) -> list[tuple[str, str]]:
        if self.kind == CAUSAL_LM:
            return [("loss", "loss"), ("perplexity", "ppl")]
        return [("accuracy", "acc"), ("loss", "loss")]

    def table(self) -> tuple[list[str], list[list]]:
        """Headers and rows (floats rounded to 4 places) for a dataframe or a markdown table."""
        metrics = self._metrics()
        headers = ["model"] + [f"{t} {short}" for t in self.tasks for _, short in metrics] + [f"mean {s}" for _, s in metrics]
        rows = []
        for r in self.rows:
            cells = [r.metrics.get(t, {}).get(m, float("nan")) for t in self.tasks for m, _ in metrics]
            cells += [r.mean(m) for m, _ in metrics]
            rows.append([r.name] + [round(c, 4) for c in cells])
        return headers, rows

    def markdown(self) -> str:
        headers, rows = self.table()
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join([str(r[0])] + [f"{c:.3f}" for c in r[1:]]) + " |" for r in rows]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ProbeReport:
        data = json.loads(text)
        rows = [ProbeRow(**r) for r in data.pop("rows")]
        return cls(rows=rows, **data)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean cross-entropy of one task."""
    return {
        "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "loss": float(F.cross_entropy(logits, labels)),
    }


# --------------------------------------------------------------------------- state dicts


def body_from_expert(expert_state: dict[str, torch.Tensor], prefix: str) -> tuple[dict, dict]:
    """Split an expert's tensors into (body in base naming, head) by the model's prefix."""
    body, head, p = {}, {}, prefix + "."
    for name, tensor in expert_state.items():
        (body if name.startswith(p) else head)[name[len(p):] if name.startswith(p) else name] = tensor
    return body, head


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _check_staged_encoder(model) -> None:
    """Refuse, in words, an encoder this probe cannot run stage by stage: it calls ``embeddings``, each of
    ``encoder.layer`` and ``pooler`` itself, so anything else the encoder holds (DeBERTa-v2's ``conv`` after
    block 0, its relative embeddings) would be skipped and every score silently wrong."""
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    problems = []
    if getattr(model, "embeddings", None) is None or not isinstance(layers, torch.nn.ModuleList):
        problems.append("no embeddings + encoder.layer blocks")
    else:
        extra = [n for n, m in encoder.named_children() if n != "layer" and any(True for _ in m.parameters())]
        if extra:
            problems.append(f"encoder parts outside its blocks ({', '.join(extra)})")
    if getattr(model, "pooler", None) is None:
        problems.append("no pooler")
    if problems:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise MergeLabError(
            f"The classifier probe runs BERT-style encoders (embeddings, encoder.layer, pooler) stage by stage; "
            f"this base ({kind}) has {'; '.join(problems)}, so it cannot probe these experts. Importance, merging "
            "and export work as before: evaluate the exported merge with your own script.", field="probe")


class _Body:
    """A base-architecture body that can load bodies in place and run layer by layer.

    Stages: 0 = embeddings, 1..L = encoder layers, L+1 = pooler. Loading a body returns
    the first stage whose tensors differ from the ones currently loaded (exact compare),
    which is where recomputation must start.
    """

    def __init__(self, base_path: Path):
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(str(base_path)).eval()
        _check_staged_encoder(self.model)
        self.prefix = self.model.base_model_prefix
        self.n_layers = len(self.model.encoder.layer)
        self.params = dict(self.model.state_dict())

    def stage_of(self, name: str) -> int:
        if name.startswith("embeddings."):
            return 0
        if name.startswith("encoder.layer."):
            return int(name.split(".")[2]) + 1
        return self.n_layers + 1

    def _normalise(self, body: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept base naming (``encoder.layer.0...``) or expert naming (``bert.encoder...``)."""
        p = self.prefix + "."
        if not any(k in self.params for k in body) and any(k.startswith(p) for k in body):
            body = {k[len(p):]: v for k, v in body.items() if k.startswith(p)}
        missing = [k for k in self.params if k not in body]
        if missing:
            raise MergeLabError(
                f"The merged body lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}: "
                "pass every body tensor, keyed by the base's names."
            )
        for name, tensor in self.params.items():
            if tuple(body[name].shape) != tuple(tensor.shape):
                raise MergeLabError(f"Tensor {name!r} of the merged body has shape {tuple(body[name].shape)}, the base has {tuple(tensor.shape)}.")
        return body

    @torch.no_grad()
    def load(self, body: dict[str, torch.Tensor], changed: set[int] | None = None) -> int:
        """Copy ``body`` into the module; return the first changed stage (L+2 if none).

        ``changed``: stages known to differ (skips the exact comparison; the caller vouches).
        """
        body = self._normalise(body)
        first = self.n_layers + 2
        for name, current in self.params.items():
            stage = self.stage_of(name)
            if changed is not None and stage not in changed:
                continue
            new = body[name].to(current.dtype)
            if changed is None and torch.equal(new, current):
                continue
            current.copy_(new)
            first = min(first, stage)
        return first

    def stage_forward(self, stage: int, hidden, batch) -> torch.Tensor:
        """Run one stage: embeddings take the batch, layers take hidden states, pooler the last."""
        m = self.model
        if stage == 0:
            return m.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        if stage <= self.n_layers:
            return m.encoder.layer[stage - 1](hidden, batch["_mask"])
        return m.pooler(hidden)

    def attach_mask(self, batch: dict) -> dict:
        """The 4-D attention mask the layers expect, built once per batch."""
        from transformers.masking_utils import create_bidirectional_mask

        shape = tuple(batch["input_ids"].shape) + (self.model.config.hidden_size,)
        dummy = torch.zeros(shape)  # only its shape and dtype are read
        batch["_mask"] = create_bidirectional_mask(config=self.model.config, inputs_embeds=dummy, attention_mask=batch["attention_mask"])
        return batch


# --------------------------------------------------------------------------- prober


class Prober:
    """Probe base, experts and merged bodies on probe sets, reusing everything that did not change.

    Takes models and probe sets, not a zoo: ``base_path`` is the base's folder, ``experts[task]`` the
    folder of the expert whose head scores ``task`` and ``probe_sets[task]`` its (text, label) examples
    — so the app probes any selection of folders the same way. :meth:`for_zoo` builds one from a zoo.
    ``cache_dir`` (optional) stores base and expert rows as ``<content hash>.json``; ``read_dirs`` are
    looked in first, never written (a zoo's own rows, written when it was built: :func:`write_zoo_reference`).

    ``first_look`` (optional): positions, per task, of a subset whose texts run first, so a caller of
    :meth:`probe_body` can show a result on them (``on_first_look``) while the rest of the forward runs —
    the same forward in another batch order, so the full result costs no more than without it.
    """

    def __init__(self, base_path: str | Path, experts: Mapping[str, str | Path],
                 probe_sets: Mapping[str, Sequence[Example]], tasks: Iterable[str] | None = None,
                 batch_size: int = 64, max_length: int = 32, cache_dir: str | Path | None = None,
                 read_dirs: Iterable[str | Path] = (), first_look: Mapping[str, Sequence[int]] | None = None):
        from transformers import AutoTokenizer

        self.base_path = Path(base_path)
        self.tasks = list(tasks or experts)
        missing = [t for t in self.tasks if t not in experts or t not in probe_sets]
        if missing:
            raise MergeLabError(f"Task {missing[0]!r} has no expert folder or probe set: give both for every task.")
        self.experts = {t: Path(experts[t]) for t in self.tasks}
        self.sets = {t: list(probe_sets[t]) for t in self.tasks}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.read_dirs = [Path(d) for d in read_dirs]
        self.max_length, self.batch_size = max_length, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.experts[self.tasks[0]]))
        self.body = _Body(self.base_path)
        self.heads = {t: self._load_head(t) for t in self.tasks}
        self.labels = {t: torch.tensor([y for _, y in self.sets[t]]) for t in self.tasks}
        self.first_look = self._first_look_positions(first_look or {})
        self._tokenise()
        self._hidden: list[list[torch.Tensor]] | None = None  # per batch: inputs of every stage, of the loaded body
        self._reference: ProbeReport | None = None
        self._base_state = {k: v.clone() for k, v in self.body.params.items()}

    @classmethod
    def for_zoo(cls, zoo, tasks: Iterable[str] | None = None, probe_sets: Mapping[str, Sequence[Example]] | None = None,
                batch_size: int = 64, max_length: int = 32, disk_cache: bool = True) -> Prober:
        """A prober of a zoo's experts on its own probe sets (or ``probe_sets``, e.g. 400 per task drawn with
        the zoo's seed for benchmarks), caching reference rows under ``zoo.root/probe_cache``."""
        tasks = list(tasks or zoo.tasks)
        sets = {t: list(probe_sets[t]) if probe_sets else zoo.probe(t) for t in tasks}
        return cls(zoo.base_path, {t: zoo.experts[t] for t in tasks}, sets, tasks=tasks, batch_size=batch_size,
                   max_length=max_length, cache_dir=zoo_reference_dir(zoo) if disk_cache else None)

    # ----- setup

    def _load_head(self, task: str) -> torch.nn.Linear:
        """The task's ``classifier`` Linear, read alone from the expert's safetensors."""
        from safetensors import safe_open

        with safe_open(str(self.experts[task] / "model.safetensors"), framework="pt") as fh:
            head = {k: fh.get_tensor(k) for k in fh.keys() if not k.startswith(self.body.prefix + ".")}
        if set(head) != {"classifier.weight", "classifier.bias"}:
            raise MergeLabError(
                f"Expert {task!r} has head tensors {sorted(head)}; the probe supports the standard "
                "sequence-classification head (classifier.weight, classifier.bias) on the pooled output."
            )
        linear = torch.nn.Linear(head["classifier.weight"].shape[1], head["classifier.weight"].shape[0])
        with torch.no_grad():
            linear.weight.copy_(head["classifier.weight"])
            linear.bias.copy_(head["classifier.bias"])
        return linear.eval()

    def _first_look_positions(self, first_look: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
        """Each task's first-look positions, checked: sorted, unique and inside its probe set."""
        out = {}
        for task, positions in first_look.items():
            if task not in self.sets:
                raise MergeLabError(f"first-look subset of {task!r}, which this prober does not probe")
            chosen = sorted({int(i) for i in positions})
            if chosen and not 0 <= chosen[0] <= chosen[-1] < len(self.sets[task]):
                raise MergeLabError(f"first-look positions of {task!r} must lie in 0..{len(self.sets[task]) - 1}")
            out[task] = chosen
        return out

    def _text_offsets(self) -> dict[str, int]:
        offsets, offset = {}, 0
        for t in self.tasks:
            offsets[t], offset = offset, offset + len(self.sets[t])
        return offsets

    def _tokenise(self) -> None:
        """All tasks' texts in one list, sorted by length and batched with per-batch padding — the first-look
        texts in batches of their own, which run first (``n_first_look_batches``)."""
        texts = [text for t in self.tasks for text, _ in self.sets[t]]
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        offsets = self._text_offsets()
        first = {offsets[t] + i for t, positions in self.first_look.items() for i in positions}
        rest = [i for i in range(len(texts)) if i not in first]
        self.batches, self.positions = [], []
        for group in (sorted(first), rest):
            order = sorted(group, key=lambda i: len(enc["input_ids"][i]))
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                feats = [{k: enc[k][i] for k in enc.keys()} for i in idx]
                batch = dict(self.tokenizer.pad(feats, return_tensors="pt"))
                self.batches.append(self.body.attach_mask(batch))
                self.positions.append(torch.tensor(idx))
            if group is not rest:
                self.n_first_look_batches = len(self.batches)
        self.n_texts = len(texts)
        self.n_tokens = int(sum(int(b["attention_mask"].sum()) for b in self.batches))

    # ----- forward

    @torch.no_grad()
    def _pooled(self, start: int, after_first_look=None) -> torch.Tensor:
        """Pooled outputs of the loaded body for every text, recomputing stages >= ``start``; calls
        ``after_first_look(pooled)`` once the first-look batches are done (the other rows not yet set)."""
        last = self.body.n_layers + 1
        if self._hidden is None:
            start = 0
        pooled = torch.empty(self.n_texts, self.body.model.config.hidden_size)
        new_cache = []
        for b, batch in enumerate(self.batches):
            checkpoint()  # Stop ends a probe between batches
            inputs = list(self._hidden[b][:start + 1]) if start > 0 else [None]
            hidden = inputs[-1]
            for stage in range(start, last + 1):
                hidden = self.body.stage_forward(stage, hidden, batch)
                if stage < last:
                    inputs.append(hidden)
            new_cache.append(inputs)
            pooled[self.positions[b]] = hidden
            if after_first_look is not None and b + 1 == self.n_first_look_batches:
                after_first_look(pooled)
        self._hidden = new_cache
        return pooled

    def _row(self, name: str, pooled: torch.Tensor) -> ProbeRow:
        metrics, offset = {}, 0
        with torch.no_grad():
            for t in self.tasks:
                n = len(self.sets[t])
                logits = self.heads[t](pooled[offset:offset + n])
                metrics[t] = classification_metrics(logits, self.labels[t])
                offset += n
        return ProbeRow(name=name, metrics=metrics)

    def _first_look_row(self, name: str, pooled: torch.Tensor) -> ProbeRow:
        """The metrics of the first-look texts alone (tasks without a first-look subset left out)."""
        offsets, metrics = self._text_offsets(), {}
        with torch.no_grad():
            for t, positions in self.first_look.items():
                if positions:
                    rows = torch.tensor(positions)
                    metrics[t] = classification_metrics(self.heads[t](pooled[offsets[t] + rows]), self.labels[t][rows])
        return ProbeRow(name=name, metrics=metrics)

    def _eval_body(self, name: str, body: dict[str, torch.Tensor], changed: set[int] | None = None,
                   on_first_look=None) -> ProbeRow:
        after = None if on_first_look is None else (lambda pooled: on_first_look(self._first_look_row(name, pooled)))
        try:
            start = self.body.load(body, changed)
            if start > self.body.n_layers + 1 and self._last_pooled is not None:
                return self._row(name, self._last_pooled)  # nothing changed: same outputs
            self._last_pooled = self._pooled(start, after)
        except BaseException:
            self._hidden = self._last_pooled = None  # weights and cache may disagree now: forget the cache
            raise
        return self._row(name, self._last_pooled)

    _last_pooled: torch.Tensor | None = None
    n_first_look_batches = 0

    # ----- public

    def _cache_key(self) -> str:
        files = [self.base_path / "model.safetensors"] + [self.experts[t] / "model.safetensors" for t in self.tasks]
        return content_hash({"v": CACHE_VERSION, "tasks": self.tasks, "sets": self.sets, "max_length": self.max_length},
                            [_digest(path) for path in files])

    def _cache_file(self) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{self._cache_key()}.json"

    def reference(self) -> ProbeReport:
        """Rows ``base`` and one per expert (body of the expert with every task's own head); computed once,
        or read from ``read_dirs`` / ``cache_dir`` when a file of the same content key is there."""
        if self._reference is not None:
            return self._reference
        if self.read_dirs or self.cache_dir is not None:
            name = f"{self._cache_key()}.json"
            for folder in self.read_dirs:
                if (folder / name).is_file():
                    try:
                        self._reference = ProbeReport.from_json((folder / name).read_text(encoding="utf-8"))
                        return self._reference
                    except (OSError, ValueError, TypeError, KeyError):
                        pass  # unreadable: the next place, or compute
        self._reference = cached_text(self._cache_file(), self._compute_reference, ProbeReport.from_json,
                                      ProbeReport.to_json)
        return self._reference

    reference_computed = False  # True once this prober ran base and experts itself (not read from a file)

    def reference_file(self) -> Path | None:
        """The readable file holding this prober's reference rows, if one is on disk already."""
        name = f"{self._cache_key()}.json"
        dirs = self.read_dirs + ([self.cache_dir] if self.cache_dir is not None else [])
        return next((folder / name for folder in dirs if (folder / name).is_file()), None)

    def _compute_reference(self) -> ProbeReport:
        self.reference_computed = True
        report = ProbeReport(tasks=list(self.tasks), meta={"n_probe": {t: len(s) for t, s in self.sets.items()}})
        for t in self.tasks:
            body, _ = body_from_expert(load_safetensors(self.experts[t] / "model.safetensors"), self.body.prefix)
            report.add(self._eval_body(t, body))
        base_row = self._eval_body("base", self._base_state)  # leaves the base loaded and its hidden states cached
        report.rows.insert(0, base_row)
        return report

    def probe_body(self, body: dict[str, torch.Tensor], name: str = "merged", changed_layers: Iterable | None = None,
                   on_first_look=None) -> ProbeRow:
        """Evaluate a merged body (base naming) with every task's head.

        ``changed_layers`` (optional): layers that differ from the previously probed body,
        as ``"embeddings"``, block indices and ``"head"``/``"pooler"``; without it, tensors
        are compared exactly. Only layers from the first changed one are recomputed.
        ``on_first_look`` (optional) gets the :class:`ProbeRow` of the first-look subset as soon as its
        texts are through, before the rest run (not called when nothing changed: the result is at once).
        """
        return self._eval_body(name, body, self._stages(changed_layers), on_first_look)

    def probe_task_bodies(self, bodies: Mapping[str, dict[str, torch.Tensor]], name: str = "merged") -> ProbeRow:
        """Evaluate a method of one body per task (EMR-Merging): task t scored on ``bodies[t]`` with t's head.

        Never one body for all tasks: a per-task-body merge is a different model per task, and scoring every
        task on one of them (or on the unified vector) measures something else. Costs a probe per task (each
        body runs over every probe text; the cache still skips layers equal to the body probed before)."""
        missing = [t for t in self.tasks if t not in bodies]
        if missing:
            raise MergeLabError(f"no body for task {missing[0]!r}: a merge of one body per task needs a body for "
                                f"every probed task ({', '.join(self.tasks)})")
        metrics = {t: self._eval_body(name, bodies[t]).metrics[t] for t in self.tasks}
        return ProbeRow(name=name, metrics=metrics)

    def _stages(self, layers: Iterable | None) -> set[int] | None:
        if layers is None:
            return None
        stages = set()
        for layer in layers:
            if layer == "embeddings":
                stages.add(0)
            elif layer in ("head", "pooler"):
                stages.add(self.body.n_layers + 1)
            elif isinstance(layer, int) and 0 <= layer < self.body.n_layers:
                stages.add(layer + 1)
            else:
                raise MergeLabError(f"Unknown layer {layer!r} in changed_layers: use 'embeddings', 0..{self.body.n_layers - 1} or 'head'.")
        return stages

    def report(self, merged: Mapping[str, Any] | None = None) -> ProbeReport:
        """Reference rows plus one row per ``{label: body}`` in ``merged``; a value with ``task_bodies`` (a
        :class:`~merging.engine.MergeResult`) is scored task by task on its own bodies when it has them."""
        ref = self.reference()
        report = ProbeReport(tasks=list(ref.tasks), rows=list(ref.rows), meta=dict(ref.meta))
        for label, merge in (merged or {}).items():
            bodies = getattr(merge, "task_bodies", None)
            report.add(self.probe_task_bodies(bodies, name=label) if bodies else
                       self.probe_body(getattr(merge, "tensors", merge), name=label))
        return report

    @torch.no_grad()
    def reference_forward_seconds(self) -> float:
        """Time of one plain HF forward of the base over the same batches (the speed yardstick)."""
        model = self.body.model
        start = time.perf_counter()
        for batch in self.batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch.get("token_type_ids"))
        return time.perf_counter() - start


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) → file_digest: a weight file is read once


def _digest(path: Path) -> str:
    """``file_digest`` of a weight file, remembered while its size and modification time stay the same (each
    prober of a process hashed the same 90 MB files again)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


def zoo_reference_dir(zoo) -> Path:
    """Where a zoo (or the zoo folder ``zoo``) keeps its probe's reference rows (``<content key>.json``)."""
    return Path(zoo if isinstance(zoo, (str, Path)) else zoo.root) / "probe_cache"


def write_zoo_reference(zoo) -> ProbeReport:
    """Compute and store the reference rows (base and every expert on every probe set) of a classifier zoo,
    once, when it is built: the first probe of a session then reads them instead of running five models over
    every probe set. Keyed like any prober's rows (tasks, probe sets, max length, the weight files' bytes), so
    a selection of the zoo's experts in its order with its probe sets finds them; anything else computes."""
    return Prober.for_zoo(zoo).reference()


# --------------------------------------------------------------------------- causal LMs


def load_body_into(model, body: dict[str, torch.Tensor]) -> None:
    """Load a body keyed by the base's names into a full model (prefix added via base_model_prefix)."""
    prefix = model.base_model_prefix + "."
    own = model.state_dict()
    mapped = {(k if k in own else prefix + k): v for k, v in body.items()}
    unknown = [k for k in mapped if k not in own]
    if unknown:
        raise MergeLabError(f"Tensor {unknown[0]!r} of the merged body does not exist in the model: key tensors by the base's names.")
    model.load_state_dict(mapped, strict=False)


@torch.no_grad()
def causal_lm_metrics(model, sequences: list[list[int]], batch_size: int = 16) -> dict[str, float]:
    """Token-weighted mean next-token loss over all sequences, and perplexity = exp(loss)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    if count == 0:
        raise MergeLabError("The probe texts are too short: each needs at least two tokens.")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def probe_causal_lm(models: dict[str, object], texts: list[str] | None = None, tokenizer=None,
                    token_ids: list[list[int]] | None = None, set_name: str = "probe", max_length: int = 64) -> ProbeReport:
    """Loss / perplexity of each ``{row name: causal LM}`` on the same probe texts (or token ids)."""
    if token_ids is None:
        if texts is None or tokenizer is None:
            raise MergeLabError("Give probe texts with their tokenizer, or token ids, to probe a causal LM.")
        token_ids = [ids for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if len(ids) >= 2]
    report = ProbeReport(tasks=[set_name], kind=CAUSAL_LM, meta={"n_sequences": len(token_ids)})
    for name, model in models.items():
        report.add(ProbeRow(name=name, metrics={set_name: causal_lm_metrics(model, token_ids)}, kind=CAUSAL_LM))
    return report
