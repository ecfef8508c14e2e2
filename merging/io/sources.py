"""Model sources: a local Hugging Face folder, one ``.safetensors`` file, or a hub id.

Tensors are read lazily: opening a source reads only safetensors *headers* (names,
shapes, dtypes), so the homology check runs before any weight is touched, and
:meth:`ModelSource.get` memory-maps one tensor at a time. Pickled ``.bin`` weights are
refused unless the caller opts in, and even then load with ``weights_only=True``.
Remote code is never run: a config that asks for it is refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import MergeLabError
from .access import allowed_roots, check_file_inside, check_fits, check_local_path, looks_local, path_exists
from .integrity import check_safetensors

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
    "special_tokens_map.json", "tokenizer.model", "added_tokens.json", "spiece.model",
)
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_HUB_ID = re.compile(r"^(hf:)?[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


#: a tensor whose float32 copy is larger than this is read and reduced in row chunks by the passes that need no
#: whole tensor (the NaN/Inf scan, task-vector statistics): a 0.5B model's 151,936 × 896 embedding is 545 MB in
#: float32, and ``inspect`` holding it whole for every model peaked at gigabytes
ROW_CHUNK_BYTES = 32 * 1024 * 1024


def row_slices(shape: tuple[int, ...], chunk_bytes: int | None = None, itemsize: int = 4) -> list[slice]:
    """Row ranges covering dimension 0 of ``shape``, each about ``chunk_bytes`` (default
    :data:`ROW_CHUNK_BYTES`) at ``itemsize`` bytes an entry; one ``slice(None)`` for a tensor that fits
    (or has fewer than two dimensions), so small tensors are read whole, as before."""
    limit = ROW_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    numel = 1
    for dim in shape:
        numel *= int(dim)
    if len(shape) < 2 or numel * itemsize <= limit:
        return [slice(None)]
    rows = int(shape[0])
    step = max(1, rows * limit // max(numel * itemsize, 1))
    return [slice(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


@dataclass
class TensorEntry:
    file: Path
    key: str  # the name inside the file
    shape: tuple[int, ...]
    dtype: str


@dataclass
class ModelSource:
    """One model on disk, opened lazily.

    ``tensors`` maps every tensor name to where it lives; ``config`` is the parsed
    ``config.json`` (``{}`` for a bare safetensors file).
    """

    name: str
    ref: str
    root: Path | None
    tensors: dict[str, TensorEntry]
    config: dict[str, Any] = field(default_factory=dict)
    pickled: bool = False
    memory: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    # ---- reading --------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped for safetensors)."""
        entry = self.tensors.get(name)
        if entry is None:
            raise MergeLabError(f"model '{self.name}' has no tensor '{name}'")
        if self.memory is not None:
            return self.memory[entry.key]
        if self.pickled:
            return self._pickled_state()[entry.key]
        try:
            handle = self._handles.get(entry.file)
            if handle is None:
                handle = self._handles[entry.file] = safe_open(str(entry.file), framework="pt")
            return handle.get_tensor(entry.key)
        except MergeLabError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt data
            raise MergeLabError(
                f"could not read tensor '{name}' of model '{self.name}' from {entry.file.name}: {exc}. "
                "The file is probably truncated or corrupt: download or export it again."
            ) from exc

    def read(self, name: str, rows: slice) -> torch.Tensor:
        """The whole tensor for ``slice(None)``, else those rows (read without the rest): what
        :func:`row_slices` hands out."""
        return self.get(name) if rows == slice(None) else self.get_rows(name, rows.start, rows.stop)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor, read without loading the rest (large tensors in chunks)."""
        entry = self.tensors.get(name)
        if entry is None:
            raise MergeLabError(f"model '{self.name}' has no tensor '{name}'")
        if self.pickled or self.memory is not None:
            return self.get(name)[start:stop]
        try:
            handle = self._handles.get(entry.file)
            if handle is None:
                handle = self._handles[entry.file] = safe_open(str(entry.file), framework="pt")
            return handle.get_slice(entry.key)[start:stop]
        except Exception as exc:
            raise MergeLabError(
                f"could not read rows of tensor '{name}' of model '{self.name}': {exc}. "
                "The file is probably truncated or corrupt."
            ) from exc

    @classmethod
    def from_state_dict(cls, name: str, state: dict[str, torch.Tensor],
                        config: dict[str, Any] | None = None) -> ModelSource:
        """An in-memory model (tests, small models, the app's merged results)."""
        entries = {k: TensorEntry(Path("<memory>"), k, tuple(v.shape), str(v.dtype).replace("torch.", ""))
                   for k, v in state.items()}
        return cls(name, f"<memory:{name}>", None, entries, dict(config or {}), memory=dict(state))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: e.shape for n, e in self.tensors.items()}

    def dtypes(self) -> dict[str, str]:
        return {n: e.dtype for n, e in self.tensors.items()}

    def n_parameters(self) -> int:
        total = 0
        for entry in self.tensors.values():
            count = 1
            for dim in entry.shape:
                count *= dim
            total += count
        return total

    def tokenizer_files(self) -> list[Path]:
        if self.root is None:
            return []
        files = [self.root / f for f in TOKENIZER_FILES if (self.root / f).is_file()]
        return [check_file_inside(f, self.name) and f for f in files]  # a symlink out is refused, not copied

    def has_tokenizer(self) -> bool:
        return bool(self.tokenizer_files())

    def close(self) -> None:
        self._handles.clear()
        self.__dict__.pop("_pickled_cache", None)

    def _pickled_state(self) -> dict[str, torch.Tensor]:
        cache = self.__dict__.get("_pickled_cache")
        if cache is None:
            cache = {}
            for file in sorted({e.file for e in self.tensors.values()}):
                cache.update(_load_pickled(file))
            self.__dict__["_pickled_cache"] = cache
        return cache


