"""The Export step: a zip of HF folders per task with recipe and model card, old exports cleaned."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import DISK_FULL, MergeLabError, is_disk_full
from .cache import Models, content_hash
from .experts import models_for
from .limits import EXPORT_MAX_AGE, UPLOAD_MAX_AGE, Progress, check_dtype, method_spec, no_progress
from .merge import settings_for
from .session import Session


def exports_root() -> Path:
    from ..paths import cache_root

    root = cache_root() / "exports"
    root.mkdir(parents=True, exist_ok=True)
    return root


def clean_old_exports(max_age: float = EXPORT_MAX_AGE, now: float | None = None) -> int:
    """Delete exports older than ``max_age`` seconds; returns how many were removed."""
    now = time.time() if now is None else now
    removed = 0
    for path in exports_root().iterdir():
        try:
            if now - path.stat().st_mtime > max_age:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _clean_folder(root: Path, max_age: float, now: float) -> int:
    removed = 0
    for path in root.iterdir() if root.is_dir() else []:
        try:
            if now - path.stat().st_mtime > max_age:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _unfinished_exports() -> int:
    """Export work folders with no finished zip: a process killed mid-export left them (hundreds of MB)."""
    removed = 0
    for path in exports_root().glob("merge-*"):
        if path.is_dir() and not any(path.glob("*.zip")):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def retention_sweep(now: float | None = None, startup: bool = False) -> dict[str, int]:
    """The one retention policy for every copy the app writes: export zips and history files (an hour), uploaded
    experts unused for UPLOAD_MAX_AGE, and — at start-up, when no export can be running — the staging of
    exports a killed process left behind. (gradio's own copies of the served files follow the same hour through
    the Blocks' ``delete_cache``, and are all deleted when the server restarts.)"""
    from ..paths import cache_root

    now = time.time() if now is None else now
    removed = {"exports": clean_old_exports(EXPORT_MAX_AGE, now),
               "uploads": _clean_folder(cache_root() / "uploads", UPLOAD_MAX_AGE, now)}
    if startup:
        removed["unfinished"] = _unfinished_exports()
    return removed


def export_tasks(session: Session) -> list[str]:
    """The experts that get a folder of their own: classifiers with a task head — and every expert when the last
    merge's method makes one body per task (a ``per_task_bodies`` declaration, EMR's). Empty otherwise (causal
    LMs): the merge is one folder, with no task to choose."""
    if not session.refs:
        return []
    experts = models_for(session).expert_set.experts
    method = session.last_recipe.method if session.last_recipe is not None else None
    if method is not None and getattr(method_spec(method), "per_task_bodies", False):
        return list(experts)
    return [name for name, expert in experts.items() if expert.head_names]


def _check_tasks(session: Session, chosen: Sequence[str] | None) -> None:
    unknown = [t for t in chosen or [] if t not in session.refs]
    if unknown:
        raise MergeLabError(f"Export tasks: no loaded expert named {', '.join(map(repr, unknown))} "
                            f"(experts: {', '.join(session.refs)})", field="tasks")
    with_heads = export_tasks(session)
    headless = [t for t in chosen or [] if t not in with_heads]
    if headless and not with_heads:
        raise MergeLabError("Export tasks: these experts have no task heads, so the merge is exported as one folder; "
                            "leave Tasks to export empty", field="tasks")
    if headless:
        raise MergeLabError(f"Export tasks: expert {headless[0]!r} has no task head to export a folder for "
                            f"(experts with task heads: {', '.join(with_heads)})", field="tasks")


EXPORTS: dict[str, Path] = {}  # export content hash → zip (identical exports are served from the same file)


def export(session: Session, tasks: Sequence[str] | None = None, dtype: str = "float32",
           progress: Progress | None = None, configs_from: str | None = None) -> Path:
    """Write the last merge (HF folders, recipe, mergekit YAML, model card, importance) into a stored zip.

    ``tasks``: the classifier experts to write a folder for (:func:`export_tasks`; an LM merge is one folder).
    ``configs_from``: the model (base or an expert) whose generation config and chat template are kept,
    recorded in the recipe (default: the recipe's, else the base).

    Atomic: on any failure (a full disk, a cancelled export) the half-written folder is removed and
    earlier zips are untouched; a full disk gets a readable message."""
    progress = progress or no_progress
    if session.last_recipe is None or session.merge_inputs is None:
        raise MergeLabError("nothing to export yet: press Merge first")
    dtype = check_dtype(dtype)
    chosen = list(tasks) if tasks else None
    _check_tasks(session, chosen)
    retention_sweep()
    models = models_for(session)
    recipe = session.last_recipe
    recipe.dtype = dtype
    if configs_from is not None:
        from ..io.recipe import check_configs_from

        recipe.configs_from = check_configs_from(configs_from, list(session.refs))
    importance_json = session.importance.to_json() if session.importance is not None else None
    key = content_hash("export", session.merge_key, recipe.to_dict(), chosen, dtype, importance_json)
    previous = EXPORTS.get(key)
    if previous is not None and previous.is_file():
        os.utime(previous)  # keep it another hour
        progress(1.0, "export ready (identical export reused)")
        return previous
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix=f"merge-{stamp}-", dir=exports_root()))
    out_dir = work / "merge"
    zip_path = work / f"merge-lab-{session.method}-{stamp}.zip"
    try:
        # the settings of the last merge's frozen inputs (overrides as they were at Merge, the same few-shot
        # data and prepared inputs), prepared before the models' lock: Export writes exactly what Merge built
        settings, _ = settings_for(session, session.merge_inputs)
        with models.lock:
            _export_with_settings(models, recipe, settings, out_dir, chosen, dtype, importance_json, progress)
        progress(0.95, "zipping (stored, not recompressed)")
        partial = work / (zip_path.name + ".part")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
            for path in sorted(out_dir.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(out_dir).as_posix())
        os.replace(partial, zip_path)
    except (OSError, MergeLabError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        if is_disk_full(exc):  # the library's message names a server path: a public page gets this one
            raise MergeLabError("export failed: the server's disk is full. Earlier exports are untouched; try "
                                "again later, export fewer tasks or a smaller dtype (fp16)", kind=DISK_FULL) from None
        if isinstance(exc, MergeLabError) and exc.field == "out":  # names the server's export folder
            raise MergeLabError("export failed: the server could not write the export folder. Earlier exports are "
                                "untouched; try again later") from None
        if isinstance(exc, MergeLabError):
            raise
        raise MergeLabError(f"export failed while writing files: {exc.strerror or exc}. Earlier exports are "
                            "untouched") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    EXPORTS[key] = zip_path
    progress(1.0, "export ready")
    return zip_path


def _export_with_settings(models: Models, recipe, settings, out_dir: Path, tasks, dtype: str,
                          importance_json: str | None, progress: Progress) -> None:
    from ..io.export import export_recipe

    export_recipe(recipe, out_dir, expert_set=models.expert_set, engine=models.engine, tasks=tasks, dtype=dtype,
                  importance_json=importance_json, progress=progress, settings=settings)


def read_zip_names(path: str | Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def zip_is_stored(path: str | Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())




def size_text(size: int) -> str:
    """A file size the way the page's download box writes it (steps of 1024, labelled KB / MB / GB, one
    decimal), so the status line and the box show one number for one file."""
    value, units = float(size), ["B", "KB", "MB", "GB", "PB"]
    index = 0
    while value > 1024 and index < len(units) - 1:
        value /= 1024
        index += 1
    return f"{value:.1f} {units[index]}"
