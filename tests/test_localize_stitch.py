"""Localize-and-Stitch (He et al. 2024) against its formulas written here: stitching with overlaps averaged,
the relaxed mask's gradient (∇L ⊙ τ) · σ'(S), exact kept counts, the magnitude variant as a top-k oracle,
mask training on a tiny BERT, the mask cache, determinism, chunks, low precision and clear errors."""

import apl_fixtures as fx
import pytest
import torch

from merging import MergeEngine, MergeLabError, MergeSettings, engine, merge_state_dicts
from merging.apl import localize
from merging.apl.localize import (
    compute_masks,
    magnitude_mask,
    prepare_localize,
    relaxed_gradient,
    top_k_masks,
    train_mask,
)
from merging.apl.taskloss import FunctionLoss, body_state, classifier_task_loss
from merging.cancel import Cancelled, CancelToken, cancellable
from merging.io.experts import check_homology
from merging.io.mergekit_yaml import to_mergekit_yaml
from merging.io.recipe import ExpertRef, Recipe
from merging.io.sources import ModelSource
from merging.methods import PerTensor, get_method
from merging.methods.localize_stitch import MASKS_EXTRAS

W = "encoder.layer.0.attention.self.query.weight"
B = "encoder.layer.0.attention.self.query.bias"
NORM = "encoder.layer.0.attention.output.LayerNorm.weight"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with fx.one_thread():
        yield


def _states(n=3, seed=0, shape=(6, 5)):
    generator = torch.Generator().manual_seed(seed)
    base = {W: torch.randn(shape, generator=generator), B: torch.randn(shape[0], generator=generator),
            NORM: torch.ones(shape[1])}
    experts = {f"e{i}": {k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()} for i in range(n)}
    return base, experts


def _expert_set(base, experts):
    return check_homology(ModelSource.from_state_dict("base", base),
                          {k: ModelSource.from_state_dict(k, v) for k, v in experts.items()})


def _random_masks(experts, names, seed=1, keep=0.4):
    generator = torch.Generator().manual_seed(seed)
    any_expert = next(iter(experts.values()))
    return {n: {e: torch.rand(any_expert[n].shape, generator=generator) < keep for e in experts} for n in names}


# ---------------------------------------------------------------- stitching


def _stitch_oracle(base, experts, masks, lam=1.0):
    """Entry by entry: the mean of the task-vector values of the experts whose mask holds the entry; the base
    where none does (He et al. eq. for τ*: Σ_t γ_t / Σ_s γ_s ⊙ τ_t)."""
    out = base.clone().reshape(-1)
    flat = {e: (t - base).reshape(-1) for e, t in experts.items()}
    flat_masks = {e: m.reshape(-1) for e, m in masks.items()}
    for i in range(out.numel()):
        holders = [e for e in experts if bool(flat_masks[e][i])]
        if holders:
            out[i] = base.reshape(-1)[i] + lam * sum(float(flat[e][i]) for e in holders) / len(holders)
    return out.reshape(base.shape)


@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_stitching_averages_overlaps_and_leaves_unkept_entries_at_the_base(lam):
    base, experts = _states(3)
    masks = _random_masks(experts, [W, B])
    masks[W]["e0"][0, :] = False  # a row no expert keeps (stays at the base)
    masks[W]["e1"][0, :] = False
    masks[W]["e2"][0, :] = False
    for e in experts:
        masks[W][e][1, :] = True  # a row every expert keeps (the plain mean)
    extras = {MASKS_EXTRAS: PerTensor(masks, row_axis=0)}
    out = merge_state_dicts(base, experts, "localize_stitch", extras=extras, **{"lambda": lam})
    for name in (W, B):
        expected = _stitch_oracle(base[name], {e: s[name] for e, s in experts.items()},
                                  {e: masks[name][e] for e in experts}, lam)
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[W][0], base[W][0])
    mean_row = sum(experts[e][W][1] - base[W][1] for e in experts) / 3
    torch.testing.assert_close(out[W][1], base[W][1] + lam * mean_row)
    # norms are never masked: every expert keeps them, so they are averaged
    torch.testing.assert_close(out[NORM], base[NORM] + lam * sum(experts[e][NORM] - base[NORM] for e in experts) / 3)


