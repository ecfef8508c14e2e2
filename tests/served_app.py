"""Serving the app in-process for the API and browser tests, exactly as ``python app.py`` serves it."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPO_TMP = ROOT / "tmp"  # gitignored


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched_app(cache_outside_tmp: Path | None = None):
    """Serve ``app.demo`` exactly as ``python app.py`` does (``app.launch_kwargs``), on a free port.

    With ``cache_outside_tmp`` (a zoo cache root), the server's cache root moves to a fresh folder under the
    repo's ``tmp/`` (its ``zoo`` a link to the given cache's), so export zips live outside the system temp
    folder, which gradio would serve anyway: an export link that works then proves ``allowed_paths``.
    """
    import app as app_module

    patch = pytest.MonkeyPatch()
    outside = None
    if cache_outside_tmp is not None:
        REPO_TMP.mkdir(exist_ok=True)
        outside = Path(tempfile.mkdtemp(prefix="app-cache-", dir=REPO_TMP))
        (outside / "zoo").symlink_to(Path(cache_outside_tmp) / "zoo", target_is_directory=True)
        patch.setenv("MERGE_LAB_CACHE", str(outside))
    port = free_port()
    kwargs = app_module.launch_kwargs(app_module.parse_args(["--host", "127.0.0.1", "--port", str(port)]))
    app_module.start_background_work()
    app_module.demo.launch(**kwargs, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app_module.demo.close()
        patch.undo()
        if outside is not None:
            shutil.rmtree(outside, ignore_errors=True)


def error_message(call) -> str:
    """The message of the error ``call`` raises (an API call expected to fail): it must be the app's own
    words, never a traceback or gradio's generic "Something went wrong"."""
    with pytest.raises(Exception) as info:
        call()
    text = str(info.value)
    assert "Traceback" not in text and "Something went wrong" not in text, text
    return text
