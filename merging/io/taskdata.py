"""Task data by reference: the one reader of a few-shot file, and what a recipe's few-shot record names.

Data-aware methods (APL, Fisher, …) get their few-shot examples as an input of ``prepare``; they never
look beside the weights. What a merge used is recorded in the recipe by reference, per expert::

    few_shot:
      topic: {file: zoo:default/topic, n: 32, seed: 0, indices: [0, 3, …]}

``file`` is a model ref in a registered scheme (``zoo:…``) or a folder — its ``fewshot.jsonl`` (the
zoo's layout) — or a ``.jsonl`` / ``.txt`` file itself; ``indices`` index that file's examples in order.
Replay and the CLI read it here, through :func:`read_examples`, the reader the zoo uses too.

Two kinds of task data, told apart by the rows themselves (one kind per file):

- classification: JSONL rows ``{"text": …, "label": <int>}`` → ``(text, label)`` pairs;
- causal LM: JSONL rows ``{"text": …}`` or ``{"prompt": …, "completion": …}``, or a ``.txt`` file with
  one example per line → :class:`LMExample` ``(prompt, completion)``; a text row is an empty prompt
  and the whole text as completion, so "loss over the completion" is "loss over every token".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import MergeLabError

Example = tuple[str, int]
FEWSHOT_FILE = "fewshot.jsonl"
TEXT_SUFFIXES = (".txt",)


class LMExample(NamedTuple):
    """One causal-LM example: the loss is taken over the ``completion`` tokens, predicted after ``prompt``
    (empty for a plain text row: then every token is a target). A tuple, so recipes and content hashes
    see plain JSON lists."""

    prompt: str
    completion: str


def read_examples(path: str | Path) -> list:
    """The examples of one task file, in file order (blank lines skipped): ``(text, label)`` pairs for
    classification rows, :class:`LMExample` for text or prompt/completion rows and ``.txt`` lines.

    One kind per file: a file mixing labelled and unlabelled rows is refused at the first row of the
    other kind, so a forgotten label never turns a classifier's data into LM text silently."""
    path = Path(path)
    kinds: set[str] = set()
    out: list = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                example = _text_line(line) if path.suffix.lower() in TEXT_SUFFIXES else _json_row(path, number, line)
                kind = "lm" if isinstance(example, LMExample) else "classification"
                if kinds and kind not in kinds:
                    raise MergeLabError(f"{path.name} line {number} is a {kind} row but earlier rows are not: one file "
                                        "holds one kind of task data (all rows with an integer label, or none)")
                kinds.add(kind)
                out.append(example)
    except UnicodeDecodeError:
        raise MergeLabError(f"{path.name} is not UTF-8 text: save the task data as UTF-8 JSONL or .txt") from None
    except OSError as exc:
        raise MergeLabError(f"cannot read task data {path}: {exc.strerror or exc}") from None
    return out


def _text_line(line: str) -> LMExample:
    return LMExample("", line.rstrip("\r\n"))


def _json_row(path: Path, number: int, line: str):
    """One JSONL row as a classification pair or an LM example, or an error naming the line."""
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise MergeLabError(f"{path.name} line {number} is not valid JSON ({exc}): fix or regenerate the file") from None
    if not isinstance(row, dict):
        raise MergeLabError(f"{path.name} line {number} is not a JSON object: write one object per line")
    if "label" in row:
        try:
            return (_string(row, "text", path, number), int(row["label"]))
        except (ValueError, TypeError) as exc:
            raise MergeLabError(f"{path.name} line {number} is not a JSON object with text and an integer label "
                                f"({exc}): fix or regenerate the file") from None
    if "completion" in row or "prompt" in row:
        return LMExample(_string(row, "prompt", path, number), _string(row, "completion", path, number))
    if "text" in row:
        return LMExample("", _string(row, "text", path, number))
    raise MergeLabError(f"{path.name} line {number} has none of text, label, prompt, completion: write "
                        '{"text": …, "label": N} for a classifier, {"text": …} or {"prompt": …, "completion": …} '
                        "for a causal LM")


def _string(row: dict, key: str, path: Path, number: int) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise MergeLabError(f"{path.name} line {number}: '{key}' must be a string (got "
                            f"{type(value).__name__ if key in row else 'nothing'})")
    return value


def is_lm_data(examples) -> bool:
    """Whether a list of examples (or a mapping expert → examples) is causal-LM data."""
    if isinstance(examples, Mapping):
        return any(is_lm_data(v) for v in examples.values())
    return bool(examples) and isinstance(next(iter(examples)), LMExample)


