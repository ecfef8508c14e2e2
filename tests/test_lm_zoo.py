"""The LM demo zoo (merging/zoo/lm_zoo.py) on a tiny build: tokenizer, reproducibility, experts that learned
their text, and every ``--zoo`` CLI command on it.

The oracle for perplexity is written here from the definition — exp of the mean over every text token
after BOS of −log softmax(logits)[next token], tokens pooled over the texts — with the model's plain
forward, not the library's loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from merging.errors import MergeLabError


def _run(argv, capsys):
    from merging.cli.main import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _oracle_perplexity(folder, texts, max_length=64):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).float().eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text)["input_ids"]  # BOS, then the text
            ids = ids[1:max_length + 1] if len(ids) > max_length else ids  # too long: its first tokens, no BOS
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            nll -= float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())  # log p(next | prefix)
            count += len(ids) - 1
    return math.exp(nll / count)


def test_the_tokenizer_round_trips_every_language_and_adds_bos(lm_zoo):
    from merging.io.taskdata import _load_tokenizer

    tok = _load_tokenizer(lm_zoo.base_path)
    assert len(tok) <= 512 and tok.bos_token_id == 1 and tok.pad_token_id == 0
    for text in ("Der Mann sagte: Grüß Gott!", "Człowiek powiedział — żółć", "El niño ¿qué?", "Ω ≈ 3.14 \t tabs"):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level: nothing is unknown
    digests = {json.loads((lm_zoo.experts[t] / "merge_lab_task.json").read_text())["tokenizer_sha256"]
               for t in lm_zoo.tasks}
    assert len(digests) == 1  # every expert ships the base's tokenizer
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors"):
        assert (lm_zoo.base_path / name).is_file()


def test_the_zoo_is_an_lm_zoo_with_disjoint_text_splits(lm_zoo):
    from merging.io.taskdata import LMExample

    assert lm_zoo.kind == "causal_lm" and lm_zoo.tasks == ["de", "computers"] and not lm_zoo.damaged
    for task in lm_zoo.tasks:
        few, probe = lm_zoo.fewshot(task), lm_zoo.probe(task)
        assert few and probe and all(isinstance(r, LMExample) and r.prompt == "" for r in few + probe)
        record = lm_zoo.task_record(task)
        assert not set(record["fewshot_indices"]) & set(record["probe_indices"])
        assert len(probe) == len(record["probe_indices"]) == 60


def test_experts_beat_the_base_on_their_own_held_out_text(lm_zoo):
    """Recorded perplexities match the oracle, and each expert is better than the base on its own text."""
    for task in lm_zoo.tasks:
        record = lm_zoo.task_record(task)
        texts = [r.completion for r in lm_zoo.probe(task)]
        base, expert = (_oracle_perplexity(folder, texts) for folder in (lm_zoo.base_path, lm_zoo.experts[task]))
        assert record["probe_perplexity"]["base"][task] == pytest.approx(base, rel=1e-3)
        assert record["probe_perplexity"]["expert"][task] == pytest.approx(expert, rel=1e-3)
        assert expert < 0.95 * base, (task, base, expert)
        assert record["continuation"]["expert"]  # a greedy continuation is recorded


def test_same_seed_same_checksums_and_rebuilding_reuses(lm_zoo, tiny_lm_spec):
    from merging.zoo.lm_zoo import build_lm_zoo, split_texts

    spec, tasks = tiny_lm_spec
    meta = (lm_zoo.root / "zoo.json").stat().st_mtime_ns
    again = build_lm_zoo("lm-tiny", tasks=tasks, steps=20, seed=0, spec=spec)  # same settings: reused as is
    assert (again.root / "zoo.json").stat().st_mtime_ns == meta
    twin = build_lm_zoo("lm-tiny-twin", tasks=["de"], steps=20, seed=0, spec=spec)  # trained again, same seed

    def sha(folder, record):
        return json.loads((folder / record).read_text())["weights_sha256"]

    assert sha(twin.base_path, "merge_lab_base.json") == sha(lm_zoo.base_path, "merge_lab_base.json")
    assert sha(twin.experts["de"], "merge_lab_task.json") == sha(lm_zoo.experts["de"], "merge_lab_task.json")
    assert (twin.base_path / "tokenizer.json").read_bytes() == (lm_zoo.base_path / "tokenizer.json").read_bytes()
    items = [f"text {i}" for i in range(100)]
    assert split_texts(items, 0, 20, 10, 80) == split_texts(items, 0, 20, 10, 80)
    assert split_texts(items, 1, 20, 10, 80)["probe"] != split_texts(items, 0, 20, 10, 80)["probe"]


def test_importance_calibrate_merge_inspect_and_probe_through_the_cli(lm_zoo, tmp_path, capsys):
    zoo = ["--zoo", lm_zoo.name]
    imp, recipe = tmp_path / "imp.json", tmp_path / "apl.yaml"
    code, out, err = _run(["importance", *zoo, "--n-fewshot", "8", "--level", "layer", "--out", str(imp), "--json"],
                          capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["experts"] == ["de", "computers"] and summary["fewshot"] == {"de": 8, "computers": 8}
    code, out, err = _run(["calibrate", *zoo, "--importance", str(imp), "--drop-ratio", "0.3", "--out", str(recipe),
                           "--json"], capsys)
    assert code == 0, err
    assert set(json.loads(out)["drop_ratio"]["de"]) == {"embeddings", "0", "1", "head"}
    code, out, err = _run(["merge", str(recipe), "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    code, out, err = _run(["inspect", f"zoo:{lm_zoo.name}/base", f"zoo:{lm_zoo.name}/de"], capsys)
    assert code == 0, err
    code, out, err = _run(["probe", *zoo, "--recipe", str(recipe), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["kind"] == "causal_lm" and [r["name"] for r in report["rows"]] == ["base", "de", "computers", "merged"]
    ppl = {r["name"]: {t: m["perplexity"] for t, m in r["metrics"].items()} for r in report["rows"]}
    for task in lm_zoo.tasks:
        recorded = lm_zoo.task_record(task)["probe_perplexity"]
        assert ppl["base"][task] == pytest.approx(recorded["base"][task], rel=1e-3)  # the build measured the same
        assert ppl[task][task] == pytest.approx(recorded["expert"][task], rel=1e-3)
        assert ppl["merged"][task] < ppl["base"][task]  # the merge keeps some of each expert


def test_missing_fortunes_name_the_apt_packages(merge_lab_cache, tmp_path, tiny_lm_spec):
    from merging.zoo.lm_zoo import build_lm_zoo

    spec, tasks = tiny_lm_spec
    with pytest.raises(MergeLabError, match="apt-get install fortunes fortunes-de"):
        build_lm_zoo("lm-nowhere", tasks=tasks, steps=2, spec={**spec, "root": str(tmp_path)})
    with pytest.raises(MergeLabError, match="unknown LM text 'klingon'"):
        build_lm_zoo("lm-nowhere", tasks=["klingon"], steps=2, spec=spec)
