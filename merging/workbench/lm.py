"""Causal-LM experts in a session: attach an LM task file per expert, get perplexity rows.

For the page to call (its UI is built elsewhere). An LM expert's task data is text — a ``.txt`` file
(one example per line) or JSONL ``{"text"}`` / ``{"prompt", "completion"}`` rows — split with the
session's seed into few-shot rows (APL importance, calibration, Fisher) and disjoint held-out rows
(the probe). Stored as the session's :class:`TaskData` like a classifier's data, so importance and
the data-aware methods' ``prepare`` read it with no LM-specific step.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import MergeLabError
from .cache import content_hash
from .experts import models_for, tokenizer_for
from .limits import MAX_PROBE_ROWS, Progress, check_fewshot, no_progress
from .session import Session, TaskData


def attach_lm_data(session: Session, expert: str, path: str | os.PathLike, n_fewshot: int | None = None) -> Session:
    """Attach a causal-LM task file to an LM expert: ``n_fewshot`` rows (default: the session's count, at
    most half the file) drawn with the session's seed are its few-shot data, the rest (up to the probe's
    row limit) its held-out probe text."""
    from ..io.taskdata import is_lm_data, read_examples
    from ..lm.model import is_causal_lm
    from ..zoo.tasks import MAX_USER_ROWS, max_task_bytes

    if expert not in session.refs:
        raise MergeLabError(f"no expert named '{expert}' is loaded (experts: {', '.join(session.refs) or 'none'})")
    name = Path(path).name[:80]
    if Path(path).suffix.lower() not in (".txt", ".jsonl"):
        raise MergeLabError(f"{name}: an LM task file is a .txt file (one text per line) or .jsonl rows")
    try:
        size = Path(path).stat().st_size
    except OSError as exc:
        raise MergeLabError(f"cannot read task file {name}: {exc.strerror or exc}") from None
    if size > max_task_bytes():  # the same caps as a classifier's upload, checked before reading
        raise MergeLabError(f"task file {name} is {size / 1024**2:.1f} MB, over the {max_task_bytes() / 1024**2:.3g} MB "
                            "limit for task files (MERGE_LAB_MAX_TASK_MB): upload a sample")
    rows = read_examples(path)
    if len(rows) > MAX_USER_ROWS:
        raise MergeLabError(f"task file {name} has {len(rows)} rows, over the limit of {MAX_USER_ROWS}: upload a sample")
    if not is_lm_data(rows):
        raise MergeLabError(f"{name} holds labelled rows: an LM expert's task data is text (a .txt file, or JSONL "
                            'rows {"text": …} or {"prompt": …, "completion": …})')
    if len(rows) < 2:
        raise MergeLabError(f"{name} has {len(rows)} example(s): an LM task file needs at least two (few-shot and "
                            "held-out rows are disjoint)")
    spec = models_for(session).expert_set.experts[expert]
    if not is_causal_lm(spec.source.config):
        raise MergeLabError(f"expert '{expert}' is not a causal LM (its config.json names no *ForCausalLM "
                            "architecture): attach its labelled task data instead")
    n_few = int(check_fewshot(n_fewshot) if n_fewshot is not None else session.fewshot_n)
    n_few = max(1, min(n_few, len(rows) // 2))
    order = np.random.default_rng(session.seed).permutation(len(rows))
    few = sorted(int(i) for i in order[:n_few])
    held = sorted(int(i) for i in order[n_few:n_few + MAX_PROBE_ROWS])
    session.data[expert] = TaskData([rows[i] for i in few], [rows[i] for i in held], [], Path(path).name)
    return session


def is_lm_session(session: Session) -> bool:
    """Whether the session's experts are causal LMs (their config.json names a *ForCausalLM architecture):
    their data is text, their probe reports perplexity and their page tries a prompt, not a sentence."""
    from ..lm.model import is_causal_lm

    if not session.refs:
        return False
    experts = models_for(session).expert_set.experts
    return any(is_causal_lm(e.source.config) for e in experts.values())


def attach_data(session: Session, expert: str, path: str | os.PathLike, n_fewshot: int | None = None) -> Session:
    """Attach a task file to an expert, as text for a causal LM and as labelled rows for a classifier —
    the upload on the page is one, whichever kind of experts is loaded."""
    from ..lm.model import is_causal_lm
    from .experts import attach_task_data

    if expert not in session.refs:
        raise MergeLabError(f"no expert named '{expert}' is loaded (experts: {', '.join(session.refs) or 'none'})")
    spec = models_for(session).expert_set.experts[expert]
    if is_causal_lm(spec.source.config):
        return attach_lm_data(session, expert, path, n_fewshot)
    if Path(path).suffix.lower() == ".txt":
        raise MergeLabError(f"{Path(path).name[:80]} is plain text, but expert '{expert}' is a classifier: its "
                            "task data is a CSV or JSONL file with `text` and `label` columns")
    return attach_task_data(session, expert, path, n_fewshot)


def _lm_prober(session: Session, models):
    """(prober, held-out sets, experts left out) for the session's LM experts; the prober (base and
    experts scored once) is shared by every session of the selection with the same held-out text."""
    from ..io.taskdata import is_lm_data
    from ..lm.probe import LMProber

    sets = {e: list(d.probe) for e, d in session.data.items() if e in session.refs and d.probe and is_lm_data(d.probe)}
    if not sets:
        raise MergeLabError("no expert has LM task data with held-out rows: attach a text file to each LM expert first")
    key = content_hash("lm-probe", sets)
    with models.lock:
        if models.prober is None or models.prober_key != key:
            cache_dir = Path(tempfile.gettempdir()) / "merge-lab-probe" / "probe_cache"
            models.prober = LMProber(models.expert_set, sets, tokenizer_for(models), cache_dir=cache_dir)
            models.prober_key = key
    return models.prober, sets, [e for e in session.refs if e not in sets]


def run_lm_probe(session: Session, progress: Progress | None = None):
    """The Probe step for causal-LM experts: loss and perplexity per task (lower is better) of base, each
    expert and every probed merge of the session, as a ``causal_lm`` :class:`~merging.zoo.probe.ProbeReport`
    (so the page, the history and every caller read one report type). A merge of one body per task (EMR)
    is scored task by task on its own body. The merged row is cached across sessions by content hash."""
    from ..zoo.probe import CAUSAL_LM, ProbeReport, ProbeRow
    from .cache import CACHE, RESULTS
    from .merge import merged_result

    progress = progress or no_progress
    models = models_for(session)
    if session.merge_key is None:
        raise MergeLabError("no merge yet in this session: press Merge first")
    prober, sets, unavailable = _lm_prober(session, models)
    progress(0.1, "base and experts (computed once, then cached)")
    with models.lock:
        reference = prober.reference()

    def probe_merge():
        result = merged_result(session)
        with models.lock:
            progress(0.6, "the merged model")
            if result.task_bodies:
                return prober.probe_task_bodies(result.task_bodies)
            return prober.probe_body(result.tensors)

    metrics, _ = RESULTS.get_or_compute("probe", content_hash("lm-probe", session.merge_key, sets), probe_merge)
    metrics = {t: dict(m) for t, m in metrics.items()}
    rows = [ProbeRow(r["name"], r["metrics"], CAUSAL_LM) for r in reference.rows]
    session.reference = ProbeReport(list(reference.tasks), rows, CAUSAL_LM, dict(reference.meta))
    for item in reversed(session.history):
        if item.get("key") == session.merge_key or "key" not in item:
            item["metrics"] = metrics
            break
    report = ProbeReport(list(reference.tasks), list(rows), CAUSAL_LM, dict(reference.meta))
    for item in session.history:
        if item.get("metrics") and set(item["metrics"]) <= set(reference.tasks):
            report.add(ProbeRow(item["label"], item["metrics"], CAUSAL_LM))
    report.meta["unavailable"] = unavailable
    CACHE.trim()
    progress(1.0, "probe done")
    return report


def lm_probe_rows(session: Session, progress: Progress | None = None) -> tuple[list[str], list[list]]:
    """(headers, rows) of loss and perplexity per task: base, each expert, and the session's latest merge
    when there is one, each on the held-out text of every expert with LM data. The prober (reference
    rows computed once) is shared by every session of the selection."""
    progress = progress or no_progress
    models = models_for(session)
    prober, _, _ = _lm_prober(session, models)
    with models.lock:
        progress(0.3, "base and experts")
        merged = {}
        if session.merge_key is not None:
            from .merge import merged_result

            progress(0.7, "the merged model")
            merged = {session.last_label or "merged": merged_result(session)}
        report = prober.report(merged)  # a merge of one body per task is scored on each task's own body
    progress(1.0, "done")
    return report.table()


# ---------------------------------------------------------------- layer swapping beside APL's layer importance

LAYER_SWAP = "layer_swap"
#: what a layer can take besides one of the two experts (layer_swap's declared sources; "shape" follows its
#: bottom / top / transition shape)
OTHER_TAKES = ("blend", "base", "shape")


def swap_experts(session: Session) -> list[str]:
    """The two experts layer swapping composes (it takes exactly two), in the order the page lists them."""
    if len(session.refs) != 2:
        raise MergeLabError(f"layer swapping composes exactly two experts; {len(session.refs)} are loaded: load two "
                            "(the two whose layers you want to combine) and compute importance")
    return list(session.refs)


def layer_swap_rows(session: Session) -> tuple[list[str], list[list]]:
    """(headers, rows): per layer, each expert's share of its own layer-level APL importance (the whole-layer
    intervention, as a share of that expert's total, so experts with different loss scales compare) and the
    layer's layer-swap choice (an expert's name, blend, base, or shape: the method's bottom/top shape)."""
    from .views import layer_importance

    layers, shares, _ = layer_importance(session)
    experts = list(session.refs)
    headers = ["layer", *(f"{e} importance" for e in experts), "take"]
    if not layers:
        layers = list(session.layers)
    rows = []
    for index, layer in enumerate(layers):
        row = [layer]
        for e in experts:
            values = shares.get(e)
            row.append(round(100.0 * values[index], 1) if values else None)
        rows.append([*row, session.layer_take.get(layer, "shape")])
    return headers, rows


