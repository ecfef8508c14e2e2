"""EMR-Merging: one body per task, checked against the paper's formula written here entry by entry.

τ_t = θ_t − θ_0; γ = sgn(Σ_t τ_t); ε = max over tasks with sgn(τ_t) = γ of |τ_t|; τ_uni = γ ε;
M_t = (τ_t τ_uni > 0); λ_t = Σ|τ_t| / Σ|M_t τ_uni| over the whole model; body_t = θ_0 + λ_t M_t τ_uni.
"""

from __future__ import annotations

import math

import pytest
import tiny_models as tm
import torch
import yaml
from safetensors.torch import load_file

from merging import MergeEngine, MergeLabError, MergeSettings, engine, merge_state_dicts
from merging.cli.main import main
from merging.io.experts import ExpertSet, check_homology
from merging.io.export import export_recipe
from merging.io.layout import ROLE_MERGE
from merging.io.mergekit_yaml import to_mergekit_yaml
from merging.io.recipe import Recipe
from merging.io.replay import merge_recipe, merge_recipe_body, merge_recipe_task_bodies
from merging.io.sources import ModelSource
from merging.methods import get_method

SHAPES = {
    "embeddings.word_embeddings.weight": (12, 8),
    "embeddings.LayerNorm.weight": (8,),
    "encoder.layer.0.attention.self.query.weight": (8, 8),
    "encoder.layer.0.attention.self.query.bias": (8,),
    "encoder.layer.1.output.dense.weight": (10, 8),
}


# --------------------------------------------------------------------------- the oracle (paper, entry by entry)


def oracle(base: dict, experts: dict, mode: str = "model") -> tuple[dict, dict, dict]:
    """(bodies per task, unified body, λ per task) from the paper's formula, one entry at a time in float64."""
    names = [n for n in base if any(not torch.equal(e[n], base[n]) for e in experts.values())]
    tasks = list(experts)
    unified, masks = {}, {t: {} for t in tasks}
    for n in names:
        b = base[n].double().reshape(-1).tolist()
        taus = {t: [x - y for x, y in zip(experts[t][n].double().reshape(-1).tolist(), b)] for t in tasks}
        uni = []
        for i in range(len(b)):
            total = sum(taus[t][i] for t in tasks)
            gamma = (total > 0) - (total < 0)
            agreeing = [abs(taus[t][i]) for t in tasks if taus[t][i] * gamma > 0]
            uni.append(gamma * max(agreeing, default=0.0))
        unified[n] = uni
        for t in tasks:
            masks[t][n] = [taus[t][i] * uni[i] > 0 for i in range(len(b))]
    lam = {}
    for t in tasks:
        num = den = 0.0
        for n in names:
            tau = [x - y for x, y in zip(experts[t][n].double().reshape(-1).tolist(), base[n].double().reshape(-1).tolist())]
            kept = [abs(u) if m else 0.0 for u, m in zip(unified[n], masks[t][n])]
            scale = 1.0 / len(tau) if mode == "tensor_means" else 1.0
            num += sum(abs(x) for x in tau) * scale
            den += sum(kept) * scale
        lam[t] = 1.0 if mode == "none" or den == 0 else num / den
    bodies = {}
    for t in tasks:
        body = {}
        for n, tensor in base.items():
            if n not in names:
                body[n] = tensor.double()
                continue
            flat = [x + (lam[t] * u if m else 0.0) for x, u, m in
                    zip(tensor.double().reshape(-1).tolist(), unified[n], masks[t][n])]
            body[n] = torch.tensor(flat, dtype=torch.float64).reshape(tensor.shape)
        bodies[t] = body
    uni_body = {n: (t.double() + torch.tensor(unified[n], dtype=torch.float64).reshape(t.shape)) if n in names
                else t.double() for n, t in base.items()}
    return bodies, uni_body, lam


def _random_models(n_experts=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}
    experts = {f"t{i}": {n: (b.float() + 0.1 * torch.randn(b.shape, generator=g)).to(dtype) for n, b in base.items()}
               for i in range(n_experts)}
    # one entry where the tasks cancel exactly (sgn 0: τ_uni = 0, every body keeps the base there)
    name = "encoder.layer.0.attention.self.query.weight"
    for i, delta in enumerate((0.25, -0.25, 0.0)[:n_experts]):
        experts[f"t{i}"][name][0, 0] = base[name][0, 0] + delta
    return base, experts


