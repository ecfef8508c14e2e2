"""Bad input gets one clear MergeLabError naming what is wrong, and leaves no output folder behind."""

import json
from pathlib import Path

import pytest
import tiny_models as tm
import torch
import yaml
from safetensors.torch import save_file

from merging import MergeLabError
from merging.cli.main import main
from merging.io.experts import ExpertSet
from merging.io.export import export_recipe
from merging.io.recipe import Recipe, load_recipe


def _family(tmp_path, n=2):
    return tm.family(tmp_path, "bert", n)


def _no_leftovers(folder: Path):
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_mismatched_shapes_name_the_tensor(tmp_path):
    base, _ = _family(tmp_path)
    other = tm.build("bert")
    other.config.intermediate_size = 40
    bigger = type(other)(other.config)
    odd = tm.save(bigger, tmp_path / "odd")
    with pytest.raises(MergeLabError, match=r"intermediate\.dense\.weight \(40, 16\) vs base \(32, 16\)"):
        ExpertSet.load(base, [odd])


def test_different_vocab(tmp_path):
    base, _ = _family(tmp_path)
    config = tm.bert_config()
    config.vocab_size = 70
    odd = tm.save(type(tm.build("bert"))(config), tmp_path / "vocab")
    with pytest.raises(MergeLabError, match="vocab size 70 but the base has 64"):
        ExpertSet.load(base, [odd])


def test_other_architecture(tmp_path):
    base, _ = _family(tmp_path)
    gpt = tm.save(tm.build("gpt2"), tmp_path / "gpt")
    with pytest.raises(MergeLabError, match="gpt2 model but the base is bert"):
        ExpertSet.load(base, [gpt])


def test_missing_file(tmp_path):
    base, _ = _family(tmp_path)
    with pytest.raises(MergeLabError, match="not found"):
        ExpertSet.load(base, [tmp_path / "nowhere"])


def test_truncated_safetensors(tmp_path):
    base, experts = _family(tmp_path)
    weights = experts[0] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(MergeLabError, match="truncated"):
        ExpertSet.load(base, experts)


def test_nan_weights_are_named(tmp_path):
    base, experts = _family(tmp_path)
    state = {k: v.clone() for k, v in tm.build("bert").state_dict().items()}
    state["encoder.layer.1.output.dense.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "config.json").write_text((base / "config.json").read_text())
    save_file(state, str(bad / "model.safetensors"))
    recipe = Recipe("task_arithmetic", str(base), [], source=None)
    from merging.io.recipe import ExpertRef
    recipe.experts = [ExpertRef("good", str(experts[0])), ExpertRef("nan", str(bad))]
    with pytest.raises(MergeLabError, match=r"'nan' has 1 NaN/Inf value\(s\) in tensor 'encoder.layer.1.output.dense.weight'"):
        export_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_inspect_names_nan_tensors(tmp_path, capsys):
    base, experts = _family(tmp_path)
    state = {k: v.clone() for k, v in tm.build("bert").state_dict().items()}
    state["encoder.layer.0.intermediate.dense.bias"][3] = float("inf")
    bad = tmp_path / "inf"
    bad.mkdir()
    (bad / "config.json").write_text((base / "config.json").read_text())
    save_file(state, str(bad / "model.safetensors"))
    capsys.readouterr()
    assert main(["inspect", str(base), str(experts[0]), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model 'inf' has 1 NaN/Inf value(s) in tensor 'encoder.layer.0.intermediate.dense.bias'" in err


def test_pickled_weights_need_opt_in(tmp_path):
    base, experts = _family(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((base / "config.json").read_text())
    torch.save(tm.build("bert").state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(MergeLabError, match="refuses them by default"):
        ExpertSet.load(base, [pickled])
    assert ExpertSet.load(base, [pickled], allow_pickle=True).experts["pickled"].get(
        "encoder.layer.0.attention.self.query.weight").shape == (16, 16)


def test_remote_code_config_is_refused(tmp_path):
    base, experts = _family(tmp_path)
    config = json.loads((experts[0] / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.Model"}
    (experts[0] / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeLabError, match="never runs remote code"):
        ExpertSet.load(base, experts)


def test_recipe_typo_names_field_and_line(tmp_path):
    base, experts = _family(tmp_path)
    text = f"method: ties\nbase: {base}\nexperts:\n  - model: {experts[0]}\nparamters:\n  drop_ratio: 0.5\n"
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(MergeLabError, match="unknown recipe field 'paramters'") as info:
        load_recipe(path)
    assert info.value.line == 5


@pytest.mark.parametrize("patch, message", [
    ({"method": "tiez"}, "unknown merge method 'tiez'"),
    ({"parameters": {"drop_ratio": 2}}, "parameters.drop_ratio must lie in"),
    ({"seed": -1}, "seed must be a whole number"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"experts": []}, "experts must be a non-empty list"),
    ({"parameters": {"drop_ratio": 0.2, "density": 0.8}}, "not both"),
])
def test_invalid_recipes(tmp_path, patch, message):
    data = {"method": "ties", "base": "b", "experts": [{"model": "e"}], **patch}
    with pytest.raises(MergeLabError, match=message):
        Recipe.from_dict(data)


def test_cli_reports_errors_in_one_line_and_leaves_nothing(tmp_path, capsys):
    base, experts = _family(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": "ties", "base": str(base),
                                    "experts": [{"model": str(experts[0])}, {"model": str(tmp_path / "missing")}]}))
    capsys.readouterr()  # drop the fixture's own output
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model") and "not found" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_failed_export_keeps_previous_export(tmp_path, monkeypatch):
    base, experts = _family(tmp_path)
    recipe = Recipe.from_dict({"method": "task_arithmetic", "base": str(base),
                               "experts": [{"model": str(e)} for e in experts]})
    export_recipe(recipe, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("merging.io.export.save_file", disk_full)  # the buffered shard writer
    monkeypatch.setattr("merging.io.export._pwrite_all", disk_full)  # the planned one (export's default)
    recipe.parameters = {"lambda": 0.3}
    with pytest.raises(MergeLabError, match="disk is full"):
        export_recipe(recipe, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    _no_leftovers(tmp_path)


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MergeLabError, match="could not fetch hub model 'no-such-org/no-such-model'"):
        ExpertSet.load("hf:no-such-org/no-such-model", ["hf:no-such-org/other"])


@pytest.mark.parametrize("drop", ["locate", "saliency"])
def test_calibrate_refuses_drops_its_recipe_cannot_replay(tmp_path, capsys, drop):
    """A calibrated recipe holds per-layer drop ratios and weights only: APL's locate and saliency drops need
    per-unit profiles or per-entry saliency from the few-shot data, so calibrate refuses them before writing
    a recipe whose merge would fail."""
    out = tmp_path / "apl.yaml"
    assert main(["calibrate", "--zoo", "no-such-zoo", "--importance", str(tmp_path / "imp.json"),
                 "--drop", drop, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--drop {drop}" in err and "--drop random" in err and "Traceback" not in err
    assert not out.exists()
