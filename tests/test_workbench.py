"""The app's session logic (merging/workbench.py), without any UI: load → importance → plan → merge → probe → export.

Uses the session-scoped ``tiny_zoo`` fixture from conftest.py when it exists; otherwise
``app_zoo`` builds an equivalent 2-task zoo of tiny BERTs in the zoo layout (seconds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from merging import workbench as wb
from merging.errors import MergeLabError

TINY_ZOO = "tiny-app"
WORDS = [f"w{i}" for i in range(40)]


# ---------------------------------------------------------------- a tiny zoo (fallback fixture)


def _examples(n: int, seed: int, labels: int) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = int(torch.randint(0, labels, (1,), generator=g))
        length = int(torch.randint(3, 8, (1,), generator=g))
        # the label leaves a trace in the words so the experts' heads have something to find
        words = [WORDS[(label * 7 + int(w)) % len(WORDS)] for w in torch.randint(0, 6, (length,), generator=g)]
        out.append((" ".join(words), label))
    return out


def _write_jsonl(path: Path, rows, labels) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for text, label in rows:
            fh.write(json.dumps({"text": text, "label": label, "label_name": labels[label]}) + "\n")


def build_tiny_zoo(cache: Path, name: str = TINY_ZOO, layers: int = 2):
    """A zoo of two tiny BERT experts (2 and 3 classes) written in the zoo's on-disk layout."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    root = cache / "zoo" / name
    if (root / "zoo.json").is_file():
        from merging.zoo.zoo import open_zoo

        return open_zoo(name)
    vocab = cache / "vocab.txt"
    cache.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    cfg = dict(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=40)
    torch.manual_seed(0)
    base = BertModel(BertConfig(**cfg))
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    tasks = {"topic": ["a", "b"], "mood": ["neg", "neu", "pos"]}
    for i, (task, labels) in enumerate(tasks.items()):
        model = BertForSequenceClassification(BertConfig(**cfg, num_labels=len(labels)))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name_, param in model.bert.named_parameters():
                base_param = dict(base.named_parameters())[name_]
                param.copy_(base_param + 0.05 * torch.randn(param.shape, generator=g))
            model.classifier.weight.copy_(0.5 * torch.randn(model.classifier.weight.shape, generator=g))
        folder = root / "experts" / task
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "merge_lab_task.json").write_text(json.dumps({"task": task, "label_names": labels}))
        _write_jsonl(folder / "fewshot.jsonl", _examples(16, 100 + i, len(labels)), labels)
        _write_jsonl(folder / "probe.jsonl", _examples(24, 200 + i, len(labels)), labels)
    (root / "zoo.json").write_text(json.dumps({"name": name, "base": str(base_dir), "seed": 0,
                                               "tasks": list(tasks), "skipped": {}, "steps": {}, "format": 1}))
    from merging.zoo.zoo import open_zoo

    return open_zoo(name)


def _cache_root() -> Path:
    from merging.paths import cache_root

    return cache_root()


@pytest.fixture(scope="session")
def app_zoo():
    """(zoo, cache root): a zoo of two tiny random BERTs in the zoo layout under MERGE_LAB_CACHE (instant).

    Sets MERGE_LAB_ZOO so ``zoo:`` refs and the app resolve to it.
    """
    cache = _cache_root()
    zoo = build_tiny_zoo(cache)
    os.environ["MERGE_LAB_ZOO"] = zoo.name
    return zoo, cache


@pytest.fixture(scope="session")
def real_zoo(request):
    """(zoo, cache root): the project's ``tiny_zoo`` (real experts of the packaged base) when conftest has it,
    else the instant fake zoo. The API and browser tests use this one (MERGE_LAB_TEST_FAKE_ZOO=1 forces
    the fake zoo, for quick local iterations)."""
    if os.environ.get("MERGE_LAB_TEST_FAKE_ZOO") == "1":
        return request.getfixturevalue("app_zoo")
    try:
        zoo = request.getfixturevalue("tiny_zoo")
    except pytest.FixtureLookupError:
        return request.getfixturevalue("app_zoo")
    os.environ["MERGE_LAB_ZOO"] = zoo.name
    return zoo, Path(zoo.root).parent.parent


