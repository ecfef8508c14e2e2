"""mergekit YAML → Merge Lab recipe: ours → mergekit YAML → ours merges the same tensors for every exportable
method; gradients, filters and slices translate with mergekit's meanings; hostile or odd configs are a
MergeLabError, never a traceback (nor a billion-node expansion)."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
import yaml
from safetensors.torch import load_file

from merging.cli.main import main
from merging.errors import MergeLabError
from merging.io.mergekit_import import from_mergekit_yaml, is_mergekit_yaml
from merging.io.mergekit_yaml import to_mergekit_yaml
from merging.io.recipe import load_recipe
from merging.io.replay import expert_set_from_recipe, merge_recipe
from merging.methods import all_specs


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk-import")
    tm.family(root, "llama", 3)
    return root


def _recipe(root, method, n, parameters, expert_params=None, seed=5, name="recipe.yaml"):
    expert_params = expert_params or {}
    data = {"method": method, "base": "base", "seed": seed, "parameters": parameters,
            "experts": [{"name": f"expert{i}", "model": f"expert{i}",
                         **({"parameters": expert_params[f"expert{i}"]} if f"expert{i}" in expert_params else {})}
                        for i in range(n)]}
    path = root / name
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


ROUND_TRIPS = [
    ("linear", 3, {}, {"expert0": {"weight": 2.0}}),
    ("task_arithmetic", 2, {"lambda": [0.5, 1.5]}, {"expert1": {"weight": {"1": -0.5, "default": 0.8}}}),
    ("ties", 3, {"drop_ratio": 0.7, "normalize": False}, {"expert2": {"weight": 1.5}}),
    ("magnitude", 2, {"drop_ratio": {"0": 0.25, "default": 0.6}}, {}),
    ("breadcrumbs", 3, {"drop_ratio": 0.5, "gamma": 0.05}, {"expert1": {"gamma": 0.1}}),
    ("dare_linear", 2, {"drop_ratio": 0.4, "rescale": False}, {}),
    ("dare_ties", 3, {"drop_ratio": [0.2, 0.8], "lambda": 1.3}, {}),
    ("della", 2, {"drop_ratio": 0.5, "epsilon": 0.3}, {"expert0": {"epsilon": 0.1}}),
    ("slerp", 2, {"t": {"head": 0.9, "default": 0.35}}, {}),
    ("model_stock", 3, {"filter_wise": True}, {}),
]


@pytest.mark.parametrize("method, n, parameters, expert_params", ROUND_TRIPS, ids=[c[0] for c in ROUND_TRIPS])
def test_ours_to_mergekit_to_ours_merges_the_same(family, method, n, parameters, expert_params):
    recipe = _recipe(family, method, n, parameters, expert_params)
    layout = expert_set_from_recipe(recipe).layout
    text = to_mergekit_yaml(recipe, layout)
    assert is_mergekit_yaml(text)
    # the seed travels on mergekit's command line (--random-seed), not in its config
    back = from_mergekit_yaml(text, layers=layout.layers, source=recipe.source, seed=recipe.seed)
    assert back.method == ("breadcrumbs" if method == "magnitude" else method)
    ours, theirs = merge_recipe(recipe).tensors, merge_recipe(back).tensors
    assert set(ours) == set(theirs)
    for name in ours:
        if method == "linear":
            # mergekit's linear has no base, so the import takes the first model as base: the average is
            # the same, computed as base + Σ w·Δ / Σ w from another base (fp32 rounding only)
            assert torch.allclose(ours[name], theirs[name], rtol=0, atol=1e-6), name
        else:
            assert torch.equal(ours[name], theirs[name]), name


def test_mergekit_gradient_is_resolved_with_mergekit_positions(family):
    text = """
merge_method: task_arithmetic
base_model: base
models:
  - model: expert0
    parameters: {weight: [0.0, 1.0]}
parameters: {lambda: 1.0}
"""
    layers = ["embeddings", "0", "1", "head"]
    recipe = from_mergekit_yaml(text, layers=layers)
    # mergekit: block i at t = i/(N-1); embeddings and head (pre/post weights) at t = 0
    assert recipe.experts[0].parameters["weight"] == {"0": 0.0, "1": 1.0, "embeddings": 0.0, "head": 0.0}
    with pytest.raises(MergeLabError, match="gradient"):
        from_mergekit_yaml(text)


def test_filters_slices_and_defaults(family):
    text = """
