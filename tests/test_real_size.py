"""What keeps a 0.5B model's steps inside a CPU Space's 16 GB, on small models: importance's bodies are read
from the model files on access (never two float32 copies of the model held beside the live one), and the
real-size benchmark's model writer makes a Qwen2 that transformers builds and the checks accept."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from merging.apl.taskloss import Body, body_state
from merging.io.experts import ExpertSet
from merging.io.sources import ModelSource


def _expert_set():
    g = torch.Generator().manual_seed(3)
    shapes = {"embeddings.word_embeddings.weight": (12, 4), "encoder.layer.0.attention.self.query.weight": (4, 4),
              "encoder.layer.0.attention.self.query.bias": (4,)}
    base = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}
    expert = {n: (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
    return ExpertSet.load(ModelSource.from_state_dict("base", base), {"a": ModelSource.from_state_dict("a", expert)}), \
        base, expert


def test_body_reads_float32_on_access_and_holds_nothing():
    expert_set, base, expert = _expert_set()
    reads = []
    source = expert_set.experts["a"].source
    original = source.get
    source.get = lambda name: reads.append(name) or original(name)
    body = body_state(expert_set, "a")
    assert isinstance(body, Body) and not reads  # opening a body reads nothing
    assert list(body) == list(expert) and len(body) == len(expert)
    for name, value in body.items():
        assert value.dtype == torch.float32 and torch.equal(value, expert[name].float())
    first = body["encoder.layer.0.attention.self.query.weight"]
    assert body["encoder.layer.0.attention.self.query.weight"] is not first  # read again, not kept
    assert len(reads) == len(expert) + 2
    assert "nope" not in body and len(reads) == len(expert) + 2  # membership reads no tensor
    with pytest.raises(KeyError):
        body["nope"]
    assert torch.equal(body_state(expert_set, "base")["embeddings.word_embeddings.weight"],
                       base["embeddings.word_embeddings.weight"].float())


def test_body_keeps_what_a_caller_assigns_like_a_dict():
    expert_set, _, expert = _expert_set()
    body = body_state(expert_set, "a")
    edited = torch.zeros(4, 4)
    body["encoder.layer.0.attention.self.query.weight"] = edited
    assert body["encoder.layer.0.attention.self.query.weight"] is edited
    del body["encoder.layer.0.attention.self.query.bias"]
    assert "encoder.layer.0.attention.self.query.bias" not in body and len(body) == len(expert) - 1
    assert dict(body).keys() == {"embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight"}


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_real_size.py"
    spec = importlib.util.spec_from_file_location("bench_real_size", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_writes_a_qwen2_transformers_builds_with_a_full_vocabulary_tokenizer(tmp_path):
    """The benchmark's small model: config, names and shapes transformers' Qwen2 agrees with, tied head, a
    tokenizer with exactly vocab_size ids, experts that differ from the base."""
    bench = _bench()
    if not Path("/usr/share/games/fortunes").is_dir():
        pytest.skip("the Debian fortunes (apt-get install fortunes) are the benchmark's packaged text")
    from merging.io.taskdata import tokenizer_of
    from merging.lm.model import bind_body, causal_lm_from_config

    info = bench.write_models(tmp_path, bench.SMALL)
    expert_set = ExpertSet.load(tmp_path / "base", {t: tmp_path / t for t in bench.TASKS})
    assert expert_set.layout.tied_embeddings and not expert_set.warnings
    model = causal_lm_from_config(json.loads((tmp_path / "base" / "config.json").read_text()), "base")
    bind_body(model, expert_set.layout, lambda n: n, "base")  # every parameter has a tensor of the same name
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    assert len(tokenizer_of(expert_set)) == bench.SMALL["vocab_size"]
    assert all(expert_set.delta(t, "model.layers.0.mlp.up_proj.weight").abs().sum() > 0 for t in bench.TASKS)
    rows = (tmp_path / "data" / "de.jsonl").read_text().splitlines()
    assert len(rows) == bench.N_FEWSHOT + bench.N_PROBE
