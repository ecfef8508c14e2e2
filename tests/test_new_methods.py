"""The methods the field compares against, each against its paper's formula written here independently
(plain loops or plain torch on 2–3 expert toy cases), plus determinism, low precision and edge cases."""

import itertools
import math

import pytest
import torch

from merging import MergeLabError, merge_state_dicts
from merging.methods import get_method

NAME = "encoder.layer.0.attention.self.query.weight"
NORM = "encoder.layer.0.attention.output.LayerNorm.weight"
BIAS = "encoder.layer.0.attention.self.query.bias"


def _models(n=3, seed=0, shape=(6, 5), shared=0.0):
    """A base and ``n`` experts; ``shared`` mixes a common direction into every task vector."""
    generator = torch.Generator().manual_seed(seed)
    base = {NAME: torch.randn(shape, generator=generator), BIAS: torch.randn(shape[0], generator=generator),
            NORM: torch.ones(shape[1])}
    common = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
    experts = {}
    for i in range(n):
        experts[f"e{i}"] = {k: v + shared * common[k] + torch.randn(v.shape, generator=generator) * (
            0.1 if k == NORM else 1.0) for k, v in base.items()}
    return base, experts


def _cast(models, dtype):
    base, experts = models
    return ({k: v.to(dtype) for k, v in base.items()},
            {n: {k: v.to(dtype) for k, v in e.items()} for n, e in experts.items()})


#: method → shared parameters that exercise it (defaults otherwise)
NEW_METHODS = {"model_stock": [{}, {"filter_wise": True}],
               "consensus": [{}, {"base_method": "ties", "k": 1}],
               "pcb": [{}, {"drop_ratio": 0.5, "lambda": 0.8}],
               "tsv": [{}, {"lambda": 0.5}]}
#: data-aware methods: the inputs their prepare would compute, fabricated for the shared property tests
DATA_AWARE = {"regmean"}


def _new_cases():
    cases = dict(NEW_METHODS, regmean=[{}, {"alpha": 0.5, "lambda": 0.8}])
    return [pytest.param(m, p, id=f"{m}-{i}") for m, variants in cases.items() for i, p in enumerate(variants)]


def _merge(models, method, seed=0, **params):
    """merge_state_dicts, with fabricated Gram matrices for RegMean (every 2-D weight a Linear [out, in])."""
    base, experts = models
    extras = _fabricated_grams(base, experts) if method in DATA_AWARE else None
    return merge_state_dicts(base, experts, method, seed=seed, extras=extras, **params)


def _fabricated_grams(base, experts, seed=0, axis=1):
    from apl_fixtures import fabricated_regmean_extras

    inputs = {name: (tensor.shape[axis], axis) for name, tensor in base.items() if tensor.dim() == 2}
    return fabricated_regmean_extras(inputs, experts, torch.Generator().manual_seed(seed), draws_per_unit=2)


# ---------------------------------------------------------------- shared properties


@pytest.mark.parametrize("method, params", _new_cases())
def test_declared_for_the_cli_recipes_and_page(method, params):
    spec = get_method(method)
    assert spec.pretty_name and spec.paper_url.startswith("https://arxiv.org/abs/")
    assert spec.summary and "\n" not in spec.summary and len(spec.summary) > 60
    for p in spec.params:
        assert p.help and p.scope in ("shared", "expert", "layer")
        if p.kind in ("float", "int"):
            assert p.low is not None and p.high is not None and p.low <= p.default <= p.high
        spec.describe()  # JSON-ready


@pytest.mark.parametrize("method, params", _new_cases())
def test_deterministic_under_a_seed(method, params):
    models = _models(3, seed=1, shared=0.5)
    a = _merge(models, method, seed=4, **params)
    b = _merge(models, method, seed=4, **params)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("method, params", _new_cases())
def test_low_precision_inputs_stay_finite(method, params, dtype):
    out = _merge(_cast(_models(3, seed=2, shared=0.5), dtype), method, **params)
    assert all(torch.isfinite(t).all() and torch.isfinite(t.to(dtype)).all() for t in out.values())


