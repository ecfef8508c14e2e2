"""What the benchmarks measured, read back for the page: APL against the best baseline, per setting.

The Probe section must say honestly how APL compares on the zoo that is loaded, including where it loses;
the numbers come from the benchmark's own output (``benchmarks/RESULTS-methods.json`` when the script
writes one, else the stable *Verdict* lines of ``RESULTS-methods.md``), never from text typed here. A
result is only quoted for the zoo it was measured on: the file names its zoo (name, seed, steps per
task), and a different or rebuilt zoo gets the command that would benchmark it instead.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MergeLabError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
METHODS_MD = "RESULTS-methods.md"
METHODS_JSON = "RESULTS-methods.json"
ANALYSES_JSON = "RESULTS-apl-analyses.json"
#: |t| below this, with 3 paired seeds, is not a difference at p < 0.05 (two-sided); the script says so too
T_CRITICAL_3_SEEDS = 4.3


@dataclass(frozen=True)
class SettingFinding:
    """APL against the best single-model baseline in one benchmark setting."""

    setting: str  # "all", "pair", …
    tasks: tuple[str, ...]
    best: str  # the best baseline's pretty name
    apl: float  # APL's mean probe accuracy, points
    best_score: float | None
    diff: float  # APL − best, paired by seed, points
    interval: float  # ± standard error of the paired differences
    t: float | None
    rank: int  # APL's rank among the single-model merges (1 = best)
    n_methods: int


@dataclass(frozen=True)
class Findings:
    zoo: str
    zoo_seed: int | None
    zoo_steps: dict[str, int] | None
    seeds: int  # paired seeds per setting
    settings: tuple[SettingFinding, ...]
    source: str  # file name it was read from


_HEADER = re.compile(r"zoo '(?P<name>[^']+)'(?: \(seed (?P<seed>\d+), steps (?P<steps>\{[^}]*\})\))?")
_VERDICT = re.compile(
    r"^- (?P<setting>[\w-]+) \((?P<tasks>[^)]*)\): APL (?P<apl>-?[\d.]+) vs best baseline (?P<best>.+?) "
    r"(?P<best_score>-?[\d.]+) — paired difference (?P<diff>[+-]?[\d.]+) ± (?P<se>[\d.]+)"
    r"(?: \(t = (?P<t>[+-]?[\d.]+)\))? points over (?P<seeds>\d+) seeds.*?APL ranks \*\*(?P<rank>\d+) of "
    r"(?P<n>\d+)\*\*", re.MULTILINE)


def parse_methods_md(text: str, source: str = METHODS_MD) -> Findings:
    """The header's zoo and each *Verdict* line of a RESULTS-methods.md written by bench_methods.py."""
    head = _HEADER.search(text)
    if head is None:
        raise MergeLabError(f"{source} names no zoo (expected \"zoo 'NAME' (seed S, steps {{...}})\" in its "
                            "header): regenerate it with python benchmarks/bench_methods.py", field="results")
    steps = _literal_steps(head.group("steps"))
    settings, seeds = [], 0
    for m in _VERDICT.finditer(text):
        seeds = int(m.group("seeds"))
        settings.append(SettingFinding(
            m.group("setting"), tuple(t.strip() for t in m.group("tasks").split(",") if t.strip()),
            m.group("best"), float(m.group("apl")), float(m.group("best_score")), float(m.group("diff")),
            float(m.group("se")), float(m.group("t")) if m.group("t") else None, int(m.group("rank")),
            int(m.group("n"))))
    if not settings:
        raise MergeLabError(f"{source} has no verdict line (\"- SETTING (tasks): APL x vs best baseline …\"): "
                            "regenerate it with python benchmarks/bench_methods.py", field="results")
    return Findings(head.group("name"), int(head.group("seed")) if head.group("seed") else None, steps, seeds,
                    tuple(settings), source)


