"""What the fast paths promise, checked as equalities (never timings).

- The engine's worker pool: a merge on 1, 2 or 3 workers gives the same tensors, bit for bit, and an
  export the same bytes; the caller's cancel token reaches the workers; the first broken tensor in
  layout order is the one named.
- The classic pipeline checks its output, not its inputs, for NaN/Inf: a broken input is still named.
- The planned shard writer writes exactly the files ``safetensors.save_file`` writes.
- Magnitude top-k thresholds and masks equal a sort-based oracle (ties kept lowest index first) on
  tie-heavy, fp16, bf16 and tiny inputs; DELLA's ranks equal a stable sort's.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from safetensors.torch import load_file

from merging import MergeEngine, MergeSettings, engine
from merging.cancel import Cancelled, CancelToken, cancellable
from merging.errors import MergeLabError
from merging.io.experts import check_homology
from merging.io.export import ShardWriter, _StreamPlan
from merging.io.sources import ModelSource
from merging.methods import kernels

SHAPES = {
    "embeddings.word_embeddings.weight": (50, 32),
    "embeddings.LayerNorm.weight": (32,),
    **{name: shape for layer in (0, 1, 2) for name, shape in {
        f"encoder.layer.{layer}.attention.self.query.weight": (64, 32),
        f"encoder.layer.{layer}.attention.self.query.bias": (64,),
        f"encoder.layer.{layer}.output.dense.weight": (45, 40),
        f"encoder.layer.{layer}.output.LayerNorm.weight": (40,),
    }.items()},
}
LEVELS = torch.tensor([1.0, 2.0, 3.0, 0.5]) / 16  # exact in fp16 / bf16: magnitudes tie often


def _expert_set(n_experts=3, dtype=torch.float32, seed=0, poison=None):
    generator = torch.Generator().manual_seed(seed)
    base = {n: (torch.randn(s, generator=generator) * 0.1).to(dtype) for n, s in SHAPES.items()}
    experts = {}
    for i in range(n_experts):
        state = {}
        for name, tensor in base.items():
            levels = LEVELS[torch.randint(len(LEVELS), tensor.shape, generator=generator)]
            signs = torch.where(torch.rand(tensor.shape, generator=generator) < 0.5, -1.0, 1.0)
            noise = 0.05 * torch.randn(tensor.shape, generator=generator)
            delta = torch.where(torch.rand(tensor.shape, generator=generator) < 0.5, levels * signs, noise)
            state[name] = (tensor.float() + delta).to(dtype)
        experts[f"e{i}"] = state
    if poison:
        model, name, value = poison
        (base if model == "base" else experts[model])[name].view(-1)[7] = value
    sources = {name: ModelSource.from_state_dict(name, state) for name, state in experts.items()}
    return check_homology(ModelSource.from_state_dict("base", base), sources)


METHODS = [("linear", {}), ("task_arithmetic", {"lambda": 0.7}), ("ties", {"drop_ratio": 0.6}),
           ("ties", {"drop_ratio": 0.6, "trim_scope": "layer"}), ("dare_ties", {"drop_ratio": 0.5}),
           ("dare_linear", {"drop_ratio": 0.3}), ("magnitude", {"drop_ratio": 0.4, "trim_scope": "model"}),
           ("breadcrumbs", {"drop_ratio": 0.6}), ("della", {"drop_ratio": 0.5})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,params", METHODS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_any_worker_count_merges_the_same_bits(monkeypatch, method, params, dtype):
    monkeypatch.setattr(engine, "CHUNK_BYTES", 4 * 32 * 8)  # 2-D tensors in several row chunks too
    expert_set = _expert_set(dtype=dtype)
    settings = MergeSettings.build(expert_set, method, params, seed=5)
    results = [MergeEngine(expert_set, cache=False, workers=w).merge(settings).tensors for w in (1, 2, 3)]
    for other in results[1:]:
        assert list(other) == list(results[0])
        for name, tensor in results[0].items():
            assert torch.equal(other[name], tensor), name


def test_a_method_with_float_reductions_stays_on_the_callers_threads():
    """SLERP's angle is a float reduction: it is merged one tensor at a time whatever ``workers`` says."""
    expert_set = _expert_set(n_experts=2)
    settings = MergeSettings.build(expert_set, "slerp", {"t": 0.3})
    one = MergeEngine(expert_set, cache=False, workers=1).merge(settings).tensors
    two = MergeEngine(expert_set, cache=False, workers=2).merge(settings).tensors
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_workers_is_checked():
    expert_set = _expert_set(n_experts=2)
    settings = MergeSettings.build(expert_set, "linear", {})
    with pytest.raises(MergeLabError, match="workers must be a whole number"):
        MergeEngine(expert_set, workers=0).merge(settings)


