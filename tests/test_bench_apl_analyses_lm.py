"""benchmarks/bench_apl_analyses.py on the tiny LM zoo: every score is perplexity ÷ the base's (lower is
better), and every verdict reads it that way (slow: the tiny LM zoo is trained once per session).

Oracles, written here from the definitions and not from the bench: the base scores 1.0 by definition; the
unpruned expert's own-text ratio is what the zoo build measured with its own perplexity loop; a DARE-pruned
expert's ratio is recomputed from DARE's formula (seeded uniforms, keep < 1 − p, rescale by 1/(1 − p)) and
that loop on an HF model; "best baseline" is the lowest mean and a negative APL − best means APL is better.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from apl_fixtures import one_thread

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_apl_analyses

    return bench_apl_analyses


@pytest.fixture(scope="module")
def lm_part(bench, lm_zoo, tiny_lm_spec, tmp_path_factory):
    """One quick LM run of every analysis, written as a part (``--json-only``), as the real LM run is."""
    out = tmp_path_factory.mktemp("lm-analyses") / "lm.json"
    with one_thread():
        code = bench.main(["--zoo", lm_zoo.name, "--quick", "--lm-spec", json.dumps(tiny_lm_spec[0]),
                           "--n-fewshot", "8", "--n-probe", "60", "--fractions", "0.5", "--drop-fractions", "0.9",
                           "--sizes", "4", "--taus", "2,inf", "--baselines", "dare_linear,magnitude",
                           "--json-only", str(out)])
    data = json.loads(out.read_text())
    return code, data


def _ppl(zoo, body: dict, texts: list[str]) -> float:
    """The zoo build's perplexity loop on the base model with ``body`` loaded (independent of the bench)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merging.zoo.lm_zoo import perplexity

    model = AutoModelForCausalLM.from_pretrained(str(zoo.base_path)).float()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in body.items():
            if name in params:
                params[name].copy_(value)
    return perplexity(model, AutoTokenizer.from_pretrained(str(zoo.base_path)), texts, 64)


def test_lm_run_measures_every_analysis(lm_part, lm_zoo):
    code, data = lm_part
    assert code == 0, data["meta"]["parts"][0]["failed"]
    assert data["zoo"] == lm_zoo.name and data["meta"]["metric"] == "perplexity / base perplexity"
    assert set(data["meta"]["base_perplexity"]) == set(lm_zoo.tasks)
    for key in ("pruning", "drop_range", "fewshot_size", "taus", "ablation"):
        assert data[key], key
    for row in data["drop_range"]:  # per-task scores are ratios, the perplexities beside them
        for seed, ratios in row["per_task"].items():
            for task, ratio in ratios.items():
                ppl = row["per_task_perplexity"][seed][task]
                assert ratio == pytest.approx(ppl / data["meta"]["base_perplexity"][task], rel=1e-9)
            assert row["per_seed"][seed] == pytest.approx(sum(ratios.values()) / len(ratios))


def test_lm_pruning_curve_against_the_zoo_and_dare_oracles(lm_part, lm_zoo):
    from merging.apl.pruning import PruningCurve
    from merging.io.experts import ExpertSet
    from merging.methods import kernels

    _, data = lm_part
    es = ExpertSet.load(lm_zoo.base_path, {t: f"zoo:{lm_zoo.name}/{t}" for t in lm_zoo.tasks})
    for d in data["pruning"]:
        c = PruningCurve.from_json(d)
        assert not c.higher_is_better and c.metric == "perplexity / base perplexity"
        assert c.base_score == 1.0  # the base against itself, by definition
        record = lm_zoo.task_record(c.expert)["probe_perplexity"]  # the build's own measurement, all 60 texts
        assert c.expert_score == pytest.approx(record["expert"][c.expert] / record["base"][c.expert], rel=2e-3)
    # DARE at p = 0.5, seed 0, on the first expert: the formula, then the build's perplexity loop
    c = PruningCurve.from_json(data["pruning"][0])
    p, seed, expert = 0.5, 0, c.expert
    body = {}
    for name, info in es.layout.tensors.items():
        if info.role != "merge":
            continue
        base = es.base.get(name).float()
        delta = es.experts[expert].get(name).float() - base
        if info.droppable:
            u = kernels.uniforms(seed, expert, name, delta.numel()).reshape(delta.shape)
            delta = torch.where(u < 1 - p, delta / (1 - p), torch.zeros_like(delta))
        body[name] = base + delta
    texts = [e.completion for e in lm_zoo.probe(expert)]
    base_body = {n: es.base.get(n).float() for n in body}
    oracle = _ppl(lm_zoo, body, texts) / _ppl(lm_zoo, base_body, texts)
    measured = [pt.score for pt in c.points if pt.strategy == "dare" and pt.fraction == p and pt.seed == seed]
    assert measured == [pytest.approx(oracle, rel=1e-3)]