merge_method: ties
base_model: base
slices:
  - sources:
      - {model: base, layer_range: [0, 1]}
      - {model: expert0, layer_range: [0, 1], parameters: {density: 0.5, weight: 1.0}}
      - {model: expert1, layer_range: [0, 1], parameters: {density: 0.5, weight: 1.0}}
  - sources:
      - {model: base, layer_range: [1, 2]}
      - {model: expert0, layer_range: [1, 2], parameters: {density: 0.25, weight: 1.0}}
      - {model: expert1, layer_range: [1, 2], parameters: {density: 0.5, weight: 1.0}}
parameters:
  lambda:
    - {filter: layers.1., value: 0.5}
    - {filter: lm_head.weight, value: 2.0}
    - {value: 1.0}
"""
    recipe = from_mergekit_yaml(text)
    assert recipe.parameters["lambda"] == {"1": 0.5, "head": 2.0, "default": 1.0}
    assert recipe.experts[0].parameters["drop_ratio"] == {"0": 0.5, "1": 0.75, "embeddings": 0.5, "head": 0.75}
    assert recipe.experts[1].parameters["drop_ratio"] == 0.5
    della = from_mergekit_yaml("merge_method: della\nbase_model: base\nmodels: [{model: a/x}, {model: b/x}]\n")
    # mergekit defaults: density 1.0 (nothing dropped), epsilon 0.15 (= our 0.3); names made unique
    assert della.parameters == {"drop_ratio": 0.0, "epsilon": 0.3}
    assert [e.name for e in della.experts] == ["x", "x-2"]


def test_cli_merges_a_mergekit_config(family, tmp_path):
    recipe = _recipe(family, "ties", 2, {"drop_ratio": 0.5}, name="cli.yaml")
    config = family / "cli.mergekit.yml"
    config.write_text(to_mergekit_yaml(recipe, expert_set_from_recipe(recipe).layout))
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 0
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, tensor in merge_recipe(recipe).tensors.items():
        assert torch.equal(exported[name], tensor), name
    bad = family / "bad.mergekit.yml"
    bad.write_text("merge_method: sce\nbase_model: base\nmodels: [{model: expert0}]\n")
    assert main(["merge", str(bad), "--out", str(tmp_path / "bad")]) == 2


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
HOSTILE = [
    (BOMB, "anchor or alias"),
    ("merge_method: ties\nbase_model: &b base\nmodels: [{model: *b}]\n", "anchor or alias"),
    ("merge_method: ties\n<<: {base_model: x}\nmodels: []\n", "non-empty list"),
    ("[" * 5000 + "]" * 5000, "nests too deeply|mapping"),
    ("merge_method: ties\nmodels: [{model: a}]\nbase_model: b\nmodels: [\n", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
    ("merge_method: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    ("merge_method: sce\nbase_model: b\nmodels: [{model: a}]\n", "no Merge Lab equivalent"),
    ("merge_method: ties\nmodels: [{model: a}]\n", "needs base_model"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a+lora}]\n", "LoRA"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ntokenizer_source: union\n", "tokenizer"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: .nan}}]\n", "finite"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: true}}]\n", "number"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: 1e400}}]\n", "finite"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: 7}}]\n", "drop_ratio"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: "
     "[{filter: self_attn, value: 0.5}, {value: 1}]}}]\n", "by module"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {gamma: 0.1}}]\n", "does not take"),
    ("merge_method: ties\nbase_model: b\nparameters: {rescale: true}\nmodels: [{model: a}]\n", "rescale"),
    ("merge_method: linear\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\n", "Missing required"),
    ("merge_method: slerp\nbase_model: b\nmodels: [{model: a}, {model: c}]\nparameters: {t: 0.5}\n", "slerp needs"),
    ("merge_method: ties\nbase_model: b\nslices:\n  - sources: [{model: a, layer_range: [4, 8]}, "
     "{model: b, layer_range: [4, 8]}]\n", "reorder"),
    ("merge_method: ties\nbase_model: b\nslices:\n  - sources: [{model: a, layer_range: [0, 4]}, "
     "{model: b, layer_range: [2, 6]}]\n", "different layer ranges"),
    ("merge_method: ties\nbase_model: b\nmodules: {text: {models: [{model: a}]}}\n", "modules"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nslices: []\n", "exactly one of"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ndtype: float64\n", "dtype"),
    ("merge_method: ties\nbase_model: b\nmodels: [a, a]\n", "listed twice"),
    ("merge_method: ties\nbase_model: b\nmodels: {a: 1}\n", "non-empty list"),
    ("merge_method: 3\n", "no Merge Lab equivalent"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: 5}]\n", "must name a model"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: [1]}]\n", "mapping"),
    ("x" * (1 << 21), "larger than"),
    ("merge_method: slerp\nbase_model: b\nmodels: [{model: b}, {model: a, parameters: {t: 0.5}}]\n", "shared scope"),
    ("merge_method: model_stock\nbase_model: b\nmodels: [{model: b}, {model: a}]\n", "at least two models"),
    ("merge_method: model_stock\nbase_model: b\nmodels: [{model: a}, {model: c}]\nparameters: {filter_wise: 1}\n",
     "true or false"),
    ("merge_method: model_stock\nbase_model: b\nmodels: [{model: a, parameters: {filter_wise: true}}, {model: c}]\n",
     "shared scope"),
    ("merge_method: model_stock\nbase_model: b\nmodels: [{model: a, parameters: {weight: 2}}, {model: c}]\n",
     "does not take"),
]


@pytest.mark.parametrize("text, message", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_configs_are_merge_lab_errors(text, message):
    with pytest.raises(MergeLabError, match=message):
        from_mergekit_yaml(text, layers=["embeddings", "0", "1", "head"])


@pytest.mark.parametrize("filter_wise", [False, True])
def test_mergekit_model_stock_imports_as_our_model_stock(family, filter_wise):
    """mergekit's model_stock (base_model + models, one global filter_wise) is our model_stock with the same
    switch; its merge equals ours, and both equal t·mean Θ_t + (1 − t)·Θ_base with t from the angle."""
    text = f"""
