"""The one fake-zoo builder of the test suite: tiny random BERT experts written in the zoo's on-disk layout.

A zoo of two experts (2 and 3 classes) of a 2-layer, 16-wide BERT with its own 45-word vocabulary,
built in well under a second; each expert is the base plus seeded noise on every body tensor (so
every layer changes) and carries few-shot and probe examples whose words depend on the label.
Fixtures in ``conftest.py`` build it; tests never build it themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_ZOO = "tiny-app"
WORDS = [f"w{i}" for i in range(40)]


def _examples(n: int, seed: int, labels: int) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = int(torch.randint(0, labels, (1,), generator=g))
        length = int(torch.randint(3, 8, (1,), generator=g))
        # the label leaves a trace in the words so the experts' heads have something to find
        words = [WORDS[(label * 7 + int(w)) % len(WORDS)] for w in torch.randint(0, 6, (length,), generator=g)]
        out.append((" ".join(words), label))
    return out


def _write_jsonl(path: Path, rows, labels) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for text, label in rows:
            fh.write(json.dumps({"text": text, "label": label, "label_name": labels[label]}) + "\n")


def build_tiny_zoo(cache: Path, name: str = TINY_ZOO, layers: int = 2):
    """A zoo of two tiny BERT experts (2 and 3 classes) written in the zoo's on-disk layout."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    root = cache / "zoo" / name
    if (root / "zoo.json").is_file():
        from merging.zoo.zoo import open_zoo

        return open_zoo(name)
    vocab = cache / "vocab.txt"
    cache.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    cfg = dict(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=40)
    torch.manual_seed(0)
    base = BertModel(BertConfig(**cfg))
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    tasks = {"topic": ["a", "b"], "mood": ["neg", "neu", "pos"]}
    for i, (task, labels) in enumerate(tasks.items()):
        model = BertForSequenceClassification(BertConfig(**cfg, num_labels=len(labels)))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name_, param in model.bert.named_parameters():
                base_param = dict(base.named_parameters())[name_]
                param.copy_(base_param + 0.05 * torch.randn(param.shape, generator=g))
            model.classifier.weight.copy_(0.5 * torch.randn(model.classifier.weight.shape, generator=g))
        folder = root / "experts" / task
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "merge_lab_task.json").write_text(json.dumps({"task": task, "label_names": labels}))
        _write_jsonl(folder / "fewshot.jsonl", _examples(16, 100 + i, len(labels)), labels)
        _write_jsonl(folder / "probe.jsonl", _examples(24, 200 + i, len(labels)), labels)
    (root / "zoo.json").write_text(json.dumps({"name": name, "base": str(base_dir), "seed": 0,
                                               "tasks": list(tasks), "skipped": {}, "steps": {}, "format": 1}))
    from merging.zoo.probe import write_zoo_reference
    from merging.zoo.zoo import open_zoo

    zoo = open_zoo(name)
    write_zoo_reference(zoo)  # like a built zoo: the probe's reference rows written once, at build
    return zoo


FAKE_LM_TASKS = ("count", "echo")


def build_fake_lm_zoo(cache: Path, name: str = "fake-lm"):
    """An LM zoo in the LM zoo's on-disk layout (``kind: causal_lm``, ``base/`` inside the zoo) with two tiny
    Llama experts a few Adam steps from the base on their own toy text, in a few seconds: what the page's
    zoo switch opens or, through ``zoo_build.BUILDER``, "builds". Each model ships its own
    generation_config.json (the base's ``max_new_tokens`` is 16, expert i's 17 + i), so an export shows whose
    it kept."""
    import tiny_models as tm

    root = cache / "zoo" / name
    if (root / "zoo.json").is_file():
        from merging.zoo.zoo import open_zoo

        return open_zoo(name)
    staging = cache / "zoo" / f".{name}.fake"
    tokenizer = tm.lm_tokenizer()
    folders = {"base": staging / "base"}
    tm.save(tm.build_lm("llama"), folders["base"])
    for index, task in enumerate(FAKE_LM_TASKS):
        texts = tm.lm_task_texts(task, 40, seed=10 + index)
        model = tm.fine_tune_lm(tm.build_lm("llama"), tokenizer, texts[:24], steps=3, seed=index)
        folder = folders[task] = tm.save(model, staging / "experts" / task)
        for file, rows in (("fewshot.jsonl", texts[:16]), ("probe.jsonl", texts[16:])):
            (folder / file).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
        (folder / "merge_lab_task.json").write_text(json.dumps({"task": task, "label_names": []}))
    for index, folder in enumerate(folders.values()):
        tokenizer.save_pretrained(str(folder))
        (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 16 + index, "eos_token_id": 1}))
    (staging / "zoo.json").write_text(json.dumps({"name": name, "kind": "causal_lm", "base": "base", "seed": 0,
                                                  "tasks": list(FAKE_LM_TASKS), "skipped": {}, "format": 1}))
    staging.rename(root)
    from merging.zoo.zoo import open_zoo

    return open_zoo(name)