def test_own_task_score_of_the_base_is_one_and_of_the_expert_its_ratio(bench, lm_zoo, tiny_lm_spec):
    """The scorer analysis 1 scores every pruned body with, called directly: a body identical to the base
    gives 1.0, the expert's own body the ratio the zoo build measured."""
    bm = bench.bm
    with one_thread():
        inputs = bm.open_inputs(lm_zoo, 60, 10_000, list(lm_zoo.tasks), lm_spec_json=json.dumps(tiny_lm_spec[0]))
        s = bm.build_setting("all", list(lm_zoo.tasks), lm_zoo, inputs.pools, inputs.probes, [0, 1], 8,
                             inputs.tokenizer, reference=inputs.reference)
        for expert in s.tasks:
            score = bench.own_task_score(s, expert)
            assert score({n: s.expert_set.base.get(n).float() for n in s.base}) == pytest.approx(1.0, abs=1e-9)
            record = lm_zoo.task_record(expert)["probe_perplexity"]
            own = score({n: s.expert_set.experts[expert].get(n).float() for n in s.base})
            assert own == pytest.approx(record["expert"][expert] / record["base"][expert], rel=2e-3) and own < 1


def test_lm_verdicts_read_lower_as_better(bench):
    """Synthetic LM rows (ratios): the best baseline is the LOWEST mean; APL below it with an interval under
    zero is a win, said as such; the classifier reading of the same rows is the opposite."""
    lm, clf = bench.Sense(lm=True), bench.Sense()

    def row(method, values, baseline=True):
        return {"setting": "all", "tasks": ["de", "es"], "fraction": 0.8, "method": method, "baseline": baseline,
                "per_seed": {str(i): v for i, v in enumerate(values)}, "selected": {}}

    rows = [row("APL", [0.80, 0.81, 0.79], baseline=False), row("DARE linear", [0.90, 0.92, 0.91]),
            row("magnitude", [1.20, 1.25, 1.22])]
    best, diffs = bench.paired_best(rows, "APL", lm)
    assert best == "DARE linear" and diffs == pytest.approx([-10.0, -11.0, -12.0])
    assert bench.paired_best(rows, "APL", clf)[0] == "magnitude"
    _, lo, hi = bench.interval(diffs)
    assert hi < 0 and lm.ahead(lo, hi) and not lm.behind(lo, hi) and clf.behind(lo, hi)
    data = {"meta": {"metric": "perplexity / base perplexity", "seeds": [0, 1, 2]}, "drop_range": rows}
    text = bench.summary(data)
    assert text.startswith("On the LM zoo APL helps when merging") and "below zero (APL lower perplexity)" in text
    table = "\n".join(bench.render_drop_range(rows, None, lm))
    assert "LOWEST mean" in table and "negative = APL lower perplexity = APL better" in table
    assert "| 0.8 | 0.800 ± 0.010 | 0.910 ± 0.010 | 1.223 ± 0.025 | DARE linear | -11.0 [" in table


def test_combine_renders_classifier_and_lm_parts_in_one_file(bench, lm_part, tmp_path):
    _, lm = lm_part
    classifier = {"zoo": "default", "zoo_fingerprint": "abc", "commands": ["python benchmarks/bench_apl_analyses.py"],
                  "meta": {"seeds": [0, 1], "parts": []}, "summary": ""}
    paths = []
    for i, part in enumerate((classifier, lm)):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(part))
    assert bench.main(["--combine", *map(str, paths), "--out-dir", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "RESULTS-apl-analyses.json").read_text())
    assert data["zoo"] == "default" and [z["zoo"] for z in data["other_zoos"]] == [lm["zoo"]]
    text = (tmp_path / "out" / "RESULTS-apl-analyses.md").read_text()
    assert text.index("# Where does APL help?") < text.index(f"# LM zoo '{lm['zoo']}'")
    assert "lower is better" in text and data["other_zoos"][0]["summary"] in text
    # the combined file is itself a part: combining it with the LM part again keeps one LM section
    again = tmp_path / "again"
    assert bench.main(["--combine", str(tmp_path / "out" / "RESULTS-apl-analyses.json"), str(paths[1]),
                       "--out-dir", str(again)]) == 0
    assert (again / "RESULTS-apl-analyses.md").read_text().count(f"# LM zoo '{lm['zoo']}'") == 1


def test_the_page_finds_the_lm_zoo_in_a_combined_file(tmp_path):
    """A combined file holds the first zoo at the top level and the others under other_zoos: the page's
    reader hands each zoo its own results and no other's."""
    from types import SimpleNamespace

    from merging.workbench import findings as fd

    lm = {"zoo": "lm", "summary": "On the LM zoo …", "pruning": []}
    (tmp_path / fd.ANALYSES_JSON).write_text(json.dumps({"zoo": "default", "summary": "classifier",
                                                         "other_zoos": [lm]}))
    assert fd.analyses_for(SimpleNamespace(name="lm"), tmp_path) == (lm, "")
    assert fd.analyses_for(SimpleNamespace(name="default"), tmp_path)[0]["summary"] == "classifier"
    data, why = fd.analyses_for(SimpleNamespace(name="other"), tmp_path)
    assert data is None and "not this one ('other')" in why