# ---- opening --------------------------------------------------------------

def open_model(ref: str | os.PathLike, *, name: str | None = None, allow_pickle: bool = False,
               base_dir: Path | None = None) -> ModelSource:
    """Open a model from a folder, a ``.safetensors`` file, or a hub id (``hf:org/name@rev``).

    Reads headers only. ``base_dir`` resolves relative paths (recipes use it).
    """
    text = str(ref)
    local = resolve_scheme_ref(text)
    if local is not None:
        return _open_path(local, name or text.rstrip("/").split("/")[-1].split(":")[-1], text, allow_pickle)
    path = Path(text).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = (base_dir / path)
    if looks_local(text) and allowed_roots() is not None:
        path = check_local_path(path, text)  # before exists(): a refusal must not tell whether it exists
    if path_exists(path):
        path = check_local_path(path, text)
        return _open_path(path, name or _default_name(path), text, allow_pickle)
    if text.startswith("hf:") or (_HUB_ID.match(text) and not text.startswith((".", "/"))):
        return _open_hub(text, name, allow_pickle)
    _refuse_unknown_scheme(text)
    raise MergeLabError(
        f"model '{text[:200]}' not found: no such file or folder"
        + (f" (looked in {path.resolve()})" if not path.is_absolute() and allowed_roots() is None else "")
        + ". Give a folder with config.json and *.safetensors, a .safetensors file, "
        "or a hub id such as hf:org/name@revision."
    )


def _default_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def _open_path(path: Path, name: str, ref: str, allow_pickle: bool) -> ModelSource:
    if path.is_file():
        if path.suffix == ".safetensors":
            return ModelSource(name, ref, None, _read_safetensors_headers([path], name), {})
        if path.suffix in (".bin", ".pt", ".pth"):
            return _open_pickled([path], name, ref, None, {}, allow_pickle)
        raise MergeLabError(f"'{path.name}' is not a model file: expected a .safetensors file or a model folder")
    config = _read_config(path, name)
    files = [check_file_inside(f, name) and f for f in _weight_files(path, name)]
    if files:
        return ModelSource(name, ref, path, _read_safetensors_headers(files, name), config)
    pickled = [check_file_inside(f, name) and f for f in sorted(path.glob("pytorch_model*.bin"))]
    if pickled:
        return _open_pickled(pickled, name, ref, path, config, allow_pickle)
    raise MergeLabError(
        f"model '{name}' has no weights in its folder: expected model.safetensors (or sharded "
        "model-0000x-of-0000y.safetensors with model.safetensors.index.json)"
    )


def _read_config(path: Path, name: str) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        return {}
    check_file_inside(config_path, name)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except RecursionError:
        raise MergeLabError(f"config.json of model '{name}' nests too deeply to be a model config: fix or "
                            "replace it") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MergeLabError(f"config.json of model '{name}' is not valid JSON ({exc}): fix or replace it") from exc
    if not isinstance(config, dict):
        raise MergeLabError(f"config.json of model '{name}' must hold a JSON object")
    if config.get("auto_map"):
        raise MergeLabError(
            f"model '{name}' needs custom code (config.json has auto_map); Merge Lab never runs remote code. "
            "Use a model whose architecture transformers ships."
        )
    return config