@pytest.mark.parametrize("method, params", _new_cases())
def test_experts_equal_to_the_base_give_the_base(method, params):
    base, _ = _models(3)
    experts = {f"e{i}": {k: v.clone() for k, v in base.items()} for i in range(3)}
    out = _merge((base, experts), method, **params)
    for name in base:
        assert torch.allclose(out[name], base[name], atol=1e-6), name
        assert torch.isfinite(out[name]).all()


# ---------------------------------------------------------------- Model Stock


def _model_stock_oracle(base, experts, filter_wise=False):
    """Jang et al. (ECCV 2024) eq. for N experts: cosθ the mean pairwise cosine of the task vectors,
    t = N cosθ / (1 + (N − 1) cosθ), Θ = t · mean Θ_t + (1 − t) · Θ_0; written with loops in float64. The
    norm floor 1e-6 and t = 0 where 1 + (N − 1)cosθ ≈ 0 are mergekit 0.1.5's."""
    w0 = base.double()
    ws = [e.double() for e in experts]
    rows = [w0.reshape(-1)] if not filter_wise or w0.dim() <= 1 else list(w0)
    out = torch.empty(len(rows), rows[0].numel(), dtype=torch.float64)
    for r in range(len(rows)):
        vectors = [(w.reshape(-1) if len(rows) == 1 else w[r]) - rows[r] for w in ws]
        cosines = []
        for a, b in itertools.combinations(vectors, 2):
            dot = sum(float(x) * float(y) for x, y in zip(a, b))
            norms = math.sqrt(sum(float(x) ** 2 for x in a)) * math.sqrt(sum(float(y) ** 2 for y in b))
            cosines.append(min(1.0, max(-1.0, dot / max(norms, 1e-6))))
        cos = sum(cosines) / len(cosines)
        n = len(vectors)
        t = 0.0 if abs(1 + (n - 1) * cos) < 1e-6 else n * cos / (1 + (n - 1) * cos)
        mean = sum(v + rows[r] for v in vectors) / n
        out[r] = t * mean + (1 - t) * rows[r]
    return out.reshape(base.shape).float()


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_formula(n, filter_wise):
    base, experts = _models(n, seed=3, shared=0.8)
    out = merge_state_dicts(base, experts, "model_stock", filter_wise=filter_wise)
    for name in (NAME, BIAS, NORM):  # every merged tensor, 1-D ones as one vector
        expected = _model_stock_oracle(base[name], [e[name] for e in experts.values()], filter_wise)
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)
    per_tensor = merge_state_dicts(base, experts, "model_stock", filter_wise=not filter_wise)
    assert (per_tensor[NAME] - out[NAME]).abs().max() > 1e-4  # the two scopes differ


def test_model_stock_t_follows_the_angle():
    """Two experts at a known angle: cos 0.5 gives t = 2·0.5/1.5 = 2/3 along the average."""
    base = {NAME: torch.zeros(2, 2)}
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.5, math.sqrt(3) / 2], [0.0, 0.0]])  # 60° from a
    out = merge_state_dicts(base, {"a": {NAME: a}, "b": {NAME: b}}, "model_stock")[NAME]
    torch.testing.assert_close(out, (2 / 3) * (a + b) / 2)
    orthogonal = merge_state_dicts(base, {"a": {NAME: a}, "b": {NAME: torch.tensor([[0.0, 1.0], [0.0, 0.0]])}},
                                   "model_stock")[NAME]
    assert torch.equal(orthogonal, torch.zeros(2, 2))  # cos 0: t = 0, the base
    opposite = merge_state_dicts(base, {"a": {NAME: a}, "b": {NAME: -a}}, "model_stock")[NAME]
    assert torch.equal(opposite, torch.zeros(2, 2))  # 1 + cos = 0: no finite t, the base is kept


def test_model_stock_identical_experts_give_the_expert():
    base, experts = _models(3, seed=5)
    same = {f"e{i}": experts["e0"] for i in range(3)}
    out = merge_state_dicts(base, same, "model_stock")
    for name in base:  # cos 1: t = N / N = 1
        torch.testing.assert_close(out[name], experts["e0"][name], rtol=1e-5, atol=1e-6)