def _expert_set(base, experts) -> ExpertSet:
    sources = {name: ModelSource.from_state_dict(name, dict(sd)) for name, sd in experts.items()}
    return check_homology(ModelSource.from_state_dict("base", dict(base)), sources)


def _merge(base, experts, **params):
    expert_set = _expert_set(base, experts)
    return MergeEngine(expert_set, cache=False).merge(MergeSettings.build(expert_set, "emr", params))


def _assert_bodies(got: dict, want: dict, atol=1e-6):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name].double(), want[name], atol=atol, rtol=0), name


# --------------------------------------------------------------------------- formula


@pytest.mark.parametrize("mode", ["model", "tensor_means", "none"])
def test_bodies_match_the_paper_formula_with_model_wide_rescalers(mode):
    base, experts = _random_models()
    want, unified, lam = oracle(base, experts, mode)
    result = _merge(base, experts, rescalers=mode)
    assert set(result.task_bodies) == set(experts)
    for task in experts:
        _assert_bodies(result.task_bodies[task], want[task])
    # λ really is model-wide: one scalar per task, not 1, and the three summations differ
    if mode != "none":
        assert all(not math.isclose(v, 1.0) for v in lam.values())
    # the cancelled entry keeps the base in every body
    name = "encoder.layer.0.attention.self.query.weight"
    assert all(result.task_bodies[t][name][0, 0] == base[name][0, 0] for t in experts)
    # .tensors is the labelled unified body θ0 + τ_uni, never a task's model
    _assert_bodies(result.tensors, unified)
    assert "unified" in result.tensors_label and "task_bodies" in result.tensors_label
    assert result.body_for("t1") is result.task_bodies["t1"]


def test_rescaler_modes_give_different_lambdas():
    base, experts = _random_models()
    lams = {mode: oracle(base, experts, mode)[2] for mode in ("model", "tensor_means")}
    assert any(abs(lams["model"][t] - lams["tensor_means"][t]) > 1e-3 for t in experts)


def test_a_lambda_scales_the_masked_unified_vector_exactly():
    """Two experts: where they agree in sign the unified entry is the larger one; where they disagree, the larger
    magnitude's sign wins and only its task keeps the entry; λ_t = Σ|τ_t| / Σ|M_t τ_uni| (here by hand)."""
    base = {"w": torch.zeros(4)}
    experts = {"a": {"w": torch.tensor([1.0, -2.0, 0.5, 0.0])}, "b": {"w": torch.tensor([3.0, 1.0, -0.25, 0.0])}}
    result = _merge(base, experts)
    # τ_uni = [3, -2, 0.5, 0]; M_a = [1, 1, 1, 0], M_b = [1, 0, 0, 0]
    lam_a, lam_b = 3.5 / 5.5, 4.25 / 3.0
    assert torch.allclose(result.task_bodies["a"]["w"], lam_a * torch.tensor([3.0, -2.0, 0.5, 0.0]))
    assert torch.allclose(result.task_bodies["b"]["w"], lam_b * torch.tensor([3.0, 0.0, 0.0, 0.0]))
    assert torch.equal(result.tensors["w"], torch.tensor([3.0, -2.0, 0.5, 0.0]))


def test_an_expert_equal_to_the_base_gets_the_base():
    base, experts = _random_models(2)
    experts["same"] = {n: t.clone() for n, t in base.items()}
    result = _merge(base, experts)
    _assert_bodies(result.task_bodies["same"], {n: t.double() for n, t in base.items()}, atol=0)