merge_method: model_stock
base_model: base
models:
  - model: base
  - model: expert0
  - model: expert1
  - model: expert2
parameters: {{filter_wise: {str(filter_wise).lower()}}}
dtype: float32
"""
    recipe = from_mergekit_yaml(text, source=family / "stock.mergekit.yml")
    assert recipe.method == "model_stock" and [e.model for e in recipe.experts] == ["expert0", "expert1", "expert2"]
    assert recipe.parameters == {"filter_wise": filter_wise}
    ours = _recipe(family, "model_stock", 3, {"filter_wise": filter_wise}, name="stock.yaml")
    imported, direct = merge_recipe(recipe).tensors, merge_recipe(ours).tensors
    assert set(imported) == set(direct)
    expert_set = expert_set_from_recipe(ours)
    for name, tensor in direct.items():
        assert torch.equal(imported[name], tensor), name
        # the oracle, written from the paper's formula: cosθ the mean pairwise cosine of the task vectors
        base = expert_set.base.get(name).float()
        weights = [expert_set.experts[e].get(name).float() for e in ("expert0", "expert1", "expert2")]
        rows = (lambda w: w.reshape(1, -1) if w.dim() <= 1 else w) if filter_wise else (lambda w: w.reshape(-1))
        deltas = [rows(w) - rows(base) for w in weights]
        cos = [(a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6) for i, a in enumerate(deltas)
               for b in deltas[i + 1:]]
        mean_cos = (sum(cos) / 3).unsqueeze(-1)
        t = 3 * mean_cos / (1 + 2 * mean_cos)
        expected = (t * sum(rows(w) for w in weights) / 3 + (1 - t) * rows(base)).reshape(base.shape)
        assert torch.allclose(tensor, expected, atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("spec", all_specs(), ids=lambda spec: spec.name)
def test_every_method_exports_to_mergekit_or_refuses_by_name(family, spec):
    """Over the whole registry: a method mergekit has exports as its declared mergekit_name; every other
    one (PCB, consensus, TSV-M, RegMean, Fisher, APL, and whatever registers later) is refused with a
    message naming it, never a traceback."""
    n = max(spec.min_experts, 2) if spec.max_experts is None else spec.max_experts
    recipe = _recipe(family, spec.name, n, {}, name=f"export-{spec.name}.yaml")
    layout = expert_set_from_recipe(recipe).layout
    if spec.mergekit_name is not None:
        config = yaml.safe_load(to_mergekit_yaml(recipe, layout))
        assert config["merge_method"] == spec.mergekit_name
        return
    with pytest.raises(MergeLabError) as caught:
        to_mergekit_yaml(recipe, layout)
    message = str(caught.value)
    assert f"mergekit has no '{spec.name}'" in message and spec.pretty_name in message
    assert "python -m merging merge" in message  # what to do instead
    if spec.prepare is not None:
        assert "few-shot" in message
