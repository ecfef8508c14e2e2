"""Shared fixtures: an isolated cache root and one tiny real zoo for every expert-needing test.

Tests never build the default zoo and never touch ~/.cache: the session points
``MERGE_LAB_CACHE`` at a temporary folder before anything reads it.
"""

from __future__ import annotations

import json

import pytest

TINY_TASKS = ("topic", "language")
TINY_STEPS = 25
TINY_PROBE = 100


@pytest.fixture(scope="session", autouse=True)
def merge_lab_cache(tmp_path_factory):
    """Every test of the session caches under a temporary folder."""
    root = tmp_path_factory.mktemp("merge-lab-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("MERGE_LAB_CACHE", str(root))
    patch.delenv("MERGE_LAB_ZOO", raising=False)
    yield root
    patch.undo()


@pytest.fixture(scope="session")
def tiny_zoo(merge_lab_cache):
    """Two real experts (topic, language) fine-tuned 25 steps from the packaged base.

    Topic and language are the tasks where 25 steps already give a clear margin over the
    base with the expert's head, so the margin test is a real check. Shared by the session:
    tests must not modify it (copy it first).
    """
    from merging.zoo.zoo import build_zoo

    return build_zoo(name="tiny", tasks=list(TINY_TASKS), steps=TINY_STEPS, seed=0, n_probe=TINY_PROBE)


@pytest.fixture(scope="session")
def toy_zoo(tmp_path_factory):
    """A zoo of a tiny random BERT (2 layers, hidden 32) with two 3-class experts: instant to probe.

    Experts are the base plus seeded noise on every body tensor, so a merge changes every
    layer; probe sets are a few texts each. Built by hand in the zoo layout (no training).
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from merging.paths import packaged_base_path
    from merging.zoo.training import TASK_FILE, write_examples
    from merging.zoo.zoo import Zoo

    root = tmp_path_factory.mktemp("toy-zoo")
    tok = AutoTokenizer.from_pretrained(str(packaged_base_path()))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    base = BertModel(config).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    texts = ["the cat sat", "a dog ran far away", "stocks fell sharply today", "il pleut", "der Hund bellt laut",
             "markets rally", "rain again", "goal in the last minute", "new phone released", "tea or coffee"]
    experts = {}
    for k, task in enumerate(("alpha", "beta")):
        labels = ["x", "y", "z"]
        model = BertForSequenceClassification(BertConfig(**config.to_dict(), num_labels=3)).eval()
        model.bert.load_state_dict(base.state_dict())
        gen = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for p in model.bert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        folder = root / "experts" / task
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        examples = [(t, (i + k) % 3) for i, t in enumerate(texts)]
        write_examples(folder / "probe.jsonl", examples, labels)
        write_examples(folder / "fewshot.jsonl", examples[:3], labels)
        (folder / TASK_FILE).write_text(json.dumps({"task": task, "label_names": labels}))
        experts[task] = folder
    return Zoo(name="toy", root=root, base_path=root / "base", experts=experts)