def test_disjoint_masks_stitch_each_experts_region_unchanged():
    base, experts = _states(2)
    left = torch.zeros(6, 5, dtype=torch.bool)
    left[:, :2] = True
    masks = {W: {"e0": left, "e1": ~left}, B: {"e0": torch.ones(6, dtype=torch.bool), "e1": torch.zeros(6, dtype=torch.bool)}}
    out = merge_state_dicts(base, experts, "localize_stitch", extras={MASKS_EXTRAS: PerTensor(masks)})
    assert torch.equal(out[W][:, :2], experts["e0"][W][:, :2])
    assert torch.equal(out[W][:, 2:], experts["e1"][W][:, 2:])
    assert torch.allclose(out[B], experts["e0"][B])


# ---------------------------------------------------------------- the relaxed mask's gradient


def _linear_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = {W: torch.randn(6, 5, generator=generator), B: torch.randn(6, generator=generator)}
    deltas = {n: torch.randn(t.shape, generator=generator) for n, t in base.items()}
    logits = {n: 3 * torch.randn(t.shape, generator=generator) for n, t in base.items()}
    coefficients = {n: torch.randn(t.shape, generator=generator) for n, t in base.items()}
    return base, deltas, logits, coefficients


@pytest.mark.parametrize("l1", [0.0, 0.7])
def test_relaxed_gradient_is_grad_times_task_vector_times_sigmoid_slope_on_a_linear_loss(l1):
    """L(θ) = Σ ⟨c, θ⟩, so ∂L(θ0 + σ(S)τ)/∂S = c ⊙ τ ⊙ σ(S)(1 − σ(S)); the L1 term adds l1/k · σ'(S)."""
    base, deltas, logits, c = _linear_problem()
    task = FunctionLoss(base, lambda s: sum((c[n] * s[n]).sum() for n in c))
    k = 7
    loss, grads = relaxed_gradient(task, base, deltas, logits, l1=l1, k=k)
    for n in base:
        sig = 1 / (1 + torch.exp(-logits[n]))
        expected = (c[n] * deltas[n] + l1 / k) * sig * (1 - sig)
        torch.testing.assert_close(grads[n], expected, rtol=1e-5, atol=1e-7)
    expected_loss = sum(float((c[n] * (base[n] + torch.sigmoid(logits[n]) * deltas[n])).sum()) for n in c)
    assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_relaxed_gradient_matches_autograd_and_a_finite_difference_on_a_nonlinear_loss():
    base, deltas, logits, _ = _linear_problem(seed=3)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(9))
    labels = torch.tensor([0, 3, 5, 1])

    def loss_fn(s):
        return torch.nn.functional.cross_entropy(x @ s[W].T + s[B], labels)

    l1, k = 0.3, 5
    _, grads = relaxed_gradient(FunctionLoss(base, loss_fn), base, deltas, logits, l1=l1, k=k)

    def objective(s_logits):
        theta = {n: base[n] + torch.sigmoid(s_logits[n]) * deltas[n] for n in base}
        return loss_fn(theta) + l1 * sum(torch.sigmoid(v).sum() for v in s_logits.values()) / k

    leaves = {n: v.clone().double().requires_grad_(True) for n, v in logits.items()}
    base_d = {n: v.double() for n, v in base.items()}
    deltas_d = {n: v.double() for n, v in deltas.items()}
    theta = {n: base_d[n] + torch.sigmoid(leaves[n]) * deltas_d[n] for n in base}
    value = torch.nn.functional.cross_entropy(x.double() @ theta[W].T + theta[B], labels) + \
        l1 * sum(torch.sigmoid(v).sum() for v in leaves.values()) / k
    value.backward()
    for n in base:
        torch.testing.assert_close(grads[n].double(), leaves[n].grad, rtol=1e-4, atol=1e-6)
    eps = 1e-3  # central difference on one entry
    plus = {n: v.clone() for n, v in logits.items()}
    minus = {n: v.clone() for n, v in logits.items()}
    plus[W][2, 3] += eps
    minus[W][2, 3] -= eps
    numeric = (float(objective(plus)) - float(objective(minus))) / (2 * eps)
    assert float(grads[W][2, 3]) == pytest.approx(numeric, rel=2e-2, abs=1e-5)


# ---------------------------------------------------------------- top-k, kept counts, the magnitude variant


