"""Causal LMs end to end: task data, the LM loss, APL / Fisher / calibration on it, the probe, the CLI.

Tiny GPT-2, Llama and Qwen2 (tied LM head) families built from config (transformers 5), saved as
safetensors folders with a word-level tokenizer; each expert is fine-tuned a few seeded steps on its
own text, so deltas are real and each expert beats the base on its task.
"""

import json

import apl_fixtures as fx
import numpy as np
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F

from merging import MergeLabError
from merging.apl.importance import compute_importance
from merging.io.experts import ExpertSet
from merging.io.taskdata import LMExample, read_examples, tokenizer_of

FAMILIES = {"gpt2": ("gpt2", None), "llama": ("llama", None), "qwen2_tied": ("qwen2", True),
            "mistral": ("mistral", None)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with fx.one_thread():
        yield


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """kind → (base folder, {task: expert folder}, {task: data file}), built once per module."""
    built = {}

    def get(kind):
        if kind not in built:
            arch, tied = FAMILIES[kind]
            built[kind] = tm.lm_family(tmp_path_factory.mktemp(kind), arch, tied=tied)
        return built[kind]

    return get


def _open(family, kind):
    base, experts, data = family(kind)
    expert_set = ExpertSet.load(base, experts)
    return expert_set, {t: read_examples(f) for t, f in data.items()}, tokenizer_of(expert_set)


# ---- task data --------------------------------------------------------------------------------

def test_lm_task_files_in_every_documented_format(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2 w3\n\nw4 w5\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "w1 w2"}\n{"text": "w3"}\n', encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"prompt": "w1", "completion": "w2 w3"}\n', encoding="utf-8")
    assert read_examples(tmp_path / "a.txt") == [LMExample("", "w1 w2 w3"), LMExample("", "w4 w5")]
    assert read_examples(tmp_path / "b.jsonl") == [LMExample("", "w1 w2"), LMExample("", "w3")]
    assert read_examples(tmp_path / "c.jsonl") == [LMExample("w1", "w2 w3")]
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(MergeLabError, match="d.jsonl line 2 is a lm row but earlier rows are not"):
        read_examples(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text('{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(MergeLabError, match="line 1: 'completion' must be a string"):
        read_examples(tmp_path / "e.jsonl")
    (tmp_path / "f.jsonl").write_text('{"txt": "a"}\n', encoding="utf-8")
    with pytest.raises(MergeLabError, match="has none of text, label, prompt, completion"):
        read_examples(tmp_path / "f.jsonl")


# ---- layout -----------------------------------------------------------------------------------

def test_lm_layouts_rows_units_and_heads(family):
    gpt2, _, _ = _open(family, "gpt2")
    layout = gpt2.layout
    assert layout.layers == ["embeddings", "0", "1", "head"]
    c_attn = layout["transformer.h.0.attn.c_attn.weight"]
    assert (c_attn.kind, c_attn.unit_axis, c_attn.n_units) == ("qkv", 1, 48)  # Conv1D [in, 3·out]: columns
    assert layout["transformer.h.0.mlp.c_fc.weight"].unit_axis == 1
    assert layout["transformer.wte.weight"].layer == "embeddings" and layout.tied_embeddings
    assert layout["transformer.ln_f.weight"].layer == "head"
    llama, _, _ = _open(family, "llama")
    head = llama.layout["lm_head.weight"]
    assert (head.layer, head.kind, head.role, head.unit_axis) == ("head", "lm_head", "merge", 0)
    assert llama.layout["model.norm.weight"].layer == "head"
    assert {llama.layout[f"model.layers.0.mlp.{m}_proj.weight"].kind for m in ("gate", "up", "down")} == \
        {"ffn_in", "ffn_out"}
    qwen, _, _ = _open(family, "qwen2_tied")
    assert qwen.layout.tied_embeddings and not any("lm_head" in n for n in qwen.layout.merged_names())
    for expert_set in (gpt2, llama, qwen):
        assert all(not e.head_names for e in expert_set.experts.values())  # the LM head is body, not a task head


def test_gpt2_conv1d_units_are_the_output_columns(family):
    """Switching unit j of c_attn (column j of the [in, out] weight, bias j) changes output feature j only."""
    from transformers import AutoModelForCausalLM

    from merging.io.layout import unit_slice

    base, experts, _ = family("gpt2")
    expert_set = ExpertSet.load(base, experts)
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    expert = expert_set.experts["count"]
    seen = {}
    module = model.transformer.h[0].attn.c_attn
    module.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out.detach().clone()))
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    with torch.no_grad():
        model(input_ids=ids)
        before = seen["out"]
        for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"):
            where = unit_slice(expert_set.layout[name], [7])
            param = dict(model.named_parameters())[name]
            param[where] = expert.get(name)[where]
        model(input_ids=ids)
    changed = (seen["out"] - before).abs().amax(dim=(0, 1)) > 0
    assert changed.nonzero().flatten().tolist() == [7]


