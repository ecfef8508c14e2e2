"""Row chunks are part of every method's contract: a tensor merged in chunks equals it merged whole.

Every registered method is covered (``available()``: a new method is tested the day it registers),
on fp16/bf16 deltas with deliberately repeated magnitudes, so magnitude cuts fall inside runs of
ties. ``CHUNK_BYTES`` is shrunk so the 2-D tensors split into several uneven chunks; a method that
declares itself not row-separable must still pass, because the engine then merges it whole.
"""

import math

import apl_fixtures as fx
import pytest
import torch

from merging import MergeEngine, MergeSettings, engine
from merging.apl.calibration import UNIT_EXTRAS
from merging.apl.fisher import FISHER_EXTRAS
from merging.io.experts import check_homology
from merging.io.sources import ModelSource
from merging.methods import PerTensor, available, get_method

SMALL_CHUNKS = 4 * 32 * 8  # 8 rows of a [*, 32] float32 matrix per chunk: 6–20 chunks per 2-D tensor below
SHAPES = {
    "embeddings.word_embeddings.weight": (50, 32),  # 7 chunks, the last one short
    "embeddings.LayerNorm.weight": (32,),
    **{name: shape for layer in (0, 1) for name, shape in {
        f"encoder.layer.{layer}.attention.self.query.weight": (64, 32),
        f"encoder.layer.{layer}.attention.self.query.bias": (64,),
        f"encoder.layer.{layer}.output.dense.weight": (45, 40),  # 6 rows a chunk: 8 chunks
        f"encoder.layer.{layer}.output.LayerNorm.weight": (40,),
    }.items()},
    "encoder.layer.1.attn.c_attn.weight": (40, 96),  # GPT-2 Conv1D [in, out]: units along axis 1, 20 chunks
}
LEVELS = torch.tensor([1.0, 2.0, 3.0, 0.5]) / 16  # exact in fp16 and bf16: many entries share a magnitude


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on these tiny tensors two MKL threads only spin (an SVD of a 64 × 32 matrix took 48 ms
    on two loaded cores, 2 ms on one), and whole and chunked merges are compared within the same setting."""
    with fx.one_thread():
        yield


def _tied_delta(shape, generator, zeros=True):
    """Half the entries from four magnitudes (random signs, some zeros), half low-precision noise."""
    levels = LEVELS[torch.randint(len(LEVELS), shape, generator=generator)]
    signs = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    noise = 0.1 * torch.randn(shape, generator=generator)
    delta = torch.where(torch.rand(shape, generator=generator) < 0.5, levels * signs, noise)
    if zeros:
        delta = torch.where(torch.rand(shape, generator=generator) < 0.05, 0.0, delta)
    return delta


def _expert_set(n_experts, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = {n: (torch.randint(-16, 16, s, generator=generator).float() / 16).to(dtype) for n, s in SHAPES.items()}
    experts = {}
    for i in range(n_experts):
        experts[f"e{i}"] = {n: (b.float() + _tied_delta(b.shape, generator)).to(dtype) for n, b in base.items()}
    sources = {name: ModelSource.from_state_dict(name, state) for name, state in experts.items()}
    return check_homology(ModelSource.from_state_dict("base", base), sources)


def _fisher_extras(expert_set, generator):
    """Fabricated diagonals (positive, with repeated values), one per merged tensor and expert."""
    values = {}
    for name in expert_set.layout.merged_names():
        shape = expert_set.layout[name].shape
        values[name] = {e: torch.randint(1, 4, shape, generator=generator).float() / 4 for e in expert_set.experts}
    return {FISHER_EXTRAS: PerTensor(values, row_axis=0)}


def _apl_extras(expert_set, generator):
    """Fabricated unit percentiles [1, units] for every tensor with hidden-state units."""
    values = {}
    for name, info in expert_set.layout.tensors.items():
        if info.droppable and info.unit_axis is not None:
            values[name] = {e: torch.rand(1, info.n_units, generator=generator, dtype=torch.float64)
                            for e in expert_set.experts}
    return {UNIT_EXTRAS: PerTensor(values, row_axis=None)}


def _variants(spec):
    """Parameter settings worth chunking for one method: every trim scope, APL's drop kinds."""
    names = set(spec.param_names())
    shared = {}
    if "drop_ratio" in names:
        shared["drop_ratio"] = 0.6
    if "t" in names:
        shared["t"] = 0.3
    if "epsilon" in names and spec.name == "della":
        shared["epsilon"] = 0.3
    if spec.trim_scope_param:
        return [dict(shared, **{spec.trim_scope_param: scope}) for scope in spec.param(spec.trim_scope_param).choices]
    if spec.name == "model_stock":  # per tensor (merged whole) and per row (in chunks)
        return [dict(shared, filter_wise=False), dict(shared, filter_wise=True)]
    if spec.name == "consensus":  # over task arithmetic (in chunks) and over TIES (merged whole)
        return [dict(shared, base_method=base, k=k) for base, k in (("task_arithmetic", 2), ("ties", 2),
                                                                    ("task_arithmetic", 1))]
    if spec.name == "apl":
        return [dict(shared, drop=drop, within_layer=within, sign_election=sign)
                for drop, within, sign in (("random", "uniform", False), ("random", "hidden", True),
                                           ("magnitude", "uniform", False), ("magnitude", "hidden", True))]
    return [shared]