# --------------------------------------------------------------------------- engine contract


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_chunked_task_bodies_equal_whole_ones(dtype, monkeypatch):
    base, experts = _random_models(3, seed=4, dtype=dtype)
    whole = _merge(base, experts)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 4 * 8 * 3)  # 3 rows a chunk: every matrix in several chunks
    chunked = _merge(base, experts)
    for task in experts:
        for name in base:
            assert torch.equal(whole.task_bodies[task][name], chunked.task_bodies[task][name]), (task, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_experts_merge_finite_and_match_the_oracle(dtype):
    base, experts = _random_models(3, seed=5, dtype=dtype)
    result = _merge(base, experts)
    want, _, _ = oracle(base, experts)
    for task in experts:
        assert all(torch.isfinite(t).all() for t in result.task_bodies[task].values())
        _assert_bodies(result.task_bodies[task], want[task], atol=1e-5)


def test_deterministic_and_seed_free():
    base, experts = _random_models()
    expert_set = _expert_set(base, experts)
    runs = [MergeEngine(expert_set, cache=False).merge(MergeSettings.build(expert_set, "emr", {}, seed=s))
            for s in (0, 0, 123)]
    for task in experts:
        for name in base:
            assert torch.equal(runs[0].task_bodies[task][name], runs[1].task_bodies[task][name])
            assert torch.equal(runs[0].task_bodies[task][name], runs[2].task_bodies[task][name])


def test_cache_keys_are_per_task_and_rescalers_computed_once(monkeypatch):
    base, experts = _random_models()
    expert_set = _expert_set(base, experts)
    eng = MergeEngine(expert_set)
    settings = MergeSettings.build(expert_set, "emr", {})
    import merging.methods.emr as emr

    calls = []  # _row_sums runs twice per task in the pre-pass only (Σ|τ_t| and Σ|M_t τ_uni| of a tensor)
    original = emr._row_sums
    monkeypatch.setattr(emr, "_row_sums", lambda values: calls.append(1) or original(values))
    per_pass = 2 * len(experts) * len(SHAPES)
    first = eng.merge(settings)
    assert len(calls) == per_pass  # one pre-pass for the unified body and every task
    again = eng.merge(settings)
    assert again.recomputed == [] and len(calls) == per_pass
    assert not torch.equal(first.task_bodies["t0"][next(iter(base))], first.task_bodies["t1"][next(iter(base))])
    other = eng.merge(MergeSettings.build(expert_set, "emr", {"rescalers": "none"}))
    assert other.recomputed and len(calls) == 2 * per_pass


def test_single_body_paths_refuse_emr_with_a_clear_message():
    base, experts = _random_models()
    with pytest.raises(MergeLabError, match="one body per task"):
        merge_state_dicts(base, experts, "emr")
    result = MergeEngine(_expert_set(base, experts)).merge(MergeSettings.build(_expert_set(base, experts), "ties"))
    assert result.task_bodies == {} and result.body_for("t0") is result.tensors


def test_declaration_says_one_body_per_task():
    spec = get_method("emr")
    assert spec.per_task_bodies and spec.paper_url == "https://arxiv.org/abs/2405.17461"
    assert spec.mergekit_name is None and spec.describe()["per_task_bodies"] is True
    assert "one body per task" in spec.pretty_name and spec.param("rescalers").help
    assert get_method("ties").per_task_bodies is False


# --------------------------------------------------------------------------- export, replay, CLI, mergekit


def _model_oracle(expert_set: ExpertSet) -> dict[str, dict[str, torch.Tensor]]:
    """The oracle over a loaded model's merged tensors (base names)."""
    names = [n for n, i in expert_set.layout.tensors.items() if i.role == ROLE_MERGE]
    base = {n: expert_set.base.get(n).float() for n in names}
    experts = {e: {n: x.get(n).float() for n in names} for e, x in expert_set.experts.items()}
    return oracle(base, experts)[0]


def _recipe(base, experts, **params):
    return Recipe.from_dict({"method": "emr", "base": str(base), "parameters": params,
                             "experts": [{"name": f"e{i}", "model": str(e)} for i, e in enumerate(experts)]})


def _folder_body(folder, expert_set, expert):
    prefix = expert_set.experts[expert].prefix
    tensors = load_file(str(folder / "model.safetensors"))
    return {n: tensors[prefix + n] for n, i in expert_set.layout.tensors.items() if i.role == ROLE_MERGE}, tensors


def test_export_writes_each_classifier_task_its_own_body_and_head(tmp_path):
    base, experts = tm.family(tmp_path, "bert", 2, expert_kind="bert_cls")
    recipe = _recipe(base, experts)
    expert_set = ExpertSet.load(str(base), {f"e{i}": str(e) for i, e in enumerate(experts)})
    want = _model_oracle(expert_set)
    report = export_recipe(recipe, tmp_path / "out")
    assert set(report.folders) == {"e0", "e1"}
    for expert in ("e0", "e1"):
        body, tensors = _folder_body(report.folders[expert], expert_set, expert)
        _assert_bodies(body, want[expert], atol=1e-5)
        for head, value in expert_set.experts[expert].head().items():
            assert torch.equal(tensors[head], value)
        assert "own body" in (report.folders[expert] / "README.md").read_text()
    assert not (report.root / "mergekit.yaml").exists()
    # replay of the exported recipe reproduces the bodies written
    replayed = merge_recipe(Recipe.from_yaml((report.root / "recipe.yaml").read_text(), source=report.root / "recipe.yaml"))
    for expert in ("e0", "e1"):
        body, _ = _folder_body(report.folders[expert], expert_set, expert)
        for name, tensor in body.items():
            assert torch.equal(tensor, replayed.task_bodies[expert][name].to(tensor.dtype)), name


def test_headless_causal_lms_get_one_folder_per_expert_via_the_cli(tmp_path):
    base, experts = tm.family(tmp_path, "gpt2", 2)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(base, experts, rescalers="tensor_means").to_dict()))
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 0
    expert_set = ExpertSet.load(str(base), {f"e{i}": str(e) for i, e in enumerate(experts)})
    names = [n for n, i in expert_set.layout.tensors.items() if i.role == ROLE_MERGE]
    want = oracle({n: expert_set.base.get(n).float() for n in names},
                  {e: {n: x.get(n).float() for n in names} for e, x in expert_set.experts.items()},
                  "tensor_means")[0]
    for expert in ("e0", "e1"):
        body, _ = _folder_body(tmp_path / "out" / expert, expert_set, expert)
        _assert_bodies(body, want[expert], atol=1e-5)
    bodies = merge_recipe_task_bodies(Recipe.from_yaml(path.read_text(), source=path))
    for expert in ("e0", "e1"):
        _assert_bodies(bodies[expert], want[expert], atol=1e-5)
    with pytest.raises(MergeLabError, match="one body per task"):
        merge_recipe_body(Recipe.from_yaml(path.read_text(), source=path))