def _weight_files(path: Path, name: str = "model") -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        check_file_inside(index, name)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = {str(f) for f in weight_map.values()}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise MergeLabError(f"{index.name} of model '{name}' is not a valid safetensors index "
                                f"({type(exc).__name__}): fix or re-export it") from None
        odd = sorted(f for f in shards if Path(f).name != f or not f.endswith(".safetensors"))
        if odd:  # a shard is a file beside the index, never '../../outside/x.safetensors'
            raise MergeLabError(f"{index.name} of model '{name}' names shard '{odd[0][:80]}', which is not a "
                                ".safetensors file beside it: shard names are plain file names; fix the index")
        files = sorted(path / f for f in shards)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MergeLabError(f"shards listed in {index.name} are missing: {', '.join(missing[:5])}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(path.glob("*.safetensors"))


def _read_safetensors_headers(files: list[Path], name: str) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    shape = tuple(int(d) for d in piece.get_shape())
                    dtype = _DTYPE_NAMES.get(piece.get_dtype(), piece.get_dtype().lower())
                    entries[key] = TensorEntry(file, key, shape, dtype)
        except Exception as exc:
            check_safetensors(file, f"{name}: {file.name}")  # names the tensor and the bytes when it can
            raise MergeLabError(
                f"'{file.name}' of model '{name}' is not a readable safetensors file ({exc}). "
                "It is probably truncated or corrupt: download or export it again."
            ) from exc
    return entries


def _open_pickled(files: list[Path], name: str, ref: str, root: Path | None,
                  config: dict[str, Any], allow_pickle: bool) -> ModelSource:
    if not allow_pickle:
        raise MergeLabError(
            f"model '{name}' has only pickled weights ({files[0].name}); pickles can run code, so Merge Lab "
            "refuses them by default. Convert the model to safetensors, or opt in with allow_pickle=True "
            "(CLI: --allow-pickle), which loads with torch.load(weights_only=True)."
        )
    entries: dict[str, TensorEntry] = {}
    for file in files:
        for key, tensor in _load_pickled(file).items():
            entries[key] = TensorEntry(file, key, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
    return ModelSource(name, ref, root, entries, config, pickled=True)


def _load_pickled(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise MergeLabError(f"could not load pickled weights {file.name} safely (weights_only=True): {exc}") from exc
    if not isinstance(state, dict):
        raise MergeLabError(f"{file.name} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """``hf:org/name@rev`` → (``org/name``, ``rev``)."""
    text = ref[3:] if ref.startswith("hf:") else ref
    repo, _, revision = text.partition("@")
    return repo, revision or None


def _open_hub(ref: str, name: str | None, allow_pickle: bool) -> ModelSource:
    """Size a hub model, refuse remote code, then download its config, tokenizer and safetensors."""
    repo, revision = parse_hub_ref(ref)
    shown = f"{repo}@{revision}" if revision else repo
    try:
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE

        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
        weights = [s for s in (info.siblings or []) if s.rfilename.endswith(".safetensors")]
        if not weights:
            raise MergeLabError(f"hub model '{shown}' has no .safetensors weights; Merge Lab does not load pickles "
                                "from the hub")
        check_fits(shown, sum(s.size or 0 for s in weights), Path(HF_HUB_CACHE))
        config_file = hf_hub_download(repo, "config.json", revision=revision)
        _read_config(Path(config_file).parent, shown)  # refuses auto_map (remote code) before any weight arrives
        folder = snapshot_download(repo, revision=revision,
                                   allow_patterns=["*.json", "*.safetensors", *TOKENIZER_FILES])
    except MergeLabError:
        raise
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise MergeLabError(
            f"could not fetch hub model '{shown}': {type(exc).__name__}: {first_line}. "
            "Hub ids need a network connection and an existing public repo; "
            "offline, download the model elsewhere and give its local folder."
        ) from exc
    return _open_path(Path(folder), name or repo.split("/")[-1], ref, allow_pickle)


# ---- reference schemes ----------------------------------------------------------------------
#
# ``hf:`` and plain paths are built in; any other ``scheme:rest`` ref is resolved to a local path by
# whoever registered the scheme — the demo zoo registers ``zoo`` when ``merging.zoo`` is imported. The
# I/O layer so never knows the zoo (nor imports its training code) to open ``zoo:default/topic``.

SchemeResolver = Callable[[str], Path]
_SCHEMES: dict[str, SchemeResolver] = {}
_SCHEME = re.compile(r"^([a-z][a-z0-9_+-]*):(?!//)")


def register_scheme(scheme: str, resolver: SchemeResolver) -> None:
    """Make ``scheme:rest`` refs open the local path ``resolver(ref)`` returns (it raises a MergeLabError
    naming what is missing). Registering a scheme again replaces its resolver."""
    if scheme in ("hf",) or not _SCHEME.match(f"{scheme}:"):
        raise MergeLabError(f"cannot register reference scheme {scheme!r}: use lower-case letters and digits, "
                            "and not the built-in 'hf'")
    _SCHEMES[scheme] = resolver


def registered_schemes() -> list[str]:
    return ["hf", *_SCHEMES]


def resolve_scheme_ref(ref: str) -> Path | None:
    """The local path of a ref in a registered scheme; None for hub ids, plain paths and unknown schemes."""
    match = _SCHEME.match(str(ref))
    if match is None or match.group(1) not in _SCHEMES:
        return None
    return Path(_SCHEMES[match.group(1)](str(ref)))


def _refuse_unknown_scheme(text: str) -> None:
    match = _SCHEME.match(text)
    if match is not None and match.group(1) != "hf" and match.group(1) not in _SCHEMES:
        hint = " (the demo zoo's refs: `import merging.zoo` registers 'zoo')" if match.group(1) == "zoo" else ""
        raise MergeLabError(f"model '{text}': no resolver is registered for '{match.group(1)}:' refs{hint}; known "
                            f"schemes: {', '.join(registered_schemes())}, or give a folder or file path")
