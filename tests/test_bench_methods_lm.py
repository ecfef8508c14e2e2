"""benchmarks/bench_methods.py on the tiny LM zoo: pools no training batch drew, selection by few-shot LM
loss, perplexity checked against the zoo build's own perplexity of an independently merged model, and
Localize-and-Stitch's mask loss on LM text (slow: the tiny LM zoo is trained once per session)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods_lm_under_test",
                                                  ROOT / "benchmarks" / "bench_methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lm_inputs(bench, lm_zoo, tiny_lm_spec):
    from merging.zoo.lm_zoo import lm_zoo_spec

    spec = lm_zoo_spec(lm_zoo.name, tiny_lm_spec[0])
    probes, _ = bench.probe_sets(lm_zoo, 20)
    held = {bench.example_text(e) for t in lm_zoo.tasks for e in lm_zoo.probe(t)}
    pools, info = bench.fewshot_pools(lm_zoo, 10_000, held, lm_spec=spec)
    return spec, probes, held, pools, info


def test_lm_pools_hold_no_text_the_expert_or_base_trained_on(bench, lm_zoo, lm_inputs):
    from merging.zoo.lm_zoo import read_texts, split_texts

    spec, _, held, pools, info = lm_inputs
    rng_rows = {}
    for text in spec["pretrain_texts"]:
        items = read_texts(spec, text)
        split = split_texts(items, 0, int(spec["n_probe"]), int(spec["n_fewshot"]), int(spec["max_items"]))
        rng_rows[text] = [items[i] for i in split["train"]]
    mix = [r for t in spec["pretrain_texts"] for r in rng_rows[t]]
    # the first batch of each training run: the head of its seeded permutation (independent of the replay)
    base_first = {mix[int(i)] for i in np.random.default_rng(0).permutation(len(mix))[:int(spec["pretrain"]["batch_size"])]}
    for task in lm_zoo.tasks:
        texts = {bench.example_text(e) for e in pools[task]}
        train = rng_rows[task]
        batch = int(lm_zoo.task_record(task)["train_config"]["batch_size"])
        expert_first = {train[int(i)] for i in np.random.default_rng(0).permutation(len(train))[:batch]}
        assert not texts & expert_first and not texts & base_first and not texts & held
        assert {bench.example_text(e) for e in lm_zoo.fewshot(task)} <= texts
        assert info[task]["pool"] > 3 * 16  # enough for three distinct draws of the shipped few-shot size
    draws = bench.check_draws(pools, 16, [0, 1, 2])
    assert all(d["max_overlap"] < 0.5 for d in draws.values())


def _perplexity_of(zoo, body: dict, rows) -> float:
    """The zoo build's perplexity (its own loop over an HF model), of ``body`` loaded into the base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merging.zoo.lm_zoo import perplexity

    model = AutoModelForCausalLM.from_pretrained(str(zoo.base_path)).float()
    names = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in body.items():
            names[name].copy_(value)
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.base_path))
    return perplexity(model, tokenizer, [r.completion for r in rows], 64)


def test_lm_protocol_selects_by_loss_and_scores_perplexity(bench, lm_zoo, lm_inputs):
    from merging.apl.taskloss import tokenizer_of
    from merging.io.experts import ExpertSet

    _, probes, _, pools, _ = lm_inputs
    tasks = list(lm_zoo.tasks)
    tokenizer = tokenizer_of(ExpertSet.load(lm_zoo.base_path, {t: f"zoo:{lm_zoo.name}/{t}" for t in tasks}))
    setting = bench.build_setting("all", tasks, lm_zoo, pools, probes, [0, 1], 8, tokenizer)
    assert setting.lm and setting.metric == "perplexity"
    base = {n: setting.expert_set.base.get(n).float() for n in setting.base}
    for task in tasks:  # the base's perplexity, by the build's own loop
        assert setting.base_metric[task] == pytest.approx(_perplexity_of(lm_zoo, base, probes[task]), rel=1e-4)
    run = bench.run_of("task arithmetic", "task_arithmetic", [{}], [0.3, 0.6, 1.0], deterministic=True)
    out = bench.run_method(setting, run, [0, 1], tokenizer, {}, lambda _m: None)
    for result in out.values():
        assert result.best.loss == min(t.loss for t in result.trials) and len(result.trials) == 3
        lam = result.best.lam
        merged = {n: b + lam * sum(setting.expert_set.experts[t].get(n).float() - b for t in tasks)
                  for n, b in base.items()}
        for task in tasks:
            assert result.accuracy[task] == pytest.approx(_perplexity_of(lm_zoo, merged, probes[task]), rel=1e-3)
            assert result.ratio[task] == pytest.approx(result.accuracy[task] / setting.base_metric[task])
        assert bench.summary(result) == pytest.approx(np.mean(list(result.ratio.values())))
    # few-shot losses differ by seed: the draws differ
    assert out[0].trials[0].loss != out[1].trials[0].loss


def test_localize_stitch_mask_loss_on_lm_text_is_the_causal_lm_loss(lm_zoo):
    from merging.apl.taskloss import CausalLMLoss, body_state, tokenizer_of
    from merging.io.experts import ExpertSet
    from merging.lm.model import encode_lm_examples
    from merging.methods.localize_stitch import _lm_mask_losses

    es = ExpertSet.load(lm_zoo.base_path, {t: f"zoo:{lm_zoo.name}/{t}" for t in lm_zoo.tasks})
    tokenizer = tokenizer_of(es)
    examples = {t: lm_zoo.fewshot(t)[:6] for t in lm_zoo.tasks}
    fns = _lm_mask_losses(es, examples, tokenizer, 32)
    for task in lm_zoo.tasks:
        reference = CausalLMLoss(es, task, encode_lm_examples(tokenizer, examples[task], 32))
        state = body_state(es, task)
        reference.assign(state)
        with torch.no_grad():
            expected = float(reference.loss())
        live = {n: v.clone().requires_grad_(True) for n, v in state.items()}
        loss = fns[task](live, 0)
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        loss.backward()
        assert all(v.grad is not None for v in live.values())