def test_the_cancel_token_reaches_the_workers():
    expert_set = _expert_set()
    settings = MergeSettings.build(expert_set, "ties", {})
    token = CancelToken()
    token.cancel()
    with cancellable(token), pytest.raises(Cancelled):
        MergeEngine(expert_set, cache=False, workers=2).merge(settings)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("model,value", [("e2", math.nan), ("base", math.inf), ("e0", -math.inf)])
def test_a_broken_input_is_named_though_only_outputs_are_scanned(workers, model, value):
    name = "encoder.layer.2.output.dense.weight"  # late in layout order: the workers run ahead of it
    expert_set = _expert_set(poison=(model, name, value))
    zero_weight = {"e2": {"weight": 0.0}}  # weight 0 does not hide NaN
    for method, params, expert_params in [("ties", {}, zero_weight), ("dare_linear", {"drop_ratio": 0.9}, zero_weight),
                                          ("linear", {}, zero_weight), ("model_stock", {}, None),
                                          ("model_stock", {"filter_wise": True}, None)]:
        settings = MergeSettings.build(expert_set, method, params, expert_params=expert_params)
        with pytest.raises(MergeLabError, match=rf"model '{model}' has 1 NaN/Inf value\(s\) in tensor '{name}'"):
            MergeEngine(expert_set, cache=False, workers=workers).merge(settings)


def _state(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "z.weight": torch.randn(7, 5, generator=generator),
        "a.bias": torch.randn(5, generator=generator).half(),
        "m.embed": torch.randn(33, 4, generator=generator).bfloat16(),
        "ids": torch.arange(9),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "small.int": torch.tensor([1, -2], dtype=torch.int32),
        "b.double": torch.randn(3, generator=generator).double(),
        "q.int8": torch.tensor([1, -3, 5], dtype=torch.int8),
        "r.int16": torch.tensor([100, -300], dtype=torch.int16),
        "u.bytes": torch.tensor([1, 2, 250], dtype=torch.uint8),
    }


@pytest.mark.parametrize("shard_bytes", [10 ** 9, 200, 64])
def test_the_planned_writer_writes_save_files_bytes(tmp_path, shard_bytes):
    state = _state()
    plan = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    files = {}
    for kind, writer_plan in (("buffered", None), ("planned", plan)):
        folder = tmp_path / kind
        folder.mkdir()
        writer = ShardWriter(folder, shard_bytes, plan=writer_plan)
        assert (writer._plan is not None) == (writer_plan is not None)
        for name, tensor in state.items():
            writer.add(name, tensor)
        files[kind] = {p.name: p.read_bytes() for p in writer.close()}
    assert files["planned"] == files["buffered"]
    assert (len(files["planned"]) > 1) == (shard_bytes < 10 ** 9)
    read = {}
    for name in files["planned"]:
        if name.endswith(".safetensors"):
            read.update(load_file(str(tmp_path / "planned" / name)))
    assert read.keys() == state.keys() and all(torch.equal(read[n], state[n]) for n in state)


def test_the_planned_writer_refuses_a_tensor_it_did_not_plan(tmp_path):
    writer = ShardWriter(tmp_path, plan=[("a", (2,), torch.float32), ("b", (3,), torch.float32)])
    writer.add("a", torch.zeros(2))
    with pytest.raises(MergeLabError, match="planned 'b'"):
        writer.add("b", torch.zeros(4))
    assert _StreamPlan([("a", (2,), torch.float32)], 10).shards[0].names == ["a"]


def test_an_export_writes_the_same_bytes_on_any_worker_count(tmp_path):
    from safetensors.torch import save_file

    from merging.io.export import export_recipe
    from merging.io.recipe import ExpertRef, Recipe

    expert_set = _expert_set(dtype=torch.float16)
    folders = {}
    for name, source in [("base", expert_set.base), *((n, e.source) for n, e in expert_set.experts.items())]:
        folders[name] = tmp_path / "models" / name
        folders[name].mkdir(parents=True)
        save_file({k: source.get(k) for k in source.tensors}, str(folders[name] / "model.safetensors"))
    recipe = Recipe(method="ties", base=str(folders["base"]), seed=3, dtype="float16", parameters={"drop_ratio": 0.7},
                    experts=[ExpertRef(n, str(folders[n])) for n in expert_set.experts])
    written = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        from merging.io.replay import expert_set_from_recipe

        opened = expert_set_from_recipe(recipe)
        export_recipe(recipe, out, expert_set=opened, engine=MergeEngine(opened, cache=False, workers=workers))
        written.append((out / "model.safetensors").read_bytes())
    assert written[0] == written[1]