def draw_fewshot(pool: Sequence[Example], n: int, seed: int) -> tuple[list[Example], list[int]]:
    """A seeded draw of ``n`` examples from a pool (all of it, in order, when n ≥ pool size)."""
    if n >= len(pool):
        return list(pool), list(range(len(pool)))
    indices = sorted(int(i) for i in np.random.default_rng(seed).choice(len(pool), size=n, replace=False))
    return [pool[i] for i in indices], indices


def fewshot_file(ref: str, base_dir: Path | None = None) -> Path:
    """The few-shot file a reference names: a registered-scheme ref or folder → its ``fewshot.jsonl``,
    a file → itself (relative paths resolve against ``base_dir``, the recipe's folder)."""
    from .access import check_local_path
    from .sources import resolve_scheme_ref

    path = resolve_scheme_ref(ref)
    if path is None:
        path = Path(ref).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if path.exists():
            path = check_local_path(path, ref)  # a recipe reads task data only where it may read models
    if path.is_dir():
        path = path / FEWSHOT_FILE
    if not path.is_file():
        raise MergeLabError(f"few-shot data '{ref}' not found (looked for {path}): give a folder holding "
                            f"{FEWSHOT_FILE}, a .jsonl or .txt file, or store the method's calibrated values in the recipe",
                            field="few_shot")
    return path


def fewshot_record(file: str | None, indices: Sequence[int], seed: int | None = None,
                   source: str | None = None) -> dict[str, Any]:
    """One expert's entry of a recipe's ``few_shot`` (``file`` None: data the recipe cannot reference,
    such as an upload; ``source`` then says what it was)."""
    out: dict[str, Any] = {"n": len(indices), "indices": [int(i) for i in indices]}
    if seed is not None:
        out["seed"] = int(seed)
    if file is not None:
        out["file"] = str(file)
    elif source is not None:
        out["source"] = str(source)
    return out


def recipe_examples(recipe, expert_refs: Mapping[str, str] | None = None) -> dict[str, list[Example]]:
    """Each expert's few-shot examples as the recipe's ``few_shot`` record names them.

    An entry without ``file`` falls back to the expert's own model ref (recipes written before the
    record named its file: the zoo layout keeps ``fewshot.jsonl`` in the expert folder); an entry that
    says its data was an upload (``source`` without ``file``) cannot be replayed from data."""
    refs = dict(expert_refs or {e.name: e.model for e in recipe.experts})
    base_dir = recipe.resolve_dir()
    out: dict[str, list[Example]] = {}
    for name, model in refs.items():
        entry = recipe.few_shot.get(name) or {}
        if not isinstance(entry, Mapping):
            raise MergeLabError(f"few_shot.{name} must be a mapping (file, indices)", field=f"few_shot.{name}")
        file = entry.get("file")
        if file is None and entry.get("source"):
            raise MergeLabError(f"recipe replay: expert '{name}' used few-shot data from '{entry['source']}', which the "
                                f"recipe does not reference, so {recipe.method} cannot recompute its inputs; set "
                                f"few_shot.{name}.file to that data as a .jsonl file", field=f"few_shot.{name}")
        pool = read_examples(fewshot_file(str(file or model), base_dir))
        indices = entry.get("indices")
        if indices:
            bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < len(pool)]
            if bad:
                raise MergeLabError(f"few_shot.{name}.indices: {bad[0]!r} is outside its file's {len(pool)} "
                                    "examples (was the file replaced?)", field=f"few_shot.{name}.indices")
            out[name] = [pool[i] for i in indices]
        else:
            out[name] = pool
    return out


def tokenizer_of(expert_set, required: bool = True):
    """The tokenizer of the base folder, else of the first expert folder that has one (None when none
    has one and ``required`` is false: a method that needs one says so)."""
    sources = [expert_set.base, *(e.source for e in expert_set.experts.values())]
    for source in sources:
        if getattr(source, "root", None) is not None and source.has_tokenizer():
            try:
                return _load_tokenizer(Path(source.root))
            except (OSError, ValueError) as exc:
                raise MergeLabError(f"the tokenizer files in {source.root} cannot be loaded ({exc}): replace them "
                                    "with the base model's tokenizer files") from exc
    if required:
        raise MergeLabError("no tokenizer found in the base or the experts: importance, Fisher and the probe need "
                            "one (add tokenizer files to the base folder)")
    return None


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _load_tokenizer(folder: Path):
    """The folder's tokenizer as saved. A folder whose tokenizer_config.json declares the generic
    ``tokenizer.json`` class is loaded as exactly that: AutoTokenizer would otherwise pick the model
    type's own class for some types (qwen2) and rebuild a different tokenizer from the vocabulary."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    declared = None
    config = folder / "tokenizer_config.json"
    if config.is_file() and (folder / "tokenizer.json").is_file():
        try:
            declared = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
        except (OSError, ValueError, AttributeError):
            declared = None
    if declared in GENERIC_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))