def _magnitude_oracle(deltas, drop_ratio):
    """Stable descending sort of |τ| over all tensors in order: the first round((1 − p) N) are kept."""
    flat = torch.cat([d.abs().reshape(-1) for d in deltas.values()])
    k = round((1 - drop_ratio) * flat.numel())
    order = torch.sort(-flat, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for n, d in deltas.items():
        out[n] = keep[start:start + d.numel()].reshape(d.shape)
        start += d.numel()
    return out


@pytest.mark.parametrize("drop_ratio", [0.0, 0.5, 0.77, 0.99, 1.0])
def test_magnitude_mask_is_the_top_k_magnitude_oracle_with_ties(drop_ratio):
    generator = torch.Generator().manual_seed(4)
    levels = torch.tensor([0.25, 0.5, 1.0])
    deltas = {W: levels[torch.randint(3, (20, 10), generator=generator)] * torch.sign(torch.randn(20, 10, generator=generator)),
              B: levels[torch.randint(3, (20,), generator=generator)]}
    masks = magnitude_mask(deltas, drop_ratio)
    expected = _magnitude_oracle(deltas, drop_ratio)
    for n in deltas:
        assert masks[n].dtype == torch.bool and torch.equal(masks[n], expected[n]), n
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - drop_ratio) * 220)


def test_top_k_refuses_an_impossible_count():
    with pytest.raises(MergeLabError, match="kept count"):
        top_k_masks({W: torch.ones(3)}, 4)


def test_magnitude_variant_merges_the_oracle_masks():
    base, experts = _states(3, seed=5)
    expert_set = _expert_set(base, experts)
    prepared = prepare_localize(expert_set, params={"localize": "magnitude", "drop_ratio": 0.7})
    merged = MergeEngine(expert_set, cache=False).merge(MergeSettings.build(
        expert_set, "localize_stitch", {"localize": "magnitude", "drop_ratio": 0.7}, extras=prepared["extras"])).tensors
    oracle = {e: _magnitude_oracle({n: s[n] - base[n] for n in (W, B)}, 0.7) for e, s in experts.items()}
    for name in (W, B):
        expected = _stitch_oracle(base[name], {e: s[name] for e, s in experts.items()},
                                  {e: oracle[e][name] for e in experts})
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)
    assert all(abs(v - 0.3) < 0.02 for v in prepared["localize"].kept.values())


def test_density_is_accepted_as_the_complement_of_drop_ratio():
    base, experts = _states(2, seed=6)
    expert_set = _expert_set(base, experts)
    a = compute_masks(expert_set, None, None, params={"localize": "magnitude", "density": 0.25}, cache=False)
    b = compute_masks(expert_set, None, None, params={"localize": "magnitude", "drop_ratio": 0.75}, cache=False)
    assert all(torch.equal(a.masks["e0"][n], b.masks["e0"][n]) for n in (W, B))
    with pytest.raises(MergeLabError, match="not both"):
        compute_masks(expert_set, None, None, params={"density": 0.2, "drop_ratio": 0.8})


# ---------------------------------------------------------------- training on a tiny BERT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT base, two experts (base body plus seeded noise, own heads) and their few-shot data."""
    tokenizer = fx.tokenizer(tmp_path_factory.mktemp("tok"))
    expert_set = fx.expert_set(2, scale=0.05)
    examples = {e: fx.examples(24, seed=10 + i) for i, e in enumerate(expert_set.experts)}
    return expert_set, examples, tokenizer


def _rounded_loss(expert_set, expert, examples, tokenizer, mask):
    """Few-shot loss of θ0 + γ ⊙ τ (norms at the expert's values, as the stitched model for one task has them)."""
    state = body_state(expert_set, expert)
    for name, m in mask.items():
        state[name] = expert_set.base.get(name).float() + m.float() * expert_set.delta(expert, name).float()
    task = classifier_task_loss(expert_set, expert, examples, tokenizer, state, purpose="test")
    return float(task.loss())


PARAMS = {"drop_ratio": 0.9, "steps": 25, "mask_lr": 0.4, "l1": 0.0}


def test_training_lowers_the_few_shot_loss_below_the_magnitude_mask_and_keeps_the_count(tiny):
    expert_set, examples, tokenizer = tiny
    result = compute_masks(expert_set, examples, tokenizer, params=PARAMS, cache=False)
    names = localize.maskable_tensors(expert_set)
    total = sum(expert_set.base.get(n).numel() for n in names)
    k = round(0.1 * total)
    for expert in expert_set.experts:
        trained = result.masks[expert]
        assert set(trained) == set(names) and all(m.dtype == torch.bool for m in trained.values())
        assert sum(int(m.sum()) for m in trained.values()) == k  # exactly the declared share
        start = magnitude_mask({n: expert_set.delta(expert, n).float() for n in names}, 0.9)
        assert any(not torch.equal(trained[n], start[n]) for n in names)  # training moved the mask
        before = _rounded_loss(expert_set, expert, examples, tokenizer, start)
        after = _rounded_loss(expert_set, expert, examples, tokenizer, trained)
        assert after < before, (expert, before, after)
        losses = result.losses[expert]
        assert len(losses) == PARAMS["steps"] and losses[-1] < losses[0]