def test_combine_refuses_parts_of_one_zoo_name_from_two_builds(bench):
    from merging.errors import MergeLabError

    def part(fingerprint):
        return {"zoo": "lm", "zoo_fingerprint": fingerprint, "commands": [], "meta": {"parts": []}}

    with pytest.raises(MergeLabError, match="different builds"):
        bench.combine([part("a"), part("b")], "combine")
    both = bench.combine([part("a"), {**part("x"), "zoo": "default"}], "combine")
    assert both["zoo"] == "lm" and both["other_zoos"][0]["zoo"] == "default"


def test_combine_across_builds_keeps_each_analysis_from_one_build(bench):
    """--across-builds lets a zoo rebuilt on another machine stand beside the first build: each analysis
    comes from one build (a later build's rows replace, never join, the earlier build's rows at equal seeds
    and probe) and the page's header names each build's fingerprint with its analyses."""
    def row(fraction, value):
        return {"setting": "all", "tasks": ["a"], "fraction": fraction, "method": "APL", "baseline": False,
                "per_seed": {"0": value}, "per_task": {}, "selected": {}, "fewshot_loss": {}}

    def part(fingerprint, command, reduced="", **analyses):
        numbers = [n for n, k in bench.ANALYSES.items() if k in analyses]
        return {"zoo": "default", "zoo_fingerprint": fingerprint, "commands": [],
                "meta": {"seeds": [0], "n_probe": 400, "grids": {}, "reduced": reduced,
                         "parts": [{"command": command, "analyses": numbers}]}, **analyses}

    old = part("old", "run --reduced 'fewer seeds'", "fewer seeds", drop_range=[row(0.5, 1.0), row(0.9, 2.0)])
    ablation = part("old", "run ablation", ablation=[{"setting": "all", "label": "x"}])
    new = part("new", "run full", drop_range=[row(0.99, 3.0)])
    both = bench.combine([bench.combine([old, ablation], "c1"), new], "combine", across_builds=True)
    assert [r["fraction"] for r in both["drop_range"]] == [0.99]
    # the reduced run supplies nothing now: named as superseded, its reduction note gone
    assert [r["command"] for r in both["meta"]["parts"]] == ["run ablation", "run full"]
    assert [r["command"] for r in both["meta"]["superseded"]] == ["run --reduced 'fewer seeds'"]
    assert both["meta"]["reduced"] == ""
    kept = bench.combine([old, ablation], "c1")
    assert kept["meta"]["reduced"] == "fewer seeds" and not kept["meta"]["superseded"]
    assert both["meta"]["analysis_fingerprints"] == {"drop_range": "new", "ablation": "old"}
    header = bench._builds_line(both)
    assert "fingerprint new for drop_range" in header and "fingerprint old for ablation" in header
    same = bench.combine([bench.combine([old, ablation], "c1"), part("old", "run more", drop_range=[row(0.99, 3.0)])],
                         "combine")
    assert [r["fraction"] for r in same["drop_range"]] == [0.5, 0.9, 0.99]
    assert bench._builds_line(same) == "fingerprint old"


def test_combine_joins_a_split_run_and_lets_another_protocol_replace(bench):
    """Parts measuring one analysis with the same seeds and probe on other grid points (a run split by p̄)
    join into one table, in setting order and by p̄; a part measured another way (a full run after a
    reduced one) replaces the earlier rows instead of mixing seeds."""
    def row(setting, fraction, method, value):
        return {"setting": setting, "tasks": ["a"], "fraction": fraction, "method": method, "baseline": method != "APL",
                "per_seed": {"0": value}, "per_task": {}, "selected": {}, "fewshot_loss": {}}

    def part(rows, seeds, n_probe, fractions):
        return {"zoo": "default", "zoo_fingerprint": "f", "commands": [],
                "meta": {"seeds": seeds, "n_probe": n_probe, "parts": [], "grids": {"drop_fractions": fractions}},
                "drop_range": rows}

    high = part([row("all", 0.99, "APL", 1.0), row("pair", 0.99, "APL", 2.0)], [0, 1, 2], 400, [0.99])
    low = part([row("all", 0.5, "APL", 3.0), row("pair", 0.5, "APL", 4.0), row("all", 0.9, "APL", 5.0)],
               [0, 1, 2], 400, [0.5, 0.9])
    joined = bench.combine([high, low], "combine")
    assert [(r["setting"], r["fraction"]) for r in joined["drop_range"]] == [
        ("all", 0.5), ("all", 0.9), ("all", 0.99), ("pair", 0.5), ("pair", 0.99)]
    assert joined["meta"]["analysis_grids"]["drop_range"]["drop_fractions"] == [0.5, 0.9, 0.99]
    reduced = part([row("all", 0.8, "APL", 9.0)], [0, 1], 100, [0.8])
    replaced = bench.combine([reduced, high], "combine")
    assert [(r["setting"], r["fraction"]) for r in replaced["drop_range"]] == [("all", 0.99), ("pair", 0.99)]
    assert replaced["meta"]["analysis_n_probe"]["drop_range"] == 400