def test_model_stock_a_zero_delta_counts_as_orthogonal():
    base, experts = _models(3, seed=6, shared=1.0)
    experts["e2"] = {k: v.clone() for k, v in base.items()}
    out = merge_state_dicts(base, experts, "model_stock")
    expected = _model_stock_oracle(base[NAME], [e[NAME] for e in experts.values()])
    torch.testing.assert_close(out[NAME], expected, rtol=1e-5, atol=1e-6)


def test_model_stock_needs_two_experts():
    base, experts = _models(1)
    with pytest.raises(MergeLabError, match="at least 2 experts"):
        merge_state_dicts(base, experts, "model_stock")


def test_model_stock_row_separable_only_filter_wise():
    spec = get_method("model_stock")
    assert not spec.is_row_separable({}) and spec.is_row_separable({"filter_wise": True})
    assert spec.mergekit_name == "model_stock"


# ---------------------------------------------------------------- Consensus (TALL masks)


def _ties_vector_oracle(vectors, density):
    """TIES' multi-task vector as the reference's dis-sum: keep each τ_t's round(density·n) largest |τ|
    (ties by lowest index), elect the sign of the sum, add the agreeing kept entries (no division)."""
    trimmed = []
    for v in vectors:
        flat = v.reshape(-1)
        keep = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))[:round(density * flat.numel())]
        t = torch.zeros_like(flat)
        t[keep] = flat[keep]
        trimmed.append(t.reshape(v.shape))
    total = sum(trimmed)
    out = torch.zeros_like(total)
    for idx in itertools.product(*map(range, total.shape)):
        sign = 1.0 if float(total[idx]) >= 0 else -1.0
        out[idx] = sum(float(t[idx]) for t in trimmed if float(t[idx]) * sign > 0)
    return out


def _consensus_oracle(base, vectors, lambdas, k, lam=1.0, multitask=None):
    """Wang et al. (ICML 2024): m_t = |τ_t| > λ_t |τ_MTL − τ_t|; keep entries with Σ_t m_t ≥ k; entry by entry."""
    multitask = sum(vectors) if multitask is None else multitask
    out = base.clone()
    for idx in itertools.product(*map(range, base.shape)):
        active = sum(abs(float(v[idx])) > lt * abs(float(multitask[idx]) - float(v[idx]))
                     for v, lt in zip(vectors, lambdas))
        if active >= k:
            out[idx] = float(base[idx]) + lam * float(multitask[idx])
    return out


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_consensus_over_task_arithmetic_formula(k):
    base, experts = _models(3, seed=7, shared=0.5)
    lambdas = {"e0": 0.6, "e1": 0.3, "e2": 1.2}
    weights = {"e0": 1.0, "e1": 0.5, "e2": 1.5}
    out = merge_state_dicts(base, experts, "consensus", k=k, **{"lambda": 0.7},
                            expert_params={e: {"tall_lambda": lambdas[e], "weight": weights[e]} for e in experts})
    vectors = [weights[e] * (experts[e][NAME] - base[NAME]) for e in experts]
    expected = _consensus_oracle(base[NAME], vectors, list(lambdas.values()), k, 0.7)
    torch.testing.assert_close(out[NAME], expected, rtol=1e-5, atol=1e-6)
    if k == 0:  # no entry removed: task arithmetic
        ta = merge_state_dicts(base, experts, "task_arithmetic", **{"lambda": 0.7},
                               expert_params={e: {"weight": weights[e]} for e in experts})
        torch.testing.assert_close(out[NAME], ta[NAME], rtol=1e-5, atol=1e-6)
    # norms are never masked: task arithmetic there
    norm_ta = base[NORM] + 0.7 * sum(weights[e] * (experts[e][NORM] - base[NORM]) for e in experts)
    torch.testing.assert_close(out[NORM], norm_ta, rtol=1e-5, atol=1e-6)


def test_consensus_removes_selfish_and_catastrophic_entries():
    """Hand-made: entry 0 matters to both tasks, entry 1 to task a only (selfish), entry 2 to neither."""
    base = {NAME: torch.zeros(1, 3)}
    a = torch.tensor([[1.0, 2.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 0.0]])
    out = merge_state_dicts(base, {"a": {NAME: a}, "b": {NAME: b}}, "consensus", tall_lambda=0.5)[NAME]
    assert torch.equal(out, torch.tensor([[2.0, 0.0, 0.0]]))
    out1 = merge_state_dicts(base, {"a": {NAME: a}, "b": {NAME: b}}, "consensus", tall_lambda=0.5, k=1)[NAME]
    assert torch.equal(out1, torch.tensor([[2.0, 2.0, 0.0]]))  # k = 1 keeps the selfish entry


