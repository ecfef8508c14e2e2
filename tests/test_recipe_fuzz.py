"""Fuzz the recipe parser: no input makes it raise anything but MergeLabError."""

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merging import MergeLabError
from merging.io.recipe import Recipe

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
keys = st.sampled_from(["method", "base", "experts", "parameters", "seed", "dtype", "importance", "suggested",
                        "few_shot", "notes", "merge_lab", "bogus"])
methods = st.sampled_from(["ties", "dare_linear", "slerp", "linear", "nope", "apl", "fisher"])
params = st.dictionaries(st.sampled_from(["drop_ratio", "density", "lambda", "weight", "t", "trim_scope",
                                          "normalize", "gamma", "epsilon", "x"]), values, max_size=4)
experts = st.lists(st.one_of(st.text(max_size=6), st.fixed_dictionaries(
    {"model": st.one_of(st.text(max_size=6), scalars)}, optional={"name": scalars, "parameters": params})),
    max_size=3)


def _parse(data):
    try:
        Recipe.from_dict(data)
    except MergeLabError:
        pass


# the two 300-example sweeps of structured recipes (≈ 5 s of CPU) run in the full run; the YAML-text sweep
# below keeps the parser's fuzzing in the fast inner loop
@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=6))
def test_arbitrary_mappings(data):
    _parse(data)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(method=methods, experts=experts, parameters=st.one_of(params, values), seed=values, dtype=values)
def test_plausible_recipes(method, experts, parameters, seed, dtype):
    _parse({"method": method, "base": "b", "experts": experts, "parameters": parameters, "seed": seed,
            "dtype": dtype})


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_yaml_text(text):
    try:
        Recipe.from_yaml(text)
    except MergeLabError:
        pass


def test_round_trip():
    recipe = Recipe.from_dict({"method": "ties", "base": "zoo:default/base",
                               "experts": [{"name": "a", "model": "zoo:default/a", "parameters": {"weight": 0.5}},
                                           {"model": "hf:org/b@main"}],
                               "parameters": {"density": 0.3, "lambda": [0.5, 1.0]}, "seed": 4, "dtype": "bf16"})
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.to_dict() == recipe.to_dict()
    assert again.parameters["density"] == 0.3 and again.dtype == "bfloat16"
    assert yaml.safe_load(recipe.to_yaml())["experts"][1]["name"] == "b"
