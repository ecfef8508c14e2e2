"""The Probe section's benchmark line quotes RESULTS-methods exactly, and only for the zoo it measured."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from merging.errors import MergeLabError
from merging.workbench import findings as fd

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _oracle(text: str) -> tuple[str, list[tuple[str, str, str, str, str, str]]]:
    """The zoo name and, per setting, (best, diff, se, rank, n) read by splitting the verdict lines by hand,
    independently of the module's regular expression."""
    zoo = text.split("zoo '", 1)[1].split("'", 1)[0]
    rows = []
    verdict = text.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    for line in verdict.splitlines():
        if not line.startswith("- ") or "vs best baseline" not in line:
            continue
        best = line.split("vs best baseline ", 1)[1].split(" — ", 1)[0].rsplit(" ", 1)[0]
        diff, rest = line.split("paired difference ", 1)[1].split(" ± ", 1)
        se = rest.split(" ", 1)[0]
        rank, n = line.split("APL ranks **", 1)[1].split("**", 1)[0].split(" of ")
        rows.append((line[2:].split(" ", 1)[0], best, diff, se, rank, n))
    return zoo, rows


def _zoo_like(findings: fd.Findings, **change):
    values = dict(name=findings.zoo, seed=findings.zoo_seed, steps=dict(findings.zoo_steps or {}),
                  tasks=list((findings.zoo_steps or {}).keys()))
    values.update(change)
    return SimpleNamespace(**values)


def test_numbers_shown_equal_the_file():
    text = (BENCH / fd.METHODS_MD).read_text(encoding="utf-8")
    zoo_name, expected = _oracle(text)
    findings = fd.parse_methods_md(text)[0]  # the classifier zoo's section comes first
    assert findings.zoo == zoo_name and findings.metric == "accuracy" and len(findings.settings) == len(expected) >= 1
    line = fd.findings_text(findings, _zoo_like(findings))
    for setting, (name, best, diff, se, rank, n) in zip(findings.settings, expected):
        assert setting.setting == name and setting.best == best
        assert setting.diff == float(diff) and setting.interval == float(se)
        assert (setting.rank, setting.n_methods) == (int(rank), int(n))
        verb = "trails" if float(diff) < 0 else "leads"
        rank_word = re.escape(f"{rank}") + r"(st|nd|rd|th)"
        assert re.search(rf"APL {verb} the best baseline, {re.escape(best)}, by {abs(float(diff)):.1f} ± "
                         rf"{float(se):.1f} points \({rank_word} of {n}\)", line), line
    assert line.startswith("On this zoo's benchmark (3 seeds")


def test_foreign_or_rebuilt_zoo_gets_the_command():
    findings = fd.parse_methods_md((BENCH / fd.METHODS_MD).read_text(encoding="utf-8"))[0]
    other = _zoo_like(findings, name="toy")
    assert fd.findings_text(findings, other) == ("Not benchmarked on this zoo ('toy'): run `python "
                                                "benchmarks/bench_methods.py --zoo toy` to measure APL against "
                                                "every baseline here.")
    steps = dict(findings.zoo_steps)
    steps[next(iter(steps))] += 1  # the same name rebuilt with other steps is another zoo
    assert "Not benchmarked on this zoo" in fd.findings_text(findings, _zoo_like(findings, steps=steps))
    assert "Not benchmarked" in fd.findings_text(None, other)  # no results file at all
    assert "not a zoo" in fd.findings_text(findings, None)


def test_missing_files_and_json_preferred(tmp_path):
    assert fd.read_findings(tmp_path) is None
    (tmp_path / fd.METHODS_MD).write_text((BENCH / fd.METHODS_MD).read_text(encoding="utf-8"), encoding="utf-8")
    assert [f.source for f in fd.read_findings(tmp_path)] == [fd.METHODS_MD, fd.METHODS_MD]  # both zoos' sections
    record = {"zoo": "default", "seeds": 3, "settings": {
        "all": {"best": "RegMean", "apl": 70.0, "diff": 1.5, "interval": 0.4, "rank": 1, "n_methods": 13,
                "tasks": ["a", "b", "c"]}}}
    (tmp_path / fd.METHODS_JSON).write_text(json.dumps(record), encoding="utf-8")
    findings = fd.read_findings(tmp_path)
    assert [f.source for f in findings] == [fd.METHODS_JSON]
    text = fd.findings_text(findings, SimpleNamespace(name="default", seed=0, steps={}, tasks=["a", "b", "c"]))
    assert "with all three experts APL leads the best baseline, RegMean, by 1.5 ± 0.4 points (1st of 13)" in text


