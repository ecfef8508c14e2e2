"""End to end: tiny random checkpoints on disk → recipe → CLI merge → reload with transformers → forward."""

import json
from pathlib import Path

import pytest
import tiny_models as tm
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from merging.cli.main import main
from merging.engine import MergeEngine, MergeSettings
from merging.io.experts import ExpertSet
from merging.io.recipe import load_recipe


def _recipe(tmp: Path, base: Path, experts: list[Path], method: str, **extra) -> Path:
    data = {"method": method, "base": str(base.relative_to(tmp)),
            "experts": [{"name": f"e{i}", "model": str(e.relative_to(tmp))} for i, e in enumerate(experts)],
            "parameters": extra.pop("parameters", {}), "seed": 1, **extra}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("kind, loader", [("gpt2", AutoModelForCausalLM), ("llama", AutoModelForCausalLM),
                                          ("bert", AutoModel)])
def test_cli_merge_reloads_and_runs(tmp_path, kind, loader, capsys):
    base, experts = tm.family(tmp_path, kind, 3)
    recipe = _recipe(tmp_path, base, experts, "ties", parameters={"drop_ratio": 0.6})
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = loader.from_pretrained(report["folders"]["merged"])
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = model(input_ids=ids)
    assert torch.isfinite(out[0]).all()
    merged = load_file(str(Path(report["folders"]["merged"]) / "model.safetensors"))
    base_names = set(load_file(str(base / "model.safetensors")))
    assert base_names <= set(merged)  # every tensor present
    assert (tmp_path / "out" / "recipe.yaml").is_file() and (tmp_path / "out" / "mergekit.yaml").is_file()
    assert "## Recipe" in (Path(report["folders"]["merged"]) / "README.md").read_text()


def test_classifier_experts_export_one_folder_per_task_with_its_head(tmp_path):
    base, experts = tm.family(tmp_path, "bert", 2, expert_kind="bert_cls")
    recipe = _recipe(tmp_path, base, experts, "task_arithmetic", parameters={"lambda": 0.5}, dtype="float16")
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 0
    for i, expert in enumerate(experts):
        folder = tmp_path / "out" / f"e{i}"
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert model.dtype == torch.float16
        saved = load_file(str(folder / "model.safetensors"))
        original = load_file(str(expert / "model.safetensors"))
        assert torch.equal(saved["classifier.weight"], original["classifier.weight"].half())
        logits = model(input_ids=torch.tensor([[1, 5, 2]])).logits
        assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_replayed_recipe_equals_in_memory_merge(tmp_path):
    base, experts = tm.family(tmp_path, "bert", 2)
    recipe_path = _recipe(tmp_path, base, experts, "dare_ties", parameters={"drop_ratio": {"0": 0.9, "default": 0.3}})
    assert main(["merge", str(recipe_path), "--out", str(tmp_path / "out")]) == 0
    recipe = load_recipe(recipe_path)
    expert_set = ExpertSet.load(base, {f"e{i}": e for i, e in enumerate(experts)})
    settings = MergeSettings.build(expert_set, "dare_ties", recipe.parameters, seed=recipe.seed)
    in_memory = MergeEngine(expert_set).merge(settings).tensors
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, tensor in in_memory.items():
        assert torch.equal(exported[name], tensor.to(exported[name].dtype)), name


def test_sharded_export_and_sharded_input(tmp_path):
    base, experts = tm.family(tmp_path, "llama", 2)
    recipe = _recipe(tmp_path, base, experts, "task_arithmetic")
    assert main(["merge", str(recipe), "--out", str(tmp_path / "sharded"), "--shard-mb", "0"]) == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # a sharded folder is a valid input too
    expert_set = ExpertSet.load(tmp_path / "sharded", [experts[0]])
    assert expert_set.layout.merged_names()


def test_partial_remerge_equals_full_merge(tmp_path):
    base, experts = tm.family(tmp_path, "bert", 2)
    expert_set = ExpertSet.load(base, experts)
    engine = MergeEngine(expert_set)
    first = engine.merge(MergeSettings.build(expert_set, "dare_linear", {"drop_ratio": 0.5}, seed=2))
    assert first.changed_layers == expert_set.layout.layers
    moved = MergeSettings.build(expert_set, "dare_linear", {"drop_ratio": {"1": 0.8, "default": 0.5}}, seed=2)
    second = engine.merge(moved)
    assert second.changed_layers == ["1"]
    fresh = MergeEngine(expert_set, cache=False).merge(moved)
    for name in fresh.tensors:
        assert torch.equal(second.tensors[name], fresh.tensors[name])


def test_mergekit_format(tmp_path, capsys):
    base, experts = tm.family(tmp_path, "bert", 2)
    recipe = _recipe(tmp_path, base, experts, "ties", parameters={"drop_ratio": 0.7})
    assert main(["merge", str(recipe), "--format", "mergekit"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["merge_method"] == "ties"
    # density 1.0 for norm tensors (never sparsified in Merge Lab) by filter, 0.3 for the rest
    density = config["parameters"]["density"]
    assert density[-1] == {"value": pytest.approx(0.3)} and all(f["value"] == 1.0 for f in density[:-1])


def test_inspect_and_methods_json(tmp_path, capsys):
    base, experts = tm.family(tmp_path, "bert", 2)
    assert main(["inspect", str(base), *map(str, experts), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["experts"]) == {"expert0", "expert1"}
    assert data["stats"]["cosine"]["expert0|expert1"]["model"] == pytest.approx(0, abs=0.2)
    assert main(["methods", "--json"]) == 0
    assert {m["name"] for m in json.loads(capsys.readouterr().out)} >= {"ties", "slerp"}
