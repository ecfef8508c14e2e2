"""One path for every data-aware method: a method is its declaration, wherever it runs.

A throwaway data-aware method registered here — its own ``prepare`` turning each expert's few-shot
examples into per-expert weights — runs through the workbench (merge, override, export) and replays
from the exported recipe with no app code of its own. Plus: the recipe's explicit ``calibrated``
field, the few-shot record by reference, the ``zoo:`` scheme registry, lazy imports, and declared
ranges as the one source of every limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
import torch

from merging import workbench as wb
from merging.errors import MergeLabError
from merging.methods import MethodSpec, all_specs, get_method, register
from merging.methods.base import _REGISTRY, NEEDS_BASE, NEEDS_FEW_SHOT
from merging.methods.classic import LAMBDA, WEIGHT

NAME = "fewshot_weights"


def _share_of_label_zero(rows) -> float:
    return sum(1 for _, label in rows if int(label) == 0) / len(rows)


@pytest.fixture()
def fewshot_method():
    """A data-aware method no app code knows: w_t = 0.5 + (share of label 0 in t's few-shot set) at every
    layer but layer 0 (0.25); Θ = Θ_base + λ Σ_t w_t Δ_t. ``calls`` records what ``prepare`` was given."""
    calls: list[dict] = []

    def prepare(expert_set, examples, tokenizer, *, params, progress=None, **inputs):
        assert not inputs, "a method that does not need importance gets none"
        calls.append({e: [tuple(x) for x in rows] for e, rows in examples.items()})
        return {"expert_params": {e: {"weight": {"default": 0.5 + _share_of_label_zero(rows), "0": 0.25}}
                                  for e, rows in examples.items()}, "extras": {}}

    def kernel(job):
        mixed = sum(delta * float(job.params[e]["weight"]) for e, delta in job.deltas().items())
        return job.base.float() + float(job.shared.get("lambda", 1.0)) * mixed

    register(MethodSpec(NAME, "Few-shot weights (test)", "https://example.org/fewshot-weights",
                        "Weights from the share of label 0 in each expert's few-shot set.", (WEIGHT, LAMBDA), kernel,
                        needs=frozenset({NEEDS_BASE, NEEDS_FEW_SHOT}), prepare=prepare))
    try:
        yield calls
    finally:
        _REGISTRY.pop(NAME, None)


def _zip_recipe(path):
    from merging.io.recipe import Recipe

    with zipfile.ZipFile(path) as archive:
        return Recipe.from_yaml(archive.read("recipe.yaml").decode("utf-8"))


def test_a_new_data_aware_method_runs_in_the_app_and_replays_without_app_code(loaded, fewshot_method):  # noqa: F811
    from merging.io.replay import merge_recipe

    calls = fewshot_method
    session, _ = loaded
    session.fewshot_n = 6
    e0, e1 = session.experts[:2]
    assert wb.method_available(session, NAME) is None
    wb.merge(session, NAME, {"lambda": 0.8}, seed=3)
    assert len(calls) == 1 and len(calls[0][e0]) == 6
    recipe = session.last_recipe
    # the few-shot data prepare was given is recorded by reference: the expert's zoo ref + indices
    record = recipe.few_shot[e0]
    assert record["file"] == session.refs[e0] and record["n"] == 6
    assert [tuple(session.data[e0].fewshot[i]) for i in record["indices"]] == calls[0][e0]
    weight = 0.5 + _share_of_label_zero(calls[0][e0])
    assert recipe.experts[0].parameters["weight"]["1"] == pytest.approx(weight)
    assert recipe.experts[0].parameters["weight"]["0"] == 0.25
    assert recipe.calibrated is not None  # its values are all prepare made: replay needs no data
    # the plan shows the prepared values once prepared; an override wins, beside the suggestion it replaced
    assert wb.plan(session, NAME, {"lambda": 0.8})[e1]["weight"]["0"] == 0.25
    wb.set_cell(session, e0, "1", "weight", 1.7, NAME)
    summary = wb.merge(session, NAME, {"lambda": 0.8}, seed=3)
    assert len(calls) == 1, "the same inputs are prepared once (content-hashed)"
    assert summary.changed_layers == ["1"]
    recipe = session.last_recipe
    assert recipe.experts[0].parameters["weight"]["1"] == 1.7
    assert recipe.suggested["overrides"] == [{"expert": e0, "key": "weight", "layer": "1", "value": 1.7,
                                              "suggested": pytest.approx(weight)}]
    assert recipe.suggested[NAME]["expert_params"][e0]["weight"]["default"] == pytest.approx(weight)
    merged = {k: v.clone() for k, v in wb.merged_tensors(session).items()}
    wb.set_cell(session, e0, "0", "weight", 0.0, NAME)  # after Merge: Export must not see it
    exported = _zip_recipe(wb.export(session))
    assert "0" not in [o["layer"] for o in exported.suggested["overrides"]]
    # replay from the exported recipe: calibrated, so prepare is not called, and the tensors are the same
    replayed = merge_recipe(exported).tensors
    assert len(calls) == 1
    assert set(replayed) == set(merged)
    for name, tensor in merged.items():
        assert torch.equal(replayed[name], tensor), name
    # without `calibrated`, replay prepares again from the referenced few-shot data: the same examples
    data = exported.to_dict()
    data.pop("calibrated")
    from merging.io.recipe import Recipe

    again = merge_recipe(Recipe.from_dict(data)).tensors
    assert len(calls) == 2 and calls[1] == calls[0]
    for name, tensor in merged.items():
        assert torch.equal(again[name], tensor), name


def test_an_upload_is_recorded_by_name_and_replay_says_what_is_missing(loaded, fewshot_method, tmp_path):  # noqa: F811
    from merging.io.replay import merge_recipe

    session, zoo = loaded
    expert = session.experts[0]
    labels = len(zoo.label_names(expert))
    path = tmp_path / "mine.csv"
    path.write_text("\n".join(["text,label"] + [f"w{i} w{i+1},{chr(97 + i % labels)}" for i in range(30)]))
    wb.attach_task_data(session, expert, path, n_fewshot=8)
    wb.merge(session, NAME, {})
    data = session.last_recipe.to_dict()
    assert data["few_shot"][expert]["source"] == "mine.csv" and "file" not in data["few_shot"][expert]
    data.pop("calibrated")
    from merging.io.recipe import Recipe

    with pytest.raises(MergeLabError, match="mine.csv.*few_shot.*file"):
        merge_recipe(Recipe.from_dict(data))


def test_calibrated_is_an_explicit_recipe_field():
    from merging.io.recipe import Recipe

    base = {"method": "apl", "base": "b", "experts": [{"name": "a", "model": "a"}, {"name": "c", "model": "c"}]}
    assert Recipe.from_dict(base).calibrated is None
    assert Recipe.from_dict({**base, "calibrated": True}).calibrated == {}
    assert Recipe.from_dict({**base, "calibrated": True}).to_dict()["calibrated"] is True
    given = Recipe.from_dict({**base, "calibrated": {"from": "imp.json"}})
    assert Recipe.from_yaml(given.to_yaml()).calibrated == {"from": "imp.json"}
    with pytest.raises(MergeLabError, match="calibrated must be true or a mapping"):
        Recipe.from_dict({**base, "calibrated": "yes"})


def test_apl_replay_of_an_uncalibrated_recipe_prepares_from_the_referenced_fewshot(loaded):  # noqa: F811
    """The app's APL merge (its importance map an input of prepare) and APL's prepare fed the examples the
    recipe's few-shot record references (importance recomputed from them) calibrate the same values."""
    from merging.io.replay import expert_set_from_recipe
    from merging.io.taskdata import recipe_examples, tokenizer_of

    session, _ = loaded
    wb.compute_importance(session, n_fewshot=8)
    wb.merge(session, "apl", {"drop_ratio": 0.4})
    recipe = session.last_recipe
    assert recipe.calibrated["importance"]["mode"] == "gradient"
    assert {e: r["indices"] for e, r in recipe.few_shot.items()} == session.importance.fewshot
    examples = recipe_examples(recipe)
    assert examples == {e: [tuple(session.data[e].fewshot[i]) for i in ix] for e, ix in session.importance.fewshot.items()}
    expert_set = expert_set_from_recipe(recipe)
    replayed = get_method("apl").prepare(expert_set, examples, tokenizer_of(expert_set), params=recipe.parameters)
    suggested = recipe.suggested["apl"]
    for expert in session.experts:
        for layer in session.layers:
            assert replayed["table"].drop[expert][layer] == pytest.approx(suggested["drop_ratio"][expert][layer], abs=1e-6)
            assert replayed["table"].weight[expert][layer] == pytest.approx(suggested["weight"][expert][layer], abs=1e-6)


def test_zoo_refs_resolve_through_a_registered_scheme():
    from merging.io import sources

    assert "zoo" in sources.registered_schemes()  # merging.workbench imports merging.zoo
    with pytest.raises(MergeLabError, match="no resolver is registered for 'nozoo:'"):
        sources.open_model("nozoo:x/y")
    seen = []
    sources.register_scheme("testscheme", lambda ref: seen.append(ref) or (_ for _ in ()).throw(
        MergeLabError("testscheme has no such model")))
    try:
        with pytest.raises(MergeLabError, match="testscheme has no such model"):
            sources.open_model("testscheme:a/b")
        assert seen == ["testscheme:a/b"]
    finally:
        sources._SCHEMES.pop("testscheme", None)
    with pytest.raises(MergeLabError, match="built-in"):
        sources.register_scheme("hf", lambda ref: ref)


def test_io_layer_does_not_import_the_zoo():
    code = ("import sys; import merging.io.sources, merging.io.replay, merging.io.recipe, merging.io.taskdata; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('merging.zoo'))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_a_plain_merge_method_loads_no_measurement_code():
    code = ("import json, sys; from merging.methods import get_method; get_method('ties'); "
            "print(json.dumps({m: m in sys.modules for m in ('scipy', 'transformers', 'merging.apl.importance', "
            "'merging.apl.calibration', 'merging.apl.fisher', 'merging.zoo')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"scipy": False, "transformers": False, "merging.apl.importance": False,
                                      "merging.apl.calibration": False, "merging.apl.fisher": False,
                                      "merging.zoo": False}


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_every_declared_range_is_the_workbench_limit(spec):
    for p in spec.params:
        if p.kind not in ("float", "int"):
            continue
        assert p.low is not None and p.high is not None, f"{spec.name}.{p.name} declares no range"
        for inside in (p.low, p.high, (p.low + p.high) / 2 if p.kind == "float" else p.low):
            assert wb.check_shared(spec.name, {p.name: inside})[p.name] == pytest.approx(inside)
        step = max(abs(p.high), 1.0) * 1e-6
        for outside in (p.low - step, p.high + step):
            with pytest.raises(MergeLabError, match=p.name.replace("_", " ")):
                wb.check_shared(spec.name, {p.name: outside})
        if p.name in wb.PER_LAYER_KEYS:
            assert wb.cell_param(p.name, spec.name) is p or (wb.cell_param(p.name, spec.name).low,
                                                             wb.cell_param(p.name, spec.name).high) == (p.low, p.high)
            assert wb.check_cell(p.name, p.high, "1", spec.name) == p.high
            with pytest.raises(MergeLabError, match="must lie in"):
                wb.check_cell(p.name, p.high + step, "1", spec.name)


def test_a_calibrated_weight_above_two_is_accepted_everywhere(loaded):  # noqa: F811
    """APL's weights reach T = 4 × softmax share (2.15 with four experts): inside the declared −5..5, so
    the cell check, the table and the sliders accept it."""
    from components import handlers as h

    session, _ = loaded
    e0 = session.experts[0]
    wb.set_cell(session, e0, "1", wb.WEIGHT, 2.15, "apl")
    assert session.overrides[e0][wb.WEIGHT]["1"] == 2.15
    weight = get_method("apl").param(wb.WEIGHT)
    slider = h.cell_slider(wb.WEIGHT)
    assert (slider["minimum"], slider["maximum"]) == (weight.low, weight.high)
    drop = get_method("apl").param(wb.DROP)
    assert (h.cell_slider(wb.DROP)["minimum"], h.cell_slider(wb.DROP)["maximum"]) == (drop.low, drop.high)
    headers, rows = wb.table_rows(session, wb.WEIGHT, "apl", {})
    rows[0][2] = 2.15
    wb.apply_table(session, wb.WEIGHT, rows, "apl", {})
    assert session.overrides[e0][wb.WEIGHT][session.layers[1]] == 2.15


def test_calibration_refuses_q_min_outside_its_declaration():
    from merging.apl.calibration import _check

    _check(0.5, 2.0, 2.0, 0.5, "uniform")
    _check(0.5, float("inf"), float("inf"), 0.01, "uniform")  # τ = ∞: APL as DARE, the library-only limit
    with pytest.raises(MergeLabError, match="q_min must lie in"):
        _check(0.5, 2.0, 2.0, 0.9, "uniform")


def test_drop_sweep_prepares_each_ratio_and_leaves_the_session_alone(loaded):  # noqa: F811
    """The sweep builds from snapshots (no overrides, APL prepared again at each ratio): its APL point at
    0.3 is the probe of an override-free APL merge at drop ratio 0.3, and the session's overrides survive."""
    session, _ = loaded
    e0 = session.experts[0]
    wb.compute_importance(session, n_fewshot=8)
    wb.set_cell(session, e0, "1", wb.WEIGHT, 0.3, "apl")
    out = wb.drop_sweep(session, ratios=(0.3, 0.8), methods=("apl",))
    assert session.overrides == {e0: {wb.WEIGHT: {"1": 0.3}}}
    wb.reset_overrides(session)
    wb.merge(session, "apl", {"drop_ratio": 0.3}, seed=session.seed)
    report = wb.run_probe(session)
    assert out["apl"][0] == pytest.approx(report.rows[-1].mean("accuracy"))
    assert len(out["apl"]) == 2


def test_recipe_fewshot_record_errors_say_what_to_fix(tmp_path):
    from merging.io.recipe import Recipe
    from merging.io.taskdata import read_examples, recipe_examples

    data = tmp_path / "few.jsonl"
    data.write_text('{"text": "a b", "label": 1}\n\n{"text": "c", "label": 0}\n')
    assert read_examples(data) == [("a b", 1), ("c", 0)]
    recipe = Recipe.from_dict({"method": "fisher", "base": "b", "experts": [{"name": "x", "model": "x"}, "y"],
                               "few_shot": {"x": {"file": "few.jsonl", "indices": [1]},
                                            "y": {"file": str(data)}}}, source=tmp_path / "r.yaml")
    assert recipe_examples(recipe) == {"x": [("c", 0)], "y": [("a b", 1), ("c", 0)]}
    recipe.few_shot["x"]["indices"] = [5]
    with pytest.raises(MergeLabError, match=r"few_shot.x.indices: 5 is outside its file's 2 examples"):
        recipe_examples(recipe)
    recipe.few_shot["x"] = {"file": "missing.jsonl"}
    with pytest.raises(MergeLabError, match="few-shot data 'missing.jsonl' not found"):
        recipe_examples(recipe)
    data.write_text('{"text": "a b", "label": "x"}\n')  # (a row of text alone is causal-LM data: tests/test_lm.py)
    with pytest.raises(MergeLabError, match="few.jsonl line 1 is not a JSON object with text and an integer label"):
        read_examples(data)


def test_fisher_from_the_app_replays_from_its_referenced_fewshot(loaded):  # noqa: F811
    """Fisher's diagonals are engine extras, so its recipe is not calibrated: replay reads the few-shot
    files the recipe references (at its indices), prepares Fisher again and gets the app's tensors."""
    from merging.io.replay import merge_recipe

    session, _ = loaded
    session.fewshot_n = 5
    wb.merge(session, "fisher", {"epsilon": 1e-6}, seed=1)
    recipe = session.last_recipe
    assert recipe.calibrated is None and not recipe.suggested
    assert all(r["n"] == 5 and r["file"] == session.refs[e] for e, r in recipe.few_shot.items())
    merged = wb.merged_tensors(session)
    replayed = merge_recipe(recipe).tensors
    changed = 0
    for name, tensor in merged.items():
        assert torch.allclose(replayed[name], tensor, rtol=0, atol=1e-6), name
        changed += int(not torch.equal(tensor, wb.models_for(session).expert_set.base.get(name).float()))
    assert changed, "the merge changed nothing: the comparison would prove nothing"