# ---- thresholds against a sort --------------------------------------------------------------

def _oracle_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of |values| by a stable sort: ties at the cut kept lowest flat index first."""
    magnitude = values.abs().reshape(-1).float()
    order = torch.sort(-magnitude, stable=True).indices[:k]
    mask = torch.zeros(magnitude.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.reshape(values.shape)


@functools.lru_cache(maxsize=1)
def _inputs():
    generator = torch.Generator().manual_seed(11)
    big = kernels._SELECT_MIN  # the sample-based selection's smallest input
    tied = LEVELS[torch.randint(len(LEVELS), (big,), generator=generator)] * torch.where(
        torch.rand(big, generator=generator) < 0.5, -1.0, 1.0)
    noisy = torch.randn(big, generator=generator)
    mostly_zero = torch.where(torch.rand(big, generator=generator) < 0.9, 0.0, noisy)
    return {
        "tie-heavy": tied, "fp16": noisy.half().float(), "bf16": noisy.bfloat16().float(),
        "fp16 storage": noisy.half(), "mostly zero": mostly_zero, "constant": torch.full((big,), 0.25),
        "tiny": torch.tensor([0.5, -0.5, 0.25, 0.5, -1.0]), "one": torch.tensor([2.0]),
        "small random": torch.randn(1000, generator=generator),
    }


@pytest.mark.parametrize("kind", list(_inputs()))
@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 0.7, 0.999, 1.0])
def test_magnitude_masks_equal_a_sort(kind, density):
    values = _inputs()[kind]
    n = values.numel()
    k = int(round(density * n))
    expected = _oracle_mask(values, k)
    assert torch.equal(kernels.magnitude_mask(values, density), expected)
    factor = kernels.magnitude_keep_factor(values.float(), density)
    assert torch.equal(factor.bool(), expected)
    if 0 < k < n:  # the cut is the k-th largest magnitude, as torch.kthvalue gives it
        cut = kernels.kth_largest_threshold(values.abs(), k)
        assert cut == float(torch.kthvalue(values.abs().float().reshape(-1), n - k).values)



@pytest.mark.parametrize("kind", list(_inputs()))
@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 0.7, 0.999, 1.0])
def test_the_blocked_delta_cut_keeps_what_a_sort_keeps(monkeypatch, kind, density):
    """kernels.delta_topk takes the top-k of |x − b| in cache-sized blocks without the delta: its cut and tie
    quota keep exactly the sort oracle's entries (ties lowest index first), on the inputs above — through
    the banded pass wherever the input spans more than one block (not only through its fallback)."""
    monkeypatch.setattr(kernels, "_TOPK_BLOCK", 1 << 14)
    banded = []
    select = kernels._delta_band_select
    monkeypatch.setattr(kernels, "_delta_band_select", lambda *a: banded.append(select(*a)) or banded[-1])
    delta = _inputs()[kind].float()
    base = torch.linspace(-1, 1, delta.numel())
    tensor = base + delta
    exact = tensor - base  # the float32 delta the kernels see
    k = int(round(density * exact.numel()))
    cut, ties = kernels.delta_topk(tensor, base, k)
    kept = exact.abs() > cut
    tied = (exact.abs() == cut).nonzero().reshape(-1)[:max(ties, 0)]
    kept[tied] = True
    assert torch.equal(kept, _oracle_mask(exact, k))
    if 0 < k < exact.numel() and exact.numel() > kernels._TOPK_BLOCK and kind != "constant":
        assert banded and banded[0] is not None  # the band held the cut

def test_della_ranks_equal_a_stable_sort():
    generator = torch.Generator().manual_seed(2)
    delta = LEVELS[torch.randint(len(LEVELS), (37, 29), generator=generator)] * torch.randn(37, 29, generator=generator).sign()
    probs = kernels.della_keep_probabilities(delta, 0.4, 0.2)
    order = torch.sort(delta.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(29).expand_as(order))
    expected = (0.4 + 0.2 * (ranks.float() / 28 - 0.5)).clamp(1e-6, 1.0)
    assert torch.equal(probs, expected)


@pytest.mark.parametrize("kind", ["tie-heavy", "fp16", "small random", "constant"])
def test_pcbs_order_statistics_equal_a_sort(kind):
    from merging.methods.pcb import quantile_clamp

    row = _inputs()[kind].float()
    x = torch.stack([row, row.flip(0) * 2, -row])
    d = x.shape[1]
    for lows, high in [([0.0001] * 3, 0.0001), ([0.1, 0.5, 0.9], 0.0), ([0.0, 0.3, 0.999], 0.25)]:
        ordered = x.sort(dim=1).values  # the reference's clamp, by a full sort
        low = ordered[torch.arange(3), torch.tensor([int(d * r) for r in lows])].unsqueeze(1)
        top = ordered[:, max(int(d * (1 - high) - 1), 0)].unsqueeze(1)
        assert torch.equal(quantile_clamp(x, lows, high), torch.maximum(torch.minimum(x, top), low))


def test_the_selection_falls_back_where_nan_and_inf_sit():
    """NaN sorts last in torch.kthvalue; the sample-based band must see it and give kthvalue's answer."""
    for seed in range(2):
        x = torch.randn(kernels._SELECT_MIN, generator=torch.Generator().manual_seed(seed))
        x[5], x[9], x[11] = math.nan, math.inf, -math.inf
        n = x.numel()
        for j in (1, 2, 1000, n // 2, n - 2, n - 1, n):
            got, want = kernels.kth_smallest(x, j), float(torch.kthvalue(x, j).values)
            assert got == want or (math.isnan(got) and math.isnan(want)), (j, got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,params,weights", [
    ("linear", {}, {"e1": {"weight": 0.3}}), ("task_arithmetic", {"lambda": 0.7}, {"e2": {"weight": -1.5}}),
    ("task_arithmetic", {}, None), ("linear", {}, {e: {"weight": 0.0} for e in ("e0", "e1", "e2")})])