def test_mergekit_export_refuses_emr_by_name(tmp_path):
    recipe = Recipe.from_dict({"method": "emr", "base": "b", "experts": [{"model": "x"}, {"model": "y"}]})
    with pytest.raises(MergeLabError, match="mergekit has no .emr. method .EMR-Merging.*one body per task"):
        to_mergekit_yaml(recipe)


# --------------------------------------------------------------------------- probe


def test_prober_scores_each_task_on_its_own_body(toy_zoo):
    from merging.zoo.probe import Prober

    recipe = Recipe.from_dict({"method": "emr", "base": str(toy_zoo.base_path),
                               "experts": [{"name": t, "model": str(toy_zoo.experts[t])} for t in toy_zoo.tasks]})
    result = merge_recipe(recipe)
    prober = Prober.for_zoo(toy_zoo, disk_cache=False)
    row = prober.probe_task_bodies(result.task_bodies, name="emr")
    unified = Prober.for_zoo(toy_zoo, disk_cache=False).probe_body(result.tensors)
    for task in toy_zoo.tasks:
        own = Prober.for_zoo(toy_zoo, disk_cache=False).probe_body(result.task_bodies[task])
        assert row.metrics[task] == pytest.approx(own.metrics[task], rel=1e-6)
    # it would fail if the probe used the unified body (or one task's body for every task)
    assert any(abs(row.metrics[t]["loss"] - unified.metrics[t]["loss"]) > 1e-4 for t in toy_zoo.tasks)
    with pytest.raises(MergeLabError, match="no body for task"):
        prober.probe_task_bodies({toy_zoo.tasks[0]: result.task_bodies[toy_zoo.tasks[0]]})


def test_workbench_merge_probe_export_label_and_score_per_task(loaded):
    from merging import workbench as wb
    from merging.workbench.merge import merged_result
    from merging.zoo.probe import Prober

    session, zoo = loaded
    summary = wb.merge(session, "emr", {})
    assert summary.label.endswith("emr (one body per task)")
    report = wb.run_probe(session)
    row = report.row(summary.label)
    result = merged_result(session)
    for task in session.refs:
        own = Prober.for_zoo(zoo, disk_cache=False).probe_body(result.task_bodies[task])
        assert row.metrics[task] == pytest.approx(own.metrics[task], rel=1e-6)
    headers, rows = wb.history_rows(session)
    assert rows[-1][0] == summary.label
    # Try a sentence: each task's "merged" prediction comes from that task's own body
    preds = wb.predict(session, "w1 w2 w3")
    assert {r[1] for r in preds} == {"base", "expert", "merged"}
    names = wb.read_zip_names(wb.export(session))
    for task in session.refs:
        assert f"{task}/model.safetensors" in names
    assert "mergekit.yaml" not in names