# ---- the loss -----------------------------------------------------------------------------------

def _by_hand(model, tokenizer, example: LMExample) -> tuple[float, int]:
    """Σ −log p(completion token | everything before it) and the count, one unpadded sequence at a time."""
    prompt = tokenizer(example.prompt)["input_ids"]
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    start = max(len(prompt), 1)
    return -sum(float(logp[pos - 1, ids[0, pos]]) for pos in range(start, ids.shape[1])), ids.shape[1] - start


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lm_loss_is_completion_cross_entropy_ignoring_prompt_and_padding(family, kind):
    from merging.apl.taskloss import body_state, task_loss

    expert_set, _, tokenizer = _open(family, kind)
    rows = [LMExample("w1 w2 w3 w4", "w5 w6"), LMExample("w9", "w10 w11 w12 w13"), LMExample("", "w20 w21 w22")]
    task = task_loss(expert_set, "count", {"count": rows}, tokenizer, body_state(expert_set, "count"), purpose="t")
    parts = [_by_hand(task.model, tokenizer, row) for row in rows]
    assert float(task.loss()) == pytest.approx(sum(s for s, _ in parts) / sum(n for _, n in parts), rel=1e-5)
    for index, (total, count) in enumerate(parts):
        assert float(task.example_loss(index)) == pytest.approx(total / count, rel=1e-5)
    # targets are exactly the completion tokens (a text row's BOS prompt makes its first word a target)
    assert [n for _, n in parts] == [2, 4, 3]


def test_lm_gradient_equals_exact_on_a_loss_linear_in_the_parameters(family):
    """⟨c, θ⟩ is exactly its own first-order expansion, so gradient and exact APL agree at every level —
    over the GPT-2 layout, Conv1D column units included."""
    expert_set, _, _ = _open(family, "gpt2")
    generator = torch.Generator().manual_seed(0)
    coeff = {n: torch.randn(expert_set.layout[n].shape, generator=generator) for n in expert_set.layout.merged_names()}

    def linear(state):
        return sum((coeff[n].double() * state[n].double()).sum() for n in coeff)

    runs = {mode: compute_importance(expert_set, None, None, mode=mode, level="all", loss_fn=linear)
            for mode in ("exact", "gradient")}
    for level in ("model", "layer", "module"):
        np.testing.assert_allclose(runs["exact"].matrix(level, False), runs["gradient"].matrix(level, False),
                                   rtol=1e-4, atol=1e-4)
    assert "transformer.h.1.attn.c_attn" in runs["exact"].units
    for module, exact in runs["exact"].units.items():
        np.testing.assert_allclose(exact, runs["gradient"].units[module], rtol=1e-3, atol=1e-4, err_msg=module)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_every_lm_family_is_scored_and_calibrated(family, kind):
    """Gradient APL at every level, then calibration: every layer row gets a drop ratio and a weight, and
    the parameter-weighted keep rate is 1 − p̄ exactly."""
    from merging.apl.calibration import calibrate, droppable_counts

    expert_set, examples, tokenizer = _open(family, kind)
    result = compute_importance(expert_set, {t: rows[:8] for t, rows in examples.items()}, tokenizer, level="all")
    assert set(result.partitions["layer"]) == {"embeddings", "0", "1", "head"}
    assert all(np.isfinite(result.matrix(lv)).all() and result.matrix(lv).any() for lv in ("model", "layer", "module"))
    table = calibrate(result, expert_set, drop_ratio=0.4, tau1=0.5)
    counts = droppable_counts(expert_set.layout)
    for task in examples:
        keep = {layer: 1 - p for layer, p in table.drop[task].items()}
        active = [layer for layer in counts if counts[layer]]
        mean = sum(counts[k] * keep[k] for k in active) / sum(counts[k] for k in active)
        assert mean == pytest.approx(0.6, abs=1e-6)
        assert len(set(round(v, 6) for v in table.drop[task].values())) > 1


