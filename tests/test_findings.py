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
    findings = fd.parse_methods_md(text)
    assert findings.zoo == zoo_name and len(findings.settings) == len(expected) >= 1
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
    findings = fd.parse_methods_md((BENCH / fd.METHODS_MD).read_text(encoding="utf-8"))
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
    assert fd.read_findings(tmp_path).source == fd.METHODS_MD
    record = {"zoo": "default", "seeds": 3, "settings": {
        "all": {"best": "RegMean", "apl": 70.0, "diff": 1.5, "interval": 0.4, "rank": 1, "n_methods": 13,
                "tasks": ["a", "b", "c"]}}}
    (tmp_path / fd.METHODS_JSON).write_text(json.dumps(record), encoding="utf-8")
    findings = fd.read_findings(tmp_path)
    assert findings.source == fd.METHODS_JSON
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
