"""The app through its API (gradio_client against a launched server):
load → importance → per-layer override → merge → probe → export, then the exported recipe replays
with the CLI to the same tensors."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging import workbench as wb

ROOT = Path(__file__).resolve().parent.parent


def test_launch_kwargs_match_the_command_line():
    import app as app_module

    kwargs = app_module.launch_kwargs(app_module.parse_args(["--host", "0.0.0.0", "--port", "7999"]))
    assert kwargs["server_name"] == "0.0.0.0" and kwargs["server_port"] == 7999
    assert str(wb.exports_root()) in kwargs["allowed_paths"]
    assert kwargs["max_file_size"] == wb.max_upload_bytes() and kwargs["css"] == app_module.CSS


def test_api_end_to_end_and_replay(app_url, real_zoo, tmp_path):
    from gradio_client import Client

    zoo, cache = real_zoo
    client = Client(app_url, verbose=False)
    base = f"zoo:{zoo.name}/base"
    out = client.predict(base, list(zoo.tasks), "", None, "apl", api_name="/load_experts")
    rows = out[0]["data"] if isinstance(out[0], dict) else out[0]
    assert [r[0] for r in rows] == list(zoo.tasks)

    client.predict(8, "gradient", "restore", "apl", *([None] * 0), api_name="/compute_importance")
    expert = zoo.tasks[0]
    client.predict(expert, "0", "drop_ratio", 0.8, "dare_linear", api_name="/set_layer")
    merged = client.predict("dare_linear", 0, api_name="/merge")
    assert "#1 dare_linear" in merged
    probe = client.predict(api_name="/run_probe")
    table = probe[0]
    names = [r[0] for r in table["data"]]
    assert names[0] == "base" and "#1 dare_linear" in names
    result = client.predict(list(zoo.tasks), "fp32", api_name="/export")
    path = Path(result[0] if isinstance(result, (list, tuple)) else result)
    assert path.suffix == ".zip"
    # the client downloaded the zip through gradio's file route: the server's zip lives under the cache
    # root, outside the system temp folder, so this only works because launch() allows that path
    served = [p for p in wb.exports_root().rglob(path.name)]
    assert served, path
    repo_in_tmp = str(Path(__file__).resolve()).startswith(tempfile.gettempdir())
    assert repo_in_tmp or not str(served[0]).startswith(tempfile.gettempdir()), served
    with urllib.request.urlopen(f"{app_url}gradio_api/file={served[0]}", timeout=30) as response:
        assert response.status == 200 and response.read(2) == b"PK"
    with zipfile.ZipFile(path) as archive:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
        archive.extractall(tmp_path / "export")
    recipe = tmp_path / "export" / "recipe.yaml"
    text = recipe.read_text()
    assert "dare_linear" in text and "0.8" in text
    env = {**os.environ, "MERGE_LAB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "merging", "merge", str(recipe), "--out", str(tmp_path / "replay")],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=240)
    task = zoo.tasks[0]
    exported = load_file(str(tmp_path / "export" / task / "model.safetensors"))
    replayed = load_file(str(tmp_path / "replay" / task / "model.safetensors"))
    assert exported.keys() == replayed.keys()
    for name in exported:
        assert torch.equal(exported[name], replayed[name]), name


def test_api_errors_are_readable(app_url, real_zoo):
    from gradio_client import Client

    zoo, _ = real_zoo
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception) as info:
        client.predict(f"zoo:{zoo.name}/base", list(zoo.tasks)[:1], "", None, "apl", api_name="/load_experts")
    assert "at least two" in str(info.value)
    assert "Traceback" not in str(info.value)
    with pytest.raises(Exception) as info:
        client.predict(api_name="/run_probe")
    assert "Load experts" in str(info.value) or "Merge" in str(info.value)
