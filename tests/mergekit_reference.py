"""Where the tests find mergekit 0.1.5, the reference some of them run: a virtual environment of its own, never a
Merge Lab dependency. ``MERGE_LAB_MERGEKIT_PYTHON`` names its python (``.ci/run`` sets it); without it, the venv
``.ci/run`` makes, ``${MERGE_LAB_CI_CACHE:-${XDG_CACHE_HOME:-~/.cache}/merge-lab-ci}/mergekit-0.1.5-torch-2.13.0``,
once its ``.complete`` marker is there. Make one by hand with
``python -m venv V && V/bin/pip install torch==2.13.0 && V/bin/pip install mergekit==0.1.5``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV = "MERGE_LAB_MERGEKIT_PYTHON"
VENV_NAME = "mergekit-0.1.5-torch-2.13.0"


def ci_venv() -> Path:
    """The venv ``.ci/run`` creates (the same cache folder rule as its shell line)."""
    cache = os.environ.get("MERGE_LAB_CI_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "merge-lab-ci")
    return Path(cache) / VENV_NAME


def mergekit_python() -> Path:
    """The reference's python, or skip the calling test saying what to set."""
    configured = os.environ.get(ENV)
    if configured:
        if not Path(configured).is_file():
            pytest.skip(f"mergekit reference not installed: {ENV}={configured} does not exist")
        return Path(configured)
    venv = ci_venv()
    if (venv / ".complete").is_file() and (venv / "bin" / "python").is_file():
        return venv / "bin" / "python"
    pytest.skip(f"mergekit reference not installed: set {ENV} to a python with mergekit 0.1.5 ({venv} is not "
                "complete)")


def mergekit_yaml() -> Path:
    """The reference's ``mergekit-yaml`` console script, or skip."""
    script = mergekit_python().parent / "mergekit-yaml"
    if not script.is_file():
        pytest.skip(f"mergekit reference incomplete: no mergekit-yaml beside {script.parent / 'python'}")
    return script
