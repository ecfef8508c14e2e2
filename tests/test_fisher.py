"""Fisher diagonals against hand computations, and the ``fisher`` merge against its formula."""

import apl_fixtures as fx
import numpy as np
import pytest
import torch

from merging import MergeEngine, MergeLabError, MergeSettings
from merging.apl.fisher import compute_fisher, prepare_fisher
from merging.io.experts import check_homology
from merging.io.sources import ModelSource

W = "encoder.layer.0.output.dense.weight"
B = "encoder.layer.0.output.dense.bias"
X = np.array([[1.0, -2.0, 0.5, 0.0], [0.3, 0.1, -1.0, 2.0]])
Y = [2, 0]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with fx.one_thread():
        yield


def _linear_set():
    """A softmax-regression 'model' (3 classes, 4 features) as base and two experts."""
    generator = torch.Generator().manual_seed(0)
    base = {W: torch.randn(3, 4, generator=generator), B: torch.randn(3, generator=generator)}
    experts = {f"e{i}": {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
               for i in range(2)}
    return check_homology(ModelSource.from_state_dict("base", base),
                          {k: ModelSource.from_state_dict(k, v) for k, v in experts.items()})


def _example_loss(state, i):
    logits = state[W] @ torch.tensor(X[i], dtype=torch.float32) + state[B]
    return torch.nn.functional.cross_entropy(logits.unsqueeze(0), torch.tensor([Y[i]]))


def _hand_fisher(weight, bias):
    """Per example: ∂CE/∂W = (softmax − onehot) xᵀ, ∂CE/∂b = softmax − onehot; F = mean of squares."""
    fw, fb = np.zeros_like(weight), np.zeros_like(bias)
    for x, y in zip(X, Y):
        z = weight @ x + bias
        p = np.exp(z - z.max())
        p /= p.sum()
        p[y] -= 1.0
        fw += np.outer(p, x) ** 2 / len(X)
        fb += p ** 2 / len(X)
    return fw, fb


def test_fisher_equals_hand_computation_with_two_examples():
    expert_set = _linear_set()
    result = compute_fisher(expert_set, None, None, example_loss_fn=_example_loss, n_examples=2)
    for expert in expert_set.experts:
        fw, fb = _hand_fisher(expert_set.experts[expert].get(W).double().numpy(),
                              expert_set.experts[expert].get(B).double().numpy())
        np.testing.assert_allclose(result.diagonals[expert][W].numpy(), fw, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(result.diagonals[expert][B].numpy(), fb, rtol=1e-5, atol=1e-7)
    assert result.n_examples == {"e0": 2, "e1": 2}
    # not the square of the batch gradient, in which opposing examples would cancel
    state = {n: expert_set.experts["e0"].get(n).clone().requires_grad_(True) for n in (W, B)}
    ((_example_loss(state, 0) + _example_loss(state, 1)) / 2).backward()
    assert not torch.allclose(state[W].grad ** 2, result.diagonals["e0"][W])


def test_fisher_merge_follows_the_formula():
    expert_set = _linear_set()
    prepared = prepare_fisher(expert_set, example_loss_fn=_example_loss, n_examples=2)
    settings = MergeSettings.build(expert_set, "fisher", {"epsilon": 1e-6}, seed=0, extras=prepared["extras"])
    merged = MergeEngine(expert_set).merge(settings).tensors
    diagonals = prepared["fisher"].diagonals
    for name in (W, B):
        num = sum(diagonals[t][name] * expert_set.delta(t, name) for t in expert_set.experts)
        den = sum(diagonals[t][name] for t in expert_set.experts)
        torch.testing.assert_close(merged[name], expert_set.base.get(name) + num / (den + 1e-6))


def test_fisher_without_diagonals_is_a_clear_error():
    expert_set = _linear_set()
    with pytest.raises(MergeLabError, match="Fisher"):
        MergeEngine(expert_set).merge(MergeSettings.build(expert_set, "fisher"))


def test_classifier_fisher_matches_a_per_example_autograd_loop(tmp_path):
    """The transformers path (batch tokenised once, padded) equals an independent batch-1 loop."""
    from transformers import BertForSequenceClassification

    expert_set = fx.expert_set(n_experts=1, frozen=("embeddings.word_embeddings.weight",))
    tok = fx.tokenizer(tmp_path)
    examples = fx.examples(2, seed=3)
    result = compute_fisher(expert_set, {"task0": examples}, tok)
    model = BertForSequenceClassification(fx.config()).eval()
    model.load_state_dict(expert_set.experts["task0"].source.memory)
    squares = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for text, label in examples:
        model.zero_grad()
        out = model(**tok([text], return_tensors="pt"), labels=torch.tensor([label]))
        out.loss.backward()
        for n, p in model.named_parameters():
            squares[n] += p.grad ** 2 / len(examples)
    diagonals = result.diagonals["task0"]
    assert "embeddings.word_embeddings.weight" not in diagonals  # unchanged by every expert: not needed
    for name, value in diagonals.items():
        torch.testing.assert_close(value, squares["bert." + name], rtol=1e-4, atol=1e-9)
