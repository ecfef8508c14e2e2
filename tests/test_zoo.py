"""Zoo: experts beat the base, layout, reproducible training, corruption detection and rebuild."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from merging.errors import MergeLabError
from merging.paths import zoos_root
from merging.zoo.zoo import build_zoo, expert_problem, list_zoos, open_zoo


def test_each_tiny_expert_beats_the_base_on_its_own_task(tiny_zoo):
    for task in tiny_zoo.tasks:
        acc = tiny_zoo.task_record(task)["probe_accuracy"]
        assert acc["expert"] >= acc["base_with_head"] + 0.05, (task, acc)


def test_zoo_layout_and_records(tiny_zoo):
    meta = json.loads((tiny_zoo.root / "zoo.json").read_text())
    assert {"name", "base", "seed", "tasks", "skipped", "steps", "format"} <= set(meta)
    assert meta["format"] == 1 and meta["tasks"] == ["topic", "language"] and meta["steps"] == {"topic": 25, "language": 25}
    for task, folder in tiny_zoo.experts.items():
        assert folder == zoos_root() / "tiny" / "experts" / task
        rec = tiny_zoo.task_record(task)
        assert rec["seed"] == 0 and rec["steps"] == 25 and len(rec["probe_indices"]) == 100
        assert not set(rec["probe_indices"]) & set(rec["fewshot_indices"])
        assert len(tiny_zoo.probe(task)) == 100 and len(tiny_zoo.fewshot(task)) == 32
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == ["BertForSequenceClassification"]
        assert list(cfg["id2label"].values()) == rec["label_names"]
        with safe_open(str(folder / "model.safetensors"), "pt") as fh:
            assert "classifier.weight" in fh.keys() and "bert.encoder.layer.5.output.dense.weight" in fh.keys()
    assert [z.name for z in list_zoos()].count("tiny") == 1


def test_finished_zoo_is_reused(tiny_zoo):
    weights = tiny_zoo.experts["topic"] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = build_zoo(name="tiny", tasks=["topic", "language"], steps=25, seed=0, n_probe=100)
    assert again.experts == tiny_zoo.experts and weights.stat().st_mtime_ns == before


def test_missing_zoo_says_how_to_build():
    with pytest.raises(MergeLabError, match="python -m merging zoo build"):
        open_zoo("never-built")


def test_unknown_task_and_bad_steps_are_clear_errors():
    with pytest.raises(MergeLabError, match="Unknown task"):
        build_zoo(name="bad", tasks=["astrology"])
    with pytest.raises(MergeLabError, match="at least 1"):
        build_zoo(name="bad", tasks=["topic"], steps=0)


@pytest.mark.slow
def test_corruption_is_detected_rebuilt_and_training_is_reproducible():
    """One 2-step expert: truncating its weights is caught before torch, and the rebuild
    (same seed) reproduces the very same weights; a missing zoo.json reuses the expert."""
    kwargs = dict(name="fragile", tasks=["topic"], steps=2, seed=5, n_probe=20)
    zoo = build_zoo(**kwargs)
    weights = zoo.experts["topic"] / "model.safetensors"
    original = weights.read_bytes()

    weights.write_bytes(original[: len(original) // 2])
    assert "truncated" in expert_problem(zoo.experts["topic"])
    with pytest.raises(MergeLabError, match="damaged.*zoo build"):
        open_zoo("fragile")
    assert "fragile" not in [z.name for z in list_zoos()]

    rebuilt = build_zoo(**kwargs)
    assert (rebuilt.experts["topic"] / "model.safetensors").read_bytes() == original  # same seed -> identical weights

    (rebuilt.root / "zoo.json").unlink()  # half-written zoo: experts fine, no zoo.json
    record = rebuilt.task_record("topic")
    again = build_zoo(**kwargs)
    assert (again.root / "zoo.json").is_file()
    assert (again.experts["topic"] / "model.safetensors").read_bytes() == original
    assert not list(zoos_root().glob(".fragile*")), "temporary build folders must be gone"
    assert again.task_record("topic") == record  # reused (its recorded timings too), not retrained


def test_garbage_header_is_a_clear_error(tmp_path):
    from merging.zoo.zoo import safetensors_problem

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert "cannot be read" in safetensors_problem(bad)
    bad.write_bytes(b"\xff" * 8)
    assert "truncated" in safetensors_problem(bad)
