"""Loading a base and its experts into a session: references, homology check, task data, the experts table."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from ..errors import MergeLabError
from ..io.names import check_name, derive_name
from .budget import check_expert_count, check_memory
from .cache import CACHE, Models, files_fingerprint
from .limits import MAX_PROBE_ROWS, Progress, check_fewshot, no_progress, shorten_list
from .preflight import preflight_ref, scan_nonfinite
from .session import Session, TaskData


def parse_extra_refs(text: str | None) -> dict[str, str]:
    """``name=ref`` or bare ``ref`` lines → {name: ref} (names derived from the ref's last part)."""
    out: dict[str, str] = {}
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line and not line.startswith(("/", ".", "hf:", "zoo:")):
            name, _, ref = line.partition("=")
            name, ref = name.strip(), ref.strip()
            if name and ref:
                check_name(name)
        else:
            ref = line
            name = derive_name(Path(ref.split("@")[0].rstrip("/")).stem or ref)
        if not name or not ref:
            raise MergeLabError(f"cannot read expert line {raw[:200]!r}: write one per line as name=path or just "
                                "a path")
        out[name] = ref
    return out


def models_for(session: Session, progress: Progress | None = None) -> Models:
    """The heavy objects of the session's selection (loaded once, shared, bounded)."""
    if not session.refs:
        raise MergeLabError("no experts loaded yet: pick experts and press Load experts")
    key = session.key
    item = CACHE.get(key)
    if item is not None:
        return item
    from ..devices import resolve_device
    from ..engine import MergeEngine
    from ..io.experts import ExpertSet

    (progress or no_progress)(0.05, "checking the experts against the base (homology check)")
    expert_set = ExpertSet.load(session.base_ref, dict(session.refs), tokenizer=session.tokenizer)
    engine = MergeEngine(expert_set, device=resolve_device())  # CUDA when present, as importance and probe
    return CACHE.put(Models(key, expert_set, engine, fingerprint=files_fingerprint(expert_set)))


def load_experts(session: Session, base_ref: str, refs: Mapping[str, str], zoo=None,
                 progress: Progress | None = None, tokenizer: str | None = None) -> Session:
    """Run the homology check and open the experts; returns a fresh session for this selection (keeping the
    session's merge history, which is the user's record). ``tokenizer`` (base, union or an expert's name):
    experts whose vocabularies differ are aligned by token to that vocabulary (:mod:`merging.io.vocab`)."""
    progress = progress or no_progress
    refs = {str(k): str(v) for k, v in refs.items() if str(v).strip()}
    if not base_ref:
        raise MergeLabError("pick a base model (the model every expert was fine-tuned from)")
    if len(refs) < 2:
        raise MergeLabError(f"pick at least two experts to merge (got {len(refs)})")
    check_expert_count(len(refs))  # before anything is opened: one request must not take the machine
    for name in refs:  # names become folder names at export: identifiers only, whatever sent them
        check_name(name)
    for name, ref in [("base", base_ref), *refs.items()]:
        preflight_ref(ref, name)
    if tokenizer is not None:
        from ..io.vocab import check_tokenizer_choice

        tokenizer = check_tokenizer_choice(tokenizer, list(refs))
    new = Session(id=session.id if session else uuid.uuid4().hex[:12], base_ref=str(base_ref), refs=dict(refs),
                  tokenizer=tokenizer)
    if session is not None:
        new.history, new.merges = list(session.history), session.merges
    cached = CACHE.get(new.key)
    if cached is not None and cached.fingerprint != files_fingerprint(cached.expert_set):
        with CACHE._lock:  # the files changed on disk since they were opened: open them again
            CACHE._items.pop(new.key, None)
    models = models_for(new, progress)
    check_memory(models, "merge")  # a selection that cannot even be merged here is refused at load
    expert_set = models.expert_set
    new.refs = {name: refs.get(name, expert_set.experts[name].source.ref) for name in expert_set.experts}
    new.layers = list(expert_set.layout.layers)
    progress(0.3, "scanning the weights for NaN/Inf")
    scan_nonfinite(models)
    progress(0.5, "measuring task vectors (delta norms, sign conflicts, cosines)")
    stats = task_vector_stats(models)
    for name, expert in expert_set.experts.items():
        ref = new.refs[name]
        task = ref.split("/", 1)[1] if ref.startswith("zoo:") and zoo is not None and ref.split("/", 1)[1] in zoo.experts \
            else None
        new.tasks[name] = task
        root = getattr(expert.source, "root", None)
        new.folders[name] = str(root) if root is not None and Path(root).is_dir() else None
        data = _task_data_for(zoo, task, root)
        if data is not None:
            _check_head_matches_data(models, name, data)
            new.data[name] = data
    new.summary = expert_rows(new, models, stats)
    CACHE.trim()
    progress(1.0, "experts loaded")
    return new


def load_warnings(session: Session) -> list[str]:
    """What the page should warn about after loading: the library's warnings and broken (NaN/Inf) weights."""
    models = models_for(session)
    out = list(models.expert_set.warnings)
    for model, bad in (models.nonfinite or {}).items():
        shown = ", ".join(f"'{t}' ({n} value{'s' if n != 1 else ''})" for t, n in bad[:3])
        more = f" and {len(bad) - 3} more tensor(s)" if len(bad) > 3 else ""
        out.append(f"model '{model}' has NaN/Inf weights in {shown}{more}: the checkpoint is broken. Merging it "
                   "will fail and importance is blocked; replace it with a good copy")
    return out


# ---------------------------------------------------------------- broken files, found before use

def _task_data_for(zoo, task: str | None, root) -> TaskData | None:
    if zoo is not None and task is not None:
        try:
            labels = zoo.label_names(task)
        except (MergeLabError, KeyError, OSError, ValueError):
            labels = []
        return TaskData(list(zoo.fewshot(task)), list(zoo.probe(task))[:MAX_PROBE_ROWS], labels, "zoo")
    if root is not None and Path(root).is_dir():  # a folder laid out like a zoo expert carries its data
        from ..io.access import check_file_inside

        folder = Path(root)
        from ..io.taskdata import FEWSHOT_FILE, read_examples

        few, probe = folder / FEWSHOT_FILE, folder / "probe.jsonl"
        for file in (few, probe, folder / "merge_lab_task.json"):
            if file.is_file():
                check_file_inside(file, folder.name)  # a symlinked data file must not read outside the roots
        if few.is_file():
            labels: list[str] = []
            task_file = folder / "merge_lab_task.json"
            if task_file.is_file():
                try:
                    labels = list(json.loads(task_file.read_text(encoding="utf-8")).get("label_names", []))
                except (OSError, ValueError):
                    labels = []
            probe_rows = read_examples(probe)[:MAX_PROBE_ROWS] if probe.is_file() else []
            return TaskData(read_examples(few), probe_rows, labels, "folder")
    return None


def _check_head_matches_data(models: Models, expert: str, data: TaskData) -> None:
    """A folder's task data must fit the expert's head: more labels (or label ids) than classes made the probe and
    importance fail deep inside torch with an index error."""
    classes = head_size(models, expert)
    if classes is None:
        return
    top = max((label for _, label in [*data.fewshot, *data.probe]), default=-1)
    if (data.labels and len(data.labels) != classes) or top >= classes:
        count = len(data.labels) if data.labels else top + 1
        raise MergeLabError(f"expert '{expert}' has a {classes}-class head but the task data in its folder has "
                            f"{count} labels: fix merge_lab_task.json / the .jsonl files, or remove them and attach "
                            "the task's own file")


def head_size(models: Models, expert: str) -> int | None:
    """Number of classes of an expert's task head (None if it has no classifier head)."""
    expert_obj = models.expert_set.experts[expert]
    for name in expert_obj.head_names:
        if name.endswith("weight"):
            shape = expert_obj.source.tensors[name].shape
            return int(shape[0])
    return None


def attach_task_data(session: Session, expert: str, path: str | os.PathLike, n_fewshot: int | None = None) -> Session:
    """Attach a user's CSV/JSONL (text, label) file to an expert that has no task data."""
    from ..zoo.tasks import load_user_task, split_task

    if expert not in session.refs:
        raise MergeLabError(f"no expert named '{expert}' is loaded (experts: {', '.join(session.refs) or 'none'})")
    if n_fewshot is not None:
        n_fewshot = check_fewshot(n_fewshot)
    task = load_user_task(path, name=expert)
    models = models_for(session)
    classes = head_size(models, expert)
    if classes is not None and classes != len(task.label_names):
        raise MergeLabError(f"{Path(path).name[:80]} has {len(task.label_names)} labels "
                            f"({shorten_list(task.label_names)}) but expert '{expert}' has a {classes}-class head: "
                            "give the file of its own task")
    n_few = int(n_fewshot or session.fewshot_n)
    total = len(task.examples())
    n_few = max(1, min(n_few, total // 2))
    split = split_task(task, seed=session.seed, n_fewshot=n_few, n_probe=min(MAX_PROBE_ROWS, total - n_few), n_train=0)
    session.data[expert] = TaskData(list(split.fewshot_examples), list(split.probe_examples), list(task.label_names),
                                    Path(path).name)
    return session


def data_status(session: Session) -> str:
    """Markdown: which experts have task data, and what is unavailable without it."""
    if not session.refs:
        return "No experts loaded yet."
    from .lm import is_lm_session

    lines, lm = [], is_lm_session(session)
    for name in session.refs:
        data = session.data.get(name)
        if data is not None:
            lines.append(f"- **{name}**: {len(data.fewshot)} few-shot + {len(data.probe)} probe examples "
                         f"({data.source})")
        elif lm:
            lines.append(f"- **{name}**: no task text — APL, Fisher and the perplexity probe are unavailable for "
                         "it until you attach a .txt file (one example per line) or JSONL rows of `text` or "
                         "`prompt`/`completion`")
        else:
            lines.append(f"- **{name}**: no task data — APL, Fisher and the probe are unavailable for it until you "
                         "attach a CSV/JSONL file with `text` and `label` columns")
    return "\n".join(lines)


def task_vector_stats(models: Models):
    """The selection's task-vector statistics (computed once). Once computed they are read without the models
    lock, so slider and table edits never wait behind a merge or an export holding it."""
    if models.stats is not None:
        return models.stats
    with models.lock:
        if models.stats is None:
            from ..task_vectors import TaskVectors

            models.stats = TaskVectors(models.expert_set, cache=False).stats()
        return models.stats


def expert_rows(session: Session, models: Models, stats) -> list[list]:
    """The experts table: name, task, parameters, delta norm, task data."""
    rows = []
    for name in models.expert_set.experts:
        data = session.data.get(name)
        rows.append([name, session.tasks.get(name) or (data.source if data else "—"),
                     f"{stats.parameters.get(name, 0) / 1e6:.2f} M", round(stats.model_norm(name), 4),
                     f"{len(data.fewshot)} few-shot" if data else "none: attach a file"])
    return rows


EXPERT_HEADERS = ["expert", "task", "parameters", "delta norm", "task data"]


def tokenizer_for(models: Models):
    """The tokenizer of the first model folder that ships one (loaded once per selection)."""
    from ..io.taskdata import tokenizer_of

    with models.lock:
        if models.tokenizer is None:
            models.tokenizer = tokenizer_of(models.expert_set)
        return models.tokenizer