def test_damaged_results_say_what_is_wrong(tmp_path):
    (tmp_path / fd.METHODS_MD).write_text("# nothing here\n", encoding="utf-8")
    with pytest.raises(MergeLabError, match="names no zoo"):
        fd.read_findings(tmp_path)
    (tmp_path / fd.METHODS_JSON).write_text(json.dumps({"zoo": "x", "settings": {"all": {"best": "TIES"}}}))
    with pytest.raises(MergeLabError, match="setting 'all' lacks"):
        fd.read_findings(tmp_path)
    session = SimpleNamespace(base_ref="/some/folder")
    assert fd.probe_findings(session, tmp_path).startswith("The benchmark results could not be read")


# ---------------------------------------------------------------- one section per zoo (classifier, LM)

TWO_ZOOS = """# Merge methods against the baselines: measured results

Generated by `python benchmarks/bench_methods.py --zoo alpha` on 2026-01-01 10:00 (local time); zoo 'alpha' (seed 1, \
steps {'a': 10, 'b': 20}); x86_64 Linux, 2 CPUs.

## Verdict (from the numbers below)

- all (a, b): APL 71.5 vs best baseline TIES 70.0 — paired difference +1.5 ± 0.5 (t = +3.0) points over 3 seeds; \
target 'APL ≥ best baseline' met. APL ranks **1 of 5** single-model merges by mean probe accuracy (APL 71.5, TIES 70.0).

# LM zoo (causal LMs): merge methods against the baselines

Prose that names zoo 'not-a-header' in passing, and a pair line: - pair (x, y): not a verdict.

Generated by `python benchmarks/bench_methods.py --zoo beta` on 2026-01-02 10:00 (local time); zoo 'beta' (seed 0, \
steps {'x': 5, 'y': 7}); x86_64 Linux, 2 CPUs.

### Verdict (from the numbers below)

- all (x, y): APL 0.912 vs best baseline Consensus (TALL masks) 0.850 (mean perplexity / base perplexity, lower is \
better) — paired difference APL − Consensus (TALL masks) +6.2 ± 1.0 (t = +6.2) percentage points of the base's \
perplexity over 2 seeds (negative: APL lower); target 'APL ≤ best baseline' NOT met. APL ranks **3 of 4** \
single-model merges (Consensus (TALL masks) 0.850, TIES 0.880, APL 0.912, DARE TIES 1.100).
- pair (x, y): APL 0.700 vs best baseline TIES 0.750 (mean perplexity / base perplexity, lower is better) — paired \
difference APL − TIES -5.0 ± 2.5 (t = -2.0) percentage points of the base's perplexity over 2 seeds (negative: APL \
lower); target 'APL ≤ best baseline' met. APL ranks **1 of 4** single-model merges (APL 0.700, TIES 0.750).
"""


