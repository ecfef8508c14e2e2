"""Fine-tune one expert per task from the packaged base, by step count, reproducibly.

Experts are plain ``BertForSequenceClassification`` folders (standard head, no remote
code) so any transformers user can load them, and the merge library sees a BERT body
plus a ``classifier.*`` task head. Training is by step count - never by a time budget -
because timings on shared 2-core machines swing 4-6x and a zoo must be reproducible
from (task, seed, steps).
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..cancel import checkpoint
from ..io.taskdata import FEWSHOT_FILE, read_examples  # noqa: F401  (the one reader; re-exported)
from .tasks import Example, Task, TaskSplit

Progress = Callable[[float, str], None]

TASK_FILE = "merge_lab_task.json"
PROBE_FILE = "probe.jsonl"
#: Frozen: the 30k-row word embeddings dominate the parameter count and barely move in a
#: short fine-tune, and freezing them keeps deltas (and merges) focused on the encoder.
FROZEN = ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings")


@dataclass
class TrainConfig:
    """Hyper-parameters of one expert; recorded in ``merge_lab_task.json``."""

    steps: int
    seed: int = 0
    batch_size: int = 32
    max_length: int = 32
    lr_encoder: float = 1e-4
    lr_head: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1


def _quiet_transformers() -> None:
    """Silence "newly initialized weights" notices: a fresh head is the point here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_base_classifier(base_path: Path, label_names: list[str], seed: int):
    """Base body + a freshly initialised (seeded) classification head, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_path),
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    return model, tokenizer


def encode(tokenizer, texts: list[str], max_length: int = 32) -> dict[str, torch.Tensor]:
    """Tokenise a batch, padded to its longest member (cheaper than padding to max_length)."""
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with a larger rate for the fresh head; no decay on biases and norms."""
    groups = {(h, d): [] for h in (True, False) for d in (True, False)}
    for name, param in model.named_parameters():
        if any(f in name for f in FROZEN):
            param.requires_grad_(False)
            continue
        head = not name.startswith(model.base_model_prefix + ".")
        decay = not (name.endswith("bias") or "LayerNorm" in name)
        groups[(head, decay)].append(param)
    return torch.optim.AdamW(
        [
            {"params": ps, "lr": cfg.lr_head if head else cfg.lr_encoder, "weight_decay": cfg.weight_decay if decay else 0.0}
            for (head, decay), ps in groups.items()
            if ps
        ]
    )


def _batches(train: list[Example], cfg: TrainConfig) -> Iterator[list[Example]]:
    """Seeded epochs over the training examples, one batch at a time, forever."""
    rng = np.random.default_rng(cfg.seed)
    while True:
        order = rng.permutation(len(train))
        for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            yield [train[i] for i in order[start:start + cfg.batch_size]]
        if len(order) < cfg.batch_size:
            yield [train[i] for i in order]


def train_classifier(model, tokenizer, train: list[Example], cfg: TrainConfig, progress: Progress | None = None, label: str = "") -> dict:
    """Fine-tune ``model`` in place for ``cfg.steps`` steps; returns timing statistics."""
    from transformers import get_linear_schedule_with_warmup

    if not train:
        raise ValueError("no training examples")
    torch.manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_fraction * cfg.steps), cfg.steps)
    model.train()
    batches = _batches(train, cfg)
    bar = tqdm(total=cfg.steps, desc=f"train {label}", file=sys.stderr, leave=False, dynamic_ncols=True)
    start, loss_value = time.perf_counter(), float("nan")
    for step in range(1, cfg.steps + 1):
        checkpoint()  # Stop ends a training run between steps
        batch = next(batches)
        inputs = encode(tokenizer, [t for t, _ in batch], cfg.max_length)
        out = model(**inputs, labels=torch.tensor([y for _, y in batch]))
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = out.loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if progress:
            progress(step / cfg.steps, f"{label}: step {step}/{cfg.steps}, loss {loss_value:.3f}")
    bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    return {"train_seconds": round(seconds, 2), "seconds_per_step": round(seconds / max(cfg.steps, 1), 3), "final_loss": round(loss_value, 4)}


@torch.no_grad()
def evaluate_classifier(model, tokenizer, examples: list[Example], max_length: int = 32, batch_size: int = 100) -> dict:
    """Accuracy and mean cross-entropy in eval mode (no dropout)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        labels = torch.tensor([y for _, y in batch])
        logits = model(**encode(tokenizer, [t for t, _ in batch], max_length)).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    n = max(len(examples), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n}


def with_body(model, body_state: dict[str, torch.Tensor]):
    """A copy of a classifier whose body is replaced (its head is kept)."""
    clone = copy.deepcopy(model)
    getattr(clone, clone.base_model_prefix).load_state_dict(body_state)
    return clone.eval()


def write_examples(path: Path, examples: list[Example], label_names: list[str]) -> None:
    """JSONL with text, label index and label name: the zoo carries its own data."""
    with open(path, "w", encoding="utf-8") as fh:
        for text, label in examples:
            fh.write(json.dumps({"text": text, "label": label, "label_name": label_names[label]}, ensure_ascii=False) + "\n")


def train_expert(
    task: Task, split: TaskSplit, base_path: Path, out_dir: Path, cfg: TrainConfig, progress: Progress | None = None, extra: dict | None = None
) -> dict:
    """Train, measure (base body + expert head vs expert on the probe set) and save an expert.

    Writes an HF folder (safetensors + tokenizer) plus ``merge_lab_task.json``,
    ``fewshot.jsonl`` and ``probe.jsonl`` into ``out_dir``; returns the task record.
    """
    model, tokenizer = load_base_classifier(base_path, task.label_names, cfg.seed)
    body = getattr(model, model.base_model_prefix)
    base_body = {k: v.detach().clone() for k, v in body.state_dict().items()}
    stats = train_classifier(model, tokenizer, split.train_examples, cfg, progress, label=task.name)
    probe = split.probe_examples
    expert_eval = evaluate_classifier(model, tokenizer, probe, cfg.max_length)
    base_eval = evaluate_classifier(with_body(model, base_body), tokenizer, probe, cfg.max_length)
    record = {
        "task": task.name,
        "label_names": task.label_names,
        "description": task.description,
        "source": task.source,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "train_config": asdict(cfg),
        "n_train_pool": len(split.train),
        "fewshot_indices": split.fewshot,
        "probe_indices": split.probe,
        "probe_accuracy": {"base_with_head": round(base_eval["accuracy"], 4), "expert": round(expert_eval["accuracy"], 4)},
        "probe_loss": {"base_with_head": round(base_eval["loss"], 4), "expert": round(expert_eval["loss"], 4)},
        "timing": stats,
        "base": str(base_path),
        **(extra or {}),
    }
    _save(out_dir, model, tokenizer, task, split, record)
    return record


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) → sha256: each file is hashed once


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered by path, size and modification time (opening a zoo re-checks every
    expert; a file that changed on disk gets hashed again)."""
    from ..hashing import file_digest

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = _DIGESTS[key] = file_digest(path, algorithm="sha256")
    return digest


def _save(out_dir: Path, model, tokenizer, task: Task, split: TaskSplit, record: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))  # transformers 5 always writes model.safetensors
    tokenizer.save_pretrained(str(out_dir))
    record["weights_sha256"] = file_sha256(out_dir / "model.safetensors")  # verified when the zoo is opened
    write_examples(out_dir / FEWSHOT_FILE, split.fewshot_examples, task.label_names)
    write_examples(out_dir / PROBE_FILE, split.probe_examples, task.label_names)
    (out_dir / TASK_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
