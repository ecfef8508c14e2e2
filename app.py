"""Merge Lab — the browser app. ``python app.py`` serves it; ``demo`` is module-level for Hugging Face Spaces.

Host and port come from ``--host/--port``, else ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``, else
127.0.0.1:7860 (never hard-coded in ``launch()``, which would make a Space unreachable).
"""

from __future__ import annotations

import argparse
import os

from components.layout import _css, build_demo
from merging.workbench import exports_root

CSS = _css()

demo = build_demo()
demo.queue(default_concurrency_limit=1)  # one heavy job at a time on a 2-core machine; sessions queue


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the Merge Lab app.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--zoo", default=os.environ.get("MERGE_LAB_ZOO", "default"),
                        help="zoo to open (built on first start if missing)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    os.environ["MERGE_LAB_ZOO"] = args.zoo
    # Export zips are written under the cache root; gradio may only serve files it is allowed to.
    demo.launch(server_name=args.host, server_port=args.port, css=CSS, allowed_paths=[str(exports_root())])