@pytest.mark.parametrize("kind", ["llama", "qwen2_tied"])
def test_lm_exact_restore_matches_a_transformers_model_loaded_by_hand(family, kind):
    """Oracle: the base loaded by transformers, one layer swapped for the expert's, loss by hand."""
    from transformers import AutoModelForCausalLM

    expert_set, examples, tokenizer = _open(family, kind)
    rows = examples["count"][:6]
    result = compute_importance(expert_set, {"count": rows, "echo": examples["echo"][:6]}, tokenizer, mode="exact",
                                level="layer")
    base, experts, _ = family(kind)
    layer = "head" if kind == "llama" else "embeddings"  # untied lm_head + norm; tied embeddings (both uses)
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    with torch.no_grad():
        params = dict(model.named_parameters())
        swapped = [n for n in expert_set.layout.layer_tensors()[layer]]
        def pooled():
            parts = [_by_hand(model, tokenizer, row) for row in rows]
            return sum(s for s, _ in parts) / sum(n for _, n in parts)
        reference = pooled()
        for name in swapped:
            params[name].copy_(expert_set.experts["count"].get(name))
        changed = pooled()
    assert result.scores("count", "layer", absolute=False)[layer] == pytest.approx(changed - reference, rel=1e-3,
                                                                                   abs=1e-5)
    assert result.start_loss["count"] == pytest.approx(reference, rel=1e-5)


def test_lm_gradient_tracks_exact_for_small_deltas(family):
    """At small deltas the first-order score is the exact loss change (the real LM loss, Llama)."""
    from merging.io.experts import check_homology
    from merging.io.sources import ModelSource

    expert_set, examples, tokenizer = _open(family, "llama")
    generator = torch.Generator().manual_seed(1)
    base = {n: expert_set.base.get(n) for n in expert_set.base.tensors}
    small = {n: v + 1e-3 * torch.randn(v.shape, generator=generator) for n, v in base.items()}
    config = expert_set.base.config
    tiny = check_homology(ModelSource.from_state_dict("base", base, config),
                          {"count": ModelSource.from_state_dict("count", small, config)})
    runs = {mode: compute_importance(tiny, {"count": examples["count"][:8]}, tokenizer, mode=mode, level="module")
            for mode in ("exact", "gradient")}
    exact, grad = runs["exact"].matrix("module", False)[0], runs["gradient"].matrix("module", False)[0]
    assert np.abs(exact - grad).max() < 0.05 * np.abs(exact).max()


