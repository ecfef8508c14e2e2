"""Export a merge as Hugging Face folder(s): config, tokenizer, safetensors shards, model card, recipe.

Classifier experts carry task heads, so the export writes one folder per task (merged body
+ that task's head), each loadable with the expert's own transformers class. Without task
heads it writes a single folder — except for a method of one body per task (EMR-Merging), where
every expert's folder holds that expert's own body (and head, if it has one). Everything goes to a temporary sibling folder moved into place at
the end: a failed export (full disk, killed process, bad input) leaves the previous export,
if any, intact and nothing half-written.

The output folder may hold the user's own files (``--out .`` once wiped the current folder), so an
export never deletes what Merge Lab did not write: every export records the files it wrote in
:data:`MARKER`; a later export into that folder replaces only those. A non-empty folder without the
marker is refused unless ``force=True``, and even then only new files are added: a file of the user's
that the export would overwrite is refused by name.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..engine import MergeEngine, MergeSettings
from ..errors import DISK_FULL, MergeLabError, is_disk_full
from .access import check_file_inside
from .experts import ExpertSet
from .layout import ROLE_COPY, ROLE_MERGE
from .mergekit_yaml import to_mergekit_yaml
from .names import check_name, safe_join
from .replay import expert_set_from_recipe, settings_from_recipe

SHARD_BYTES = 500 * 1000 * 1000
MARKER = ".merge-lab-export.json"  # the files an export wrote, relative to its folder
MARKER_FORMAT = "merge-lab-export/1"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Progress = Callable[[float, str], None]


@dataclass
class ExportReport:
    root: Path
    folders: dict[str, Path]
    files: list[Path]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "folders": {k: str(v) for k, v in self.folders.items()},
                "files": [str(f) for f in self.files], "warnings": self.warnings}


class ShardWriter:
    """Collects tensors and writes safetensors shards of at most ``shard_bytes`` (with an index if > 1).

    With a ``plan`` — every tensor's (name, shape, dtype) in the order they will be added, as an export
    knows them before merging — each tensor is written into its shard file the moment it is added, at
    the offset ``save_file`` would give it, and dropped: no shard is held in memory, and writing overlaps
    the merge of the next tensors. The files are byte for byte what the buffered path (``save_file``)
    writes. Without a plan (or with a dtype the plan does not know) tensors are buffered per shard."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES,
                 plan: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None):
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self._plan = _StreamPlan(plan, shard_bytes) if plan and _plannable(plan) else None
        self._open: _OpenShard | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.total_bytes += size
        if self._plan is not None:
            self._write_planned(name, tensor)
            return
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def close(self) -> list[Path]:
        if self._plan is not None:
            self._plan.check_done()
        elif self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            final = self.folder / "model.safetensors"
            self.shards[0][0].rename(final)
            return [final]
        weight_map, files = {}, []
        for index, (path, names) in enumerate(self.shards, start=1):
            final = self.folder / f"model-{index:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update({n: final.name for n in names})
        index_path = self.folder / "model.safetensors.index.json"
        index_path.write_text(json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                                         indent=2))
        return files + [index_path]

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        try:
            save_file(self.pending, str(path), metadata={"format": "pt"})
        except Exception as exc:  # safetensors' own error type carries the OS error only in its text
            if is_disk_full(exc):
                raise OSError(errno.ENOSPC, "No space left on device") from exc
            raise
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def _write_planned(self, name: str, tensor: torch.Tensor) -> None:
        shard, offset = self._plan.place(name, tensor)
        try:
            if self._open is None:
                path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
                self._open = _OpenShard(path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
                self.shards.append((path, list(shard.names)))
                _pwrite_all(self._open.fd, shard.header, 0)
            flat = tensor.contiguous().reshape(-1)
            if flat.numel():
                _pwrite_all(self._open.fd, flat.view(torch.uint8).numpy(), len(shard.header) + offset)
            self._open.count += 1
            done = self._open.count == len(shard.names)
        except BaseException:
            os.close(self._open.fd)
            self._open = None
            raise
        if done:  # the shard's last tensor: the next add opens the next shard
            os.close(self._open.fd)
            self._open = None


#: safetensors' dtype names, in the order ``save_file`` lays tensors out (larger alignment first, then by
#: name): checked against save_file's own files by tests/test_speed_contract.py
_SAFETENSORS_DTYPES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
                       torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_SAFETENSORS_ORDER = {name: rank for rank, name in enumerate(_SAFETENSORS_DTYPES.values())}


def _plannable(plan) -> bool:
    return all(dtype in _SAFETENSORS_DTYPES for _, _, dtype in plan)


@dataclass
class _PlannedShard:
    index: int
    names: list[str]
    header: bytes  # 8-byte length + JSON header, as save_file writes it
    offsets: dict[str, tuple[int, tuple[int, ...], torch.dtype]]  # name → (data offset, shape, dtype)


@dataclass
class _OpenShard:
    path: Path
    fd: int
    count: int = 0  # tensors written into it so far


class _StreamPlan:
    """The shards a planned :class:`ShardWriter` writes: the buffered path's greedy split (a shard is closed
    when the next tensor would take it over ``shard_bytes``), each shard's save_file header and offsets."""

    def __init__(self, plan, shard_bytes: int):
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            if groups[-1] and size + nbytes > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, tuple(shape), dtype))
            size += nbytes
        self.shards = [self._shard(index, group) for index, group in enumerate(groups)]
        self.where = {name: shard for shard in self.shards for name in shard.names}
        self.order = [name for name, _, _ in plan]
        self.next = 0

    @staticmethod
    def _shard(index: int, group) -> _PlannedShard:
        laid = sorted(group, key=lambda item: (_SAFETENSORS_ORDER[_SAFETENSORS_DTYPES[item[2]]], item[0]))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offsets, offset = {}, 0
        for name, shape, dtype in laid:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offsets[name] = (offset, shape, dtype)
            offset += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        return _PlannedShard(index, [name for name, _, _ in group], len(text).to_bytes(8, "little") + text, offsets)

    def place(self, name: str, tensor: torch.Tensor) -> tuple[_PlannedShard, int]:
        """The shard and data offset of the next tensor, which must be the plan's next one."""
        expected = self.order[self.next] if self.next < len(self.order) else None
        shard = self.where.get(name)
        offset, shape, dtype = shard.offsets[name] if shard else (0, None, None)
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise MergeLabError(f"internal error: the export planned {expected!r} {shape} {dtype} next but got "
                                f"{name!r} {tuple(tensor.shape)} {tensor.dtype} — a Merge Lab bug; please report it")
        self.next += 1
        return shard, offset

    def check_done(self) -> None:
        if self.next != len(self.order):
            raise MergeLabError(f"internal error: the export wrote {self.next} of the {len(self.order)} tensors it "
                                "planned — a Merge Lab bug; please report it")


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (os.pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def export_recipe(recipe, out_dir: str | Path, *, expert_set: ExpertSet | None = None,
                  engine: MergeEngine | None = None, tasks: Iterable[str] | None = None,
                  dtype: str | None = None, shard_bytes: int = SHARD_BYTES,
                  importance_json: str | None = None, progress: Progress | None = None,
                  settings: MergeSettings | None = None, force: bool = False,
                  workers: int | None = None, device: str | None = None) -> ExportReport:
    """Merge ``recipe`` and write it to ``out_dir`` atomically (see module docstring).

    ``settings`` lets a caller that already prepared the method's inputs (the app holds APL's
    calibration and the few-shot data) skip preparing them again from the recipe. ``force`` adds the
    export to a non-empty folder that is not a previous export (never overwriting the user's files).
    ``workers``: tensors merged at once by the engine made here (None: its default; same output).
    ``device``: where that engine's kernels run (None: the CPU; see :class:`MergeEngine`). The written
    recipes record it (``device: cuda``), and a randomised merge replayed on another device than the one
    its recipe records gets a warning: the same seed draws other masks there."""
    out_dir = Path(out_dir).resolve()
    _previous_files(out_dir, force)  # refuse a foreign folder before minutes of merging
    expert_set = expert_set or (engine.experts if engine else expert_set_from_recipe(recipe))
    engine = engine or MergeEngine(expert_set, cache=False, workers=workers, device=device or "cpu")
    settings = settings or settings_from_recipe(recipe, expert_set)
    recipe, device_warning = _with_device_record(recipe, engine.device, settings)
    dtype = dtype or recipe.dtype
    if dtype not in TORCH_DTYPES:
        raise MergeLabError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}", field="dtype")
    targets = _targets(expert_set, tasks, settings.method.per_task_bodies)
    configs_source(expert_set, recipe.configs_from)  # a wrong name fails before the merge, not after
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(out_dir)
        _check_free_space(expert_set, targets, dtype, out_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:  # a read-only or unwritable folder, a name too long
        raise MergeLabError(f"cannot write the export to {out_dir}: {exc.strerror or exc}. Choose a folder you can "
                            "write to", field="out") from None
    try:
        report = _write(recipe, expert_set, engine, settings, targets, staging, dtype, shard_bytes,
                        importance_json, progress)
        report.warnings += [device_warning] if device_warning else []
        _swap_into_place(staging, out_dir, force)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(exc):
            raise MergeLabError(f"the disk is full while exporting to {out_dir}: free some space and export "
                                "again (nothing was written; any previous export is intact)",
                                kind=DISK_FULL) from exc
        raise MergeLabError(f"could not write the export to {out_dir}: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _relocate(report, staging, out_dir)


def _with_device_record(recipe, device: torch.device, settings: MergeSettings):
    """(a copy of ``recipe`` recording ``device`` — absent for the CPU —, a warning or None): a randomised
    merge whose recipe records another device than this one draws its masks from another generator."""
    ran_on = None if device.type == "cpu" else device.type
    warning = None
    if recipe.device != ran_on and settings.method.is_randomised(settings.shared):
        recorded = recipe.device or "cpu (no device recorded)"
        warning = (f"merged on {ran_on or 'cpu'}, the recipe records {recorded}: {settings.method.pretty_name}'s "
                   "random drop draws other masks from the same seed on each device (another generator) — an "
                   "equally valid merge, not the same bytes; the exported recipe records this device")
    return dataclasses.replace(recipe, device=ran_on), warning


STALE_STAGING_SECONDS = 3600.0


def _remove_stale_staging(out_dir: Path) -> None:
    """Staging folders of earlier exports to ``out_dir`` that a killed process left (``.NAME.tmp-*``, hundreds
    of MB each), once they are an hour old: they are ours by name, and no export runs that long unseen."""
    import time

    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            if stale.is_dir() and not stale.is_symlink() and time.time() - stale.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue


def export_bytes(expert_set: ExpertSet, targets: dict[str, str | None], dtype: str) -> int:
    """Bytes of weights the export will write: the body in ``dtype`` once per folder, plus each head."""
    size = TORCH_DTYPES[dtype].itemsize
    body = sum(math.prod(expert_set.layout[n].shape) for n in expert_set.layout.tensors) * size
    heads = sum(math.prod(expert_set.experts[e].source.tensors[h].shape) * size
                for e in targets.values() if e for h in expert_set.experts[e].head_names)
    return body * len(targets) + heads


def _check_free_space(expert_set: ExpertSet, targets, dtype: str, out_dir: Path) -> None:
    """Refuse before merging when the export cannot fit: a full disk found after minutes of work helps nobody."""
    need = export_bytes(expert_set, targets, dtype)
    free = shutil.disk_usage(out_dir.parent).free
    if need > free:
        raise MergeLabError(f"the disk is full: this export needs about {need / 1e6:.1f} MB but only "
                            f"{free / 1e6:.1f} MB are free where it goes; free some space, export fewer tasks or a "
                            "smaller dtype (fp16)", kind=DISK_FULL)


def _targets(expert_set: ExpertSet, tasks: Iterable[str] | None,
             per_task: bool = False) -> dict[str, str | None]:
    """Folder name → expert whose head (and config, and for ``per_task`` body) it uses; ``{"": None}`` for a
    single headless folder. ``per_task`` (one body per task): a folder for every expert, heads or not."""
    with_heads = [n for n, e in expert_set.experts.items() if e.head_names or per_task]
    if not with_heads:
        return {"": None}
    chosen = list(tasks) if tasks is not None else with_heads
    unknown = [t for t in chosen if t not in with_heads]
    if unknown:
        raise MergeLabError(f"cannot export task '{unknown[0]}': experts with task heads are "
                            f"{', '.join(with_heads)}", field="tasks")
    if not chosen:
        raise MergeLabError("pick at least one task to export", field="tasks")
    return {t: t for t in chosen}


def _write(recipe, expert_set, engine, settings, targets, staging, dtype, shard_bytes, importance_json, progress):
    torch_dtype = TORCH_DTYPES[dtype]
    warnings = list(expert_set.warnings)
    writers, folders = {}, {}
    for folder_name in targets:
        folder = safe_join(staging, check_name(folder_name, "task name")) if folder_name else staging
        folder.mkdir(parents=True, exist_ok=True)
        folders[folder_name or "merged"] = folder
        writers[folder_name] = ShardWriter(folder, shard_bytes,
                                           plan=_export_plan(expert_set, targets[folder_name], torch_dtype))
    if settings.method.per_task_bodies:
        for step, (folder_name, expert) in enumerate(targets.items()):
            _write_bodies(expert_set, engine.iter_merged(settings, dtype=torch_dtype, task=expert),
                          {folder_name: writers[folder_name]}, {folder_name: expert}, torch_dtype, progress,
                          step / len(targets), 1 / len(targets))
    else:
        _write_bodies(expert_set, engine.iter_merged(settings, dtype=torch_dtype), writers, targets, torch_dtype,
                      progress)
    files: list[Path] = []
    for folder_name, expert in targets.items():
        writer = writers[folder_name]
        if expert:
            for head_name, head in expert_set.experts[expert].head().items():
                writer.add(head_name, head.to(torch_dtype) if head.is_floating_point() else head)
        files += writer.close()
        files += _write_folder_files(expert_set, expert, writer.folder, recipe, dtype, warnings,
                                     settings.method.per_task_bodies)
    files += _write_top_files(recipe, expert_set, staging, importance_json)
    if progress:
        progress(1.0, "export written")
    return ExportReport(staging, folders, files, warnings)


def _write_bodies(expert_set, merged, writers, targets, torch_dtype, progress, start=0.0, span=1.0) -> None:
    """Add each tensor of ``merged`` (iter_merged's stream) to the writers of ``targets`` (one converted copy
    shared by all of them), reporting progress over ``start`` … ``start + span`` of the writing."""
    total = len(expert_set.layout.tensors)
    for index, (name, tensor, _) in enumerate(merged):
        value = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor  # one copy shared by all folders
        del tensor  # (merged tensors already come in torch_dtype, row chunk by row chunk)
        for folder_name, expert in targets.items():
            prefix = expert_set.experts[expert].prefix if expert else _headless_prefix(expert_set)
            writers[folder_name].add(prefix + name, value)
        del value
        if progress and index % 8 == 0:
            progress(0.9 * (start + span * index / max(total, 1)), f"writing {name}")


def _export_plan(expert_set: ExpertSet, expert: str | None,
                 torch_dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]] | None:
    """(name, shape, dtype) of every tensor a folder's writer will get, in order: the body as the engine
    yields it (layout order; floats in the export dtype), then the expert's task head. None when a dtype
    is not one torch names (the writer then buffers)."""
    prefix = expert_set.experts[expert].prefix if expert else _headless_prefix(expert_set)
    plan = []
    try:
        for name, info in expert_set.layout.tensors.items():
            if info.role not in (ROLE_COPY, ROLE_MERGE):
                continue
            stored = _torch_dtype(expert_set.base.tensors[name].dtype)
            plan.append((prefix + name, tuple(info.shape), torch_dtype if stored.is_floating_point else stored))
        if expert:
            source = expert_set.experts[expert].source
            for head in expert_set.experts[expert].head_names:
                stored = _torch_dtype(source.tensors[head].dtype)
                plan.append((head, tuple(source.tensors[head].shape),
                             torch_dtype if stored.is_floating_point else stored))
    except (KeyError, TypeError):
        return None
    return plan


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(name)
    return dtype


def _headless_prefix(expert_set: ExpertSet) -> str:
    return next(iter(expert_set.experts.values())).prefix


def _write_folder_files(expert_set, expert, folder, recipe, dtype, warnings, per_task=False) -> list[Path]:
    source = expert_set.experts[expert].source if expert else next(iter(expert_set.experts.values())).source
    config = dict(source.config or expert_set.base.config or {})
    files = []
    if config:
        config["torch_dtype"] = dtype
        config["dtype"] = dtype
        path = folder / "config.json"
        path.write_text(json.dumps(config, indent=2))
        files.append(path)
    else:
        warnings.append("no config.json in the base or expert: the export holds weights only")
    made: list[Path] = []
    tokenizer = _tokenizer_files(expert_set, source, folder, made)
    files += made
    if not tokenizer and not made:
        warnings.append(f"no tokenizer files found for '{expert or 'merged'}': the export has none; copy them "
                        "from the base model before loading it with a pipeline")
    for file in tokenizer:
        files.append(Path(shutil.copy2(file, folder / file.name)))
    files += write_generation_files(expert_set, recipe.configs_from, folder, warnings)
    card = folder / "README.md"
    card.write_text(model_card(recipe, expert, per_task))
    files.append(card)
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(recipe.to_yaml())
    files.append(recipe_path)
    return files


# ---- what a causal LM needs beside its weights ---------------------------------------------------------

#: Files that make a merged (instruct) LM usable and are not weights or tokenizer: generation_config.json holds
#: the stop tokens (eos_token_id lists of chat models) and sampling defaults (do_sample, temperature, top_p);
#: chat_template.jinja (chat_template.json in older processors) the chat template.
GENERATION_FILES = ("generation_config.json", "chat_template.jinja", "chat_template.json")
MAX_GENERATION_FILE_BYTES = 4 * 1024 * 1024  # a generation config or template is a few KB; refuse anything huge


def configs_source(expert_set: ExpertSet, name: str):
    """The model a recipe's ``configs_from`` names: the base, or an expert."""
    if name == "base":
        return expert_set.base
    if name not in expert_set.experts:
        raise MergeLabError(f"configs_from '{name}' is neither the base nor an expert "
                            f"({', '.join(['base', *expert_set.experts])})", field="configs_from")
    return expert_set.experts[name].source


def write_generation_files(expert_set: ExpertSet, configs_from: str, folder: Path, warnings: list[str]) -> list[Path]:
    """Copy the generation config and chat template of ``configs_from`` into ``folder``, and make the folder's
    tokenizer_config.json carry that model's template (or none), so the export holds exactly one chat
    template — the chosen model's — even when the tokenizer files came from another model."""
    source = configs_source(expert_set, configs_from)
    root = source.root
    files = []
    for name in GENERATION_FILES:
        path = root / name if root is not None else None
        if path is None or not path.is_file():
            continue
        resolved = check_file_inside(path, source.name)
        if resolved.stat().st_size > MAX_GENERATION_FILE_BYTES:
            raise MergeLabError(f"model '{source.name}': {name} is {resolved.stat().st_size / 1e6:.1f} MB, not a "
                                "generation config or chat template; remove it or pick another configs_from",
                                field="configs_from")
        files.append(Path(shutil.copyfile(resolved, folder / name)))
    _align_chat_template(source, folder)
    if not any(f.name == "generation_config.json" for f in files):
        others = [n for n, m in [("base", expert_set.base), *((e, x.source) for e, x in expert_set.experts.items())]
                  if n != configs_from and m.root is not None and (m.root / "generation_config.json").is_file()]
        if others:
            warnings.append(f"'{configs_from}' has no generation_config.json but {', '.join(others)} has: the export "
                            f"keeps no stop tokens or sampling defaults; export with configs_from {others[0]} "
                            "(--configs-from) to keep them")
    return files


def _align_chat_template(source, folder: Path) -> None:
    """The exported tokenizer_config.json's ``chat_template`` becomes ``source``'s (removed if it has none)."""
    exported = folder / "tokenizer_config.json"
    if not exported.is_file():
        return
    own_path = source.root / "tokenizer_config.json" if source.root is not None else None
    own = _read_json(check_file_inside(own_path, source.name)) if own_path and own_path.is_file() else None
    template = (own or {}).get("chat_template")
    data = _read_json(exported)
    if data is None or data.get("chat_template") == template:
        return
    if template is None:
        data.pop("chat_template", None)
    else:
        data["chat_template"] = template
    exported.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _read_json(path: Path) -> dict | None:
    """A JSON object file, or None where there is none (an unreadable tokenizer config is left as it is)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tokenizer_files(expert_set, source, folder: Path, written: list[Path]) -> list[Path]:
    """The tokenizer files to copy: the source's (else the base's); where vocabularies were aligned, the chosen
    vocabulary's model's — for the union, the base's with a tokenizer.json that adds the experts' tokens
    (written here, into ``written``)."""
    plan = expert_set.vocab
    if plan is None:
        return source.tokenizer_files() or expert_set.base.tokenizer_files()
    files = plan.sources[plan.tokenizer_model].tokenizer_files()
    if plan.choice == "union":
        from .vocab import write_union_tokenizer

        written.append(write_union_tokenizer(plan, folder))
        files = [f for f in files if f.name != "tokenizer.json"]
    return files


def _write_top_files(recipe, expert_set, staging, importance_json) -> list[Path]:
    files = []
    top_recipe = staging / "recipe.yaml"
    if not top_recipe.exists():
        top_recipe.write_text(recipe.to_yaml())
    files.append(top_recipe)
    try:
        mergekit = to_mergekit_yaml(recipe, expert_set.layout)  # tensor names: exact filters
    except MergeLabError:
        mergekit = None
    if mergekit:
        path = staging / "mergekit.yaml"
        path.write_text(mergekit)
        files.append(path)
    if importance_json:
        path = staging / "importance.json"
        path.write_text(importance_json)
        files.append(path)
    return files


def model_card(recipe, task: str | None, per_task: bool = False) -> str:
    """A README model card that says what was merged, how, and how to replay it."""
    experts = "\n".join(f"- `{e.name}`: `{e.model}`" for e in recipe.experts)
    head = f"This folder holds the merged body with the **{task}** expert's task head.\n\n" if task else ""
    if per_task and task:
        head = (f"This folder holds the **{task}** task's own body (the method makes one body per task, not one "
                "merged model: every task's folder differs), with that expert's task head if it has one. Its "
                "scores are not those of a single merged model.\n\n")
    return (
        f"---\nlibrary_name: transformers\ntags:\n- merge\n- merge-lab\n- {recipe.method}\n---\n"
        f"# Merged model ({recipe.method})\n\n"
        f"Made with Merge Lab from base `{recipe.base}` and experts:\n\n{experts}\n\n{head}"
        f"Method: `{recipe.method}`, seed {recipe.seed}, dtype {recipe.dtype}.\n\n"
        "Replay it with `python -m merging merge recipe.yaml --out DIR`.\n\n"
        f"## Recipe\n\n```yaml\n{recipe.to_yaml()}```\n"
    )


def _previous_files(out_dir: Path, force: bool) -> set[str] | None:
    """The files a previous export recorded in ``out_dir`` (None when the folder is missing or empty);
    refuses a non-empty folder without the marker unless ``force``."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise MergeLabError(f"{out_dir} exists and is not a folder: choose another output path", field="out")
    if not any(out_dir.iterdir()):
        return None
    marker = out_dir / MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        if data.get("format") != MARKER_FORMAT or not all(isinstance(f, str) for f in data["files"]):
            raise ValueError("not an export marker")
        return set(data["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        if force:
            return set()
        raise MergeLabError(
            f"{out_dir} is not empty and is not a previous Merge Lab export (no {MARKER}): export into a new "
            "folder, or pass --force (force=True) to add the export beside its files (files Merge Lab did not "
            "write are never deleted or overwritten)", field="out") from None


def _files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _swap_into_place(staging: Path, out_dir: Path, force: bool = False) -> None:
    """Move the finished export in: a missing or empty folder is replaced by renaming; otherwise only the
    files the previous export recorded are removed, and the new files moved beside the user's own."""
    written = [f for f in _files_under(staging) if f != MARKER]
    (staging / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "files": written + [MARKER]}, indent=1))
    previous = _previous_files(out_dir, force)
    if previous is None:
        if out_dir.exists():
            out_dir.rmdir()  # empty
        staging.rename(out_dir)
        return
    targets = {f: safe_join(out_dir, f) for f in written + [MARKER]}  # never through a symlink out of the folder
    theirs = [f for f, path in targets.items() if f not in previous and (path.exists() or path.is_symlink())]
    if theirs:
        raise MergeLabError(f"{out_dir} already holds '{theirs[0]}', which Merge Lab did not write: export into a "
                            "new folder (even --force never overwrites your files)", field="out")
    for name in sorted(previous, key=lambda f: -f.count("/")):
        try:
            path = safe_join(out_dir, name)
        except MergeLabError:
            continue  # a marker naming something outside the folder is ignored, never followed
        if path.is_file() or path.is_symlink():
            path.unlink()
    for name, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target)
    for folder in sorted({p for p in out_dir.rglob("*") if p.is_dir()}, key=lambda p: -len(p.parts)):
        rel = folder.relative_to(out_dir).as_posix()
        if any(f.startswith(rel + "/") for f in previous) and not any(folder.iterdir()):
            folder.rmdir()  # a task folder the previous export made and this one does not use
    shutil.rmtree(staging, ignore_errors=True)


def _relocate(report: ExportReport, staging: Path, out_dir: Path) -> ExportReport:
    def move(path: Path) -> Path:
        return out_dir / path.relative_to(staging)

    return ExportReport(out_dir, {k: move(v) for k, v in report.folders.items()},
                        [move(f) for f in report.files], report.warnings)
