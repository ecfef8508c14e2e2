"""The Importance step: APL importance for a session, and the intervention/draw comparison."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import MergeLabError
from .budget import check_memory
from .cache import CACHE, RESULTS, Models, content_hash
from .estimates import exact_levels, record, time_left
from .experts import models_for, tokenizer_for
from .limits import (
    DEFAULT_FEWSHOT,
    INTERVENTIONS,
    MODES,
    Progress,
    check_choice,
    check_fewshot,
    check_number,
    no_progress,
)
from .preflight import scan_nonfinite
from .session import Session


def compute_importance(session: Session, n_fewshot: int = DEFAULT_FEWSHOT, mode: str = "gradient",
                       intervention: str = "restore", level: str = "all", sample: int | None = None,
                       progress: Progress | None = None, scope: str | None = None) -> Session:
    """APL importance of every expert on its own few-shot data: an input of every method that ``needs``
    importance, whose ``prepare`` then calibrates from it (see :mod:`.prepare`).

    The map is a pure function of (models, few-shot examples, mode, intervention, levels, sample, seed), so it
    is cached across sessions by a hash of those: a second identical request is a cache hit.

    ``scope`` (exact mode): ``"layers (quick)"`` measures the layer level only, ``"layers and modules"`` (the
    default) both. Progress is said in words ("exact · topic · module 12 of 53, about 2 min left") and the
    run's measured pace becomes the rate the next estimate uses (:mod:`.estimates`)."""
    progress = progress or no_progress
    n_fewshot = check_fewshot(n_fewshot)
    mode = check_choice("Mode", mode, MODES)
    intervention = check_choice("Intervention", intervention, INTERVENTIONS)
    models = _models_with_task_data(session, "importance needs")
    levels = ["model", "layer", "module", "hidden"] if level == "all" else [level] if isinstance(level, str) else level
    if mode == "exact" and level == "all":  # one forward pass per unit is far too slow for a page: no units
        levels = exact_levels(scope)
    worded = worded_progress(progress, mode, {lv: list(models.expert_set.layout.partitions(lv))
                                              for lv in levels if lv != "hidden"}, len(session.refs))
    result, hit = _importance(session, models, n_fewshot, mode, intervention, list(levels), session.seed,
                              sample if mode == "exact" else None, worded)
    if not hit:
        _record_rate(result)
    session.importance = result
    session.importance_runs[f"{mode}/{intervention}"] = result
    session.fewshot_n = int(n_fewshot)
    CACHE.trim()
    return session


def worded_progress(progress: Progress, mode: str, partitions: dict[str, list[str]], experts: int) -> Progress:
    """The library's progress ("topic: module: encoder.layer.3.output.dense") in the page's words:
    "exact · topic · module 12 of 53, about 2 min left" (the time left from this run's own pace; the bar
    counts every partition of every expert, so it never runs backwards between levels)."""
    started = time.perf_counter()
    total = max(1, experts * sum(len(p) for p in partitions.values()))
    done = [0]

    def sink(fraction: float, message: str) -> None:
        parts = [p.strip() for p in str(message).split(":", 2)]
        if len(parts) == 3 and parts[1] in partitions and parts[2] in partitions[parts[1]]:
            expert, level, key = parts
            done[0] += 1
            index = partitions[level].index(key) + 1
            progress(done[0] / total, f"{mode} · {expert} · {level} {index} of {len(partitions[level])}"
                     + time_left(started, done[0], total))
        else:
            progress(fraction, f"{mode} · {message}")
    return sink