def test_training_is_deterministic_and_independent_of_the_merge_seed(tiny):
    expert_set, examples, tokenizer = tiny
    params = dict(PARAMS, steps=5)
    a = prepare_localize(expert_set, examples, tokenizer, params=params, cache=False)
    b = prepare_localize(expert_set, examples, tokenizer, params=params, cache=False)
    for e in expert_set.experts:
        assert all(torch.equal(a["localize"].masks[e][n], b["localize"].masks[e][n]) for n in a["localize"].masks[e])
        assert a["localize"].losses[e] == b["localize"].losses[e]
    merges = [MergeEngine(expert_set, cache=False).merge(MergeSettings.build(
        expert_set, "localize_stitch", params, seed=seed, extras=p["extras"])).tensors
        for seed, p in ((3, a), (3, b), (11, a))]
    for name in merges[0]:
        assert torch.equal(merges[0][name], merges[1][name]) and torch.equal(merges[0][name], merges[2][name])


def test_masks_are_cached_per_expert_draw_and_mask_parameters(tiny, monkeypatch):
    expert_set, examples, tokenizer = tiny
    calls = []
    original = localize.train_mask
    monkeypatch.setattr(localize, "train_mask", lambda *a, **k: calls.append(1) or original(*a, **k))
    params = dict(PARAMS, steps=2, init_logit=4.5)  # a key no other test used
    first = prepare_localize(expert_set, examples, tokenizer, params=dict(params, **{"lambda": 1.0}))
    assert len(calls) == 2  # one training per expert
    again = prepare_localize(expert_set, examples, tokenizer, params=dict(params, **{"lambda": 0.3}))
    assert len(calls) == 2  # λ is not a mask parameter: nothing retrained
    for e in expert_set.experts:
        assert all(torch.equal(first["localize"].masks[e][n], again["localize"].masks[e][n]) for n in again["localize"].masks[e])
    prepare_localize(expert_set, examples, tokenizer, params=dict(params, steps=3))
    assert len(calls) == 4  # a mask parameter changed: both retrain
    redrawn = dict(examples, task0=examples["task0"][:12])
    prepare_localize(expert_set, redrawn, tokenizer, params=params)
    assert len(calls) == 5  # only the expert whose few-shot draw changed


def test_training_reports_progress_and_stops_when_cancelled(tiny):
    expert_set, examples, tokenizer = tiny
    seen = []
    compute_masks(expert_set, examples, tokenizer, params=dict(PARAMS, steps=3), cache=False,
                  progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0) and len(seen) == 6
    assert "localize task0" in seen[0][1]
    token = CancelToken()
    token.cancel()
    with cancellable(token), pytest.raises(Cancelled):
        compute_masks(expert_set, examples, tokenizer, params=dict(PARAMS, steps=3), cache=False)


def test_a_linear_toy_task_trains_towards_the_entries_the_loss_needs():
    """L = ‖θ − θ_t‖² restricted to the small entries: the magnitude start keeps the large (useless) ones,
    the loss raises the small ones' logits and the L1 penalty lowers the useless ones (no loss gradient)."""
    base = {W: torch.zeros(4, 5)}
    delta = torch.tensor([[3.0, 0.1, 0.1, 0.1, 0.1]] * 4)
    expert = {W: delta.clone()}
    expert_set = _expert_set(base, {"e0": expert})
    useful = delta < 1  # the loss only measures the small entries

    def example_loss(state, _i):
        return (((state[W] - delta) * useful) ** 2).sum()

    result = compute_masks(expert_set, None, None, params={"drop_ratio": 0.8, "steps": 60, "mask_lr": 0.3, "l1": 0.01},
                           example_loss_fn=example_loss, n_examples=1)
    mask = result.masks["e0"][W]
    assert int(mask.sum()) == 4
    assert bool((magnitude_mask({W: delta}, 0.8)[W] == ~useful).all())  # the start keeps the 4 large ones
    assert int((mask & ~useful).sum()) == 0  # training keeps none of them


