"""Round trip against the real mergekit: our recipe → ``--format mergekit`` → ``mergekit-yaml`` → tensors,
compared with Merge Lab's own merge of the same recipe; and hand-written mergekit configs run by mergekit
and imported (``from_mergekit_yaml``) by Merge Lab.

mergekit is a reference, never a dependency: it lives in its own virtual environment, found as
``tests/mergekit_reference.py`` says; without it the test is skipped.

Deterministic methods must agree to fp32 rounding on every tensor, with one stated exception: for
TIES, Merge Lab merges norm tensors without sign election (norms are never sparsified nor elected,
docs/ARCHITECTURE.md) while mergekit elects signs on every tensor; those norm tensors are checked against
mergekit's rule computed here instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import tiny_models as tm
import torch
import yaml
from mergekit_reference import mergekit_python
from safetensors.torch import load_file

from merging.cli.main import main
from merging.io.recipe import load_recipe
from merging.io.replay import expert_set_from_recipe, merge_recipe
from merging.methods import get_method
from merging.params import ParamResolver

# runs mergekit itself in another interpreter (about 30 s): part of the full run, not the fast inner loop
pytestmark = pytest.mark.slow

FP32_TOL = 2e-6  # a few ulps of weights of magnitude ~1 (different summation order / fused ops)


# Importing mergekit takes ~7 s and a merge of these tiny models ~0.3 s, so each model folder gets one
# process running mergekit-yaml's own command (mergekit.scripts.run_yaml.main, the console script's entry
# point, with its argument parsing) once per config. One process per folder: mergekit caches loaders by
# model path, and the paths here are relative to the folder.
_DRIVER = r"""
import json, os, sys, traceback
from mergekit.scripts.run_yaml import main

for line in sys.stdin:
    request = json.loads(line)
    os.chdir(request["cwd"])
    try:
        main.main(args=request["args"], standalone_mode=False)
        reply = {"ok": True}
    except BaseException:
        reply = {"ok": False, "error": traceback.format_exc()[-4000:]}
    print("@@reply " + json.dumps(reply), flush=True)
"""
MERGEKIT_ARGS = ["--quiet", "--no-write-model-card", "--no-copy-tokenizer"]  # the card would ask the hub


class MergekitYaml:
    """``mergekit-yaml CONFIG OUT`` in the reference venv, one warm process per working folder."""

    def __init__(self, python: Path, log_dir: Path):
        self.python, self.log_dir, self.procs = python, log_dir, {}

    def run(self, config: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
        cwd = config.parent
        proc = self.procs.get(cwd)
        if proc is None:
            log = open(self.log_dir / f"mergekit-{len(self.procs)}.log", "w")
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # local folders only
            proc = self.procs[cwd] = subprocess.Popen([str(self.python), "-c", _DRIVER], stdin=subprocess.PIPE,
                                                      stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        request = {"cwd": str(cwd), "args": [config.name, str(out), *MERGEKIT_ARGS, *extra]}
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith("@@reply "):
                reply = json.loads(line[len("@@reply "):])
                break
        else:
            raise AssertionError(f"the mergekit process ended (log in {self.log_dir})")
        assert reply["ok"], f"mergekit-yaml failed on\n{config.read_text()}\n{reply['error']}"
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(out.glob("*.safetensors")):
            tensors.update(load_file(str(shard)))
        return tensors

    def close(self) -> None:
        for proc in self.procs.values():
            proc.stdin.close()
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def mergekit_cli(tmp_path_factory):
    runner = MergekitYaml(mergekit_python(), tmp_path_factory.mktemp("mergekit-logs"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    tm.family(root, "llama", 3)
    return root


@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    tm.family(root, "gpt2", 2)
    return root


@pytest.fixture(scope="module")
def llama_correlated(tmp_path_factory):
    """Experts sharing most of their task vector (cosines near 0.8), so Model Stock's t is far from 0."""
    root = tmp_path_factory.mktemp("llama-correlated")
    tm.save(tm.build("llama"), root / "base")
    for i in range(3):
        shared = tm.perturbed(tm.build("llama"), seed=100)
        tm.save(tm.perturbed(shared, seed=200 + i, scale=0.01), root / f"expert{i}")
    return root