def test_consensus_over_ties_formula():
    base, experts = _models(3, seed=8, shared=0.5)
    out = merge_state_dicts(base, experts, "consensus", base_method="ties", drop_ratio=0.6, k=2)
    vectors = [e[NAME] - base[NAME] for e in experts.values()]
    multitask = _ties_vector_oracle(vectors, 0.4)
    expected = _consensus_oracle(base[NAME], vectors, [0.6] * 3, 2, multitask=multitask)
    torch.testing.assert_close(out[NAME], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[NAME], merge_state_dicts(base, experts, "consensus", k=2)[NAME])
    zero_k = merge_state_dicts(base, experts, "consensus", base_method="ties", drop_ratio=0.6, k=0)
    torch.testing.assert_close(zero_k[NAME], base[NAME] + multitask, rtol=1e-5, atol=1e-6)  # k 0: TIES (dis-sum)


def test_consensus_edge_cases():
    base, experts = _models(3, seed=9)
    one = {"e0": experts["e0"]}
    # one expert: its mask is every non-zero entry (τ_MTL − τ = 0), active in one task only
    assert torch.equal(merge_state_dicts(base, one, "consensus")[NAME], base[NAME])
    torch.testing.assert_close(merge_state_dicts(base, one, "consensus", k=1)[NAME], experts["e0"][NAME])
    # two identical experts: τ_MTL − τ_t = τ, so |τ| > λ·|τ| holds for λ < 1 (everywhere τ ≠ 0), never at λ = 1
    same = {"a": experts["e0"], "b": experts["e0"]}
    doubled = base[NAME] + 2 * (experts["e0"][NAME] - base[NAME])
    torch.testing.assert_close(merge_state_dicts(base, same, "consensus", tall_lambda=0.6)[NAME], doubled)
    assert torch.equal(merge_state_dicts(base, same, "consensus", tall_lambda=1.0)[NAME], base[NAME])
    # a zero task vector is never active, and adds nothing
    zero = dict(experts, e2={k: v.clone() for k, v in base.items()})
    out = merge_state_dicts(base, zero, "consensus", k=1)
    vectors = [zero[e][NAME] - base[NAME] for e in zero]
    torch.testing.assert_close(out[NAME], _consensus_oracle(base[NAME], vectors, [0.6] * 3, 1))


def test_consensus_declarations():
    spec = get_method("consensus")
    assert spec.param("tall_lambda").scope == "expert" and spec.param("k").default == 2
    assert spec.is_row_separable({}) and not spec.is_row_separable({"base_method": "ties"})


# ---------------------------------------------------------------- PCB


def _pcb_oracle(base, vectors, drops, lam=1.0):
    """Du et al. (NeurIPS 2024) with the reference PCB_merge's facts, in plain Python on flat lists:
    |τ| clamped to its sorted values at int(d·1e-4) and int(d·(1 − 1e-4) − 1); intra exp(n·minmax(|τ̃|)²);
    inter tanh(τ_i·Σ_j τ_j); score clamped below at its sorted value at int(d·drop), then min-max; merged
    Σ s τ̃ / max(Σ s, 1e-12)."""
    n = len(vectors)
    flat = [[float(x) for x in v.reshape(-1)] for v in vectors]
    d = len(flat[0])

    def clip(row, low_ratio, high_ratio):
        ordered = sorted(row)
        low, high = ordered[int(d * low_ratio)], ordered[max(int(d * (1 - high_ratio) - 1), 0)]
        return [min(max(x, low), high) for x in row]

    def mm(row):
        low, high = min(row), max(row)
        return [(x - low) / (high - low) if high > low else 0.0 for x in row]

    totals = [sum(f[j] for f in flat) for j in range(d)]
    clamped, scores = [], []
    for i, row in enumerate(flat):
        magnitude = clip([abs(x) for x in row], 1e-4, 1e-4)
        clamped.append([math.copysign(m, x) if x != 0 else 0.0 for m, x in zip(magnitude, row)])
        intra = [math.exp(n * m ** 2) for m in mm(magnitude)]
        inter = [math.tanh(x * t) for x, t in zip(row, totals)]
        scores.append(mm(clip([a * b for a, b in zip(intra, inter)], drops[i], 0.0)))
    merged = [sum(scores[i][j] * clamped[i][j] for i in range(n)) / max(sum(scores[i][j] for i in range(n)), 1e-12)
              for j in range(d)]
    return base + lam * torch.tensor(merged).reshape(base.shape)