# ---------------------------------------------------------------- contract, precision, errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_inputs_stay_finite(dtype):
    base, experts = _states(3, seed=7)
    base = {k: v.to(dtype) for k, v in base.items()}
    experts = {e: {k: v.to(dtype) for k, v in s.items()} for e, s in experts.items()}
    expert_set = _expert_set(base, experts)
    prepared = prepare_localize(expert_set, params={"localize": "magnitude", "drop_ratio": 0.5})
    out = MergeEngine(expert_set, cache=False).merge(MergeSettings.build(
        expert_set, "localize_stitch", {"localize": "magnitude", "drop_ratio": 0.5}, extras=prepared["extras"])).tensors
    assert all(torch.isfinite(t).all() and torch.isfinite(t.to(dtype)).all() for t in out.values())


def test_prepared_masks_merged_in_chunks_equal_the_whole_merge(monkeypatch):
    generator = torch.Generator().manual_seed(8)
    base = {W: torch.randn(40, 32, generator=generator), B: torch.randn(40, generator=generator)}
    experts = {f"e{i}": {k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()} for i in range(3)}
    expert_set = _expert_set(base, experts)
    params = {"localize": "magnitude", "drop_ratio": 0.6}
    settings = MergeSettings.build(expert_set, "localize_stitch", params, extras=prepare_localize(
        expert_set, params=params)["extras"])
    whole = MergeEngine(expert_set, cache=False).merge(settings).tensors
    monkeypatch.setattr(engine, "CHUNK_BYTES", 4 * 32 * 7)
    chunked = MergeEngine(expert_set, cache=False).merge(settings).tensors
    assert get_method("localize_stitch").is_row_separable(params)
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name


def test_declaration():
    spec = get_method("localize_stitch")
    assert spec.paper_url == "https://arxiv.org/abs/2408.13656" and spec.prepare is not None
    assert {"few_shot", "base"} <= set(spec.needs)
    assert spec.param("localize").choices == ("trained", "magnitude") and spec.param("localize").default == "trained"
    assert spec.param("drop_ratio").default == 0.99  # the paper's 1 % budget
    for p in spec.params:
        assert p.help and (p.kind not in ("int", "float") or p.low <= p.default <= p.high)
    spec.describe()


def test_clear_errors():
    base, experts = _states(2)
    with pytest.raises(MergeLabError, match="no masks"):
        merge_state_dicts(base, experts, "localize_stitch")
    masks = _random_masks(experts, [W, B])
    del masks[W]["e1"]
    with pytest.raises(MergeLabError, match="no mask of .* for expert 'e1'"):
        merge_state_dicts(base, experts, "localize_stitch", extras={MASKS_EXTRAS: PerTensor(masks)})
    same = {e: {k: v.clone() for k, v in base.items()} for e in experts}
    assert torch.equal(merge_state_dicts(base, same, "localize_stitch")[W], base[W])  # nothing to stitch
    expert_set = _expert_set(base, experts)
    with pytest.raises(MergeLabError, match="few-shot examples for expert"):
        compute_masks(expert_set, None, None, params={"steps": 2})
    with pytest.raises(MergeLabError, match=r"parameters.drop_ratio must lie in"):
        compute_masks(expert_set, None, None, params={"localize": "magnitude", "drop_ratio": 1.5})
    with pytest.raises(MergeLabError, match="localize must be one of"):
        compute_masks(expert_set, None, None, params={"localize": "random"})


def test_mergekit_export_refuses_with_the_reason():
    recipe = Recipe("localize_stitch", "base", [ExpertRef("a", "a"), ExpertRef("b", "b")])
    with pytest.raises(MergeLabError, match="mergekit has no 'localize_stitch' method .*Localize-and-Stitch"):
        to_mergekit_yaml(recipe, ["embeddings", "0", "1", "head"])


def test_train_mask_with_zero_steps_is_the_magnitude_mask():
    base, deltas, _, c = _linear_problem(seed=2)
    task = FunctionLoss(base, lambda s: sum((c[n] * s[n]).sum() for n in c))
    mask, losses = train_mask(task, base, deltas, drop_ratio=0.6, steps=0, lr=0.1, l1=0.0, init_logit=5.0)
    assert losses == [] and all(torch.equal(mask[n], magnitude_mask(deltas, 0.6)[n]) for n in base)
