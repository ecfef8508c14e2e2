"""Recipe import on the page (components.handlers.import_recipe): a Merge Lab recipe or a mergekit config
fills the session — method, shared values, every per-layer cell, seed — and the page's merge equals the
headless replay of the same recipe (merging.io.replay), tensor for tensor. Bad recipes say line and field;
a model that cannot be opened is named. Runs on the instant fake zoo."""

from __future__ import annotations

import pytest
import torch

from components import handlers as h
from merging import workbench as wb
from merging.errors import MergeLabError


def _recipe_text(zoo, method="ties", parameters="{drop_ratio: 0.6, lambda: 0.9}", topic_params=None) -> str:
    topic = f"\n    parameters: {topic_params}" if topic_params else ""
    return (f"merge_lab: 1\nmethod: {method}\nbase: zoo:{zoo.name}/base\nexperts:\n"
            f"  - name: topic\n    model: zoo:{zoo.name}/topic{topic}\n"
            f"  - name: mood\n    model: zoo:{zoo.name}/mood\n"
            f"parameters: {parameters}\nseed: 7\n")


def _replayed(recipe) -> dict[str, torch.Tensor]:
    from merging.io.replay import merge_recipe

    return merge_recipe(recipe).tensors


def _assert_same_tensors(a, b) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_recipe_fills_the_page_and_merges_like_replay(app_zoo):
    zoo, _ = app_zoo
    text = _recipe_text(zoo, topic_params='{weight: {"0": 0.4, default: 1.0}, drop_ratio: {"1": 0.2}}')
    session, recipe, shared = h.import_recipe(None, text, zoo=zoo)
    assert session.experts == ["topic", "mood"] and session.seed == 7 and session.method == "ties"
    assert shared == {"drop_ratio": 0.6, "lambda": 0.9}  # the page's shared controls show the recipe's values
    plan = wb.plan(session, "ties", shared)
    # every cell, from the recipe's own words: topic's layer 0 weight 0.4, layer 1 drop 0.2, the rest shared
    for layer in session.layers:
        assert plan["topic"]["weight"][layer] == pytest.approx(0.4 if layer == "0" else 1.0)
        assert plan["topic"]["drop_ratio"][layer] == pytest.approx(0.2 if layer == "1" else 0.6)
        assert plan["mood"]["weight"][layer] == pytest.approx(1.0)
        assert plan["mood"]["drop_ratio"][layer] == pytest.approx(0.6)
    # the sliders show them
    updates = h.slider_updates(session, "topic", "ties", shared)
    index = session.layers.index("0")
    assert updates[2 * h.MAX_LAYER_ROWS + index]["value"] == pytest.approx(0.4)
    wb.merge(session, "ties", shared, session.seed)
    _assert_same_tensors(wb.merged_tensors(session), _replayed(recipe))


def test_mergekit_config_fills_the_page_with_our_meanings(app_zoo):
    zoo, _ = app_zoo
    text = (f"merge_method: dare_ties\nbase_model: zoo:{zoo.name}/base\nmodels:\n"
            f"  - model: zoo:{zoo.name}/topic\n    parameters: {{weight: 0.7, density: 0.25}}\n"
            f"  - model: zoo:{zoo.name}/mood\n    parameters: {{weight: 1.0, density: 0.5}}\n"
            "parameters: {lambda: 1.0}\ndtype: float16\n")
    session, recipe, shared = h.import_recipe(None, text, zoo=zoo)
    assert session.method == "dare_ties" and recipe.dtype == "float16" and h.dtype_label(recipe.dtype) == "fp16"
    plan = wb.plan(session, "dare_ties", shared)
    names = {e.model.rsplit("/", 1)[1]: e.name for e in recipe.experts}
    for layer in session.layers:  # mergekit's density is what is kept: drop ratio = 1 − density
        assert plan[names["topic"]]["drop_ratio"][layer] == pytest.approx(0.75)
        assert plan[names["mood"]]["drop_ratio"][layer] == pytest.approx(0.5)
        assert plan[names["topic"]]["weight"][layer] == pytest.approx(0.7)
    wb.merge(session, "dare_ties", shared, session.seed)
    _assert_same_tensors(wb.merged_tensors(session), _replayed(recipe))


def test_a_bad_recipe_says_line_and_field(app_zoo):
    zoo, _ = app_zoo
    with pytest.raises(MergeLabError) as info:
        h.import_recipe(None, _recipe_text(zoo, parameters="{drop_ratio: 1.7}"), zoo=zoo)
    text = str(info.value)
    assert text.endswith("(line 9)") and "parameters.drop_ratio" in text and "1.7" in text, text
    with pytest.raises(MergeLabError) as info:
        h.import_recipe(None, _recipe_text(zoo).replace("seed: 7", "sede: 7"), zoo=zoo)
    assert "(line 10)" in str(info.value) and "sede" in str(info.value)
    with pytest.raises(MergeLabError, match="paste a recipe"):
        h.import_recipe(None, "   ", zoo=zoo)
    with pytest.raises(MergeLabError, match="not valid YAML"):
        h.import_recipe(None, "method: [ties", zoo=zoo)


def test_a_model_that_cannot_be_opened_is_named(app_zoo, tmp_path):
    zoo, _ = app_zoo
    missing = tmp_path / "no-such-expert"
    text = _recipe_text(zoo).replace(f"zoo:{zoo.name}/mood", str(missing))
    with pytest.raises(MergeLabError) as info:
        h.import_recipe(None, text, zoo=zoo)
    assert str(missing) in str(info.value) and "mood" in str(info.value), str(info.value)


def test_what_the_page_cannot_show_is_refused_with_the_way_out(app_zoo):
    """A shared value given per layer that the page shows as one number: refused, naming the field and the
    command line that merges it anyway."""
    zoo, _ = app_zoo
    text = _recipe_text(zoo, parameters='{drop_ratio: 0.5, lambda: {"0": 0.5, default: 1.0}}')
    with pytest.raises(MergeLabError) as info:
        h.import_recipe(None, text, zoo=zoo)
    assert "parameters.lambda" in str(info.value) and "python -m merging merge" in str(info.value)