@pytest.mark.parametrize("n, drops", [(2, (0.5, 0.5)), (3, (0.9, 0.9, 0.9)), (3, (0.2, 0.6, 0.8))])
def test_pcb_formula(n, drops):
    base, experts = _models(n, seed=10, shape=(40, 30), shared=0.5)  # 1200 entries: the 1e-4 clamp bites
    out = merge_state_dicts(base, experts, "pcb", **{"lambda": 0.7},
                            expert_params={e: {"drop_ratio": d} for e, d in zip(experts, drops)})
    for name in (NAME, BIAS):
        vectors = [e[name] - base[name] for e in experts.values()]
        torch.testing.assert_close(out[name], _pcb_oracle(base[name], vectors, drops, 0.7), rtol=1e-5, atol=1e-6)
    norm_mean = base[NORM] + 0.7 * sum(e[NORM] - base[NORM] for e in experts.values()) / n
    torch.testing.assert_close(out[NORM], norm_mean, rtol=1e-5, atol=1e-6)  # norms: never dropped, the mean


def test_pcb_drops_the_low_scores():
    base, experts = _models(3, seed=11, shape=(20, 10), shared=0.3)
    out = merge_state_dicts(base, experts, "pcb", drop_ratio=0.9)[NAME] - base[NAME]
    changed = int((out != 0).sum())
    assert 0 < changed <= 3 * 20  # at most each task's top 10% (20 of 200) carry weight
    keep_more = merge_state_dicts(base, experts, "pcb", drop_ratio=0.3)[NAME] - base[NAME]
    assert int((keep_more != 0).sum()) > changed


def test_pcb_edge_cases():
    base, experts = _models(3, seed=12)
    # one expert: the score-weighted mean of one task is its own clamped vector where its score is above the cut
    one = merge_state_dicts(base, {"e0": experts["e0"]}, "pcb", drop_ratio=0.5)
    vector = experts["e0"][NAME] - base[NAME]
    torch.testing.assert_close(one[NAME], _pcb_oracle(base[NAME], [vector], [0.5]), rtol=1e-5, atol=1e-6)
    # a zero task vector scores 0 everywhere (constant min-max → 0), so the others decide
    zero = dict(experts, e2={k: v.clone() for k, v in base.items()})
    out = merge_state_dicts(base, zero, "pcb", drop_ratio=0.5)
    vectors = [zero[e][NAME] - base[NAME] for e in zero]
    torch.testing.assert_close(out[NAME], _pcb_oracle(base[NAME], vectors, [0.5] * 3), rtol=1e-5, atol=1e-6)
    # identical experts: the clamped vector itself on the kept entries (30 entries: int(30·0.9999 − 1) = 28,
    # so the largest magnitude is clipped to the second largest)
    same = {f"e{i}": experts["e0"] for i in range(3)}
    out = merge_state_dicts(base, same, "pcb", drop_ratio=0.5)[NAME] - base[NAME]
    kept = out != 0
    assert 0 < int(kept.sum()) <= 15
    clipped = vector.sign() * vector.abs().clamp(max=float(vector.abs().reshape(-1).sort().values[28]))
    torch.testing.assert_close(out[kept], clipped[kept], rtol=1e-5, atol=1e-6)
    assert not torch.equal(clipped, vector)


def test_pcb_is_per_tensor_and_merged_whole():
    spec = get_method("pcb")
    assert not spec.is_row_separable({})
    assert "flattens the whole model" in " ".join(spec.param("drop_ratio").help.split())


# ---------------------------------------------------------------- TSV-M


