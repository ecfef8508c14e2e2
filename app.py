"""Merge Lab — the browser app. ``python app.py`` serves it; ``demo`` is module-level for Hugging Face Spaces.

Host and port come from ``--host/--port``, else ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``, else
127.0.0.1:7860 (never hard-coded in ``launch()``, which would make a Space unreachable).

:func:`launch_kwargs` is the one place that says how the app is launched; the API and browser tests
launch with it too, so they serve exactly what ``python app.py`` serves.
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

from components import handlers as h
from components.layout import build_demo, load_css, load_head
from merging.io.access import public_host_warning
from merging.workbench import exports_root, retention_sweep, start_zoo_build

CSS = load_css()
HEAD = load_head()
retention_sweep(startup=True)  # what a killed process left (export staging, old exports and uploads) goes first

demo = build_demo()
# One heavy job at a time on a 2-core machine (the model events share one concurrency group, see
# components.handlers.HEAVY); everyone else waits in the queue and sees their position.
demo.queue(default_concurrency_limit=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the Merge Lab app.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--zoo", default=os.environ.get("MERGE_LAB_ZOO", "default"),
                        help="zoo to open (built on first start if missing)")
    return parser.parse_args(argv)


def launch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``demo.launch`` for these command-line arguments.

    Export zips and history files are written under the cache root, which gradio serves only when it is
    in ``allowed_paths``; uploads are capped by gradio (``max_file_size``) at the app's own limit
    (``MERGE_LAB_MAX_UPLOAD_MB``), which the app checks again on the server. Served publicly (0.0.0.0 or a
    Space) without ``MERGE_LAB_ALLOWED_ROOTS``, it warns: any visitor could then read any local model path.
    """
    warning = public_host_warning(args.host)
    if warning:
        warnings.warn(warning, stacklevel=2)
    return dict(server_name=args.host, server_port=args.port, css=CSS, head=HEAD,
                allowed_paths=[str(exports_root())], max_file_size=h.launch_max_file_size())


def start_background_work() -> None:
    """What the server starts with, once per process: building the demo zoo (``MERGE_LAB_ZOO``, minutes of
    training the first time) in a background thread, so it is under way before anyone opens the page.
    ``MERGE_LAB_ZOO_BUILD=off`` turns it off. (A page that loads first would start it too, once.)"""
    start_zoo_build()


if __name__ == "__main__":
    args = parse_args()
    os.environ["MERGE_LAB_ZOO"] = args.zoo
    start_background_work()
    demo.launch(**launch_kwargs(args))
