"""APL importance: exact and gradient modes against their definitions, on tiny BERT experts."""

import apl_fixtures as fx
import numpy as np
import pytest
import torch

from merging import MergeLabError
from merging.apl.importance import ImportanceMap, compute_importance, draw_fewshot, sample_units

LAYER1 = tuple(f"encoder.layer.1.{m}.{p}" for m in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm") for p in ("weight", "bias"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with fx.one_thread():
        yield


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return fx.tokenizer(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def frozen_set():
    """Experts that left layer 1 and the word embeddings untouched."""
    return fx.expert_set(frozen=LAYER1 + ("embeddings.word_embeddings.weight",))


def _examples(expert_set, n=12):
    return {t: fx.examples(n, seed=i) for i, t in enumerate(expert_set.experts)}


@pytest.mark.parametrize("mode", ["exact", "gradient"])
@pytest.mark.parametrize("intervention", ["restore", "ablate"])
def test_zero_delta_partitions_score_zero(frozen_set, tok, mode, intervention):
    result = compute_importance(frozen_set, _examples(frozen_set), tok, mode=mode, level="all",
                                intervention=intervention, sample=40, seed=1)
    for expert in frozen_set.experts:
        assert result.scores(expert, "layer")["1"] == 0.0
        modules = result.scores(expert, "module")
        assert modules["embeddings.word_embeddings"] == 0.0
        assert all(modules[m] == 0.0 for m in modules if m.startswith("encoder.layer.1."))
        for module in result.unit_modules("1"):
            units = result.unit_scores(expert, module)
            assert np.all(units[np.isfinite(units)] == 0.0)
        assert result.scores(expert, "layer")["0"] != 0.0  # the changed layer does register


def _linear_loss(expert_set):
    """A loss linear in every parameter: first-order Taylor is exact, so gradient must equal exact."""
    generator = torch.Generator().manual_seed(7)
    coefficients = {n: torch.randn(expert_set.layout[n].shape, generator=generator).double()
                    for n in expert_set.layout.merged_names()}
    return lambda state: sum((coefficients[n] * state[n].double()).sum() for n in coefficients)


@pytest.mark.parametrize("intervention", ["restore", "ablate"])
def test_gradient_equals_exact_when_loss_is_linear(intervention):
    expert_set = fx.expert_set(frozen=("embeddings.word_embeddings.weight",))
    loss = _linear_loss(expert_set)
    exact = compute_importance(expert_set, None, None, mode="exact", level="all", intervention=intervention, loss_fn=loss)
    gradient = compute_importance(expert_set, None, None, mode="gradient", level="all", intervention=intervention,
                                  loss_fn=loss)
    for level in ("model", "layer", "module"):
        np.testing.assert_allclose(gradient.matrix(level, absolute=False), exact.matrix(level, absolute=False),
                                   rtol=1e-5, atol=1e-6)
    for module in exact.units:
        np.testing.assert_allclose(gradient.units[module], exact.units[module], rtol=1e-5, atol=1e-6)


def test_scores_do_not_depend_on_tensor_order(tok):
    forward = fx.expert_set(frozen=("embeddings.word_embeddings.weight",))
    backward = fx.expert_set(frozen=("embeddings.word_embeddings.weight",), order=lambda d: dict(reversed(list(d.items()))))
    examples = _examples(forward)
    for mode in ("gradient", "exact"):
        a = compute_importance(forward, examples, tok, mode=mode, level="module")
        b = compute_importance(backward, examples, tok, mode=mode, level="module")
        assert a.partitions["module"] != b.partitions["module"]  # the orders really differ
        for expert in forward.experts:
            sa, sb = a.scores(expert, "module", False), b.scores(expert, "module", False)
            assert sa.keys() == sb.keys()
            np.testing.assert_allclose([sa[k] for k in sa], [sb[k] for k in sa], rtol=1e-6, atol=1e-9)


def test_exact_hidden_sample_is_seeded_and_recorded(frozen_set, tok):
    units = sample_units(frozen_set.layout, 25, seed=3)
    assert sum(len(v) for v in units.values()) == 25
    assert units == sample_units(frozen_set.layout, 25, seed=3)
    assert units != sample_units(frozen_set.layout, 25, seed=4)
    result = compute_importance(frozen_set, _examples(frozen_set), tok, mode="exact", level="hidden",
                                sample=25, seed=3)
    measured = sum(int(np.isfinite(result.units[m][0]).sum()) for m in result.units)
    assert measured == 25 and result.sample == 25 and result.levels == ["hidden"]


def test_patching_restores_the_parameters(frozen_set, tok):
    """After an exact run the live model holds the start point again (patches are undone exactly)."""
    from merging.apl.importance import exact_partition_scores
    from merging.apl.taskloss import ClassifierLoss, body_state, encode_examples

    base, own = body_state(frozen_set, "base"), body_state(frozen_set, "task0")
    task = ClassifierLoss(frozen_set, "task0", encode_examples(tok, fx.examples(8, 0)))
    task.assign(base)
    exact_partition_scores(task, base, own, frozen_set.layout.partitions("module"))
    assert all(torch.equal(task.live[n], base[n]) for n in base)


def test_map_round_trips_and_heatmap(frozen_set, tok, tmp_path):
    result = compute_importance(frozen_set, _examples(frozen_set), tok, mode="gradient", level="all",
                                fewshot_indices={t: list(range(3, 15)) for t in frozen_set.experts})
    for loaded in (ImportanceMap.from_json(result.to_json()), _npz(result, tmp_path)):
        assert loaded.experts == result.experts and loaded.levels == result.levels
        assert loaded.fewshot == result.fewshot and loaded.mode == "gradient"
        for level in ("model", "layer", "module"):
            np.testing.assert_allclose(loaded.matrix(level, False), result.matrix(level, False))
        for module in result.units:
            np.testing.assert_allclose(loaded.units[module], result.units[module])
    heat = result.layer_module_matrix("task0")
    assert heat.rows == ["embeddings", "0", "1", "head"]
    assert {"q", "k", "v", "o", "ffn_in", "ffn_out", "norm1", "norm2", "pooler"} <= set(heat.cols)
    row = heat.rows.index("0")
    assert heat.values[row, heat.cols.index("q")] == result.scores("task0", "module")["encoder.layer.0.attention.self.query"]
    assert result.timings["task0"]["gradient"] > 0 and result.start_loss["task0"] > 0


def _npz(result, tmp_path):
    path = tmp_path / "imp.npz"
    result.save_npz(path)
    return ImportanceMap.load_npz(path)


def test_clear_errors(frozen_set, tok):
    with pytest.raises(MergeLabError, match="mode"):
        compute_importance(frozen_set, _examples(frozen_set), tok, mode="fast")
    with pytest.raises(MergeLabError, match="intervention"):
        compute_importance(frozen_set, _examples(frozen_set), tok, intervention="swap")
    with pytest.raises(MergeLabError, match="few-shot"):
        compute_importance(frozen_set, {"task0": fx.examples(4, 0)}, tok)
    result = compute_importance(frozen_set, _examples(frozen_set), tok, level="layer")
    with pytest.raises(MergeLabError, match="level 'module'"):
        result.matrix("module")


def test_draw_fewshot_is_seeded():
    pool = fx.examples(20, 0)
    a, ia = draw_fewshot(pool, 8, 5)
    assert (a, ia) == draw_fewshot(pool, 8, 5) and len(set(ia)) == 8 and [pool[i] for i in ia] == a
    assert draw_fewshot(pool, 50, 5)[1] == list(range(20))