def _polar(matrix):
    """The nearest matrix with orthonormal columns, A (AᵀA)^{-1/2}, by an eigendecomposition in float64 (A of
    full column rank): the Procrustes solution, computed another way than the method's SVD."""
    a = matrix.double()
    values, vectors = torch.linalg.eigh(a.T @ a)
    return a @ vectors @ torch.diag(values.rsqrt()) @ vectors.T


def _tsv_oracle(base, vectors, lam=1.0):
    """Gargiulo et al. (CVPR 2025) TSV-M: each task's top r = ⌊k/T⌋ triplets; U = [U_1,r … U_T,r] and
    V = [V_1,r … V_T,r] replaced by their nearest orthonormal sets; Θ = Θ_0 + λ U⊥ diag(σ) V⊥ᵀ."""
    k = min(base.shape)
    r = k // len(vectors)
    us, ss, vs = [], [], []
    for v in vectors:
        u, s, vh = torch.linalg.svd(v.double())
        us.append(u[:, :r])
        ss.append(s[:r])
        vs.append(vh[:r].T)
    left, right = _polar(torch.cat(us, 1)), _polar(torch.cat(vs, 1))
    return (base.double() + lam * left @ torch.diag(torch.cat(ss)) @ right.T).float()


@pytest.mark.parametrize("n, shape", [(2, (8, 6)), (3, (7, 5)), (3, (5, 9)), (2, (6, 6))])
def test_tsv_formula(n, shape):
    base, experts = _models(n, seed=13, shape=shape, shared=0.5)
    out = merge_state_dicts(base, experts, "tsv", **{"lambda": 0.8})
    vectors = [e[NAME] - base[NAME] for e in experts.values()]
    torch.testing.assert_close(out[NAME], _tsv_oracle(base[NAME], vectors, 0.8), rtol=1e-4, atol=1e-5)
    for name in (BIAS, NORM):  # not 2-D: the mean task vector
        mean = sum(e[name] - base[name] for e in experts.values()) / n
        torch.testing.assert_close(out[name], base[name] + 0.8 * mean, rtol=1e-5, atol=1e-6)


