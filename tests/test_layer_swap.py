"""Layer swapping (Bandarkar et al., arXiv 2410.01335): every merged tensor is its layer's chosen source.

The oracle below is written from the paper's description, independently of the method's code: the outer
(language) expert gives the bottom b and top u blocks, a transition block just inside each seam is the
average of both experts' blocks, the inner (math) expert gives the rest; embeddings and head come from
where the recipe says. Copies must be exact (torch.equal), blends equal to float32 rounding.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from mergekit_reference import mergekit_yaml

from merging import MergeEngine, MergeSettings
from merging.errors import MergeLabError
from merging.io.experts import check_homology
from merging.io.mergekit_yaml import to_mergekit, to_mergekit_yaml
from merging.io.recipe import ExpertRef, Recipe
from merging.io.sources import ModelSource

N_BLOCKS = 12
HIDDEN = 8


def _llama_state(generator, vocab=16, n_blocks=N_BLOCKS, dtype=torch.float32):
    """A Llama-shaped state dict (names as transformers writes them), random values."""
    names = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,),
             "lm_head.weight": (vocab, HIDDEN)}
    for i in range(n_blocks):
        for part, shape in (("self_attn.q_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                            ("mlp.down_proj.weight", (HIDDEN, 2 * HIDDEN)), ("input_layernorm.weight", (HIDDEN,))):
            names[f"model.layers.{i}.{part}"] = shape
    return {n: torch.randn(s, generator=generator).to(dtype) for n, s in names.items()}


@pytest.fixture(scope="module")
def models():
    generator = torch.Generator().manual_seed(5)
    return {name: _llama_state(generator) for name in ("base", "lang", "math")}


def _merge(models, params, n_blocks=N_BLOCKS, expert_params=None):
    sources = {name: ModelSource.from_state_dict(name, models[name]) for name in ("lang", "math")}
    expert_set = check_homology(ModelSource.from_state_dict("base", models["base"]), sources)
    assert expert_set.layout.n_blocks == n_blocks
    settings = MergeSettings.build(expert_set, "layer_swap", params, expert_params)
    return MergeEngine(expert_set, cache=False).merge(settings).tensors


def _expected_source(name, b, u, t, embeddings="outer", head="outer", n=N_BLOCKS, take=None):
    """The paper's shape, written out: which model a tensor comes from ('outer', 'inner', 'base', 'blend')."""
    match = re.search(r"layers\.(\d+)\.", name)
    layer = match.group(1) if match else ("embeddings" if "embed" in name else "head")
    if take and layer in take:
        return take[layer]
    if layer == "embeddings":
        return embeddings
    if layer == "head":
        return head
    i = int(layer)
    bottom_zone, top_zone = range(0, b), range(n - u, n)
    if i in bottom_zone or i in top_zone:
        return "outer"
    if (b and i in range(b, b + t)) or (u and i in range(n - u - t, n - u)):
        return "blend"
    return "inner"


def _check(merged, models, outer, inner, share=0.5, **shape):
    counts = {}
    for name, tensor in merged.items():
        source = _expected_source(name, **shape)
        counts[source] = counts.get(source, 0) + 1
        if source == "blend":
            want = share * models[outer][name].float() + (1 - share) * models[inner][name].float()
            torch.testing.assert_close(tensor, want, rtol=0, atol=1e-6)
        else:
            model = {"outer": outer, "inner": inner, "base": "base"}[source]
            assert torch.equal(tensor, models[model][name].float()), (name, source)
    return counts


def test_default_is_the_papers_shape(models):
    """Defaults: bottom 5 and top 2 of the blocks from the first expert, one transition block at each seam."""
    merged = _merge(models, {})
    counts = _check(merged, models, "lang", "math", b=5, u=2, t=1)
    assert counts["blend"] == 2 * 4 and counts["inner"] == 3 * 4  # blocks 5 and 9 blended, 6–8 the math expert's


def test_outer_expert_and_hard_swap(models):
    merged = _merge(models, {"outer_expert": "second", "bottom_layers": 3, "top_layers": 4, "transition_layers": 0})
    counts = _check(merged, models, "math", "lang", b=3, u=4, t=0)
    assert "blend" not in counts and counts["inner"] == 5 * 4


