"""A public deployment reads local models only inside MERGE_LAB_ALLOWED_ROOTS (plus the cache)."""

import os

import pytest
import tiny_models as tm

from merging import MergeLabError
from merging.io.sources import open_model


@pytest.fixture
def roots(tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    monkeypatch.setenv("MERGE_LAB_ALLOWED_ROOTS", str(allowed))
    tm.save(tm.build("bert"), allowed / "ok")
    tm.save(tm.build("bert"), outside / "secret")
    return allowed, outside


def test_paths_inside_a_root_open(roots):
    allowed, _ = roots
    assert open_model(allowed / "ok").tensors


def test_absolute_paths_elsewhere_are_refused(roots):
    _, outside = roots
    with pytest.raises(MergeLabError, match="not allowed here.*lies outside"):
        open_model(outside / "secret")


def test_dotdot_cannot_escape(roots):
    allowed, _ = roots
    with pytest.raises(MergeLabError, match="not allowed here.*'\\.\\.'"):
        open_model(f"{allowed}/../outside/secret")


def test_symlink_out_of_a_root_is_refused(roots):
    allowed, outside = roots
    os.symlink(outside / "secret", allowed / "link")
    with pytest.raises(MergeLabError, match="not allowed here"):
        open_model(allowed / "link")


def test_no_restriction_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("MERGE_LAB_ALLOWED_ROOTS", raising=False)
    assert open_model(tm.save(tm.build("bert"), tmp_path / "anywhere")).tensors
