"""The LM demo zoo: a small Llama base pretrained from scratch on packaged text, and its experts.

No package ships causal-LM weights, so the project trains its own, reproducibly by step count (never
by time: shared 2-core machines swing several-fold). ``tasks.yaml`` (``lm_zoos``) says what a zoo is
built from; :func:`build_lm_zoo` then

1. reads each text source (Debian fortunes) and splits it with the seed into ``[probe | few-shot | train]``;
2. trains a byte-level BPE tokenizer with ``tokenizers`` on the pretraining mix's train rows only;
3. pretrains the base on that mix, and fine-tunes one expert per language or domain from it;
4. writes HF folders (safetensors, tokenizer files, generation_config.json) in the zoo layout of
   :mod:`.zoo` — ``base/`` inside the zoo, and ``experts/<task>/`` with ``fewshot.jsonl`` and
   ``probe.jsonl`` as ``{"text"}`` rows — so ``zoo:NAME/TASK`` refs and every ``--zoo`` command work.

Held-out probe rows never reach the tokenizer, the base or an expert. The build is idempotent (a zoo
with the same settings is reused), atomic (built in a sibling folder, renamed at the end) and records
a SHA-256 per weight file, so the same seed gives the same checksums.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..cancel import checkpoint
from ..errors import MergeLabError
from ..hashing import content_hash
from ..io.names import check_name, safe_join
from ..io.taskdata import FEWSHOT_FILE, LMExample
from ..paths import zoos_root
from .tasks import _clean_fortune, _fortune_files, _read_text, manifest
from .training import PROBE_FILE, TASK_FILE, file_sha256

KIND = "causal_lm"
BASE_DIR = "base"
BASE_FILE = "merge_lab_base.json"
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: pad, BOS (added before every text), EOS
FORMAT = 1


# --------------------------------------------------------------------------- settings and text


def lm_zoo_names() -> list[str]:
    """Names of the LM zoos ``tasks.yaml`` describes (``zoo build --name`` builds these as LM zoos)."""
    return list(manifest().get("lm_zoos") or {})


def lm_zoo_spec(name: str, overrides: dict | None = None) -> dict:
    """The settings of LM zoo ``name`` (``tasks.yaml``), with ``overrides`` merged in one level deep
    (``{"model": {"hidden_size": 64}}`` changes just that key) — how tests build a tiny one."""
    zoos = manifest().get("lm_zoos") or {}
    base = zoos.get(name) or zoos.get("lm")
    if base is None:
        raise MergeLabError("tasks.yaml describes no LM zoo (lm_zoos): reinstall Merge Lab")
    spec = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = copy.deepcopy(value)
    return spec


def _source_files(spec: dict, text: str) -> list[Path]:
    sources = manifest()["lm_texts"]
    if text not in sources:
        raise MergeLabError(f"unknown LM text {text!r}: choose from {', '.join(sources)}", field="tasks")
    entry = sources[text]
    params = {"root": spec["root"], "exclude": [*spec.get("exclude", []), *entry.get("exclude", [])]}
    return _fortune_files(params, entry)


def check_texts(spec: dict, texts: Iterable[str]) -> None:
    """Refuse a build whose text sources are unknown or not installed, naming the apt packages to install."""
    unknown = sorted(set(texts) - set(manifest()["lm_texts"]))
    if unknown:
        raise MergeLabError(f"unknown LM text {unknown[0]!r}: choose from {', '.join(manifest()['lm_texts'])}",
                            field="tasks")
    missing = sorted({manifest()["lm_texts"][t]["package"] for t in texts if not _source_files(spec, t)})
    if missing:
        pkgs = " ".join(missing)
        raise MergeLabError(f"the LM zoo reads the Debian fortunes, and {pkgs} {'is' if len(missing) == 1 else 'are'} "
                            f"not installed (nothing under {spec['root']}): run `apt-get install {pkgs}` and build again")


def read_texts(spec: dict, text: str) -> list[str]:
    """The cleaned, deduplicated items of one text source, in file order (items split on a ``%`` line)."""
    import re

    out, seen = [], set()
    for file in _source_files(spec, text):
        for item in re.split(r"^%\s*$", _read_text(file), flags=re.M):
            cleaned = _clean_fortune(item, int(spec["max_chars"]))
            if cleaned and cleaned not in seen:
                seen.add(cleaned)
                out.append(cleaned)
    return out


def split_texts(items: list[str], seed: int, n_probe: int, n_fewshot: int, max_items: int) -> dict[str, list[int]]:
    """Seeded, disjoint ``probe`` / ``fewshot`` / ``train`` index lists (head of one permutation is the probe)."""
    if len(items) < 8:
        raise MergeLabError(f"an LM text has only {len(items)} items; it needs at least 8 to split")
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(items))[:max_items]]
    n_probe = min(n_probe, len(order) // 4)
    n_fewshot = min(n_fewshot, len(order) // 4)
    return {"probe": order[:n_probe], "fewshot": order[n_probe:n_probe + n_fewshot],
            "train": order[n_probe + n_fewshot:]}


# --------------------------------------------------------------------------- tokenizer and model


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (every string encodes; nothing is unknown) that puts BOS before each text,
    as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def new_base_model(spec: dict, vocab_size: int, seed: int):
    """A freshly initialised (seeded) Llama of the spec's size, with a tied LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=int(spec["max_length"]) + 1,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
                         **spec["model"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config.do_sample = False  # written as generation_config.json: greedy by default
    model.generation_config.max_new_tokens = 24
    return model


def build_threads() -> int:
    """Torch threads of a build: ``MERGE_LAB_LM_THREADS``, default 1.

    Not one per core: on the shared 2-core machines a second thread waits at every op's barrier for a core
    another process holds — measured 7.8 s/step with 2 threads against 1.2 s/step with 1 (0.36 s of CPU),
    for the 4-layer base. One thread also keeps the build's float results independent of the core count,
    so the same seed gives the same checksums on any machine."""
    raw = os.environ.get("MERGE_LAB_LM_THREADS", "").strip()
    return max(1, min(int(raw), os.cpu_count() or 1)) if raw.isdigit() and int(raw) > 0 else 1


@contextmanager
def torch_threads(n: int | None = None):
    """``n`` torch threads (default :func:`build_threads`) for a block, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or build_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batches(rows: list[str], batch_size: int, seed: int) -> Iterator[list[LMExample]]:
    """Seeded epochs over the rows, one batch at a time, forever."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(rows))
        for start in range(0, max(len(order) - batch_size + 1, 1), batch_size):
            yield [LMExample("", rows[i]) for i in order[start:start + batch_size]]


def train_lm(model, tokenizer, rows: list[str], steps: int, lr: float, batch_size: int, max_length: int, seed: int,
             label: str) -> dict:
    """Train ``model`` in place for ``steps`` steps (AdamW, 10% warm-up then cosine decay, clip 1.0) on the
    mean next-token loss the probe and APL use; returns timing (s/step) and the last loss."""
    from ..lm.model import encode_lm_examples, lm_mean_loss

    if steps < 1:
        raise MergeLabError(f"{label}: training steps must be at least 1 (got {steps})", field="steps")
    torch.manual_seed(seed)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(steps - warmup, 1))))
    model.train()
    batches, loss_value = _batches(rows, batch_size, seed), float("nan")
    start = time.perf_counter()
    for step in range(1, steps + 1):
        checkpoint()
        loss = lm_mean_loss(model, encode_lm_examples(tokenizer, next(batches), max_length))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if step % 50 == 0 or step == steps:
            print(f"[lm-zoo] {label}: step {step}/{steps}, loss {loss_value:.3f}, "
                  f"{(time.perf_counter() - start) / step:.3f} s/step", file=sys.stderr)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    seconds = time.perf_counter() - start
    return {"train_seconds": round(seconds, 2), "seconds_per_step": round(seconds / steps, 4),
            "final_loss": round(loss_value, 4), "steps": steps, "threads": torch.get_num_threads()}


