"""Tiny in-memory BERT experts, a word-level tokenizer and random few-shot data for the APL tests.

Everything is built from a config in the test run (no hub, no zoo): a 2-layer, hidden-16
BERT base and experts that are the base body plus seeded noise with their own 3-class heads.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from merging.io.experts import ExpertSet, check_homology
from merging.io.sources import ModelSource

WORDS = [f"w{i}" for i in range(40)]


@contextlib.contextmanager
def one_thread():
    """Tiny models run far faster on one thread on a shared machine (no spinning OpenMP workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tokenizer(tmp: Path):
    """A BertTokenizer over a 45-entry vocabulary written to ``tmp``."""
    from transformers import BertTokenizer

    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(str(vocab))


def config(num_labels: int = 3):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=40, num_labels=num_labels,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def examples(n: int, seed: int, labels: int = 3) -> list[tuple[str, int]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, 9, (1,), generator=generator))
        words = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
        out.append((" ".join(WORDS[w] for w in words), int(torch.randint(0, labels, (1,), generator=generator))))
    return out


def states(n_experts: int = 2, scale: float = 0.05, seed: int = 0, frozen: tuple[str, ...] = ()):
    """(base body state, {expert: full classifier state}); ``frozen`` body tensors keep base values."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    base_model = BertForSequenceClassification(config())
    base = {k[len("bert."):]: v.clone() for k, v in base_model.state_dict().items() if k.startswith("bert.")}
    experts = {}
    for i in range(n_experts):
        generator = torch.Generator().manual_seed(100 + i)
        state = {}
        for key, value in base_model.state_dict().items():
            body = key[len("bert."):] if key.startswith("bert.") else None
            if not value.is_floating_point() or body in frozen:
                state[key] = value.clone()
            elif body is None:  # the task head: the expert's own
                state[key] = 0.5 * torch.randn(value.shape, generator=generator)
            else:
                state[key] = value + scale * torch.randn(value.shape, generator=generator)
        experts[f"task{i}"] = state
    return base, experts


def expert_set(n_experts: int = 2, scale: float = 0.05, seed: int = 0, frozen: tuple[str, ...] = (),
               order=None) -> ExpertSet:
    base, experts = states(n_experts, scale, seed, frozen)
    cfg = config().to_dict()
    if order is not None:
        base = order(base)
        experts = {k: order(v) for k, v in experts.items()}
    return check_homology(ModelSource.from_state_dict("base", base, cfg),
                          {k: ModelSource.from_state_dict(k, v, cfg) for k, v in experts.items()})


def regmean_extras(tensors, experts, generator: torch.Generator) -> dict:
    """RegMean's inputs made up with the right shapes: per linear weight (2-D, not the embeddings) of
    ``tensors`` (name → TensorInfo, in the order to draw them) a symmetric positive definite Gram matrix
    [in, in] per expert, and the weight's input axis (Conv1D [in, out] / Linear [out, in])."""
    inputs = {}
    for name, info in tensors.items():
        if len(info.shape) == 2 and "embeddings" not in name:
            axis = 0 if info.unit_axis == 1 else 1
            inputs[name] = (info.shape[axis], axis)
    return fabricated_regmean_extras(inputs, experts, generator, draws_per_unit=3)


def fabricated_regmean_extras(inputs: dict, experts, generator: torch.Generator, draws_per_unit: int) -> dict:
    """RegMean's extras for weights ``inputs`` (name → (input size, input axis), drawn in that order): per
    expert the Gram matrix XᵀX / m of m = draws_per_unit · size standard-normal rows, positive definite."""
    from merging.methods import PerTensor
    from merging.methods.regmean import REGMEAN_GRAMS, REGMEAN_INPUT_AXIS

    grams, axes = {}, {}
    for name, (size, axis) in inputs.items():
        grams[name] = {}
        for expert in experts:
            x = torch.randn(draws_per_unit * size, size, generator=generator)
            grams[name][expert] = x.T @ x / (draws_per_unit * size)
        axes[name] = torch.tensor(axis)
    return {REGMEAN_GRAMS: PerTensor(grams, row_axis=None), REGMEAN_INPUT_AXIS: PerTensor(axes, row_axis=None)}
