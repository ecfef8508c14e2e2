"""What CI runs: every test. ``slow`` only takes a test out of the fast inner loop (``pytest -m "not slow"``), so
no filter may creep into the command CI runs (README.md's second command, which .ci/run executes) or into the
options pytest always adds, and every marker the tests use is registered."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILTERS = ("-m", "-k", "--deselect", "--ignore", "--ignore-glob", "--lf", "--last-failed", "-x", "--exitfirst")


def _ci_command() -> str:
    """The first line of README.md's second fenced block: the line .ci/run takes (its awk counts fences)."""
    fences = 0
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fences += 1
        elif fences == 3:
            return line
    raise AssertionError("README.md has no second fenced command block")


def _filters(words: list[str]) -> list[str]:
    return [w for w in words if w in FILTERS or any(w.startswith(f + "=") for f in FILTERS if f.startswith("--"))]


def test_ci_runs_every_test_slow_and_browser_ones_included(pytestconfig):
    command = _ci_command()
    assert "&& python -m pytest" in command, command
    ci_run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "README.md" in ci_run and 'bash -c "$test_command"' in ci_run  # CI runs that line as written
    pytest_words = shlex.split(command.split("&& python -m pytest", 1)[1])
    assert _filters(pytest_words) == [], command
    addopts = pytestconfig.getini("addopts")  # pyproject.toml's, as pytest read it
    assert _filters(list(addopts)) == [], addopts


def test_every_marker_the_tests_use_is_registered(pytestconfig):
    registered = {m.split(":", 1)[0].strip() for m in pytestconfig.getini("markers")}
    builtin = {"parametrize", "skipif", "skip", "xfail", "usefixtures", "filterwarnings"}
    used = set()
    for path in Path(__file__).resolve().parent.glob("*.py"):
        used |= set(re.findall(r"pytest\.mark\.([a-z_]+)", path.read_text(encoding="utf-8")))
    assert used - builtin <= registered, used - builtin - registered
    assert {"slow", "browser"} <= registered