@torch.no_grad()
def perplexity(model, tokenizer, rows: list[str], max_length: int, batch_size: int = 32) -> float:
    """exp of the mean next-token loss pooled over every target token of ``rows`` (the LM probe's measure)."""
    from ..lm.model import encode_lm_examples, lm_loss_terms

    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = encode_lm_examples(tokenizer, [LMExample("", r) for r in rows[start:start + batch_size]], max_length)
        loss, n = lm_loss_terms(model, batch)
        total, count = total + float(loss), count + n
    return math.exp(total / max(count, 1))


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, new_tokens: int = 16) -> str:
    """The greedy continuation of ``prompt`` (without the prompt)."""
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------------- building


def _write_rows(path: Path, rows: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for text in rows:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def _save_model(folder: Path, model, tokenizer, record: dict, record_file: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    record["weights_sha256"] = file_sha256(folder / "model.safetensors")
    record["tokenizer_sha256"] = file_sha256(folder / "tokenizer.json")
    (folder / record_file).write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    return record


def _finished(folder: Path, record_file: str, key: str) -> dict | None:
    """The record of a folder an earlier (interrupted) build finished with the same settings, or None."""
    from .zoo import safetensors_problem

    try:
        record = json.loads((folder / record_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("settings") != key or safetensors_problem(folder / "model.safetensors"):
        return None
    return record if file_sha256(folder / "model.safetensors") == record.get("weights_sha256") else None


def _settings(spec: dict, seed: int, experts: list[str], steps: int) -> dict:
    """What a finished zoo must have been built with to be reused (the text files' sizes included)."""
    texts = sorted({*spec["pretrain_texts"], *experts})
    sizes = {t: sum(f.stat().st_size for f in _source_files(spec, t)) for t in texts}
    return {"spec": spec, "seed": seed, "experts": experts, "steps": steps, "text_bytes": sizes, "format": FORMAT}


def _reusable(root: Path, name: str, key: str) -> bool:
    from .zoo import ZOO_FILE, _open_root

    try:
        meta = json.loads((root / ZOO_FILE).read_text(encoding="utf-8"))
        zoo = _open_root(root, name)
    except (OSError, ValueError, MergeLabError):
        return False
    return meta.get("settings_sha256") == key and not zoo.damaged


def build_lm_zoo(name: str = "lm", tasks: Iterable[str] | None = None, steps: int | None = None, seed: int = 0,
                 n_probe: int | None = None, spec: dict | None = None) -> object:
    """Build (or reuse) LM zoo ``name``: tokenizer, pretrained base, one expert per task; returns the opened zoo.

    ``tasks``: expert text sources (default: the spec's ``experts``); ``steps``: fine-tuning steps per
    expert (default: the spec's); ``spec``: overrides of the ``tasks.yaml`` settings (see :func:`lm_zoo_spec`).
    Prints s/step of every run, so a loaded machine can be told from a slow build."""
    from .zoo import ZOO_FILE, _BuildLock, _swap_in, open_zoo

    check_name(name, "zoo name", field="name")
    spec = lm_zoo_spec(name, spec)
    if n_probe is not None:
        spec["n_probe"] = int(n_probe)
    experts = list(tasks or spec["experts"])
    for task in experts:
        check_name(task, "task name", field="tasks")
    ft_steps = int(steps if steps is not None else spec["finetune"]["steps"])
    check_texts(spec, {*spec["pretrain_texts"], *experts})
    settings = _settings(spec, seed, experts, ft_steps)
    key = content_hash("lm-zoo", settings)
    root = zoos_root()
    final, tmp = root / name, root / f".{name}.building"
    with _BuildLock(root / f".{name}.lock"):
        if _reusable(final, name, key):
            return open_zoo(name)
        tmp.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with torch_threads():
            timing = _build_into(tmp, spec, seed, experts, ft_steps, key)
        meta = {"name": name, "kind": KIND, "base": BASE_DIR, "seed": seed, "tasks": experts,
                "steps": {t: ft_steps for t in experts}, "pretrain_steps": int(spec["pretrain"]["steps"]),
                "n_probe": int(spec["n_probe"]), "settings_sha256": key, "format": FORMAT,
                "build_seconds": round(time.perf_counter() - start, 1), "timing": timing, "skipped": {}}
        (tmp / ZOO_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _swap_in(tmp, final)
        print(f"[lm-zoo] built {name!r} in {meta['build_seconds']} s", file=sys.stderr)
    return open_zoo(name)


def _adopt(target: Path, old: Path, record_file: str, key: str) -> dict | None:
    """A finished folder for ``target``: itself, or the same folder of the previous zoo (copied) when its
    settings match — so adding an expert or changing its steps does not pretrain the base again."""
    record = _finished(target, record_file, key)
    if record is None and _finished(old, record_file, key) is not None:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(old, target)
        record = _finished(target, record_file, key)
    return record


def _build_into(tmp: Path, spec: dict, seed: int, experts: list[str], ft_steps: int, key: str) -> dict:
    """Tokenizer + base, then each expert, into ``tmp`` (reusing what an interrupted build finished)."""
    from transformers import AutoModelForCausalLM

    from ..io.taskdata import _load_tokenizer

    max_length, texts = int(spec["max_length"]), sorted({*spec["pretrain_texts"], *experts})
    items = {t: read_texts(spec, t) for t in texts}
    splits = {t: split_texts(items[t], seed, int(spec["n_probe"]), int(spec["n_fewshot"]), int(spec["max_items"]))
              for t in texts}
    rows = {t: {part: [items[t][i] for i in idx] for part, idx in splits[t].items()} for t in texts}
    mix = [r for t in spec["pretrain_texts"] for r in rows[t]["train"]]
    held = {t: rows[t]["probe"] for t in texts}
    base_dir, pre = tmp / BASE_DIR, spec["pretrain"]
    base_key = content_hash("lm-base", {k: v for k, v in settings_of(spec, seed).items()})
    final = tmp.with_name(tmp.name[1:-len(".building")])
    record = _adopt(base_dir, final / BASE_DIR, BASE_FILE, base_key)
    if record is None:
        shutil.rmtree(base_dir, ignore_errors=True)
        tokenizer = train_tokenizer(mix, int(spec["vocab_size"]))
        model = new_base_model(spec, len(tokenizer), seed)
        stats = train_lm(model, tokenizer, mix, int(pre["steps"]), float(pre["lr"]), int(pre["batch_size"]),
                         max_length, seed, "base")
        record = _save_model(base_dir, model, tokenizer, {
            "settings": base_key, "seed": seed, "pretrain_texts": list(spec["pretrain_texts"]),
            "n_train_rows": len(mix), "timing": stats, "vocab_size": len(tokenizer),
            "probe_perplexity": {t: round(perplexity(model, tokenizer, held[t], max_length), 2) for t in texts},
        }, BASE_FILE)
    tokenizer = _load_tokenizer(base_dir)
    timing = {"base": record["timing"]}
    for task in experts:
        timing[task] = _build_expert(tmp, base_dir, tokenizer, spec, seed, task, ft_steps, key, rows, splits, held,
                                     AutoModelForCausalLM)
    return timing


def settings_of(spec: dict, seed: int) -> dict:
    """The settings the base depends on (not the experts' list or steps, so changing those keeps the base)."""
    keys = ("root", "exclude", "max_chars", "max_items", "pretrain_texts", "vocab_size", "model", "max_length",
            "pretrain", "n_fewshot", "n_probe")
    return {"seed": seed, **{k: spec[k] for k in keys}}


def _build_expert(tmp: Path, base_dir: Path, tokenizer, spec: dict, seed: int, task: str, ft_steps: int, key: str,
                  rows: dict, splits: dict, held: dict, auto_cls) -> dict:
    """Fine-tune, measure (base vs expert perplexity on every task's held-out text) and save one expert."""
    folder = safe_join(tmp, "experts", task)
    # the base's settings, the task and its steps: another expert list keeps this expert
    expert_key = content_hash("lm-expert", settings_of(spec, seed), task, ft_steps)
    final = tmp.with_name(tmp.name[1:-len(".building")])
    record = _adopt(folder, safe_join(final, "experts", task), TASK_FILE, expert_key)
    if record is not None:
        return record["timing"]
    shutil.rmtree(folder, ignore_errors=True)
    max_length, ft = int(spec["max_length"]), spec["finetune"]
    model = auto_cls.from_pretrained(str(base_dir)).float()
    base_ppl = {t: perplexity(model, tokenizer, held[t], max_length) for t in held}
    prompt = spec.get("prompts", {}).get(task, "The")
    base_text = greedy(model, tokenizer, prompt)
    stats = train_lm(model, tokenizer, rows[task]["train"], ft_steps, float(ft["lr"]), int(ft["batch_size"]),
                     max_length, seed, task)
    expert_ppl = {t: perplexity(model, tokenizer, held[t], max_length) for t in held}
    ratio = expert_ppl[task] / base_ppl[task]
    print(f"[lm-zoo] {task}: {ft_steps} steps, {stats['seconds_per_step']} s/step; own perplexity base "
          f"{base_ppl[task]:.1f} -> expert {expert_ppl[task]:.1f} (x{ratio:.2f})", file=sys.stderr)
    partial = safe_join(tmp, "experts", f".{task}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    _save_model(partial, model, tokenizer, {
        "task": task, "kind": KIND, "label_names": [], "settings": expert_key, "seed": seed, "steps": ft_steps,
        "description": f"causal LM expert on the {task} fortunes", "source": f"lm_texts.{task} under {spec['root']}",
        "train_config": {**ft, "steps": ft_steps, "max_length": max_length}, "n_train_pool": len(splits[task]["train"]),
        "fewshot_indices": splits[task]["fewshot"], "probe_indices": splits[task]["probe"],
        "probe_perplexity": {"base": {t: round(v, 2) for t, v in base_ppl.items()},
                             "expert": {t: round(v, 2) for t, v in expert_ppl.items()}},
        "own_ratio": round(ratio, 3), "continuation": {"prompt": prompt, "base": base_text,
                                                       "expert": greedy(model, tokenizer, prompt)},
        "timing": stats, "base": BASE_DIR,
    }, TASK_FILE)
    _write_rows(partial / FEWSHOT_FILE, rows[task]["fewshot"])
    _write_rows(partial / PROBE_FILE, rows[task]["probe"])
    partial.rename(folder)
    return stats
