"""Causal-LM experts through the page's workbench calls: text attached per expert, the perplexity probe
that run_probe dispatches to, the history's perplexity columns, and "try a prompt" generation."""

from __future__ import annotations

import json
import math

import apl_fixtures as fx
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F

from merging import MergeLabError
from merging import workbench as wb
from merging.cancel import Cancelled, CancelToken, cancellable
from merging.workbench.merge import merged_result


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with fx.one_thread():
        yield


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base and two fine-tuned experts; ``count``'s task text as a .txt file (one example a
    line), ``echo``'s as JSONL prompt/completion rows."""
    tmp = tmp_path_factory.mktemp("lmpage")
    base, experts, data = tm.lm_family(tmp, "llama")
    txt = tmp / "count.txt"
    txt.write_text("".join(json.loads(line)["text"] + "\n" for line in data["count"].read_text().splitlines()),
                   encoding="utf-8")
    return base, experts, {"count": txt, "echo": data["echo"]}


def _session(llama, method="task_arithmetic"):
    base, experts, data = llama
    session = wb.load_experts(wb.Session(), str(base), {t: str(p) for t, p in experts.items()})
    session.fewshot_n = 8
    for task, file in data.items():
        wb.attach_data(session, task, file)
    wb.merge(session, method, {}, seed=0)
    return session


