"""Data-aware methods in the app, by declaration only: snapshot the inputs, call the method's ``prepare``.

Every data-aware method (APL, Fisher, whatever registers next) goes through the same three steps,
driven by its :class:`~merging.methods.MethodSpec` alone — ``needs``, ``prepare`` and its declared
parameters — never by its name:

1. :func:`snapshot` freezes what a merge is a function of (:class:`MergeInputs`): the method's declared
   parameters, the seed, the user's per-cell overrides, each expert's few-shot draw with the recipe's
   record of it (by reference), and — for a method that ``needs`` importance — the session's
   importance map, which ``prepare`` then takes as an input instead of recomputing it;
2. :func:`prepared` calls ``spec.prepare(expert_set, examples, tokenizer, params=…, importance=…)``,
   cached across sessions by a content hash of those inputs (a class pressing Merge prepares once);
3. the plan lays the user's overrides over the per-expert values ``prepare`` returned, and the recipe
   records both (see :mod:`.merge`).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

from ..errors import MergeLabError
from ..methods.base import NEEDS_IMPORTANCE
from .cache import RESULTS, Models, content_hash
from .limits import WEIGHT, Progress, method_spec
from .session import MergeInputs, Session, freeze_overrides


def clean_shared(method: str, shared: Mapping[str, Any]) -> dict[str, Any]:
    """Only the method's declared parameters, typed (ints as ints), without per-layer weight."""
    spec = method_spec(method)
    out = {}
    for p in spec.params:
        if p.name == WEIGHT or p.name not in shared or shared[p.name] is None:
            continue
        value = shared[p.name]
        if p.kind == "int":
            value = int(value)
        elif p.kind == "float":
            value = float(value)
        elif p.kind == "bool":
            value = bool(value)
        out[p.name] = value
    return out


def snapshot(session: Session, method: str, shared: Mapping[str, Any], seed: int = 0,
             overrides: Mapping | None = None) -> MergeInputs:
    """The frozen inputs of a merge with the page's values (``overrides`` default: the session's)."""
    spec = method_spec(method)
    examples: dict[str, tuple] = {}
    record: dict[str, dict] = {}
    importance = None
    if spec.prepare is not None:
        importance = session.importance if NEEDS_IMPORTANCE in spec.needs else None
        examples, record = _fewshot(session, importance, int(seed))
    return MergeInputs(method, clean_shared(method, shared), int(seed),
                       freeze_overrides(session.overrides if overrides is None else overrides),
                       examples, record, importance)


def _fewshot(session: Session, importance, seed: int) -> tuple[dict[str, tuple], dict[str, dict]]:
    """Each expert's few-shot examples and the recipe's record of them: the examples the importance map
    was measured on when it is an input (what the method's values are a function of), else a draw of
    ``session.fewshot_n`` with the merge's seed. Data from a zoo or a model folder is recorded by the
    expert's ref (its ``fewshot.jsonl``); an upload by name only (a recipe cannot reach it)."""
    from ..io.taskdata import draw_fewshot, fewshot_record

    examples, record = {}, {}
    for name in session.refs:
        data = session.data.get(name)
        if data is None:
            continue
        pool = data.fewshot
        indices = list(importance.fewshot.get(name) or []) if importance is not None else []
        draw_seed = int(importance.seed) if indices else seed
        if not indices or any(not 0 <= i < len(pool) for i in indices):
            _, indices = draw_fewshot(pool, int(session.fewshot_n), seed)
            draw_seed = seed
        examples[name] = tuple(tuple(pool[i]) for i in indices)
        file = session.refs[name] if data.source in ("zoo", "folder") else None
        record[name] = fewshot_record(file, indices, draw_seed, source=data.source)
    return examples, record


def importance_id(importance) -> str | None:
    """A content hash of an importance map (what a prepared result depends on), computed once per map:
    every plan refresh asks for it, and a map is never changed once computed."""
    if importance is None:
        return None
    key = id(importance)
    found = _IMPORTANCE_IDS.get(key)
    if found is None:
        found = content_hash(importance.experts, importance.layers, importance.mode, importance.intervention,
                             importance.seed, importance.sample, importance.signed, importance.units,
                             importance.fewshot)
        _IMPORTANCE_IDS[key] = found
        weakref.finalize(importance, _IMPORTANCE_IDS.pop, key, None)
    return found


_IMPORTANCE_IDS: dict[int, str] = {}  # id(map) → its content hash, dropped when the map is collected


def prepare_key(models: Models, snap: MergeInputs) -> str:
    return content_hash("prepare", models.fingerprint, snap.method, snap.shared, snap.examples,
                        importance_id(snap.importance))


def prepared(models: Models, snap: MergeInputs, progress: Progress | None = None,
             compute: bool = True) -> dict[str, Any] | None:
    """What the method's ``prepare`` returns for these inputs (None for a method without one, or when
    ``compute`` is false and it was not computed yet). Call outside ``models.lock``: the result cache's
    per-key lock is taken first, the models' lock inside it (the order every cached step uses)."""
    spec = method_spec(snap.method)
    if spec.prepare is None:
        return None
    key = prepare_key(models, snap)
    if not compute:
        return RESULTS.get("prepare", key)

    def run() -> dict[str, Any]:
        from .experts import tokenizer_for

        try:
            tokenizer = tokenizer_for(models)
        except MergeLabError:
            tokenizer = None  # a method that needs one says so; others (custom losses, tests) do without
        inputs = {"importance": snap.importance} if snap.importance is not None else {}
        examples = {e: [tuple(x) for x in rows] for e, rows in snap.examples.items()}
        with models.lock:
            return spec.prepare(models.expert_set, examples, tokenizer, params=dict(snap.shared),
                                progress=progress, **inputs)

    value, _ = RESULTS.get_or_compute("prepare", key, run)
    return value


def view_prepared(session: Session, method: str, shared: Mapping[str, Any]) -> dict[str, Any] | None:
    """The prepared result the plan shows for the page's values: computed when the method's heavy input
    is already there (a method that ``needs`` importance, once Compute importance ran: preparing is then
    calibration, arithmetic on a few numbers per layer — unless ``prepare.heavy(params)`` says these
    settings measure more, e.g. APL at the merged point), else only what an earlier Merge prepared."""
    from .experts import models_for
    from .merge import method_available

    spec = method_spec(method)
    if spec.prepare is None or not session.refs or method_available(session, method) is not None:
        return None
    snap = snapshot(session, method, shared, session.seed, overrides={})
    heavy = getattr(spec.prepare, "heavy", None)  # a prepare may declare settings that take gradient passes
    cheap = NEEDS_IMPORTANCE in spec.needs and snap.importance is not None and not (heavy and heavy(snap.shared))
    return prepared(models_for(session), snap, compute=cheap)