def _record_rate(result) -> None:
    """The measured pace of a finished run: seconds per forward pass (exact) or per backward pass (gradient),
    with the few-shot size each pass carried."""
    timings = getattr(result, "timings", {}) or {}
    sizes = [len(ix) for ix in (result.fewshot or {}).values() if ix]
    examples = round(sum(sizes) / len(sizes)) if sizes else None
    if result.mode == "exact":
        seconds = sum(t.get(lv, 0.0) for t in timings.values() for lv in result.partitions)
        units = sum(len(parts) for parts in result.partitions.values()) * len(timings)
        record("forward", seconds, units, "the last exact run", examples)
    else:
        # each pass builds the expert's model too; the median build, as the first one pays the process's one-off costs
        setups = sorted(t.get("setup", 0.0) for t in timings.values())
        seconds = sum(t.get("gradient", 0.0) for t in timings.values()) + len(setups) * setups[len(setups) // 2]
        record("gradient", seconds, len(timings), "the last gradient run", examples)


def _models_with_task_data(session: Session, what: str) -> Models:
    """The session's models, once every expert has task data and no weight is NaN/Inf."""
    missing = session.missing_data()
    if missing:
        raise MergeLabError(f"expert(s) {', '.join(missing)} have no task data: {what} a few labelled examples of "
                            "every expert's task — attach a CSV/JSONL file (text, label) to each")
    models = models_for(session)
    check_memory(models, "importance")
    _refuse_nonfinite(models, "importance")
    return models


def _refuse_nonfinite(models: Models, what: str) -> None:
    bad = scan_nonfinite(models)
    if bad:
        model, tensors = next(iter(bad.items()))
        raise MergeLabError(f"model '{model}' has NaN/Inf values in tensor '{tensors[0][0]}' "
                            f"({len(tensors)} tensor(s) affected): {what} cannot use a broken checkpoint; replace it")


def _importance(session: Session, models: Models, n: int, mode: str, intervention: str, levels: list[str],
                seed: int, sample: int | None, progress: Progress, draw_seed: int | None = None):
    """(ImportanceMap, cache hit?) for the session's experts on a seeded few-shot draw."""
    from ..apl.importance import compute_importance as _compute
    from ..apl.importance import draw_fewshot
    from ..lm.model import resolve_device

    tokenizer = tokenizer_for(models)
    examples, indices = {}, {}
    for name in session.refs:
        examples[name], indices[name] = draw_fewshot(session.data[name].fewshot, int(n),
                                                     seed if draw_seed is None else draw_seed)
    key = content_hash("importance", models.fingerprint, sorted(session.refs), examples, mode, intervention,
                       levels, sample, seed)

    def compute():
        with models.lock:
            return _compute(models.expert_set, examples, tokenizer, mode=mode, level=levels,
                            intervention=intervention, sample=sample, seed=seed, progress=progress,
                            fewshot_indices=indices, device=resolve_device())  # CUDA when present

    return RESULTS.get_or_compute("importance", key, compute)


@dataclass
class Comparison:
    """Layer-level gradient importance with both interventions, and its rank stability over few-shot draws."""

    experts: list[str]
    layers: list[str]
    restore: dict[str, list[float]]  # expert → |importance| per layer (main draw)
    ablate: dict[str, list[float]]
    agreement: dict[str, float]  # expert → Spearman(restore, ablate) over layers
    stability: dict[str, dict[str, float]]  # intervention → expert → mean pairwise Spearman over draws
    draws: int
    draw_size: int
    seconds: float
    hits: int = 0


def compare_interventions(session: Session, n_fewshot: int | None = None, draws: int = 3,
                          progress: Progress | None = None) -> Comparison:
    """Gradient importance at layer level with ``restore`` and ``ablate`` on the same few-shot draw, and the
    layer ranking's stability over ``draws`` seeded draws for each (gradient: one backward pass per expert
    and run, so 2 × draws runs in all; each run cached like any importance)."""
    from ..apl.fidelity import rank_correlation, stability

    progress = progress or no_progress
    n = check_fewshot(n_fewshot if n_fewshot is not None else session.fewshot_n)
    draws = int(check_number("draws", draws, 2, 5, integer=True))
    models = _models_with_task_data(session, "the comparison needs")
    smallest = min(len(session.data[e].fewshot) for e in session.refs)
    size = max(2, min(n, smallest // 2)) if smallest >= 4 else smallest  # draws must differ to say anything
    start = time.perf_counter()
    maps: dict[str, list] = {}
    hits = 0
    total = 2 * draws
    done = 0
    started = time.perf_counter()
    for intervention in INTERVENTIONS:
        maps[intervention] = []
        for d in range(draws):
            def step(f, m, done=done, iv=intervention, d=d):
                progress((done + f) / total, f"compare · {iv} · draw {d + 1} of {draws} · {m}"
                         + time_left(started, done, total))
            result, hit = _importance(session, models, size, "gradient", intervention, ["layer"], session.seed,
                                      None, step, draw_seed=session.seed + d)
            maps[intervention].append(result)
            hits += int(hit)
            if not hit:
                _record_rate(result)
            done += 1
    first = maps["restore"][0]
    layers = list(first.partitions["layer"])
    restore = {e: [float(v) for v in first.matrix("layer")[i]] for i, e in enumerate(first.experts)}
    abl = maps["ablate"][0]
    ablate = {e: [float(v) for v in abl.matrix("layer")[i]] for i, e in enumerate(abl.experts)}
    agreement = {e: rank_correlation(restore[e], ablate[e]) for e in restore}
    stab = {iv: stability(maps[iv], "layer") for iv in INTERVENTIONS}
    result = Comparison(list(first.experts), layers, restore, ablate, agreement, stab, draws, size,
                        time.perf_counter() - start, hits)
    session.comparison = result
    progress(1.0, "comparison done")
    return result