def test_every_zoo_section_is_read_and_quoted_for_its_own_zoo():
    alpha_zoo = SimpleNamespace(name="alpha", seed=1, steps={"a": 10, "b": 20}, tasks=["a", "b"])
    beta_zoo = SimpleNamespace(name="beta", seed=0, steps={"x": 5, "y": 7}, tasks=["x", "y"])
    alpha, beta = fd.parse_methods_md(TWO_ZOOS)
    assert (alpha.zoo, alpha.zoo_seed, alpha.zoo_steps, alpha.seeds, alpha.metric) == \
        ("alpha", 1, {"a": 10, "b": 20}, 3, "accuracy")
    assert (beta.zoo, beta.zoo_seed, beta.zoo_steps, beta.seeds, beta.metric) == \
        ("beta", 0, {"x": 5, "y": 7}, 2, "perplexity")
    assert [s.setting for s in alpha.settings] == ["all"] and [s.setting for s in beta.settings] == ["all", "pair"]
    first = beta.settings[0]
    assert (first.best, first.apl, first.best_score, first.diff, first.interval, first.t, first.rank,
            first.n_methods) == ("Consensus (TALL masks)", 0.912, 0.850, 6.2, 1.0, 6.2, 3, 4)

    line = fd.findings_text((alpha, beta), beta_zoo)
    assert ("with both experts APL trails the best baseline, Consensus (TALL masks): 0.912 vs 0.850 × base "
            "perplexity (lower is better), a paired difference of +6.2 ± 1.0 percentage points of the base's "
            "perplexity (3rd of 4) — a clear difference") in line, line
    # lower perplexity is better: a negative difference leads
    assert ("APL leads the best baseline, TIES: 0.700 vs 0.750 × base perplexity (lower is better), a paired "
            "difference of -5.0 ± 2.5 percentage points of the base's perplexity (1st of 4) — within the seeds' "
            "noise") in line, line
    assert "71.5" not in line and "accuracy" not in line
    assert "APL leads the best baseline, TIES, by 1.5 ± 0.5 points (1st of 5)" in fd.findings_text((alpha, beta),
                                                                                                 alpha_zoo)
    assert fd.findings_text((alpha, beta), SimpleNamespace(name="not-a-header", seed=0, steps={}, tasks=[])) \
        .startswith("Not benchmarked on this zoo ('not-a-header')")
    rebuilt = SimpleNamespace(name="beta", seed=0, steps={"x": 5, "y": 8}, tasks=["x", "y"])
    assert fd.findings_text((alpha, beta), rebuilt).startswith("Not benchmarked on this zoo ('beta')")


def _lm_oracle(text: str) -> tuple[dict, list[tuple[str, str, str, str, str]]]:
    """The LM section's zoo (name, seed, steps) and per setting (apl, best, best score, diff, se), split out by
    hand from the lines after the "# LM zoo" title, independently of the module's expressions."""
    section = text.split("\n# LM zoo", 1)[1]
    header = next(line for line in section.splitlines() if line.startswith("Generated by"))
    name = header.split("; zoo '", 1)[1].split("'", 1)[0]
    seed = int(header.split("(seed ", 1)[1].split(",", 1)[0])
    steps = {}
    for pair in header.split("steps {", 1)[1].split("}", 1)[0].split(", "):
        task, count = pair.split(": ")
        steps[task.strip("'")] = int(count)
    rows = []
    for line in section.split("Verdict", 1)[1].split("\n### ", 1)[0].splitlines():
        if line.startswith("- ") and "vs best baseline" in line:
            apl = line.split(": APL ", 1)[1].split(" ", 1)[0]
            best, score = line.split("vs best baseline ", 1)[1].split(" (mean perplexity", 1)[0].rsplit(" ", 1)
            diff, se = line.split(f"APL − {best} ", 1)[1].split(" (t", 1)[0].split(" ± ")
            rows.append((apl, best, score, diff, se))
    return {"name": name, "seed": seed, "steps": steps}, rows


def test_the_lm_zoo_finds_its_own_section_of_the_real_results():
    text = (BENCH / fd.METHODS_MD).read_text(encoding="utf-8")
    zoo, rows = _lm_oracle(text)
    assert zoo["name"] == "lm" and len(rows) >= 1
    lm_zoo = SimpleNamespace(name=zoo["name"], seed=zoo["seed"], steps=zoo["steps"], tasks=list(zoo["steps"]))
    line = fd.findings_text(fd.read_findings(BENCH), lm_zoo)
    assert line.startswith("On this zoo's benchmark (3 seeds"), line
    for apl, best, score, diff, se in rows:
        verb = "trails" if float(diff) > 0 else "leads"
        assert (f"APL {verb} the best baseline, {best}: {float(apl):.3f} vs {float(score):.3f} × base perplexity "
                f"(lower is better), a paired difference of {float(diff):+.1f} ± {float(se):.1f} percentage points"
                ) in line, line
    assert "Not benchmarked" not in line and " points (" not in line.replace("percentage points", "")