def _expert_params(spec, expert_set):
    """Unequal weights and, for APL, per-layer drop ratios and weights as its calibration gives them."""
    out = {}
    for i, expert in enumerate(expert_set.experts):
        params = {}
        if "weight" in spec.param_names():
            params["weight"] = {"embeddings": 1.0, "0": 0.5 + 0.25 * i, "1": 1.5 - 0.25 * i}
        if spec.name == "apl":
            params["drop_ratio"] = {"embeddings": 0.2, "0": 0.5 + 0.1 * i, "1": 0.7}
        out[expert] = params
    return out


def _regmean_extras(expert_set, generator):
    """Fabricated Gram matrices (symmetric positive definite, [in, in]) for the linear weights (not the embeddings)."""
    return fx.regmean_extras(expert_set.layout.tensors, expert_set.experts, generator)


def _localize_stitch_extras(expert_set, generator):
    """Fabricated bool masks (about 30 % kept, overlapping) for every droppable merged tensor."""
    from merging.methods.localize_stitch import MASKS_EXTRAS

    values = {name: {e: torch.rand(info.shape, generator=generator) < 0.3 for e in expert_set.experts}
              for name, info in expert_set.layout.tensors.items() if info.droppable}
    return {MASKS_EXTRAS: PerTensor(values, row_axis=0)}


FABRICATED_INPUTS = {"fisher": _fisher_extras, "apl": _apl_extras, "regmean": _regmean_extras,
                     "localize_stitch": _localize_stitch_extras}


def _cases():
    for method in available():
        spec = get_method(method)
        counts = [2] if spec.max_experts == 2 else [3, 5]  # 5 experts: the pipeline's stacked path
        for params in _variants(spec):
            for n in counts:
                label = "-".join(f"{k}={v}" for k, v in params.items() if k not in ("drop_ratio", "t", "epsilon"))
                yield pytest.param(method, params, n, id=f"{method}-{n}x-{label or 'default'}")