@pytest.fixture()
def loaded(app_zoo):
    zoo, _ = app_zoo
    base, refs = wb.zoo_refs(zoo)
    return wb.load_experts(wb.Session(), base, refs, zoo=zoo), zoo


# ---------------------------------------------------------------- tests


def test_load_experts_table_and_data(loaded):
    session, zoo = loaded
    assert session.experts == list(zoo.tasks)
    assert session.layers[0] == "embeddings" and session.layers[-1] == "head"
    assert [r[0] for r in session.summary] == list(zoo.tasks)
    assert all(r[3] > 0 for r in session.summary)  # delta norms
    assert not session.missing_data()
    assert "few-shot" in wb.data_status(session)


def test_load_errors_are_readable(app_zoo):
    zoo, _ = app_zoo
    base, refs = wb.zoo_refs(zoo)
    with pytest.raises(MergeLabError, match="at least two"):
        wb.load_experts(wb.Session(), base, dict(list(refs.items())[:1]), zoo=zoo)
    with pytest.raises(MergeLabError, match="not found"):
        wb.load_experts(wb.Session(), base, {**refs, "ghost": "/no/such/folder"}, zoo=zoo)


def test_parse_extra_refs():
    assert wb.parse_extra_refs("a=/x/y\n/z/w.safetensors\n# note\nhf:org/m@main") == {
        "a": "/x/y", "w": "/z/w.safetensors", "m": "hf:org/m@main"}


def test_missing_data_blocks_apl_and_says_why(loaded, tmp_path):
    session, _ = loaded
    expert = session.experts[0]
    del session.data[expert]
    assert "no task data" in wb.data_status(session)
    assert "few-shot" in wb.method_available(session, "apl")
    assert wb.method_available(session, "task_arithmetic") is None
    with pytest.raises(MergeLabError, match="no task data"):
        wb.compute_importance(session)
    # attach a CSV with the right number of labels
    labels = len(loaded[1].label_names(expert))
    rows = ["text,label"] + [f"w{i} w{i+1},{chr(97 + i % labels)}" for i in range(30)]
    path = tmp_path / "mine.csv"
    path.write_text("\n".join(rows))
    wb.attach_task_data(session, expert, path, n_fewshot=8)
    assert session.data[expert].source == "mine.csv" and 6 <= len(session.data[expert].fewshot) <= 8
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(["text,label"] + [f"w{i},{chr(97 + i % 5)}" for i in range(30)]))
    with pytest.raises(MergeLabError, match="labels"):
        wb.attach_task_data(session, expert, bad)


def test_importance_calibration_overrides_merge_probe_export(loaded, tmp_path):
    session, zoo = loaded
    wb.compute_importance(session, n_fewshot=8, mode="gradient")
    imp = session.importance
    assert set(imp.experts) == set(session.experts) and "module" in imp.signed and imp.units
    shared = {"drop_ratio": 0.5}
    table = wb.view_prepared(session, "apl", shared)["table"]  # APL's prepare, fed the importance map
    sugg = wb.plan(session, "apl", shared)
    e0 = session.experts[0]
    assert sugg[e0]["drop_ratio"] == pytest.approx(table.drop[e0])
    assert wb.suggestion_source(session, "apl", shared).startswith("APL")
    # a slider move is an override; the recipe records it beside the suggestion
    wb.set_cell(session, e0, "0", "drop_ratio", 0.9)
    assert wb.is_overridden(session, e0, "drop_ratio", "0")
    assert wb.plan(session, "apl", shared)[e0]["drop_ratio"]["0"] == 0.9
    recipe = wb.build_recipe(session, "apl", shared)
    assert recipe.experts[0].parameters["drop_ratio"]["0"] == 0.9
    assert recipe.experts[0].parameters["drop_ratio"]["1"] == pytest.approx(table.drop[e0]["1"])
    assert recipe.suggested["overrides"][0]["layer"] == "0"
    assert recipe.suggested["overrides"][0]["suggested"] == pytest.approx(table.drop[e0]["0"])
    assert recipe.suggested["apl"]["drop_ratio"][e0]["0"] == pytest.approx(table.drop[e0]["0"])
    assert recipe.calibrated is not None and recipe.few_shot[e0]["file"] == session.refs[e0]
    # the page's temperature reaches the calibration (it used to be ignored after Compute importance)
    hot = wb.suggestion(session, "apl", {"drop_ratio": 0.5, "tau1": 1e6})
    assert max(hot[e0]["drop_ratio"].values()) - min(hot[e0]["drop_ratio"].values()) < \
        max(table.drop[e0].values()) - min(table.drop[e0].values())
    summary = wb.merge(session, "apl", {"drop_ratio": 0.5, "tau1": 2.0, "tau2": 2.0, "q_min": 0.01})
    assert summary.recomputed > 0
    first = wb.run_probe(session)
    assert [r.name for r in first.rows][-1] == summary.label
    # second merge after one more override re-merges only that layer
    wb.set_cell(session, e0, "1", "weight", 0.5)
    again = wb.merge(session, "apl", {"drop_ratio": 0.5, "tau1": 2.0, "tau2": 2.0, "q_min": 0.01})
    assert again.changed_layers == ["1"]
    report = wb.run_probe(session)
    names = [r.name for r in report.rows]
    assert names[0] == "base" and summary.label in names and again.label in names
    headers, rows = wb.history_rows(session)
    assert len(rows) == 2 and rows[-1][2] is not None
    preds = wb.predict(session, "w1 w2 w3")
    assert {r[1] for r in preds} == {"base", "expert", "merged"}
    wb.reset_overrides(session)
    assert not session.overrides
    path = wb.export(session, dtype="float16")
    assert wb.zip_is_stored(path)
    names = wb.read_zip_names(path)
    assert "recipe.yaml" in names and "importance.json" in names
    assert any(n.endswith("model.safetensors") for n in names) and any(n.endswith("README.md") for n in names)


