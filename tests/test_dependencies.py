"""The dependency rule, enforced: ``app → components → merging.workbench → merging``.

An AST walk over every import statement (module level and inside functions, since a lazy import is
still a dependency) of every Python file in the repository. The library never imports the UI
toolkits; nothing below the workbench imports it; the layers under the demo zoo never know the zoo.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

UI_TOOLKITS = ("gradio", "plotly", "components", "app")
#: library packages that must never import the demo zoo (it registers itself into them instead)
BELOW_THE_ZOO = ("merging.io", "merging.methods", "merging.apl", "merging.engine", "merging.params",
                 "merging.errors", "merging.paths", "merging.task_vectors")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` (module ``module``, by default its place in the
    repository) imports, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = (module or module_name(path)).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x` imports x
    return found


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(files, forbidden) -> list[str]:
    return [f"{module_name(path)} imports {name}" for path in files for name in sorted(imports_of(path))
            if within(name, forbidden)]


def test_the_library_never_imports_the_ui():
    assert violations(python_files("merging"), UI_TOOLKITS) == []


def test_only_the_app_and_its_tests_import_the_workbench():
    library = [p for p in python_files("merging") if not within(module_name(p), ("merging.workbench",))]
    assert violations(library, ("merging.workbench",)) == []


def test_components_never_import_the_app():
    assert violations(python_files("components"), ("app",)) == []


def test_layers_below_the_zoo_do_not_know_the_zoo():
    low = [p for p in python_files("merging") if within(module_name(p), BELOW_THE_ZOO)]
    assert low, "the layer list names no module: update BELOW_THE_ZOO"
    assert violations(low, ("merging.zoo",)) == []


@pytest.mark.parametrize("source, expected", [
    ("from ..errors import MergeLabError", {"merging.errors", "merging.errors.MergeLabError"}),
    ("from . import kernels", {"merging.methods", "merging.methods.kernels"}),
    ("def f():\n    import gradio as gr", {"gradio"}),
])
def test_the_walk_resolves_relative_and_lazy_imports(tmp_path, source, expected):
    """The checker itself: a relative import is resolved against its package, a lazy one is seen."""
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert imports_of(probe, "merging.methods.probe") == expected


def test_no_test_module_imports_another():
    """Shared fixtures and builders live in conftest.py and helper modules, never in a test module: a test
    module imported by another runs its tests' module-level setup twice and hides where fixtures come from."""
    tests = python_files("tests")
    found = [f"{path.name} imports {name}" for path in tests for name in sorted(imports_of(path, "tests.x"))
             if name.split(".")[0].startswith("test_")]
    assert found == []