def test_the_blocked_sum_equals_the_stacked_reference(monkeypatch, dtype, method, params, weights):
    """Linear / task arithmetic run block by block in the cache; the stacked form (a [T, …] stack reduced in
    expert order) is the reference they must equal bit for bit."""
    from merging.methods import classic

    monkeypatch.setattr(classic, "_BLOCK", 1000)  # many blocks, the last one short
    expert_set = _expert_set(dtype=dtype)
    settings = MergeSettings.build(expert_set, method, params, weights)
    blocked = MergeEngine(expert_set, cache=False).merge(settings).tensors
    monkeypatch.setattr(classic, "_IN_PLACE_MAX_EXPERTS", 0)
    stacked = MergeEngine(expert_set, cache=False).merge(settings).tensors
    assert all(torch.equal(blocked[n], stacked[n]) for n in blocked)


DROPS = [("ties", {"drop_ratio": 0.6}, None), ("ties", {"drop_ratio": 0.6, "trim_scope": "layer"}, None),
         ("ties", {"drop_ratio": 0.999, "normalize": False}, {"e1": {"weight": -1.5}}),
         ("magnitude", {"drop_ratio": 0.4, "trim_scope": "model"}, None),
         ("magnitude", {"drop_ratio": 0.7, "lambda": 1.3}, {"e0": {"weight": 0.3}}),
         ("dare_linear", {"drop_ratio": 0.3}, None), ("dare_linear", {"drop_ratio": 0.9, "rescale": False}, None),
         ("dare_ties", {"drop_ratio": 0.5}, {"e2": {"weight": 2.0}}), ("dare_ties", {"drop_ratio": 0.0}, None),
         ("della", {"drop_ratio": 0.6, "epsilon": 0.3}, None),
         ("della", {"drop_ratio": 0.2, "epsilon": 0.0, "normalize": False}, {"e1": {"weight": -0.7}})]