def test_lm_fisher_is_the_mean_squared_per_example_gradient(family):
    """Oracle: per-example losses by hand on a transformers model loaded from the expert folder."""
    from transformers import AutoModelForCausalLM

    from merging.apl.fisher import compute_fisher

    expert_set, examples, tokenizer = _open(family, "gpt2")
    rows = {t: examples[t][:3] for t in examples}
    result = compute_fisher(expert_set, rows, tokenizer)
    name = "transformer.h.1.mlp.c_fc.weight"
    model = AutoModelForCausalLM.from_pretrained(str(family("gpt2")[1]["echo"])).eval()
    param = dict(model.named_parameters())[name]
    total = torch.zeros_like(param)
    for row in rows["echo"]:
        ids = torch.tensor([tokenizer(row.prompt)["input_ids"] + tokenizer(row.completion, add_special_tokens=False)["input_ids"]])
        n_prompt = len(tokenizer(row.prompt)["input_ids"])
        logits = model(input_ids=ids).logits[0]
        loss = F.cross_entropy(logits[n_prompt - 1:-1], ids[0, n_prompt:])
        (grad,) = torch.autograd.grad(loss, param)
        total += grad * grad
    torch.testing.assert_close(result.diagonals["echo"][name], total / 3, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lm_regmean_grams_are_the_inputs_of_each_linear_layer(family, kind):
    """Oracle: a transformers model loaded from the expert folder, run on each example unpadded, with a hook
    collecting the inputs of one projection (Conv1D for GPT-2): G = XᵀX / tokens."""
    from transformers import AutoModelForCausalLM

    from merging.apl.regmean import compute_grams

    expert_set, examples, tokenizer = _open(family, kind)
    rows = {t: examples[t][:4] for t in examples}
    grams = compute_grams(expert_set, rows, tokenizer)
    name, module_path = {"gpt2": ("transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj"),
                         "llama": ("model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj")}[kind]
    model = AutoModelForCausalLM.from_pretrained(str(family(kind)[1]["count"])).eval()
    seen = []
    model.get_submodule(module_path).register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0][0].detach()))
    with torch.no_grad():
        for row in rows["count"]:
            ids = tokenizer(row.prompt)["input_ids"] + tokenizer(row.completion, add_special_tokens=False)["input_ids"]
            model(input_ids=torch.tensor([ids]))
    x = torch.cat(seen).double()
    torch.testing.assert_close(grams.grams["count"][name].double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    assert ("lm_head.weight" in grams.grams["count"]) == (kind == "llama")  # an untied head is a linear layer


def test_classifier_data_for_an_lm_is_refused_with_what_to_attach(family):
    expert_set, _, tokenizer = _open(family, "llama")
    with pytest.raises(MergeLabError, match="is a causal LM but its task data has labels"):
        compute_importance(expert_set, {e: [("w1 w2", 0)] for e in expert_set.experts}, tokenizer)


# ---- replay, CLI, workbench -------------------------------------------------------------------

def test_recipe_with_a_text_only_fewshot_file_replays(family, tmp_path):
    """An uncalibrated APL recipe whose few-shot records name text-only files (.txt and {"text"} JSONL)
    replays: the importance is recomputed from those rows, equal to computing it directly."""
    from merging.engine import MergeEngine, MergeSettings
    from merging.io.recipe import Recipe
    from merging.io.replay import merge_recipe
    from merging.methods import get_method

    base, experts, data = family("gpt2")
    txt = tmp_path / "echo.txt"
    txt.write_text("".join(f"{r.prompt} {r.completion}\n" for r in read_examples(data["echo"])), encoding="utf-8")
    recipe = Recipe.from_dict({"method": "apl", "base": str(base),
                               "experts": [{"name": t, "model": str(p)} for t, p in experts.items()],
                               "parameters": {"drop_ratio": 0.3}, "seed": 3,
                               "few_shot": {"count": {"file": str(data["count"]), "indices": [0, 2, 4, 6]},
                                            "echo": {"file": "echo.txt"}}}, source=tmp_path / "r.yaml")
    merged = merge_recipe(recipe).tensors
    expert_set = ExpertSet.load(base, experts)
    examples = {"count": [read_examples(data["count"])[i] for i in (0, 2, 4, 6)], "echo": read_examples(txt)}
    prepared = get_method("apl").prepare(expert_set, examples, tokenizer_of(expert_set), params={"drop_ratio": 0.3})
    settings = MergeSettings.build(expert_set, get_method("apl"), recipe.parameters, prepared["expert_params"],
                                   recipe.seed, prepared["extras"])
    direct = MergeEngine(expert_set).merge(settings).tensors
    assert len(set(prepared["expert_params"]["echo"]["drop_ratio"].values())) > 1  # importance shaped the drops
    for name, tensor in merged.items():
        assert torch.equal(tensor, direct[name]), name
    assert any(not torch.equal(merged[n], expert_set.base.get(n).float()) for n in expert_set.layout.merged_names())


def _run(argv, capsys):
    from merging.cli.main import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_importance_calibrate_merge_probe_through_the_cli(family, tmp_path, capsys):
    base, experts, data = family("llama")
    models = ["--base", str(base)] + [a for t, p in experts.items() for a in ("--expert", f"{t}={p}")] + \
        [a for t, f in data.items() for a in ("--data", f"{t}={f}")]
    imp = tmp_path / "imp.json"
    code, out, err = _run(["importance", *models, "--n-fewshot", "8", "--level", "all", "--out", str(imp), "--json"],
                          capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["experts"] == ["count", "echo"] and summary["fewshot"] == {"count": 8, "echo": 8}
    assert all(v < 0 for v in summary["model"].values())  # fine-tuning lowers each expert's own loss
    recipe = tmp_path / "apl.yaml"
    code, out, err = _run(["calibrate", *models, "--importance", str(imp), "--drop-ratio", "0.4", "--out", str(recipe),
                           "--json"], capsys)
    assert code == 0, err
    drops = json.loads(out)["drop_ratio"]
    assert set(drops["count"]) == {"embeddings", "0", "1", "head"}
    code, out, err = _run(["merge", str(recipe), "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    code, out, err = _run(["probe", *models, "--n-fewshot", "8", "--recipe", str(recipe), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["kind"] == "causal_lm" and [r["name"] for r in report["rows"]] == ["base", "count", "echo", "merged"]
    loss = {r["name"]: {t: m["loss"] for t, m in r["metrics"].items()} for r in report["rows"]}
    for task in ("count", "echo"):
        assert loss[task][task] < loss["base"][task]  # each expert learned its own task
        assert loss["merged"][task] < loss["base"][task]  # and the merge kept some of it
        metrics = next(r for r in report["rows"] if r["name"] == "merged")["metrics"][task]
        assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]))
    # held out = the 16 rows outside the recipe's 8 few-shot indices: 8 target words per count text (after
    # BOS), 4 completion words per echo row — the probe never scores a few-shot row or a prompt token
    merged_row = next(r for r in report["rows"] if r["name"] == "merged")["metrics"]
    assert {t: m["tokens"] for t, m in merged_row.items()} == {"count": 16 * 8, "echo": 16 * 4}
    record = json.loads(imp.read_text())["fewshot"]
    assert all(len(ix) == 8 for ix in record.values())


def test_cli_errors_are_one_clear_line(family, tmp_path, capsys):
    base, experts, data = family("gpt2")
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text('{"text": "w1 w2", "label": 0}\n' * 4, encoding="utf-8")
    expert_args = [a for t, p in experts.items() for a in ("--expert", f"{t}={p}")]
    cases = [
        (["probe", "--base", str(base), *expert_args, "--data", f"count={labelled}", "--data", f"echo={labelled}",
          "--n-fewshot", "2"], "causal LMs but their task data has labels"),
        (["importance", "--expert", f"count={experts['count']}", "--out", str(tmp_path / "x.json")], "need --base"),
        (["importance", "--base", str(base), *expert_args, "--data", f"count={data['count']}", "--out",
          str(tmp_path / "x.json")], "expert 'echo' has no task data"),
        (["probe", "--base", str(base), *expert_args, "--data", f"count={data['count']}", "--data",
          f"echo={data['echo']}", "--n-fewshot", "64"], "every row of the task data of 'count' is few-shot data"),
    ]
    # held-out files alone are enough for the probe (no few-shot data needed to score)
    code, out, err = _run(["probe", "--base", str(base), *expert_args, *[a for t, f in data.items()
                                                                      for a in ("--probe-data", f"{t}={f}")]], capsys)
    assert code == 0 and "| count |" in out, err
    for argv, message in cases:
        code, _, err = _run(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_workbench_lm_data_and_perplexity_rows(family, tmp_path):
    from merging import workbench as wb
    from merging.workbench.lm import attach_lm_data, lm_probe_rows

    base, experts, data = family("qwen2_tied")
    session = wb.load_experts(wb.Session(), str(base), {t: str(p) for t, p in experts.items()})
    session.fewshot_n = 8
    for task, file in data.items():
        attach_lm_data(session, task, file)
        assert len(session.data[task].fewshot) == 8 and len(session.data[task].probe) == 16
    headers, rows = lm_probe_rows(session)
    assert headers[:3] == ["model", "count loss", "count ppl"] and [r[0] for r in rows] == ["base", "count", "echo"]
    wb.compute_importance(session, n_fewshot=8)  # APL importance on the attached LM text
    wb.merge(session, "apl", {"drop_ratio": 0.2}, seed=0)
    headers, rows = lm_probe_rows(session)
    merged = rows[-1]
    assert len(rows) == 4 and merged[1] < rows[0][1] and merged[3] < rows[0][3]
    with pytest.raises(MergeLabError, match="holds labelled rows"):
        labelled = tmp_path / "l.jsonl"
        labelled.write_text('{"text": "w1", "label": 0}\n{"text": "w2", "label": 1}\n')
        attach_lm_data(session, "count", labelled)


def test_lm_probe_scores_base_and_experts_once_and_caches_them_on_disk(family, tmp_path, monkeypatch):
    from merging.lm import probe as probe_module
    from merging.lm.probe import LMProber

    expert_set, examples, tokenizer = _open(family, "gpt2")
    sets = {t: rows[:6] for t, rows in examples.items()}
    calls = []
    real = probe_module.lm_loss_terms
    monkeypatch.setattr(probe_module, "lm_loss_terms", lambda *a, **k: calls.append(1) or real(*a, **k))
    prober = LMProber(expert_set, sets, tokenizer, cache_dir=tmp_path)
    report = prober.report()
    assert [r["name"] for r in report.rows] == ["base", "count", "echo"] and len(calls) == 3 * 2  # rows × tasks
    echo_body = {n: expert_set.experts["echo"].get(n) for n in expert_set.layout.merged_names()}
    again = prober.report({"same as echo": echo_body})
    assert again.row("same as echo") == report.row("echo") and len(calls) == 3 * 2  # the loaded body: not rerun
    count_body = {n: expert_set.experts["count"].get(n) for n in expert_set.layout.merged_names()}
    assert prober.probe_body(count_body) == report.row("count") and len(calls) == 3 * 2 + 2
    second = LMProber(expert_set, sets, tokenizer, cache_dir=tmp_path)
    assert second.reference().rows == report.rows and len(calls) == 3 * 2 + 2  # read from the disk cache
    # the oracle: loss by hand over the held-out rows, perplexity its exponential
    parts = [_by_hand(prober.model, tokenizer, row) for row in sets["count"]]
    assert report.row("count")["count"]["loss"] == pytest.approx(sum(s for s, _ in parts) / sum(n for _, n in parts),
                                                                rel=1e-5)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_lm_probe_reruns_only_the_blocks_from_the_first_changed_one(family, kind):
    """A body changed from block 1 on skips block 0 (its recorded output stands in) and scores exactly as a
    fresh prober's full pass; a body changed in the embeddings runs every block."""
    from merging.lm.probe import LMProber

    expert_set, examples, tokenizer = _open(family, kind)
    sets = {t: rows[:5] for t, rows in examples.items()}
    prober = LMProber(expert_set, sets, tokenizer)
    prober.reference()
    calls = []
    prober.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    base = {n: expert_set.base.get(n) for n in expert_set.layout.merged_names()}
    late = dict(base)
    for name, info in expert_set.layout.tensors.items():
        if info.layer in ("1", "head") and name in late:
            late[name] = expert_set.experts["count"].get(name)
    prober.probe_body(base)  # back to the base: every block differs from the last expert, all run
    calls.clear()
    got = prober.probe_body(late)
    assert calls == [] and got != prober.reference().row("base")
    listless = LMProber(expert_set, sets, tokenizer)
    listless.blocks = None  # a family whose blocks are not one list: every row runs in full, never stale
    listless.probe_body(base)
    assert listless.probe_body(late) == got
    unbuffered = LMProber(expert_set, sets, tokenizer, reuse_bytes=0)  # nothing recorded: full passes
    unbuffered.probe_body(base)
    unbuffered.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    assert got == unbuffered.probe_body(late) and calls  # identical to a full pass
    calls.clear()
    early = dict(late)
    embed = next(n for n, i in expert_set.layout.tensors.items() if i.layer == "embeddings")
    early[embed] = expert_set.experts["echo"].get(embed)
    prober.probe_body(early)
    assert len(calls) == sum(len(b) for b in prober.batches.values())


def test_lm_probe_scores_a_merge_of_one_body_per_task_on_each_tasks_own_body(family, tmp_path):
    """EMR-style results: task t's row comes from body t (here: each expert's own weights, so the row must equal
    that expert's own-task score), never from one body for all tasks nor from the unified ``tensors``."""
    from types import SimpleNamespace

    from merging.lm.probe import LMProber

    expert_set, examples, tokenizer = _open(family, "llama")
    sets = {t: rows[:6] for t, rows in examples.items()}
    prober = LMProber(expert_set, sets, tokenizer)
    names = expert_set.layout.merged_names()
    bodies = {e: {n: x.get(n) for n in names} for e, x in expert_set.experts.items()}
    base = {n: expert_set.base.get(n) for n in names}
    report = prober.report({"per task": SimpleNamespace(task_bodies=bodies, tensors=base)})
    row = report.row("per task")
    for task in sets:
        assert row[task] == report.row(task)[task]  # the task's own expert, not the base in ``tensors``
    assert row != report.row("base")