def _write_recipe(root: Path, method: str, n_experts: int, parameters: dict, expert_params=None) -> Path:
    expert_params = expert_params or {}
    data = {"method": method, "base": "base",
            "experts": [{"name": f"e{i}", "model": f"expert{i}",
                         **({"parameters": expert_params[f"e{i}"]} if f"e{i}" in expert_params else {})}
                        for i in range(n_experts)],
            "parameters": parameters, "seed": 3}
    path = root / f"recipe-{method}-{abs(hash(repr((n_experts, parameters, expert_params)))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_mergekit(cli: MergekitYaml, root: Path, recipe: Path, *extra: str) -> tuple[dict[str, torch.Tensor], str]:
    config = recipe.with_suffix(".mergekit.yml")
    assert main(["merge", str(recipe), "--format", "mergekit", "--out", str(config)]) == 0
    return cli.run(config, recipe.with_suffix(".mergekit-out"), *extra), config.read_text()


def _compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], skip=()) -> float:
    worst = 0.0
    for name, tensor in ours.items():
        if name in skip:
            continue
        assert name in theirs, f"mergekit wrote no {name} (it wrote {sorted(theirs)[:5]}…)"
        other = theirs[name].float()
        assert other.shape == tensor.shape, name
        diff = float((tensor.float() - other).abs().max())
        assert diff <= FP32_TOL, f"{name}: max |Δ| {diff:.3g}"
        worst = max(worst, diff)
    return worst


# (method, experts, shared parameters, per-expert parameters). Densities keep density·n whole for every
# tensor of the tiny models (sizes are multiples of 16): mergekit keeps int(density·n), Merge Lab round.
CASES = [
    ("linear", 3, {}, {"e0": {"weight": 2.0}, "e2": {"weight": 0.5}}),
    ("task_arithmetic", 3, {"lambda": 0.7}, {"e1": {"weight": -0.5}}),
    ("task_arithmetic", 2, {"lambda": {"0": 0.3, "default": 1.2}}, {"e0": {"weight": [0.5, 1.5]}}),
    ("ties", 3, {"drop_ratio": 0.75, "lambda": 0.9}, {"e0": {"weight": 1.5}}),
    ("ties", 3, {"drop_ratio": 0.5, "normalize": False, "lambda": [1.0, 0.5]}, {"e2": {"drop_ratio": {"1": 0.75}}}),
    ("magnitude", 2, {"drop_ratio": 0.5, "lambda": 1.1}, {"e1": {"weight": 0.75}}),
    ("breadcrumbs", 3, {"drop_ratio": 0.5, "gamma": 0.125}, {"e0": {"gamma": 0.25}}),
    ("breadcrumbs", 2, {"drop_ratio": {"head": 0.75, "default": 0.5}, "gamma": 0.0625, "lambda": 0.8}, {}),
    ("slerp", 2, {"t": 0.3}, {}),
    ("slerp", 2, {"t": {"embeddings": 0.1, "0": 0.8, "default": 0.4}}, {}),
    ("model_stock", 3, {}, {}),
    ("model_stock", 2, {"filter_wise": True}, {}),
    ("model_stock", 3, {"filter_wise": {"0": True, "default": False}}, {}),
]