def test_presets(loaded):
    session, _ = loaded
    wb.preset_uniform(session, 0.3, 1.0)
    values = wb.plan(session, "dare_linear", {"drop_ratio": 0.5})
    assert all(v == 0.3 for e in values for v in values[e]["drop_ratio"].values())
    wb.preset_layer_swap(session)
    a, b = session.experts[:2]
    outer, middle = wb.layer_swap_groups(session.layers)
    assert "embeddings" in outer and "head" in outer and middle
    p = wb.plan(session, "linear", {})
    assert all(p[a]["weight"][k] == 1.0 and p[b]["weight"][k] == 0.0 for k in outer)
    assert all(p[b]["weight"][k] == 1.0 and p[a]["weight"][k] == 0.0 for k in middle)
    assert wb.layer_swap_groups(["embeddings", *map(str, range(6)), "head"]) == (
        ["embeddings", "0", "1", "4", "5", "head"], ["2", "3"])


def test_table_edit_records_overrides(loaded):
    session, _ = loaded
    headers, rows = wb.table_rows(session, "weight", "task_arithmetic", {})
    assert headers == ["expert", *session.layers]
    rows[1][2] = 0.25
    wb.apply_table(session, "weight", rows, "task_arithmetic", {})
    assert session.overrides == {session.experts[1]: {"weight": {session.layers[1]: 0.25}}}
    params = wb.expert_parameters(session, "task_arithmetic", {})
    assert params[session.experts[1]]["weight"][session.layers[1]] == 0.25
    assert session.experts[0] not in params


def test_merge_without_importance_uses_uniform(loaded):
    session, _ = loaded
    assert "Compute importance" in wb.method_available(session, "apl")
    summary = wb.merge(session, "dare_linear", {"drop_ratio": 0.3, "lambda": 1.0, "rescale": True})
    assert summary.method == "dare_linear"
    assert session.last_recipe.parameters["drop_ratio"] == 0.3


def test_model_cache_is_bounded_and_shared(loaded):
    session, zoo = loaded
    cache = wb.ModelCache(max_entries=1)
    a = cache.put(wb.Models("a", None, None))
    cache.put(wb.Models("b", None, None))
    assert len(cache) == 1 and cache.get("a") is None and a.key == "a"
    other = wb.load_experts(wb.Session(), session.base_ref, session.refs, zoo=zoo)
    assert wb.models_for(other) is wb.models_for(session) and other.id != session.id


def test_old_exports_are_deleted(app_zoo):
    root = wb.exports_root()
    old = root / "old.zip"
    old.write_bytes(b"x")
    os.utime(old, (1, 1))
    assert wb.clean_old_exports() >= 1 and not old.exists()
