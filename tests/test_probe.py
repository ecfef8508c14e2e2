"""Probe: hand-computed accuracies, cached == full, causal-LM perplexity, reports and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from merging.errors import MergeLabError
from merging.zoo.probe import (
    Prober,
    ProbeReport,
    ProbeRow,
    body_from_expert,
    load_body_into,
    load_safetensors,
    probe_causal_lm,
)


def _bodies(zoo):
    return {t: body_from_expert(load_safetensors(zoo.experts[t] / "model.safetensors"), "bert")[0] for t in zoo.tasks}


def _average(bodies, weight=0.5):
    names = next(iter(bodies.values()))
    return {k: sum(weight * b[k] for b in bodies.values()) for k in names}


@torch.no_grad()
def _hand_metrics(zoo, task, body):
    """Expert model of ``task`` with its body replaced, one text at a time (no padding, no batching)."""
    model = BertForSequenceClassification.from_pretrained(str(zoo.experts[task])).eval()
    model.bert.load_state_dict(body, strict=False)
    tok = AutoTokenizer.from_pretrained(str(zoo.experts[task]))
    hits, losses = [], []
    for text, label in zoo.probe(task):
        logits = model(**tok(text, return_tensors="pt", truncation=True, max_length=32)).logits[0]
        hits.append(int(logits.argmax()) == label)
        losses.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(label))))
    return {"accuracy": sum(hits) / len(hits), "loss": sum(losses) / len(losses)}


def _assert_close(got, want):
    assert got["accuracy"] == pytest.approx(want["accuracy"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def test_merged_probe_equals_hand_computed_accuracy(toy_zoo):
    merged = _average(_bodies(toy_zoo))
    prober = Prober.for_zoo(toy_zoo, disk_cache=False)
    row = prober.probe_body(merged)
    for task in toy_zoo.tasks:
        _assert_close(row.metrics[task], _hand_metrics(toy_zoo, task, merged))


def test_reference_rows_use_each_task_head(toy_zoo):
    prober = Prober.for_zoo(toy_zoo, disk_cache=False)
    ref = prober.reference()
    assert [r.name for r in ref.rows] == ["base", *toy_zoo.tasks]
    base_body = {k: v.clone() for k, v in prober.body.params.items()}
    for task in toy_zoo.tasks:
        _assert_close(ref.row("base").metrics[task], _hand_metrics(toy_zoo, task, base_body))
        _assert_close(ref.row(task).metrics[task], _hand_metrics(toy_zoo, task, _bodies(toy_zoo)[task]))


@pytest.mark.parametrize("explicit", [False, True])
def test_cached_hidden_states_give_identical_results(toy_zoo, explicit):
    bodies = _bodies(toy_zoo)
    first = _average(bodies)
    second = {k: v.clone() for k, v in first.items()}
    second["encoder.layer.1.output.dense.weight"] += 0.1  # only the last layer changes
    cached = Prober.for_zoo(toy_zoo, disk_cache=False)
    cached.reference()
    cached.probe_body(first)
    got = cached.probe_body(second, changed_layers=[1] if explicit else None)
    full = Prober.for_zoo(toy_zoo, disk_cache=False).probe_body(second)  # fresh prober: every layer computed
    assert got.metrics == full.metrics
    back = cached.probe_body(first)  # and back again: the cache follows the last probed body
    assert back.metrics == Prober.for_zoo(toy_zoo, disk_cache=False).probe_body(first).metrics
    assert cached.probe_body(second).metrics == full.metrics


def test_cache_reuses_lower_layers(toy_zoo, monkeypatch):
    prober = Prober.for_zoo(toy_zoo, disk_cache=False)
    prober.reference()
    merged = _average(_bodies(toy_zoo))
    prober.probe_body(merged)
    calls = []
    original = prober.body.stage_forward
    monkeypatch.setattr(prober.body, "stage_forward", lambda s, h, b: calls.append(s) or original(s, h, b))
    changed = {k: v.clone() for k, v in merged.items()}
    changed["pooler.dense.bias"] += 0.5
    prober.probe_body(changed)
    assert set(calls) == {prober.body.n_layers + 1}  # only the pooler ran


def test_bad_merged_body_is_a_clear_error(toy_zoo):
    prober = Prober.for_zoo(toy_zoo, disk_cache=False)
    body = _average(_bodies(toy_zoo))
    del body["encoder.layer.0.attention.self.query.weight"]
    with pytest.raises(MergeLabError, match="lacks"):
        prober.probe_body(body)
    body = _average(_bodies(toy_zoo))
    body["pooler.dense.bias"] = torch.zeros(3)
    with pytest.raises(MergeLabError, match="shape"):
        prober.probe_body(body)
    with pytest.raises(MergeLabError, match="changed_layers"):
        prober.probe_body(_average(_bodies(toy_zoo)), changed_layers=["middle"])


def test_expert_naming_is_accepted(toy_zoo):
    prober = Prober.for_zoo(toy_zoo, disk_cache=False)
    state = load_safetensors(toy_zoo.experts[toy_zoo.tasks[0]] / "model.safetensors")
    assert prober.probe_body(state, name="again").metrics == prober.reference().row(toy_zoo.tasks[0]).metrics


def test_report_roundtrip_table_and_markdown():
    report = ProbeReport(tasks=["a", "b"])
    report.add(ProbeRow("base", {"a": {"accuracy": 0.5, "loss": 1.0}, "b": {"accuracy": 0.7, "loss": 0.6}}))
    report.add(ProbeRow("merged", {"a": {"accuracy": 0.9, "loss": 0.2}, "b": {"accuracy": 0.6, "loss": 0.8}}))
    report.add(ProbeRow("merged", {"a": {"accuracy": 1.0, "loss": 0.1}, "b": {"accuracy": 0.6, "loss": 0.8}}))
    assert [r.name for r in report.rows] == ["base", "merged"]
    headers, rows = report.table()
    assert headers == ["model", "a acc", "a loss", "b acc", "b loss", "mean acc", "mean loss"]
    assert rows[1][-2] == pytest.approx(0.8)
    assert ProbeReport.from_json(report.to_json()) == report
    assert report.markdown().count("\n") == 3 and "| merged | 1.000 |" in report.markdown()


@torch.no_grad()
def test_causal_lm_perplexity_matches_hand_computation():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    seqs = [[1, 5, 7, 9, 2], [3, 4], [8, 8, 8, 1, 0, 4, 2, 6]]
    losses = []
    for s in seqs:
        logits = model(torch.tensor([s])).logits[0, :-1]
        losses += torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:]), reduction="none").tolist()
    mean = sum(losses) / len(losses)
    report = probe_causal_lm({"base": model}, token_ids=seqs)
    got = report.row("base").metrics["probe"]
    assert got["loss"] == pytest.approx(mean, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)
    assert report.table()[0] == ["model", "probe loss", "probe ppl", "mean loss", "mean ppl"]


def test_load_body_into_maps_base_names():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    model, other = GPT2LMHeadModel(config), GPT2LMHeadModel(config)
    body = {k: v for k, v in other.transformer.state_dict().items()}
    load_body_into(model, body)
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, other.transformer.h[1].mlp.c_fc.weight)
    with pytest.raises(MergeLabError, match="does not exist"):
        load_body_into(model, {"nonsense.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- real tiny zoo


def test_tiny_zoo_probe_and_cli(tiny_zoo, capsys):
    from merging.cli.main import main  # the same entry point as `python -m merging`

    assert main(["probe", "--zoo", tiny_zoo.name, "--json"]) == 0
    report = ProbeReport.from_json(capsys.readouterr().out)
    assert [r.name for r in report.rows] == ["base", *tiny_zoo.tasks]
    for task in tiny_zoo.tasks:  # the expert's own-task accuracy matches what training measured
        assert report.row(task).metrics[task]["accuracy"] == pytest.approx(tiny_zoo.task_record(task)["probe_accuracy"]["expert"], abs=1e-4)
        assert report.row("base").metrics[task]["accuracy"] == pytest.approx(tiny_zoo.task_record(task)["probe_accuracy"]["base_with_head"], abs=1e-4)
    assert list((tiny_zoo.root / "probe_cache").glob("*.json"))  # reference rows cached on disk
    assert main(["probe", "--zoo", "no-such-zoo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "zoo build" in err
    assert json.loads(report.to_json())["tasks"] == tiny_zoo.tasks
    assert main(["zoo", "list"]) == 0
    assert tiny_zoo.name in capsys.readouterr().out


def test_cli_importance_calibrate_merge_probe_chain(tiny_zoo, tmp_path, capsys, monkeypatch):
    """Issue 4's headless chain on the real tiny zoo: importance → calibrated recipe → merge → probe, all
    through ``python -m merging``'s entry point; the recipe holds every calibrated cell, so neither the
    merge nor the probe recomputes importance."""
    from safetensors.torch import load_file

    import merging.apl.importance as importance_module
    from merging.apl.calibration import calibrate
    from merging.cli.importance import load_importance
    from merging.cli.main import main
    from merging.io.experts import ExpertSet
    from merging.io.recipe import load_recipe

    imp, recipe_path = tmp_path / "imp.json", tmp_path / "apl.yaml"
    assert main(["importance", "--zoo", tiny_zoo.name, "--level", "layer", "--n-fewshot", "16", "--out", str(imp),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fewshot"] == {t: 16 for t in tiny_zoo.tasks}
    assert main(["calibrate", "--zoo", tiny_zoo.name, "--importance", str(imp), "--drop-ratio", "0.6",
                 "--out", str(recipe_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    recipe = load_recipe(recipe_path)
    expert_set = ExpertSet.load(tiny_zoo.base_path, dict(tiny_zoo.experts))
    table = calibrate(load_importance(imp), expert_set, drop_ratio=0.6)
    assert recipe.method == "apl" and recipe.importance == str(imp.resolve())
    assert recipe.expert_params() == table.to_expert_params() and summary["drop_ratio"] == table.drop
    assert {t: v["indices"] for t, v in recipe.few_shot.items()} == load_importance(imp).fewshot

    def no_recompute(*args, **kwargs):
        raise AssertionError("a calibrated recipe must replay without computing importance")

    assert recipe.calibrated["from"] == str(imp.resolve())  # said, not guessed from the recipe's shape
    assert all(v["file"] == f"zoo:{tiny_zoo.name}/{t}" for t, v in recipe.few_shot.items())
    monkeypatch.setattr(importance_module, "compute_importance", no_recompute)
    assert main(["merge", str(recipe_path), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["probe", "--zoo", tiny_zoo.name, "--recipe", str(recipe_path), "--label", "apl", "--json"]) == 0
    report = ProbeReport.from_json(capsys.readouterr().out)
    merged = report.row("apl").metrics
    assert set(merged) == set(tiny_zoo.tasks) and all(0.0 <= m["accuracy"] <= 1.0 for m in merged.values())
    weights = load_file(str(next((tmp_path / "merged").rglob("model.safetensors"))))
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert main(["calibrate", "--zoo", tiny_zoo.name, "--importance", str(tmp_path / "missing.json"),
                 "--out", str(recipe_path)]) == 2
    assert "not found" in capsys.readouterr().err