def _hand_perplexity(folder, tokenizer, rows) -> float:
    """exp of the mean next-token cross-entropy over the completion tokens, computed from the paper-style
    definition with the model transformers loads from its folder (independent of the prober)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row.prompt)["input_ids"]  # BOS (+ prompt words)
            completion = tokenizer(row.completion, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + completion])
            logits = model(ids).logits[0]
            targets = ids[0, len(prompt):]
            total += float(F.cross_entropy(logits[len(prompt) - 1:-1], targets, reduction="sum"))
            count += len(completion)
    return math.exp(total / count)


def test_text_per_expert_then_run_probe_gives_perplexity_rows(llama):
    from merging.io.taskdata import tokenizer_of
    from merging.lm.probe import LMProber

    base, experts, _ = llama
    session = _session(llama)
    assert wb.is_lm_session(session)
    assert [len(session.data[t].fewshot) for t in ("count", "echo")] == [8, 8]
    report = wb.run_probe(session)
    assert report.kind == "causal_lm" and [r.name for r in report.rows] == ["base", "count", "echo", session.last_label]
    headers, rows = report.table()
    assert headers == ["model", "count loss", "count ppl", "echo loss", "echo ppl", "mean loss", "mean ppl"]

    # the same rows as an LMProber built here on the same held-out text
    models = wb.models_for(session)
    sets = {t: session.data[t].probe for t in ("count", "echo")}
    oracle = LMProber(models.expert_set, sets, tokenizer_of(models.expert_set))
    expected = oracle.report({session.last_label: merged_result(session)})
    for row in report.rows:
        for task in sets:
            assert row.metrics[task]["perplexity"] == pytest.approx(expected.row(row.name)[task]["perplexity"],
                                                                    rel=1e-5)
    # and the prober's perplexity is exp(mean token cross-entropy) by hand
    tokenizer = tokenizer_of(models.expert_set)
    for name, folder in (("base", base), ("count", experts["count"])):
        assert report.row(name).metrics["count"]["perplexity"] == pytest.approx(
            _hand_perplexity(folder, tokenizer, sets["count"]), rel=1e-4)
    # each expert is better than the base on its own task (real fine-tunes)
    for task in sets:
        assert report.row(task).metrics[task]["perplexity"] < report.row("base").metrics[task]["perplexity"]

    # the history records the merge's mean perplexity and flags tasks above the base's perplexity
    h_headers, h_rows = wb.history_table(session)
    assert h_headers[2] == "mean perplexity" and h_headers[3:5] == ["count ppl", "echo ppl"]
    merged = report.row(session.last_label).metrics
    assert h_rows[-1][2] == pytest.approx((merged["count"]["perplexity"] + merged["echo"]["perplexity"]) / 2,
                                          abs=1e-3)
    base_row = report.row("base").metrics
    worse = [t for t in sets if merged[t]["perplexity"] > base_row[t]["perplexity"]]
    flags = wb.below_base(merged, base_row)
    assert [t for t, _, _ in flags] == worse
    from merging.workbench.history import below_base_text

    assert below_base_text([("count", 12.5, 10.0)], "perplexity") == "⚠ count perplexity 12.500 above the base 10.000"
    assert wb.below_base({"count": {"perplexity": 12.5}}, {"count": {"perplexity": 10.0}}) == [("count", 12.5, 10.0)]
    assert wb.below_base({"count": {"perplexity": 9.0}}, {"count": {"perplexity": 10.0}}) == []


def test_emr_probe_scores_each_task_on_its_own_body(llama):
    from merging.io.taskdata import tokenizer_of
    from merging.lm.probe import LMProber

    session = _session(llama, "emr")
    report = wb.run_probe(session)
    result = merged_result(session)
    assert result.task_bodies
    models = wb.models_for(session)
    oracle = LMProber(models.expert_set, {t: session.data[t].probe for t in ("count", "echo")},
                      tokenizer_of(models.expert_set))
    for task in ("count", "echo"):
        alone = oracle.probe_body(result.task_bodies[task])[task]["perplexity"]
        assert report.row(session.last_label).metrics[task]["perplexity"] == pytest.approx(alone, rel=1e-5)


def _by_hand(folder_or_body, base, tokenizer, prompt, n, sample=False, seed=0) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base if isinstance(folder_or_body, dict) else folder_or_body))
    if isinstance(folder_or_body, dict):
        missing, _ = model.load_state_dict(folder_or_body, strict=False)
        assert not missing
    ids = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    extra = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0) if sample else dict(do_sample=False)
    out = model.eval().generate(**ids, max_new_tokens=n, pad_token_id=tokenizer.pad_token_id, **extra)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("method", ["task_arithmetic", "emr"])
def test_try_a_prompt_equals_generate_by_hand(llama, method):
    from merging.io.taskdata import tokenizer_of

    base, experts, _ = llama
    session = _session(llama, method)
    tokenizer = tokenizer_of(wb.models_for(session).expert_set)
    result = merged_result(session)
    prompt = "w3 w4 w5"
    for expert in ("count", "echo"):
        rows = wb.generate_side_by_side(session, prompt, expert, max_new_tokens=6, seed=0)
        merged_body = result.task_bodies[expert] if method == "emr" else result.tensors  # EMR: the task's body
        assert rows == [("base", _by_hand(base, base, tokenizer, prompt, 6)),
                        (expert, _by_hand(experts[expert], base, tokenizer, prompt, 6)),
                        (session.last_label, _by_hand(dict(merged_body), base, tokenizer, prompt, 6))]
        assert all(0 < len(text.split()) <= 6 for _, text in rows)
    if method == "task_arithmetic":  # seeded sampling: the seed decides, and it is transformers' own sampling
        sampled = wb.generate_side_by_side(session, prompt, "count", max_new_tokens=8, seed=7, sample=True)
        assert sampled == wb.generate_side_by_side(session, prompt, "count", max_new_tokens=8, seed=7, sample=True)
        assert sampled[1][1] == _by_hand(experts["count"], base, tokenizer, prompt, 8, sample=True, seed=7)


def test_try_a_prompt_bounds_and_cancellation(llama):
    session = _session(llama)
    with pytest.raises(MergeLabError, match="at most"):
        wb.generate_side_by_side(session, "w1 " * 1000, "count")
    with pytest.raises(MergeLabError, match="New tokens"):
        wb.generate_side_by_side(session, "w1", "count", max_new_tokens=wb.MAX_NEW_TOKENS + 1)
    with pytest.raises(MergeLabError, match="type a prompt"):
        wb.generate_side_by_side(session, "  ", "count")
    with pytest.raises(MergeLabError, match="Try a prompt"):
        wb.predict(session, "w1 w2")  # an LM session does not label sentences

    class StopAfter(CancelToken):
        """Cancelled from its ``limit``-th check on: Stop pressed while the base is generating."""

        def __init__(self, limit):
            super().__init__()
            self.checks, self.limit = 0, limit

        @property
        def cancelled(self):
            self.checks += 1
            return self.checks >= self.limit

    token = StopAfter(5)  # one check before the base's generation, then one per generated token
    with cancellable(token), pytest.raises(Cancelled):
        wb.generate_side_by_side(session, "w1 w2", "count", max_new_tokens=wb.MAX_NEW_TOKENS)
    assert token.checks == 5  # stopped at the first check after Stop, long before 64 tokens


def test_wrong_kind_of_task_data_says_what_to_attach(llama, tmp_path):
    import gradio as gr

    from components import handlers as h

    session = _session(llama)
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text('{"text": "w1", "label": 0}\n{"text": "w2", "label": 1}\n', encoding="utf-8")
    with pytest.raises(gr.Error, match="holds labelled rows"):  # a toast on the page, not a traceback
        h.safe(h.attach)(session, "count", str(labelled), 8)
    csv = tmp_path / "labelled.csv"
    csv.write_text("text,label\nw1,0\nw2,1\n", encoding="utf-8")
    with pytest.raises(gr.Error, match=r"\.txt file"):
        h.safe(h.attach)(session, "count", str(csv), 8)

    base, experts = tm.family(tmp_path / "cls", "bert", expert_kind="bert_cls")
    classifier = wb.load_experts(wb.Session(), str(base), {f"e{i}": str(p) for i, p in enumerate(experts)})
    assert not wb.is_lm_session(classifier)
    text = tmp_path / "plain.txt"
    text.write_text("w1 w2\nw3 w4\n", encoding="utf-8")
    with pytest.raises(gr.Error, match="is a classifier"):
        h.safe(h.attach)(classifier, "e0", str(text), 8)
    with pytest.raises(MergeLabError, match="classifiers"):
        wb.generate_side_by_side(classifier, "w1", "e0")


def test_drop_sweep_refuses_lm_sessions_in_words(llama):
    with pytest.raises(MergeLabError, match="perplexity in the session history"):
        wb.drop_sweep(_session(llama))