def suggest_layer_swap(session: Session) -> str:
    """Fill layer swapping's per-layer choice from APL's layer importance: each layer from the expert to whom it
    matters most (the larger share of its own importance). Returns, in words, what was chosen and why."""
    from .views import layer_importance

    experts = swap_experts(session)
    layers, shares, _ = layer_importance(session)
    if not layers or any(e not in shares for e in experts):
        raise MergeLabError("no layer-level importance yet: press Compute importance (gradient or exact; the layer "
                            "level is always computed), then suggest")
    take = {}
    for index, layer in enumerate(layers):
        take[layer] = max(experts, key=lambda e: shares[e][index])
    session.layer_take = take
    counts = {e: [k for k, v in take.items() if v == e] for e in experts}
    said = "; ".join(f"**{e}**: {', '.join(ls) or 'no layer'}" for e, ls in counts.items())
    return (f"Suggested from importance — {said}. Each layer is taken from the expert whose own loss depends on that "
            "layer's change most (its larger share of APL's layer-level importance): swapping in the other "
            "expert's copy would lose more there than it gains. Edit any cell of the take column to override.")


def set_layer_swap(session: Session, rows) -> Session:
    """Record the take column of the panel's table (an expert's name, blend, base or shape per layer)."""
    experts = list(session.refs)
    allowed = [*experts, *OTHER_TAKES]
    known = set(session.layers)
    take = {}
    for row in rows or []:
        if not row or len(row) < 2:
            continue
        layer, choice = str(row[0]).strip(), str(row[-1]).strip()
        if layer not in known:
            raise MergeLabError(f"layer swap table: no layer {layer[:40]!r} in this model (layers: "
                                f"{', '.join(session.layers)})", field="take")
        if choice not in allowed:
            raise MergeLabError(f"layer swap table, layer {layer}: take must be one of {', '.join(allowed)}, got "
                                f"{choice[:40]!r}", field="take")
        if choice != "shape":
            take[layer] = choice
    session.layer_take = take
    return session


def layer_swap_shared(session: Session, method: str, shared: dict) -> dict:
    """The shared parameters with the panel's per-layer choice as layer_swap's ``take`` map (expert names
    turned into outer / inner by ``outer_expert``); other methods' parameters are returned as they are."""
    if method != LAYER_SWAP or not session.layer_take:
        return shared
    from ..methods.layer_swap import OUTER_EXPERT, SHAPE, outer_inner

    outer, inner = outer_inner(swap_experts(session), shared.get("outer_expert", OUTER_EXPERT.default))
    names = {outer: "outer", inner: "inner"}
    default = shared.get("take", SHAPE)
    take = {layer: names.get(choice, choice) for layer, choice in session.layer_take.items()}
    return {**shared, "take": {**take, "default": default if isinstance(default, str) else SHAPE}}
