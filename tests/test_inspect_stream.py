"""``python -m merging inspect`` streams: a large tensor is read and reduced in row chunks, never whole, and
no model is ever loaded as a whole state dict — with the same report as the whole-tensor pass.

Why: on a Qwen2-0.5B shape (a 151,936 × 896 embedding) inspect held every model's whole float32 delta
at once and peaked at 6.45 GB for three 1 GB models. Here the chunk limit is shrunk so that a tiny
model's embedding is "large"; the oracle is computed in the test from whole state dicts.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from merging.cli.main import main
from merging.io import integrity, sources
from merging.io.sources import ModelSource, row_slices

VOCAB, HIDDEN = 384, 16


def _shapes() -> dict[str, tuple[int, ...]]:
    p = "model.layers.0."
    return {"model.embed_tokens.weight": (VOCAB, HIDDEN), p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.q_proj.bias": (HIDDEN,),
            p + "mlp.up_proj.weight": (2 * HIDDEN, HIDDEN), "model.norm.weight": (HIDDEN,)}


@pytest.fixture()
def models(tmp_path):
    """base, a, b folders (bf16 safetensors): experts are the base plus seeded noise."""
    g = torch.Generator().manual_seed(7)
    base = {n: torch.randn(s, generator=g) * 0.1 for n, s in _shapes().items()}
    paths = []
    for index, name in enumerate(("base", "a", "b")):
        state = {n: (t + (torch.randn(t.shape, generator=g) * 0.01 if index else 0)).to(torch.bfloat16)
                 for n, t in base.items()}
        folder = tmp_path / name
        folder.mkdir()
        save_file(state, str(folder / "model.safetensors"))
        paths.append(str(folder))
    return paths


def _inspect(paths, capsys) -> dict:
    assert main(["inspect", *paths, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _guard_whole_reads(monkeypatch, limit: int) -> list[tuple[str, str]]:
    """Make every whole-file load fail, and every whole read of a tensor over ``limit`` float32 bytes;
    returns the chunk reads seen."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("inspect loaded a whole model file")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    monkeypatch.setattr(ModelSource, "_pickled_state", refuse)
    original_get, original_rows = ModelSource.get, ModelSource.get_rows
    seen: list[tuple[str, str]] = []

    def get(self, name):
        if math.prod(self.tensors[name].shape) * 4 > limit:
            raise AssertionError(f"inspect read the whole of large tensor {name}")
        return original_get(self, name)

    def get_rows(self, name, start, stop):
        seen.append((self.name, name))
        return original_rows(self, name, start, stop)

    monkeypatch.setattr(ModelSource, "get", get)
    monkeypatch.setattr(ModelSource, "get_rows", get_rows)
    return seen


def _close(a, b, path="report"):
    """Equal structure; floats equal to 1e-5 relative (chunked float32 sums add in another order)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9), path
    else:
        assert a == b, path


def test_row_slices_cover_the_rows_once():
    assert row_slices((10, 4), chunk_bytes=10_000) == [slice(None)]
    assert row_slices((1000,), chunk_bytes=16) == [slice(None)]  # 1-D tensors are read whole
    parts = row_slices((10, 4), chunk_bytes=48)  # 3 rows of 4 float32 entries a chunk
    assert [(s.start, s.stop) for s in parts] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [(s.start, s.stop) for s in row_slices((5, 1000), chunk_bytes=1)] == [(i, i + 1) for i in range(5)]


def test_inspect_streams_large_tensors_and_reports_as_the_whole_pass(models, monkeypatch, capsys):
    whole = _inspect(models, capsys)  # every tensor under the default limit: read whole, as before
    limit = 4096  # the embedding (384 × 16 float32 = 24 KB) is now large; the blocks' tensors are not
    monkeypatch.setattr(sources, "ROW_CHUNK_BYTES", limit)
    seen = _guard_whole_reads(monkeypatch, limit)
    streamed = _inspect(models, capsys)
    assert {(m, t) for m, t in seen} == {(m, "model.embed_tokens.weight") for m in ("base", "a", "b")}
    assert len(row_slices((VOCAB, HIDDEN))) == 6
    _close(streamed, whole)


def test_inspect_figures_match_an_oracle_from_whole_state_dicts(models, monkeypatch, capsys):
    states = {name: load_file(f"{path}/model.safetensors") for name, path in zip(("base", "a", "b"), models)}
    monkeypatch.setattr(sources, "ROW_CHUNK_BYTES", 4096)
    _guard_whole_reads(monkeypatch, 4096)
    report = _inspect(models, capsys)
    deltas = {e: {n: states[e][n].float() - states["base"][n].float() for n in states["base"]} for e in ("a", "b")}
    for e in ("a", "b"):
        want = math.sqrt(sum(float((d.double() ** 2).sum()) for d in deltas[e].values()))
        assert report["experts"][e]["delta_norm"] == pytest.approx(want, rel=1e-5)
    flat = {e: torch.cat([d.reshape(-1).double() for d in deltas[e].values()]) for e in deltas}
    cosine = float(flat["a"] @ flat["b"] / (flat["a"].norm() * flat["b"].norm()))
    assert report["stats"]["cosine"]["a|b"]["model"] == pytest.approx(cosine, rel=1e-5)
    embed = [deltas[e]["model.embed_tokens.weight"].reshape(-1) for e in ("a", "b")]
    disagree = sum(1 for x, y in zip(*embed) if float(x) * float(y) < 0)
    conflict = report["stats"]["conflict"]["embeddings"]
    assert list(conflict.values()) == pytest.approx([disagree / embed[0].numel()])
    for (x, y) in itertools.combinations(("a", "b"), 2):
        assert f"{x}|{y}" in report["stats"]["cosine"]


def test_nonfinite_scan_reads_large_tensors_in_chunks(models, monkeypatch):
    from merging.io.experts import ExpertSet

    expert_set = ExpertSet.load(models[0], models[1:])
    monkeypatch.setattr(sources, "ROW_CHUNK_BYTES", 4096)
    seen = _guard_whole_reads(monkeypatch, 4096)
    assert integrity.nonfinite_tensors(expert_set) == {}
    assert len(seen) == 3 * len(row_slices((VOCAB, HIDDEN), itemsize=2))  # bf16 on disk: chunks of its own bytes


def test_nonfinite_count_is_exact_across_chunks(tmp_path, monkeypatch):
    """NaN/Inf in two different row chunks of a large tensor: each counted once, the tensor named."""
    state = {"model.embed_tokens.weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16)}
    state["model.embed_tokens.weight"][5, 3] = float("nan")
    state["model.embed_tokens.weight"][300, :2] = float("inf")
    save_file(state, str(tmp_path / "m.safetensors"))
    source = sources.open_model(tmp_path / "m.safetensors", name="m")
    monkeypatch.setattr(sources, "ROW_CHUNK_BYTES", 4096)
    seen = _guard_whole_reads(monkeypatch, 4096)
    assert integrity.count_nonfinite(source, "model.embed_tokens.weight") == 3
    assert len(seen) > 2