def _assert_blocked_equals_stacked(monkeypatch, expert_set, settings):
    """The merge under the caller's patches (blocks, RNG blocks, row chunks) against the stacked reference
    form merged whole: equal tensor for tensor."""
    from merging.methods import classic

    blocked = MergeEngine(expert_set, cache=False).merge(settings).tensors
    monkeypatch.setattr(classic, "_IN_PLACE_MAX_EXPERTS", 0)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 64 * 1024 * 1024)
    stacked = MergeEngine(expert_set, cache=False).merge(settings).tensors
    differ = [n for n in blocked if not torch.equal(blocked[n], stacked[n])]
    assert not differ, differ


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "row-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,params,weights", DROPS, ids=lambda v: v if isinstance(v, str) else None)
def test_the_blocked_drops_equal_the_stacked_reference(monkeypatch, chunked, dtype, method, params, weights):
    """TIES, magnitude and DARE run block by block in the cache (Pipeline._blocked: their own magnitude cut
    found in blocks, DARE's uniforms drawn span by span); the stacked form is the reference they must equal
    bit for bit — with many blocks, RNG blocks shorter than a tensor, tie-heavy fp16/bf16 magnitudes,
    row chunks starting inside an RNG block, and cuts handed over by the engine (layer / model scope)."""
    from merging.methods import classic

    monkeypatch.setattr(classic, "_BLOCK", 100)  # many blocks, the last one short
    monkeypatch.setattr(kernels, "RNG_BLOCK", 256)  # uniforms spans shorter than a tensor, ends unaligned
    monkeypatch.setattr(kernels, "_TOPK_BLOCK", 64)  # the magnitude cut's banded pass, not its fallback
    monkeypatch.setattr(kernels, "_TOPK_SAMPLE", 128)
    if chunked:
        monkeypatch.setattr(engine, "CHUNK_BYTES", 4 * 32 * 7)  # 7 rows of a [*, 32] matrix: chunk starts unaligned
    expert_set = _expert_set(dtype=dtype)
    settings = MergeSettings.build(expert_set, method, params, weights)
    _assert_blocked_equals_stacked(monkeypatch, expert_set, settings)


@pytest.mark.parametrize("block", [16, 33], ids=["rows-longer-than-a-block", "odd-block"])
def test_blocked_della_with_rows_longer_than_a_block_equals_the_stacked_reference(monkeypatch, block):
    """DELLA's blocks are whole rows (its ranks are a row's): where a row is longer than a block, a block is
    that one row; the uniforms of row blocks that end inside RNG blocks still equal the whole draw."""
    from merging.methods import classic

    monkeypatch.setattr(classic, "_BLOCK", block)
    monkeypatch.setattr(kernels, "RNG_BLOCK", 100)  # RNG blocks that no row block lines up with
    monkeypatch.setattr(engine, "CHUNK_BYTES", 4 * 32 * 7)
    expert_set = _expert_set(n_experts=2)
    settings = MergeSettings.build(expert_set, "della", {"drop_ratio": 0.5, "epsilon": 0.4}, None)
    _assert_blocked_equals_stacked(monkeypatch, expert_set, settings)


def test_a_uniform_stream_reads_the_tensors_uniforms_drawing_each_rng_block_once(monkeypatch):
    monkeypatch.setattr(kernels, "RNG_BLOCK", 64)
    numel = 1000
    whole = kernels.uniforms(7, "e0", "w", numel)
    drawn = []
    draw = kernels._draw_block

    def spy(seed, expert, name, numel, block, *args, **kwargs):
        drawn.append(block)
        return draw(seed, expert, name, numel, block, *args, **kwargs)

    monkeypatch.setattr(kernels, "_draw_block", spy)
    stream = kernels.UniformStream(7, "e0", "w", numel, slot="test-stream")
    cuts = [0, 5, 64, 70, 70, 200, 333, 334, 640, 704, 999, 1000]
    for start, stop in zip(cuts, cuts[1:]):
        got = stream.read(start, stop, out=torch.empty(stop - start))
        assert torch.equal(got, whole[start:stop]), (start, stop)
    assert sorted(drawn) == list(range(math.ceil(numel / 64)))


@pytest.mark.parametrize("n_experts", [2, 5], ids=["blocked", "stacked"])
def test_della_merges_a_tensor_without_rows(n_experts):
    """A (0, k) weight has nothing to rank: DELLA merges it (its rows were once found by reshape(0, -1),
    which raised) on the blocked path and the stacked one alike."""
    base = {"layer.0.weight": torch.zeros(0, 4), "layer.0.dense.weight": torch.randn(3, 4)}
    experts = {f"e{i}": {n: t + 0.1 * (i + 1) for n, t in base.items()} for i in range(n_experts)}
    expert_set = check_homology(ModelSource.from_state_dict("base", base),
                                {n: ModelSource.from_state_dict(n, s) for n, s in experts.items()})
    settings = MergeSettings.build(expert_set, "della", {"drop_ratio": 0.5}, None)
    merged = MergeEngine(expert_set, cache=False).merge(settings).tensors
    assert merged["layer.0.weight"].shape == (0, 4)