def _count_jobs(monkeypatch):
    calls = []
    original = MergeEngine._run

    def counting(self, name, *args):
        calls.append(name)
        return original(self, name, *args)

    monkeypatch.setattr(MergeEngine, "_run", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("method, params, n_experts", list(_cases()))
def test_chunked_merge_equals_whole_merge(method, params, n_experts, dtype, monkeypatch):
    spec = get_method(method)
    expert_set = _expert_set(n_experts, dtype)
    fabricate = FABRICATED_INPUTS.get(method)
    extras = fabricate(expert_set, torch.Generator().manual_seed(1)) if fabricate else {}
    settings = MergeSettings.build(expert_set, method, params, _expert_params(spec, expert_set), 7, extras)
    whole = MergeEngine(expert_set, cache=False).merge(settings).tensors
    monkeypatch.setattr(engine, "CHUNK_BYTES", SMALL_CHUNKS)
    jobs = _count_jobs(monkeypatch)
    chunked = MergeEngine(expert_set, cache=False).merge(settings).tensors
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name
    merged = len(expert_set.layout.merged_names())
    if spec.is_row_separable(settings.shared):
        assert len(jobs) > 4 * merged  # it really went in chunks
    else:
        assert len(jobs) == merged  # merged whole, the only way it can be exact


def _one_expert_from_zero(dtype, seed=3):
    """Base zeros, one expert of tied non-zero magnitudes: the merged tensor's non-zeros are the kept entries."""
    generator = torch.Generator().manual_seed(seed)
    base = {n: torch.zeros(s, dtype=dtype) for n, s in SHAPES.items()}
    expert = {n: _tied_delta(s, generator, zeros=False).to(dtype) for n, s in SHAPES.items()}
    expert = {n: torch.where(e == 0, torch.tensor(1.0 / 16, dtype=dtype), e) for n, e in expert.items()}
    sources = {"e0": ModelSource.from_state_dict("e0", expert)}
    return check_homology(ModelSource.from_state_dict("base", base), sources), expert


@pytest.mark.parametrize("chunks", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("scope", ["tensor", "layer", "model"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kept_count_is_exact_with_ties(scope, chunks, dtype, monkeypatch):
    density = 0.3  # |Δ| > 2/16 holds ~23% of the entries, |Δ| ≥ 2/16 ~36%: every cut falls among the 2/16s
    expert_set, expert = _one_expert_from_zero(dtype)
    if chunks:
        monkeypatch.setattr(engine, "CHUNK_BYTES", SMALL_CHUNKS)
    settings = MergeSettings.build(expert_set, "magnitude", {"drop_ratio": 1 - density, "trim_scope": scope})
    merged = MergeEngine(expert_set, cache=False).merge(settings).tensors
    layout = expert_set.layout
    droppable = [n for n in layout.merged_names() if layout[n].droppable]
    groups = {"tensor": {n: [n] for n in droppable},
              "layer": {layer: [n for n in droppable if layout[n].layer == layer] for layer in layout.layers},
              "model": {"*": droppable}}[scope]
    for names in groups.values():
        if not names:
            continue
        magnitudes = torch.cat([expert[n].float().abs().reshape(-1) for n in names])
        k = round(density * magnitudes.numel())
        kth = magnitudes.sort(descending=True).values[k - 1]
        assert int((magnitudes > kth).sum()) < k < int((magnitudes >= kth).sum())  # the cut lies in a run of ties
        kept = torch.cat([merged[n].reshape(-1) != 0 for n in names])
        assert int(kept.sum()) == k
        assert magnitudes[kept].min() >= magnitudes[~kept].max()  # and they are the largest
        for n in names:  # kept entries are the expert's, unscaled (magnitude pruning has no rescale)
            nonzero = merged[n] != 0
            assert torch.equal(merged[n][nonzero], expert[n].float()[nonzero])
    for n in layout.merged_names():
        if not layout[n].droppable:
            assert torch.equal(merged[n], expert[n].float())  # norms are never trimmed


def test_tied_entries_are_kept_lowest_flat_index_first_across_chunks(monkeypatch):
    """Scope tensor, chunked: among the entries tied at the cut, exactly the first ones in flat order survive."""
    name = "encoder.layer.0.attention.self.query.weight"
    expert_set, expert = _one_expert_from_zero(torch.bfloat16, seed=5)
    monkeypatch.setattr(engine, "CHUNK_BYTES", SMALL_CHUNKS)
    settings = MergeSettings.build(expert_set, "ties", {"drop_ratio": 0.5})
    merged = MergeEngine(expert_set, cache=False).merge(settings).tensors[name].reshape(-1)
    magnitude = expert[name].float().abs().reshape(-1)
    k = round(0.5 * magnitude.numel())
    kth = magnitude.sort(descending=True).values[k - 1]
    tied = (magnitude == kth).nonzero().reshape(-1)
    need = k - int((magnitude > kth).sum())
    assert 0 < need < tied.numel()
    assert (merged[tied[:need]] != 0).all() and (merged[tied[need:]] == 0).all()


def test_per_tensor_input_must_match_its_declared_row_axis(monkeypatch):
    from merging import MergeLabError

    expert_set = _expert_set(2, torch.float16)
    name = "encoder.layer.0.attention.self.query.weight"
    extras = _fisher_extras(expert_set, torch.Generator().manual_seed(0))
    values = dict(extras[FISHER_EXTRAS].values)
    values[name] = {e: f.T.contiguous() for e, f in values[name].items()}  # [32, 64]: rows on the wrong axis
    settings = MergeSettings.build(expert_set, "fisher", {}, None, 0, {FISHER_EXTRAS: PerTensor(values, row_axis=0)})
    monkeypatch.setattr(engine, "CHUNK_BYTES", SMALL_CHUNKS)
    with pytest.raises(MergeLabError, match=r"declares axis 0 as the tensor's 64 rows"):
        MergeEngine(expert_set, cache=False).merge(settings)


def test_old_style_per_tensor_inputs_are_refused():
    from merging import MergeLabError

    expert_set = _expert_set(2, torch.float16)
    with pytest.raises(MergeLabError, match="PerTensor"):
        MergeSettings.build(expert_set, "fisher", extras={"per_tensor:fisher": {}})


def test_row_range_locates_a_chunk():
    spec = get_method("task_arithmetic")
    assert spec.is_row_separable({}) and not get_method("slerp").is_row_separable({})
    assert get_method("apl").is_row_separable({"drop": "random"})
    assert not get_method("apl").is_row_separable({"drop": "magnitude"})
    from merging.io.layout import describe_tensor
    from merging.methods import TensorJob

    info = describe_tensor("encoder.layer.0.output.dense.weight", (45, 40), "float32", False)
    chunk = TensorJob("x", info, torch.zeros(6, 40), {}, {}, {}, 0, numel=45 * 40, start=12 * 40)
    assert chunk.row_range() == (12, 18)
    whole = TensorJob("x", info, torch.zeros(45, 40), {}, {}, {}, 0, numel=45 * 40)
    assert whole.row_range() == (0, 45)
    assert math.prod(info.shape) == 45 * 40