@pytest.mark.parametrize("method, n_experts, parameters, expert_params", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_llama_matches_mergekit(mergekit_cli, llama_family, method, n_experts, parameters, expert_params):
    recipe_path = _write_recipe(llama_family, method, n_experts, parameters, expert_params)
    theirs, config = _run_mergekit(mergekit_cli, llama_family, recipe_path)
    recipe = load_recipe(recipe_path)
    ours = merge_recipe(recipe).tensors
    expert_set = expert_set_from_recipe(recipe)
    norms = [n for n in ours if not expert_set.layout[n].droppable]
    skip = norms if method == "ties" else ()
    worst = _compare(ours, theirs, skip)
    if method == "ties":
        # mergekit elects signs on norms too (density 1.0 there, so no trimming): check its rule here
        for name in norms:
            expected = _ties_without_trim(expert_set, recipe, name)
            assert float((expected - theirs[name].float()).abs().max()) <= FP32_TOL, name
    print(f"{method}: max |Δ| {worst:.3g}")


def _ties_without_trim(expert_set, recipe, name: str) -> torch.Tensor:
    """mergekit's ties on an untrimmed tensor: elect sign of Σ w·Δ, average agreeing w·Δ by agreeing w."""
    base = expert_set.base.get(name).float()
    layer = expert_set.layout.layer_of(name)
    spec = get_method("ties")
    resolver = ParamResolver(spec.params, recipe.parameters, recipe.expert_params(), expert_set.layout.layers)
    weights, deltas = [], []
    for expert in recipe.experts:
        weight = float(resolver.value("weight", expert.name, layer))
        weights.append(weight)
        deltas.append(weight * (expert_set.experts[expert.name].source.get(name).float() - base))
    stacked = torch.stack(deltas)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked) == sign).float()
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    mixed = (stacked * agree).sum(0)
    if recipe.parameters.get("normalize", True):
        divisor = (w * agree).sum(0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return base + float(resolver.value("lambda", None, layer)) * mixed


@pytest.mark.parametrize("n_experts, parameters", [(3, {}), (2, {"filter_wise": True}), (3, {"filter_wise": True})])
def test_model_stock_matches_mergekit_on_aligned_experts(mergekit_cli, llama_correlated, n_experts, parameters):
    """Where the task vectors agree, t is near 1 and the merge moves far from the base: still mergekit's tensors."""
    recipe_path = _write_recipe(llama_correlated, "model_stock", n_experts, parameters)
    theirs, _ = _run_mergekit(mergekit_cli, llama_correlated, recipe_path)
    recipe = load_recipe(recipe_path)
    ours = merge_recipe(recipe).tensors
    expert_set = expert_set_from_recipe(recipe)
    name = next(n for n in ours if expert_set.layout[n].droppable)
    base = expert_set.base.get(name).float()
    mean_delta = sum(e.source.get(name).float() - base for e in expert_set.experts.values()) / n_experts
    moved = float((ours[name] - base).norm() / mean_delta.norm())
    assert 0.5 < moved < 1.0  # t well away from 0 (the base) and below 1 (the average)
    print(f"aligned model_stock {parameters}: t≈{moved:.2f}, max |Δ| {_compare(ours, theirs):.3g}")


@pytest.mark.parametrize("method, parameters", [("ties", {"drop_ratio": 0.5}), ("slerp", {"t": 0.6}),
                                                ("linear", {}), ("model_stock", {}),
                                                ("model_stock", {"filter_wise": True})])
def test_gpt2_matches_mergekit(mergekit_cli, gpt2_family, method, parameters):
    recipe_path = _write_recipe(gpt2_family, method, 2, parameters)
    theirs, _ = _run_mergekit(mergekit_cli, gpt2_family, recipe_path)
    recipe = load_recipe(recipe_path)
    ours = merge_recipe(recipe).tensors
    expert_set = expert_set_from_recipe(recipe)
    norms = [n for n in ours if not expert_set.layout[n].droppable] if method == "ties" else ()
    print(f"gpt2 {method}: max |Δ| {_compare(ours, theirs, norms):.3g}")


@pytest.mark.parametrize("method, parameters", [("dare_linear", {"drop_ratio": 0.5}),
                                                ("dare_ties", {"drop_ratio": 0.5, "rescale": False}),
                                                ("della", {"drop_ratio": 0.5, "epsilon": 0.2})])
def test_random_methods_run_in_mergekit(mergekit_cli, llama_family, method, parameters):
    """DARE/DELLA masks cannot match entry-wise (different generators): mergekit must run the export, and
    the tensors Merge Lab never sparsifies nor elects signs on in a linear method (norms) must match."""
    recipe_path = _write_recipe(llama_family, method, 2, parameters)
    theirs, config = _run_mergekit(mergekit_cli, llama_family, recipe_path, "--random-seed", "3")
    assert "--random-seed 3" in config and "differs entry-wise" in config
    recipe = load_recipe(recipe_path)
    ours = merge_recipe(recipe).tensors
    expert_set = expert_set_from_recipe(recipe)
    assert set(ours) <= set(theirs)
    if method == "dare_linear":
        norms = {n: t for n, t in ours.items() if not expert_set.layout[n].droppable}
        _compare(norms, theirs)
    if method == "della":
        assert yaml.safe_load(config)["parameters"]["epsilon"] == pytest.approx(0.1)  # ε 0.2 halved


# mergekit configs written by hand (as users paste them), run by mergekit and imported by Merge Lab: the
# import's reading of gradients, slices, filters and defaults must be mergekit's.
MERGEKIT_CONFIGS = {
    "task_arithmetic-gradient": """
merge_method: task_arithmetic
base_model: base
models:
  - model: expert0
    parameters: {weight: [0.2, 0.9, 1.4]}
  - model: expert1
    parameters: {weight: 0.6}
parameters:
  lambda: [{filter: layers.1., value: 0.5}, {value: 1.1}]
dtype: float32
""",
    "ties-slices-default-density": """
merge_method: ties
base_model: base
slices:
  - sources:
      - {model: base, layer_range: [0, 1]}
      - {model: expert0, layer_range: [0, 1], parameters: {weight: 1.0}}
      - {model: expert1, layer_range: [0, 1], parameters: {weight: 0.5}}
  - sources:
      - {model: base, layer_range: [1, 2]}
      - {model: expert0, layer_range: [1, 2], parameters: {weight: 2.0}}
      - {model: expert1, layer_range: [1, 2], parameters: {weight: 0.5}}
parameters: {normalize: true}
dtype: float32
""",
    "breadcrumbs-global-density": """
merge_method: breadcrumbs
base_model: base
models: [{model: expert0}, {model: expert1}, {model: base}]
parameters:
  weight: 0.8
  density: [{filter: norm, value: 1.0}, {value: 0.5}]
  gamma: 0.125
""",
    "linear-base-listed": """
merge_method: linear
base_model: base
models:
  - {model: base, parameters: {weight: 1.0}}
  - {model: expert0, parameters: {weight: 3.0}}
""",
    "slerp-gradient": """
merge_method: slerp
base_model: expert1
models: [{model: expert0}, {model: expert1}]
parameters: {t: [0.1, 0.7]}
""",
}


@pytest.mark.parametrize("name", list(MERGEKIT_CONFIGS))
def test_imported_mergekit_config_matches_mergekit(mergekit_cli, llama_family, name):
    from merging.io.mergekit_import import from_mergekit_yaml

    config = llama_family / f"{name}.mergekit.yml"
    config.write_text(MERGEKIT_CONFIGS[name])
    theirs = mergekit_cli.run(config, llama_family / f"{name}.mergekit-out")
    recipe = from_mergekit_yaml(config.read_text(), layers=lambda draft: expert_set_from_recipe(draft).layout.layers,
                                source=config)
    ours = merge_recipe(recipe).tensors
    # the ties config elects signs on norm tensors in mergekit (density 1.0 there by default), not in Merge Lab
    skip = [n for n in ours if not expert_set_from_recipe(recipe).layout[n].droppable] if "ties" in name else ()
    print(f"{name}: max |Δ| {_compare(ours, theirs, skip):.3g}")