def _literal_steps(text: str | None) -> dict[str, int] | None:
    """The header's steps dict, read as a literal (never evaluated as code)."""
    if not text:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else None


def parse_methods_json(data: dict[str, Any], source: str = METHODS_JSON) -> Findings:
    """A RESULTS-methods.json: ``{"zoo": …, "seeds": n, "settings": {setting: {best, apl, diff, interval, rank,
    n_methods[, tasks, best_score, t]}}}`` (a bare mapping setting → record is accepted too)."""
    if not isinstance(data, dict):
        raise MergeLabError(f"{source} is not a JSON object", field="results")
    records = data.get("settings") if isinstance(data.get("settings"), dict) else \
        {k: v for k, v in data.items() if isinstance(v, dict) and "best" in v}
    settings = []
    for name, r in records.items():
        try:
            settings.append(SettingFinding(
                str(name), tuple(r.get("tasks") or ()), str(r["best"]), float(r["apl"]),
                float(r["best_score"]) if r.get("best_score") is not None else None, float(r["diff"]),
                float(r["interval"]), float(r["t"]) if r.get("t") is not None else None, int(r["rank"]),
                int(r["n_methods"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise MergeLabError(f"{source}: setting '{name}' lacks {exc} (each setting needs best, apl, diff, "
                                "interval, rank, n_methods)", field="results") from None
    if not settings:
        raise MergeLabError(f"{source} holds no setting", field="results")
    steps = data.get("zoo_steps")
    return Findings(str(data.get("zoo") or ""), int(data["zoo_seed"]) if data.get("zoo_seed") is not None else None,
                    {str(k): int(v) for k, v in steps.items()} if isinstance(steps, dict) else None,
                    int(data.get("seeds") or 0), tuple(settings), source)


def read_findings(folder: Path | None = None) -> Findings | None:
    """The benchmark's findings (the JSON when present, else the Markdown), or None if neither exists."""
    folder = Path(folder) if folder is not None else BENCH_DIR
    js, md = folder / METHODS_JSON, folder / METHODS_MD
    if js.is_file():
        try:
            return parse_methods_json(json.loads(js.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError):
            raise MergeLabError(f"{METHODS_JSON} is not valid JSON: regenerate it with "
                                "python benchmarks/bench_methods.py", field="results") from None
    if md.is_file():
        return parse_methods_md(md.read_text(encoding="utf-8"))
    return None


def zoo_matches(findings: Findings, zoo) -> bool:
    """Whether the results were measured on ``zoo`` (same name, and the same seed and steps where the file
    records them: a zoo rebuilt with other steps is another zoo)."""
    if zoo is None or findings.zoo != getattr(zoo, "name", None):
        return False
    if findings.zoo_seed is not None and findings.zoo_seed != getattr(zoo, "seed", None):
        return False
    if findings.zoo_steps is not None:
        steps = {str(k): int(v) for k, v in (getattr(zoo, "steps", None) or {}).items()}
        if any(steps.get(t) != s for t, s in findings.zoo_steps.items()):
            return False
    return True


_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _where(s: SettingFinding, n_zoo_tasks: int | None) -> str:
    n = len(s.tasks)
    if s.setting == "all" or (n_zoo_tasks and n == n_zoo_tasks):
        return f"with all {_WORDS.get(n, n)} experts" if n else "with every expert"
    if n == 2:
        return f"on the pair {s.tasks[0]} + {s.tasks[1]}"
    return f"on '{s.setting}' ({', '.join(s.tasks)})" if s.tasks else f"on '{s.setting}'"


def setting_clause(s: SettingFinding, n_zoo_tasks: int | None = None) -> str:
    """One setting in words: leads or trails, by how much, with the interval, rank and whether it is clear."""
    verb = "leads" if s.diff > 0 else "trails" if s.diff < 0 else "ties"
    amount = f"by {abs(s.diff):.1f} ± {s.interval:.1f} points" if s.diff else f"({s.diff:+.1f} ± {s.interval:.1f})"
    clear = "" if s.t is None else " — a clear difference" if abs(s.t) >= T_CRITICAL_3_SEEDS else \
        " — within the seeds' noise"
    return (f"{_where(s, n_zoo_tasks)} APL {verb} the best baseline, {s.best}, {amount} "
            f"({_ordinal(s.rank)} of {s.n_methods}){clear}")


def findings_text(findings: Findings | None, zoo) -> str:
    """The Probe section's line: the loaded zoo's benchmark in words, or how to benchmark it."""
    name = getattr(zoo, "name", None)
    if findings is None or not zoo_matches(findings, zoo):
        if name is None:
            return ("APL against the baselines is benchmarked on a demo zoo (`python benchmarks/bench_methods.py "
                    "--zoo NAME`); these experts are not a zoo, so there is no benchmark to quote.")
        return (f"Not benchmarked on this zoo ('{name}'): run `python benchmarks/bench_methods.py --zoo {name}` "
                "to measure APL against every baseline here.")
    n_tasks = len(getattr(zoo, "tasks", []) or []) or None
    clauses = [setting_clause(s, n_tasks) for s in findings.settings]
    seeds = f"{findings.seeds} seeds, mean ± standard error of the paired differences" if findings.seeds else \
        "mean ± standard error"
    return (f"On this zoo's benchmark ({seeds}; `benchmarks/{findings.source}`): " + "; ".join(clauses) + ".")


def loaded_zoo(session):
    """The demo zoo the session's experts come from (``zoo:NAME/…`` refs), or None."""
    ref = str(getattr(session, "base_ref", "") or "")
    if not ref.startswith("zoo:"):
        return None
    from .session import open_default_zoo

    return open_default_zoo(ref[4:].split("/", 1)[0])


def probe_findings(session, folder: Path | None = None) -> str:
    """:func:`findings_text` for the session's zoo, reading the results files; a damaged file is said in words."""
    try:
        findings = read_findings(folder)
    except MergeLabError as exc:
        return f"The benchmark results could not be read: {exc}"
    return findings_text(findings, loaded_zoo(session))


# ---------------------------------------------------------------- the APL analyses' stored results

def read_analyses(folder: Path | None = None) -> dict | None:
    """``RESULTS-apl-analyses.json`` (written by benchmarks/bench_apl_analyses.py), or None if absent."""
    path = (Path(folder) if folder is not None else BENCH_DIR) / ANALYSES_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise MergeLabError(f"{ANALYSES_JSON} is not valid JSON: regenerate it with "
                            "python benchmarks/bench_apl_analyses.py", field="results") from None
    if not isinstance(data, dict):
        raise MergeLabError(f"{ANALYSES_JSON} is not a JSON object", field="results")
    return data


def analyses_for(zoo, folder: Path | None = None) -> tuple[dict | None, str]:
    """(the stored analyses of ``zoo``, or None; a sentence saying why there are none)."""
    name = getattr(zoo, "name", None)
    command = f"`python benchmarks/bench_apl_analyses.py --zoo {name or 'NAME'}`"
    data = read_analyses(folder)
    if data is None:
        return None, f"No stored APL analyses yet: run {command} to measure them (minutes on a CPU)."
    if name is None:
        return None, (f"The stored APL analyses are of the demo zoo '{data.get('zoo')}'; these experts are not a zoo, "
                      "so only the quick pruning curve below applies to them.")
    if data.get("zoo") != name:  # a file of several zoos (bench_apl_analyses --combine) holds the others here
        other = next((z for z in data.get("other_zoos") or [] if isinstance(z, dict) and z.get("zoo") == name), None)
        if other is not None:
            return other, ""
        return None, (f"The stored APL analyses are of the zoo '{data.get('zoo')}', not this one ('{name}'): run "
                      f"{command} to measure them here.")
    return data, ""