@pytest.mark.parametrize("embeddings, head", [("inner", "base"), ("base", "blend"), ("blend", "inner")])
def test_embeddings_and_head_are_explicit(models, embeddings, head):
    params = {"embeddings": embeddings, "head": head, "blend": 0.25, "transition_layers": 2}
    merged = _merge(models, params)
    _check(merged, models, "lang", "math", share=0.25, b=5, u=2, t=2, embeddings=embeddings, head=head)


def test_per_layer_choice_overrides_the_shape(models):
    take = {"0": "inner", "7": "base", "8": "outer", "head": "inner"}
    params = {"take": {**take, "default": "shape"}, "blend": {"5": 0.9, "default": 0.5}}
    merged = _merge(models, params)
    for name, tensor in merged.items():
        source = _expected_source(name, 5, 2, 1, take=take)
        if source == "blend":
            share = 0.9 if "layers.5." in name else 0.5
            want = share * models["lang"][name] + (1 - share) * models["math"][name]
            torch.testing.assert_close(tensor, want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(tensor, models[{"outer": "lang", "inner": "math", "base": "base"}[source]][name]), name


def test_half_precision_sources_are_copied_exactly():
    generator = torch.Generator().manual_seed(9)
    half = {name: _llama_state(generator, n_blocks=6, dtype=torch.bfloat16) for name in ("base", "lang", "math")}
    merged = _merge(half, {"bottom_layers": 2, "top_layers": 1, "transition_layers": 0}, n_blocks=6)
    for name, tensor in merged.items():
        source = _expected_source(name, 2, 1, 0, n=6)
        assert torch.equal(tensor.to(torch.bfloat16), half["lang" if source == "outer" else "math"][name])


def test_shallow_model_zones_overlap_outer_first(models):
    """On 6 blocks the paper's 5 + 2 zones overlap: the outer expert wins, so every block is its."""
    generator = torch.Generator().manual_seed(2)
    shallow = {name: _llama_state(generator, n_blocks=6) for name in ("base", "lang", "math")}
    merged = _merge(shallow, {}, n_blocks=6)
    for name, tensor in merged.items():
        assert torch.equal(tensor, shallow["lang"][name]), name


def test_bad_input_says_what_to_fix(models):
    with pytest.raises(MergeLabError, match="shared parameters"):
        _merge(models, {}, expert_params={"lang": {"take": "inner"}})
    with pytest.raises(MergeLabError, match="must be one of"):
        _merge(models, {"take": {"3": "middle"}})
    with pytest.raises(MergeLabError, match="cannot be set per expert"):
        _merge(models, {}, expert_params={"math": {"bottom_layers": 1}})
    sources = {name: ModelSource.from_state_dict(name, models["lang"]) for name in ("a", "b", "c")}
    expert_set = check_homology(ModelSource.from_state_dict("base", models["base"]), sources)
    with pytest.raises(MergeLabError, match="exactly 2 experts"):
        MergeSettings.build(expert_set, "layer_swap", {})


# ---- mergekit -----------------------------------------------------------------------------------


def _layout(models):
    sources = {name: ModelSource.from_state_dict(name, models[name]) for name in ("lang", "math")}
    return check_homology(ModelSource.from_state_dict("base", models["base"]), sources).layout


def _recipe(params):
    return Recipe(method="layer_swap", base="base", experts=[ExpertRef("lang", "lang"), ExpertRef("math", "math")],
                  parameters=params)


def test_mergekit_hard_swap_is_passthrough_slices(models):
    config = to_mergekit(_recipe({"transition_layers": 0}), _layout(models))
    assert config["merge_method"] == "passthrough"
    assert config["slices"] == [{"sources": [{"model": "lang", "layer_range": [0, 5]}]},
                                {"sources": [{"model": "math", "layer_range": [5, 10]}]},
                                {"sources": [{"model": "lang", "layer_range": [10, 12]}]}]
    # without the tensor names the depth comes from the layer list alone: the same slices
    assert to_mergekit(_recipe({"transition_layers": 0}), _layout(models).layers)["slices"] == config["slices"]


def test_mergekit_blends_become_linear_filters(models):
    layout = _layout(models)
    config = to_mergekit(_recipe({}), layout)
    assert config["merge_method"] == "linear" and [m["model"] for m in config["models"]] == ["lang", "math"]
    weights = {m["model"]: m["parameters"]["weight"] for m in config["models"]}

    def weight(model, name):  # mergekit's rule: the first filter that is a substring of the name, else the rest
        for entry in weights[model] if isinstance(weights[model], list) else [{"value": weights[model]}]:
            if "filter" not in entry or entry["filter"] in name:
                return entry["value"]

    for name in layout.merged_names():
        source = _expected_source(name, 5, 2, 1)
        want = {"outer": (1.0, 0.0), "inner": (0.0, 1.0), "blend": (0.5, 0.5)}[source]
        assert (weight("lang", name), weight("math", name)) == want, name
    with pytest.raises(MergeLabError, match="models at hand"):
        to_mergekit(_recipe({}), layout.layers)  # blends need the tensor names
    assert "passthrough slices cannot blend" in to_mergekit_yaml(_recipe({}), layout)


def test_mergekit_base_layers_and_refusal_without_layers(models):
    config = to_mergekit(_recipe({"take": {"6": "base", "default": "shape"}, "transition_layers": 0}),
                         _layout(models))
    assert config["merge_method"] == "passthrough"
    assert {"sources": [{"model": "base", "layer_range": [6, 7]}]} in config["slices"]
    with pytest.raises(MergeLabError, match="depth"):
        to_mergekit(_recipe({}), None)


def test_cli_writes_the_mergekit_yaml(tmp_path, models, capsys):
    from safetensors.torch import save_file

    from merging.cli.main import main

    for name, state in models.items():
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
    recipe = _recipe({"transition_layers": 0})
    path = Path(tmp_path / "recipe.yaml")
    path.write_text(recipe.to_yaml())
    assert main(["merge", str(path), "--format", "mergekit"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["merge_method"] == "passthrough" and len(printed["slices"]) == 3


# ---- the real mergekit (slow: mergekit runs in its own interpreter) ------------------------------

@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory):
    """A tiny 8-block Llama base and two perturbed experts, saved as transformers writes them."""
    import tiny_models as tm
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("swap-llama")
    config = LlamaConfig(vocab_size=64, num_hidden_layers=8, num_key_value_heads=2, max_position_embeddings=32,
                         **tm.TINY)
    for index, name in enumerate(("base", "lang", "math")):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        if index:
            tm.perturbed(model, seed=100 + index, scale=0.05)
        tm.save(model, root / name)
    return root


ROUND_TRIPS = [
    {"bottom_layers": 3, "top_layers": 2, "transition_layers": 0},  # passthrough slices
    {"bottom_layers": 2, "top_layers": 1, "transition_layers": 1, "blend": 0.3},  # linear with filters
    {"take": {"4": "base", "default": "shape"}, "bottom_layers": 2, "top_layers": 1, "transition_layers": 0,
     "outer_expert": "second", "head": "inner"},  # the head from another model than the last slice's: linear
]


@pytest.mark.slow
@pytest.mark.parametrize("parameters", ROUND_TRIPS, ids=["passthrough", "blend", "base-layer"])
def test_mergekit_merges_what_merge_lab_merges(llama_folders, parameters, tmp_path):
    import os
    import subprocess

    from safetensors.torch import load_file

    from merging.cli.main import main
    from merging.io.recipe import load_recipe
    from merging.io.replay import merge_recipe

    script = mergekit_yaml()
    recipe_path = llama_folders / f"recipe-{tmp_path.name}.yaml"
    recipe_path.write_text(_recipe(parameters).to_yaml())
    config = recipe_path.with_suffix(".mergekit.yml")
    assert main(["merge", str(recipe_path), "--format", "mergekit", "--out", str(config)]) == 0
    out = tmp_path / "mergekit-out"
    done = subprocess.run([str(script), config.name, str(out), "--quiet", "--no-write-model-card",
                           "--no-copy-tokenizer"], cwd=llama_folders, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = {}
    for shard in sorted(out.glob("*.safetensors")):
        theirs.update(load_file(str(shard)))
    ours = merge_recipe(load_recipe(recipe_path)).tensors
    assert set(ours) <= set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name].float(), tensor, rtol=0, atol=2e-6, msg=name)
