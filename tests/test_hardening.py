"""Hostile and broken input: every bad model, file and number gets a clear message naming what is wrong —
in the session logic, through the HTTP API (what a browser page shows) and in the CLI — and the app stays
usable afterwards. Also: history download/restore, and an export that fails on a full disk.

Uses the instant fake zoo (``app_zoo``: tiny random BERTs in the zoo layout); the server is launched the
way ``python app.py`` launches it (``app.launch_kwargs``), with a 1 MB upload cap.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import gradio as gr
import pytest
import torch
from safetensors.torch import load_file, save_file
from served_app import error_message, launched_app

from components import handlers as h
from merging import workbench as wb
from merging.errors import MergeLabError

TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")
QUERY = "bert.encoder.layer.0.attention.self.query.weight"


# ---------------------------------------------------------------- building broken models


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _poison(folder: Path, name: str, value: float) -> None:
    state = load_file(str(folder / "model.safetensors"))
    state[name] = state[name].clone()
    state[name].view(-1)[3] = value
    save_file(state, str(folder / "model.safetensors"))


def make_bad_models(root: Path, zoo) -> dict[str, Path]:
    """Broken copies of the zoo's 'topic' expert (and a few foreign models), one per way to be broken."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2Model

    good = Path(zoo.experts["topic"])
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    out["truncated"] = _copy(good, root / "truncated")
    weights = out["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    out["garbage"] = _copy(good, root / "garbage")
    (out["garbage"] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" * 20)
    out["lying"] = _copy(good, root / "lying")
    _rewrite_header(out["lying"] / "model.safetensors", lambda hd: hd[QUERY].update(shape=[32, 16]))
    out["nan"] = _copy(good, root / "nan")
    _poison(out["nan"], "bert.encoder.layer.1.output.dense.weight", float("nan"))
    out["inf"] = _copy(good, root / "inf")
    _poison(out["inf"], "bert.embeddings.word_embeddings.weight", float("inf"))
    base_cfg = json.loads((Path(zoo.base_path) / "config.json").read_text())
    cfg = {k: base_cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                    "max_position_embeddings")}
    vocab = BertForSequenceClassification(BertConfig(**cfg, vocab_size=base_cfg["vocab_size"] + 7, num_labels=2))
    vocab.save_pretrained(root / "vocab")
    out["vocab"] = root / "vocab"
    GPT2Model(GPT2Config(vocab_size=base_cfg["vocab_size"], n_embd=16, n_layer=2, n_head=2,
                         n_positions=40)).save_pretrained(root / "gpt2")
    out["gpt2"] = root / "gpt2"
    out["remote"] = _copy(good, root / "remote")
    config = json.loads((out["remote"] / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.Model"}
    (out["remote"] / "config.json").write_text(json.dumps(config))
    out["pickled"] = root / "pickled"
    out["pickled"].mkdir()
    (out["pickled"] / "config.json").write_text((good / "config.json").read_text())
    torch.save(load_file(str(good / "model.safetensors")), out["pickled"] / "pytorch_model.bin")
    return out


# What the page says for each (a substring of the exact message; the full texts are in the report).
EXPECTED = {
    "truncated": "is truncated: tensor",
    "garbage": "has a corrupt safetensors header (not a valid JSON object)",
    "lying": f"the header says tensor '{QUERY}' is F32 of shape (32, 16)",
    "vocab": "has vocab size 52 but the base has 45",
    "gpt2": "gpt2 model but the base is bert",
    "remote": "Merge Lab never runs remote code",
    "pickled": "pickles can run code",
}


@pytest.fixture(scope="module")
def bad(app_zoo, tmp_path_factory):
    zoo, _ = app_zoo
    return make_bad_models(tmp_path_factory.mktemp("bad-models"), zoo)


def _refs(zoo, **extra):
    base, refs = wb.zoo_refs(zoo, ["mood"])
    return base, {**refs, **{k: str(v) for k, v in extra.items()}}


# ---------------------------------------------------------------- session logic


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_broken_model_gets_a_clear_message(app_zoo, bad, case):
    zoo, _ = app_zoo
    base, refs = _refs(zoo, broken=bad[case])
    with pytest.raises(MergeLabError) as info:
        wb.load_experts(wb.Session(), base, refs, zoo=zoo)
    assert EXPECTED[case] in str(info.value), str(info.value)
    assert "Traceback" not in str(info.value)


def test_nan_and_inf_weights_warn_at_load_block_importance_and_name_the_tensor_at_merge(app_zoo, bad):
    zoo, _ = app_zoo
    base, refs = _refs(zoo, nan=bad["nan"], inf=bad["inf"])
    session = wb.load_experts(wb.Session(), base, refs, zoo=zoo)
    warnings = "\n".join(wb.load_warnings(session))
    assert "model 'nan' has NaN/Inf weights in 'bert.encoder.layer.1.output.dense.weight' (1 value)" in warnings
    assert "model 'inf' has NaN/Inf weights in 'bert.embeddings.word_embeddings.weight'" in warnings
    session.data["nan"] = session.data["inf"] = session.data["mood"]
    with pytest.raises(MergeLabError, match="importance cannot use a broken checkpoint"):
        wb.compute_importance(session, n_fewshot=8)
    with pytest.raises(MergeLabError, match=r"model 'inf' has 1 NaN/Inf value\(s\) in tensor 'embeddings.word_emb"):
        wb.merge(session, "task_arithmetic", {})  # the engine names the first broken tensor it meets


def test_missing_tokenizer_warns_then_importance_says_what_to_add(app_zoo, tmp_path):
    zoo, _ = app_zoo
    folders = {"base": Path(zoo.base_path), **{t: Path(p) for t, p in zoo.experts.items()}}
    copies = {}
    for name, folder in folders.items():
        copies[name] = _copy(folder, tmp_path / name)
        for f in TOKENIZER_FILES:
            (copies[name] / f).unlink(missing_ok=True)
    session = wb.load_experts(wb.Session(), str(copies["base"]), {t: str(copies[t]) for t in zoo.tasks})
    assert any("no tokenizer found" in w for w in wb.load_warnings(session))
    for t in zoo.tasks:
        session.data[t] = wb.TaskData([("w1 w2", 0)] * 8, [("w1 w2", 0)] * 4, ["a", "b"], "test")
    with pytest.raises(MergeLabError, match="no tokenizer found in the base or the experts"):
        wb.compute_importance(session, n_fewshot=8)
    assert wb.merge(session, "task_arithmetic", {}).label == "#1 task_arithmetic"  # weight-only still works


def test_uploads_are_checked_before_use(app_zoo, bad, tmp_path, monkeypatch):
    zoo, _ = app_zoo
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(MergeLabError, match=r"'notes.txt' is not a .safetensors file"):
        wb.accept_upload(text)
    with pytest.raises(MergeLabError, match="is truncated: tensor"):
        wb.accept_upload(bad["truncated"] / "model.safetensors", "truncated.safetensors")
    monkeypatch.setenv("MERGE_LAB_MAX_UPLOAD_MB", "0.01")
    with pytest.raises(MergeLabError, match=r"over this server's upload limit of 0 MB \(MERGE_LAB_MAX_UPLOAD_MB\)"):
        wb.accept_upload(Path(zoo.experts["topic"]) / "model.safetensors", "topic.safetensors")
    monkeypatch.delenv("MERGE_LAB_MAX_UPLOAD_MB")
    placed = Path(wb.accept_upload(Path(zoo.experts["topic"]) / "model.safetensors", "topic.safetensors"))
    from merging.paths import cache_root

    assert placed.is_relative_to(cache_root()) and placed.suffix == ".safetensors"
    # the uploads folder is inside the cache root, which MERGE_LAB_ALLOWED_ROOTS always admits
    monkeypatch.setenv("MERGE_LAB_ALLOWED_ROOTS", str(tmp_path / "models-only"))
    base, refs = _refs(zoo, topic=placed)
    assert wb.load_experts(wb.Session(), base, refs, zoo=zoo).experts == ["mood", "topic"]


def test_numbers_are_validated_naming_the_field(app_zoo):
    zoo, _ = app_zoo
    session = wb.load_experts(wb.Session(), *wb.zoo_refs(zoo), zoo=zoo)
    cases = [
        (lambda: wb.compute_importance(session, 1000), "Few-shot examples per expert must lie in [4, 128]"),
        (lambda: wb.compute_importance(session, 7.5), "Few-shot examples per expert must be a whole number"),
        (lambda: wb.compute_importance(session, 8, "bogus"), "Mode must be one of gradient, exact"),
        (lambda: wb.compute_importance(session, 8, "gradient", "x"), "Intervention must be one of restore, ablate"),
        (lambda: wb.set_cell(session, "topic", "0", wb.DROP, 1.5), "layer 0 drop ratio must lie in [0, 0.999]"),
        (lambda: wb.set_cell(session, "topic", "0", wb.WEIGHT, float("nan")), "layer 0 weight must be a finite"),
        (lambda: wb.merge(session, "dare_linear", {"drop_ratio": 5}), "drop ratio must lie in [0, 0.999]"),
        (lambda: wb.merge(session, "task_arithmetic", {"lambda": -1}), "lambda must lie in [0, 5]"),
        (lambda: wb.merge(session, "task_arithmetic", {}, seed=-3), "Seed must lie in [0, 2147483647]"),
        (lambda: wb.merge(session, "nope", {}), "Method must be one of"),
        (lambda: wb.apply_table(session, wb.WEIGHT, [["topic", "x"]]), "table cell topic/embeddings (weight) must be"),
        (lambda: h.dtype_of("int8"), "dtype must be one of fp32, fp16, bf16"),
        (lambda: wb.predict(session, "w" * 5000), "Try a sentence: at most 2000 characters"),
    ]
    for call, message in cases:
        with pytest.raises(MergeLabError) as info:
            call()
        assert message in str(info.value), (message, str(info.value))
    assert not session.overrides  # nothing half-applied


def test_export_on_a_full_disk_keeps_the_previous_zip(app_zoo, monkeypatch):
    zoo, _ = app_zoo
    session = wb.load_experts(wb.Session(), *wb.zoo_refs(zoo), zoo=zoo)
    wb.merge(session, "task_arithmetic", {"lambda": 0.9})
    first = wb.export(session, dtype="float32")
    before = first.read_bytes()
    folders = set(wb.exports_root().iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("merging.io.export.save_file", disk_full)  # the buffered shard writer
    monkeypatch.setattr("merging.io.export._pwrite_all", disk_full)  # the planned one (export's default)
    with pytest.raises(gr.Error) as info:
        h.safe(wb.export)(session, dtype="float16")  # what the page shows
    assert "export failed: the server's disk is full. Earlier exports are untouched" in str(info.value)
    assert first.read_bytes() == before and zipfile.ZipFile(first).testzip() is None
    assert set(wb.exports_root().iterdir()) == folders  # the half-written folder is gone


def test_history_round_trip_restores_table_recipes_and_overrides(app_zoo, tmp_path):
    zoo, _ = app_zoo
    session = wb.load_experts(wb.Session(), *wb.zoo_refs(zoo), zoo=zoo)
    wb.set_cell(session, "topic", "1", wb.WEIGHT, 0.4)
    wb.merge(session, "task_arithmetic", {"lambda": 0.8})
    wb.run_probe(session)
    wb.merge(session, "dare_linear", {"drop_ratio": 0.3}, seed=2)
    path = wb.save_history(session)
    data = json.loads(path.read_text())
    assert [m["label"] for m in data["merges"]] == ["#1 task_arithmetic", "#2 dare_linear"]
    assert data["merges"][1]["recipe"]["parameters"]["drop_ratio"] == 0.3 and data["merges"][0]["metrics"]
    fresh = wb.load_experts(wb.Session(), *wb.zoo_refs(zoo), zoo=zoo)
    fresh, note = wb.restore_history(fresh, path)
    headers, rows = wb.history_rows(fresh)
    assert [r[0] for r in rows] == ["#1 task_arithmetic", "#2 dare_linear"] and rows[0][2] is not None
    assert "Restored 2 merge(s)" in note and "override(s) are restored" in note
    assert fresh.overrides == {"topic": {"weight": {"1": 0.4}}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(MergeLabError, match="not a Merge Lab history file"):
        wb.restore_history(fresh, bad)
    bad.write_text("{oops")
    with pytest.raises(MergeLabError, match="not valid JSON"):
        wb.restore_history(fresh, bad)
    # hand-edited metrics: whatever is not {task: {name: finite number}} is dropped, the table still renders
    data["merges"][0]["metrics"] = {"topic": {"accuracy": "high", "loss": 0.5}, "mood": 3, "x": {"accuracy": None}}
    data["merges"][1]["metrics"] = ["not", "a", "dict"]
    bad.write_text(json.dumps(data))
    again, _ = wb.restore_history(wb.load_experts(wb.Session(), *wb.zoo_refs(zoo), zoo=zoo), bad)
    assert again.history[0]["metrics"] == {"topic": {"loss": 0.5}} and again.history[1]["metrics"] is None
    headers, rows = wb.history_rows(again)
    assert headers[:4] == ["merge", "method", "mean accuracy", "topic acc"] and rows[0][2:4] == [None, None]


def test_cli_inspect_reports_broken_models_in_one_line(app_zoo, bad, capsys):
    from merging.cli.main import main

    zoo, _ = app_zoo
    for case in ("truncated", "lying", "vocab", "gpt2", "remote"):
        capsys.readouterr()
        assert main(["inspect", str(zoo.base_path), str(zoo.experts["mood"]), str(bad[case])]) == 2, case
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (case, err)
        assert EXPECTED[case] in err, (case, err)  # the same words as the page: file and tensor named


# ---------------------------------------------------------------- through the HTTP API (what the page shows)


@pytest.fixture(scope="module")
def hard_url(app_zoo):
    zoo, _ = app_zoo
    patch = pytest.MonkeyPatch()
    patch.setenv("MERGE_LAB_ZOO", zoo.name)
    patch.setenv("MERGE_LAB_MAX_UPLOAD_MB", "1")
    try:
        with launched_app() as url:
            yield url
    finally:
        patch.undo()


def test_api_bad_loads_then_a_good_load_works(hard_url, app_zoo, bad, tmp_path):
    from gradio_client import Client, handle_file

    zoo, _ = app_zoo
    client = Client(hard_url, verbose=False)
    base = f"zoo:{zoo.name}/base"
    for case, expected in EXPECTED.items():
        text = error_message(lambda case=case: client.predict(base, ["mood"], f"broken={bad[case]}", None, "apl",
                                               api_name="/load_experts"))
        assert expected in text, (case, text)
    # uploads: a bare .safetensors expert that is broken, a file of another type, one over the 1 MB cap
    lying = tmp_path / "lying.safetensors"
    shutil.copy(bad["lying"] / "model.safetensors", lying)
    text = error_message(lambda: client.predict(base, ["mood"], "", [handle_file(str(lying))], "apl",
                                           api_name="/load_experts"))
    assert EXPECTED["lying"] in text
    notes = tmp_path / "expert.bin"
    notes.write_bytes(b"\x80\x02}q\x00.")
    text = error_message(lambda: client.predict(base, ["mood"], "", [handle_file(str(notes))], "apl",
                                           api_name="/load_experts"))
    assert "not a .safetensors file" in text or "Invalid file type" in text, text
    big = tmp_path / "big.safetensors"
    save_file({"x": torch.zeros(400_000)}, str(big))  # 1.6 MB
    text = error_message(lambda: client.predict(base, ["mood"], "", [handle_file(str(big))], "apl",
                                           api_name="/load_experts"))
    assert "upload limit" in text or "exceeds the maximum" in text or "too large" in text.lower(), text
    # NaN: loads, with a warning naming the tensor, then Merge names it too
    out = client.predict(base, ["mood"], f"nan={bad['nan']}", None, "apl", api_name="/load_experts")
    assert "NaN/Inf weights in 'bert.encoder.layer.1.output.dense.weight'" in out[1]
    text = error_message(lambda: client.predict("task_arithmetic", 0, api_name="/merge"))
    assert "NaN/Inf value(s) in tensor 'encoder.layer.1.output.dense.weight'" in text
    # the same client (same session) still works: a good load, then a merge
    out = client.predict(base, list(zoo.tasks), "", None, "apl", api_name="/load_experts")
    rows = out[0]["data"] if isinstance(out[0], dict) else out[0]
    assert [r[0] for r in rows] == list(zoo.tasks)
    assert "#1 task_arithmetic" in client.predict("task_arithmetic", 0, api_name="/merge")  # the failed one did not count


def test_api_out_of_range_numbers_are_refused_naming_the_field(hard_url, app_zoo):
    from gradio_client import Client

    zoo, _ = app_zoo
    client = Client(hard_url, verbose=False)
    client.predict(f"zoo:{zoo.name}/base", list(zoo.tasks), "", None, "apl", api_name="/load_experts")
    params = dict(zip(h.PARAM_NAMES, [None] * len(h.PARAM_NAMES)))

    def merge_with(method="task_arithmetic", seed=0, **values):
        row = [values.get(n, params[n]) for n in h.PARAM_NAMES]
        return lambda: client.predict(method, seed, *row, api_name="/merge")

    checks = [
        (lambda: client.predict(1000, "gradient", "restore", "apl", api_name="/compute_importance"),
         "Few-shot examples per expert"),
        (lambda: client.predict(-4, "gradient", "restore", "apl", api_name="/compute_importance"),
         "Few-shot examples per expert"),
        (lambda: client.predict(8, "sideways", "restore", "apl", api_name="/compute_importance"), "Mode"),
        (lambda: client.predict(8, "gradient", "both", "apl", api_name="/compute_importance"), "Intervention"),
        (lambda: client.predict("topic", "0", "drop_ratio", 7.0, "apl", api_name="/set_layer"),
         "layer 0 drop ratio must lie in [0, 0.999]"),
        (lambda: client.predict("topic", "0", "weight", -80, "apl", api_name="/set_layer"),
         "layer 0 weight must lie in [-5, 5]"),
        (lambda: client.predict("topic", "99", "weight", 1, "apl", api_name="/set_layer"), "layer '99' does not exist"),
        (merge_with(seed=-1), "Seed"),
        (merge_with(**{"lambda": 50}), "lambda"),
        (merge_with("dare_linear", drop_ratio=1.5), "drop ratio"),
        (merge_with("ties", trim_scope="galaxy"), "trim scope"),
        (merge_with("fancy"), "Method"),
        (lambda: client.predict(list(zoo.tasks), "int8", api_name="/export"), "dtype"),
        (lambda: client.predict(0, api_name="/compare_interventions"), "Few-shot examples per expert"),
    ]
    for call, field in checks:
        text = error_message(call)
        assert field in text, (field, text)
    client.predict("task_arithmetic", 0, api_name="/merge")
    assert "Export tasks" in error_message(lambda: client.predict(["ghost"], "fp32", api_name="/export"))
    # after all that, the session still merges and probes
    assert "#2 dare_linear" in client.predict("dare_linear", 3, *[{"drop_ratio": 0.4}.get(n) for n in h.PARAM_NAMES],
                                              api_name="/merge")
    assert client.predict(api_name="/run_probe")[0]["data"][0][0] == "base"


def test_api_paths_outside_allowed_roots_are_refused(hard_url, app_zoo, bad, tmp_path, monkeypatch):
    from gradio_client import Client

    zoo, _ = app_zoo
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv("MERGE_LAB_ALLOWED_ROOTS", str(allowed))  # the server runs in this process
    client = Client(hard_url, verbose=False)
    outside = shutil.copytree(zoo.experts["topic"], tmp_path / "elsewhere")
    text = error_message(lambda: client.predict(f"zoo:{zoo.name}/base", ["mood"], f"mine={outside}", None, "apl",
                                           api_name="/load_experts"))
    assert f"path '{outside}' is not allowed here" in text and "it lies outside them" in text
    sneaky = f"{allowed}/../elsewhere"
    text = error_message(lambda: client.predict(f"zoo:{zoo.name}/base", ["mood"], f"mine={sneaky}", None, "apl",
                                           api_name="/load_experts"))
    assert "is not allowed here" in text and "through '..' or a symlink" in text
    inside = shutil.copytree(zoo.experts["topic"], allowed / "topic")
    out = client.predict(f"zoo:{zoo.name}/base", ["mood"], f"mine={inside}", None, "apl", api_name="/load_experts")
    assert "homology check passed" in out[1]


def test_api_history_download_and_restore(hard_url, app_zoo):
    from gradio_client import Client, handle_file

    zoo, _ = app_zoo
    first = Client(hard_url, verbose=False)
    base = f"zoo:{zoo.name}/base"
    first.predict(base, list(zoo.tasks), "", None, "apl", api_name="/load_experts")
    first.predict("topic", "1", "weight", 0.25, "task_arithmetic", api_name="/set_layer")
    first.predict("task_arithmetic", 0, api_name="/merge")
    first.predict(api_name="/run_probe")
    saved = first.predict(api_name="/download_history")
    path = saved[0]["value"] if isinstance(saved[0], dict) else saved[0]
    data = json.loads(Path(path).read_text())
    assert data["merges"][0]["recipe"]["experts"][0]["parameters"]["weight"]["1"] == 0.25
    returning = Client(hard_url, verbose=False)  # a new session: the user came back
    returning.predict(base, list(zoo.tasks), "", None, "apl", api_name="/load_experts")
    table, note = returning.predict(handle_file(path), api_name="/restore_history")
    assert [r[0] for r in table["data"]] == ["#1 task_arithmetic"] and table["data"][0][2] is not None
    assert "Restored 1 merge(s)" in note and "override(s) are restored" in note


def test_bad_deployment_limits_warn_and_fall_back(monkeypatch):
    monkeypatch.setenv("MERGE_LAB_CACHE_BYTES", "lots")
    with pytest.warns(UserWarning, match="MERGE_LAB_CACHE_BYTES='lots' is not a positive size"):
        assert wb.cache_budget_bytes() == 4 * 1024**3
    monkeypatch.setenv("MERGE_LAB_CACHE_BYTES", "512M")
    assert wb.cache_budget_bytes() == 512 * 1024**2
    monkeypatch.setenv("MERGE_LAB_MAX_UPLOAD_MB", "-3")
    with pytest.warns(UserWarning, match="MERGE_LAB_MAX_UPLOAD_MB='-3'"):
        assert wb.max_upload_bytes() == 2048 * 1024 * 1024
