"""The mergekit YAML export, field by field against mergekit 0.1.5's meanings (no mergekit needed here;
tests/test_mergekit_roundtrip.py runs the real one)."""

from __future__ import annotations

import pytest
import yaml

from merging.errors import MergeLabError
from merging.io.layout import Layout
from merging.io.mergekit_yaml import to_mergekit_yaml
from merging.io.recipe import ExpertRef, Recipe

LAYERS = ["embeddings", "0", "1", "head"]


def _recipe(method, parameters=None, experts=2, expert_params=None, seed=7):
    expert_params = expert_params or {}
    return Recipe(method, "base", [ExpertRef(f"e{i}", f"m{i}", expert_params.get(f"e{i}", {}))
                                   for i in range(experts)], parameters or {}, seed)


def _export(recipe, layers=LAYERS):
    text = to_mergekit_yaml(recipe, layers)
    return text, yaml.safe_load(text)


def _layout():
    shapes = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,), "lm_head.weight": (8, 4)}
    for i in range(2):
        shapes |= {f"model.layers.{i}.self_attn.q_proj.weight": (4, 4), f"model.layers.{i}.input_layernorm.weight": (4,)}
    return Layout.from_shapes(shapes)


def test_linear_names_no_base_model_and_every_weight():
    _, config = _export(_recipe("linear", experts=3, expert_params={"e1": {"weight": 2.0}}))
    assert "base_model" not in config  # mergekit would make it an input without a weight
    assert [m["model"] for m in config["models"]] == ["m0", "m1", "m2"]
    assert [m["parameters"]["weight"] for m in config["models"]] == [1.0, 2.0, 1.0]
    assert config["parameters"] == {"normalize": True}


def test_della_epsilon_is_halved_and_range_checked():
    text, config = _export(_recipe("della", {"drop_ratio": 0.6, "epsilon": 0.3}))
    assert config["parameters"]["epsilon"] == pytest.approx(0.15)  # mergekit: density ± epsilon
    assert config["parameters"]["rescale"] is True and config["parameters"]["normalize"] is True
    assert "--random-seed 7" in text and "differs entry-wise" in text and "ε / 2" in text
    with pytest.raises(MergeLabError, match=r"density ± ε/2"):
        to_mergekit_yaml(_recipe("della", {"drop_ratio": 0.05, "epsilon": 0.2}), LAYERS)


def test_magnitude_is_breadcrumbs_without_outliers_and_trim_scope_is_noted():
    text, config = _export(_recipe("magnitude", {"drop_ratio": 0.5, "trim_scope": "layer"}))
    assert config["merge_method"] == "breadcrumbs" and config["parameters"]["gamma"] == 0.0
    assert config["parameters"]["normalize"] is False and config["parameters"]["rescale"] is False
    assert "trim_scope layer" in text and "no equivalent" in text


def test_dare_rescale_translated_and_said_to_differ():
    text, config = _export(_recipe("dare_ties", {"drop_ratio": 0.3, "rescale": False}))
    assert config["parameters"]["rescale"] is False and config["parameters"]["normalize"] is False
    density = config["parameters"]["density"]
    assert density[-1] == {"value": pytest.approx(0.7)} and {d.get("filter") for d in density[:-1]} == {
        "norm", "Norm", "ln_"}
    assert "L1 norm" in text


def test_per_layer_values_with_layout_are_exact_filters():
    recipe = _recipe("task_arithmetic", {"lambda": {"1": 0.5, "head": 2.0, "default": 1.0}})
    _, config = _export(recipe, _layout())
    assert config["parameters"]["lambda"] == [
        {"filter": "layers.1.", "value": 0.5}, {"filter": "model.norm.weight", "value": 2.0},
        {"filter": "lm_head.weight", "value": 2.0}, {"value": 1.0}]


def test_per_layer_values_without_tensor_names_are_block_gradients_with_a_note():
    text, config = _export(_recipe("task_arithmetic", {"lambda": {"0": 0.5, "1": 1.5, "head": 3.0}}))
    assert config["parameters"]["lambda"] == [0.5, 1.5]
    assert "block 0's value" in text
    with pytest.raises(MergeLabError, match="need the model's layers"):
        to_mergekit_yaml(_recipe("ties", {"drop_ratio": [0.1, 0.9]}))


@pytest.mark.parametrize("method", ["fisher", "apl"])
def test_methods_without_mergekit_equivalent(method):
    with pytest.raises(MergeLabError, match="mergekit has no"):
        to_mergekit_yaml(Recipe(method, "base", [ExpertRef("a", "a"), ExpertRef("b", "b")]), LAYERS)


def test_model_references_and_dtype():
    recipe = Recipe("slerp", "hf:org/base@v1", [ExpertRef("a", "hf:org/a@main"), ExpertRef("b", "zoo:default/b")],
                    {"t": 0.25}, dtype="bfloat16")
    text, config = _export(recipe)
    assert config["base_model"] == "org/a@main" and config["models"][1]["model"] == "zoo:default/b"
    assert config["parameters"] == {"t": 0.25}
    assert config["dtype"] == "float32" and config["out_dtype"] == "bfloat16"
    assert "zoo model" in text


def test_task_heads_are_said_to_be_merged_by_mergekit():
    layout = Layout.from_shapes({"bert.embeddings.word_embeddings.weight": (8, 4),
                                 "bert.encoder.layer.0.attention.self.query.weight": (4, 4),
                                 "classifier.weight": (3, 4)})
    text, config = _export(_recipe("task_arithmetic", {"lambda": 0.5}), layout)
    assert "own task head (classifier.weight)" in text and config["parameters"]["lambda"] == 0.5


def test_declared_mergekit_names_are_what_the_export_writes():
    """One answer to "does mergekit have this method?": the declaration (shown by `methods --json` and the
    page) and the exporter's translation table agree for every registered method."""
    from merging.io.mergekit_yaml import _METHODS
    from merging.methods import all_specs

    for spec in all_specs():
        assert spec.mergekit_name == (_METHODS[spec.name][0] if spec.name in _METHODS else None), spec.name