def test_tsv_keeps_rank_and_orthogonal_directions():
    base, experts = _models(2, seed=14, shape=(10, 8))
    merged = merge_state_dicts(base, experts, "tsv")[NAME] - base[NAME]
    assert int(torch.linalg.matrix_rank(merged)) == 2 * (8 // 2)  # T·⌊k/T⌋ = 8 directions
    # the singular values of the merge are the tasks' kept ones: its factors are orthonormal
    kept = torch.cat([torch.linalg.svdvals(e[NAME] - base[NAME])[:4] for e in experts.values()])
    torch.testing.assert_close(torch.linalg.svdvals(merged), kept.sort(descending=True).values, rtol=1e-4, atol=1e-5)


def test_tsv_edge_cases():
    base, experts = _models(3, seed=15, shape=(6, 4))
    # one expert: ⌊k/1⌋ = k triplets, its own SVD, orthonormal already: the expert itself
    one = merge_state_dicts(base, {"e0": experts["e0"]}, "tsv")
    torch.testing.assert_close(one[NAME], experts["e0"][NAME], rtol=1e-4, atol=1e-5)
    # more experts than the smaller dimension: no triplet kept (r = 0), the base, as the reference
    many = {f"e{i}": experts[f"e{i % 3}"] for i in range(5)}
    assert torch.equal(merge_state_dicts(base, many, "tsv")[NAME], base[NAME])
    # a zero task vector contributes zero singular values
    zero = {"e0": experts["e0"], "e1": {k: v.clone() for k, v in base.items()}}
    out = merge_state_dicts(base, zero, "tsv")[NAME]
    u, s, vh = torch.linalg.svd(experts["e0"][NAME] - base[NAME])
    torch.testing.assert_close(torch.linalg.svdvals(out - base[NAME])[:2], s[:2], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(out).all()
    # identical experts: finite, and no larger than the expert's own leading singular value
    same = {"a": experts["e0"], "b": experts["e0"]}
    doubled = merge_state_dicts(base, same, "tsv")[NAME] - base[NAME]
    assert torch.isfinite(doubled).all() and float(torch.linalg.svdvals(doubled)[0]) <= float(s[0]) * (1 + 1e-4)


def test_tsv_is_merged_whole():
    assert not get_method("tsv").is_row_separable({})


# ---------------------------------------------------------------- RegMean


def _regmean_oracle(base, weights, grams, alpha, lam=1.0, axis=1):
    """Jin et al. (ICLR 2023): W* = (Σ G̃_t)⁻¹ Σ G̃_t W_t with W oriented [in, out] and G̃ = αG + (1 − α)diag(G),
    in numpy float64 on the weights themselves; Θ = Θ_0 + λ (W* − Θ_0)."""
    import numpy as np

    def orient(w):
        w = w.double().numpy()
        return w if axis == 0 else w.T

    reduced = []
    for g in grams:
        g = g.double().numpy()
        reduced.append(alpha * g + (1 - alpha) * np.diag(np.diag(g)))
    w_star = np.linalg.inv(sum(reduced)) @ sum(g @ orient(w) for g, w in zip(reduced, weights))
    w_star = torch.from_numpy(w_star if axis == 0 else w_star.T)
    return (base.double() + lam * (w_star - base.double())).float()


@pytest.mark.parametrize("axis", [1, 0], ids=["linear-out-in", "conv1d-in-out"])
@pytest.mark.parametrize("alpha, lam", [(0.9, 1.0), (1.0, 0.7), (0.3, 1.2)])
def test_regmean_formula(axis, alpha, lam):
    base, experts = _models(3, seed=16, shape=(7, 5))
    extras = _fabricated_grams(base, experts, seed=1, axis=axis)
    out = merge_state_dicts(base, experts, "regmean", alpha=alpha, extras=extras, **{"lambda": lam})
    grams = [extras["regmean_grams"].values[NAME][e] for e in experts]
    expected = _regmean_oracle(base[NAME], [e[NAME] for e in experts.values()], grams, alpha, lam, axis)
    torch.testing.assert_close(out[NAME], expected, rtol=1e-5, atol=1e-5)
    for name in (BIAS, NORM):  # not linear weights: the mean task vector
        mean = sum(e[name] - base[name] for e in experts.values()) / 3
        torch.testing.assert_close(out[name], base[name] + lam * mean, rtol=1e-5, atol=1e-6)


def test_regmean_alpha_zero_is_a_per_input_weighted_average():
    """α = 0 keeps only diag(G): each input row of W* = Σ_t g_t,ii W_t[i, :] / Σ_t g_t,ii (W as [in, out])."""
    base, experts = _models(2, seed=17, shape=(4, 6))
    extras = _fabricated_grams(base, experts, seed=2, axis=1)
    out = merge_state_dicts(base, experts, "regmean", alpha=0.0, extras=extras)[NAME]
    grams = extras["regmean_grams"].values[NAME]
    expected = torch.zeros(6, 4)
    for i in range(6):
        total = sum(float(grams[e][i, i]) for e in experts)
        for j in range(4):
            expected[i, j] = sum(float(grams[e][i, i]) * float(experts[e][NAME][j, i]) for e in experts) / total
    torch.testing.assert_close(out, expected.T, rtol=1e-5, atol=1e-6)


def test_regmean_edge_cases():
    base, experts = _models(3, seed=18, shape=(6, 4))
    one = {"e0": experts["e0"]}
    out = merge_state_dicts(base, one, "regmean", extras=_fabricated_grams(base, one))
    torch.testing.assert_close(out[NAME], experts["e0"][NAME], rtol=1e-5, atol=1e-5)  # G⁻¹ G W = W
    same = {f"e{i}": experts["e0"] for i in range(3)}
    out = merge_state_dicts(base, same, "regmean", extras=_fabricated_grams(base, same))
    torch.testing.assert_close(out[NAME], experts["e0"][NAME], rtol=1e-5, atol=1e-5)  # (ΣG)⁻¹ ΣG W = W
    # a zero task vector pulls the solution towards the base, by its Gram matrix
    zero = dict(experts, e2={k: v.clone() for k, v in base.items()})
    extras = _fabricated_grams(base, zero, seed=3)
    out = merge_state_dicts(base, zero, "regmean", extras=extras)
    grams = [extras["regmean_grams"].values[NAME][e] for e in zero]
    expected = _regmean_oracle(base[NAME], [e[NAME] for e in zero.values()], grams, 0.9)
    torch.testing.assert_close(out[NAME], expected, rtol=1e-5, atol=1e-5)
    # a singular Gram sum (an input feature never active): the least-squares solution, finite
    singular = _fabricated_grams(base, experts, seed=4)
    for g in singular["regmean_grams"].values[NAME].values():
        g[0, :] = 0
        g[:, 0] = 0
    assert torch.isfinite(merge_state_dicts(base, experts, "regmean", extras=singular)[NAME]).all()
    # without its Gram matrices RegMean refuses, rather than silently averaging
    with pytest.raises(MergeLabError, match="no Gram matrices"):
        merge_state_dicts(base, experts, "regmean")


def test_regmean_prepare_measures_the_inputs_of_every_linear_layer(tmp_path):
    """On a tiny BERT: the Gram matrix of layer 0's query is the mean outer product of the embedding output
    over the real (unpadded) tokens, computed here through the embeddings module itself."""
    import apl_fixtures as fx
    from transformers import BertForSequenceClassification

    from merging import MergeEngine, MergeSettings
    from merging.apl.regmean import prepare_regmean
    from merging.apl.taskloss import encode_examples

    with fx.one_thread():
        expert_set = fx.expert_set(2)
        tokenizer = fx.tokenizer(tmp_path)
        examples = {e: fx.examples(6, seed=i) for i, e in enumerate(expert_set.experts)}
        prepared = prepare_regmean(expert_set, examples, tokenizer)
        grams = prepared["grams"]
        linear = [n for n in expert_set.layout.merged_names()
                  if n.endswith(".weight") and len(expert_set.layout[n].shape) == 2 and "embeddings" not in n]
        assert set(grams.grams["task0"]) == set(linear) and grams.input_axis[linear[0]] == 1
        query = "encoder.layer.0.attention.self.query.weight"
        full_states = fx.states(2)[1]  # the same experts, as full classifier state dicts
        for expert in expert_set.experts:
            model = BertForSequenceClassification(fx.config()).eval()
            missing, unexpected = model.load_state_dict(full_states[expert], strict=False)
            assert not unexpected and all("position_ids" in k for k in missing)
            batch = encode_examples(tokenizer, examples[expert])
            with torch.no_grad():
                hidden = model.bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
            x = hidden[batch["attention_mask"].bool()].double()
            expected = (x.T @ x / x.shape[0]).float()
            torch.testing.assert_close(grams.grams[expert][query], expected, rtol=1e-4, atol=1e-6)
        settings = MergeSettings.build(expert_set, "regmean", {"alpha": 0.9}, extras=prepared["extras"])
        merged = MergeEngine(expert_set, cache=False).merge(settings).tensors
        assert all(torch.isfinite(t).all() for t in merged.values())
        grams_q = [grams.grams[e][query] for e in expert_set.experts]
        weights = [expert_set.experts[e].get(query) for e in expert_set.experts]
        torch.testing.assert_close(merged[query], _regmean_oracle(expert_set.base.get(query), weights, grams_q, 0.9),
                                   rtol=1e-4, atol=1e-5)


def test_regmean_declarations():
    spec = get_method("regmean")
    assert spec.prepare is not None and "few_shot" in spec.needs and not spec.is_row_separable({})
    assert spec.param("alpha").default == 0.9


def test_regmean_finds_gpt2_conv1d_weights_stored_in_out():
    """GPT-2's Conv1D weights are [in, out]: their input axis is 0, nn.Linear's ([out, in]) 1."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from merging.apl.regmean import linear_layers
    from merging.io.experts import check_homology
    from merging.io.sources import ModelSource

    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2, num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    body = {k[len("transformer."):]: v for k, v in full.items() if k.startswith("transformer.")}
    cfg = config.to_dict()
    expert_set = check_homology(ModelSource.from_state_dict("base", body, cfg),
                                {"t": ModelSource.from_state_dict("t", full, cfg)})
    found = {name: axis for name, (_, axis) in linear_layers(model, expert_set, "t").items()}
    assert found["h.0.attn.c_attn.weight"] == 0 and found["h.0.mlp.c_proj.weight"] == 0
    assert not any("wte" in n or "wpe" in n for n in found)  # embeddings are not linear layers
