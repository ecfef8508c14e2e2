"""The Merge step: a merge per frozen snapshot of the page, cached across sessions by content hash, rebuilt
when evicted. Method-agnostic: a data-aware method's inputs come from its declared ``prepare``."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MergeLabError
from .budget import check_memory
from .cache import CACHE, MAX_MERGES_KEPT, MERGE_STATS, Models, content_hash
from .experts import models_for
from .limits import PER_LAYER_KEYS, Progress, check_method, check_seed, check_shared, method_spec, no_progress
from .plan import layer_values, listed_overrides, with_overrides
from .prepare import clean_shared, importance_id, prepared, snapshot  # noqa: F401  (clean_shared re-exported)
from .session import MergeInputs, Session


def method_available(session: Session, method: str) -> str | None:
    """Why a method cannot run for this session (None if it can)."""
    spec = method_spec(method)
    needs = set(spec.needs)
    n = len(session.refs)
    if n and n < spec.min_experts or spec.max_experts is not None and n > spec.max_experts:
        return f"{spec.pretty_name} merges {spec.min_experts}–{spec.max_experts or 'any'} experts; {n} are loaded"
    if "few_shot" in needs and session.missing_data():
        return (f"{spec.pretty_name} needs few-shot task data for every expert; missing for "
                f"{', '.join(session.missing_data())}")
    if "importance" in needs and session.importance is None:
        return f"{spec.pretty_name} needs importance: press Compute importance first"
    return None


def expert_parameters(session: Session, method: str, shared: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-expert parameters of the merge the page describes (see :func:`recipe_expert_params`)."""
    snap = snapshot(session, method, shared, session.seed)
    return recipe_expert_params(snap, session.experts, session.layers, _prepared_or_none(session, snap))


def recipe_expert_params(snap: MergeInputs, experts, layers, prepared: Mapping | None) -> dict[str, dict[str, Any]]:
    """Everything ``prepare`` set per expert, with the per-layer drop_ratio / weight maps the user's
    overrides changed laid over it cell by cell; a key ``prepare`` did not set is written only where it
    differs from the shared value."""
    spec = method_spec(snap.method)
    declared = {p.name for p in spec.params}
    prepared_params = (prepared or {}).get("expert_params") or {}
    values = with_overrides(layer_values(snap.method, experts, layers, snap.shared, prepared_params),
                            snap.override_map())
    out: dict[str, dict[str, Any]] = {}
    for expert in experts:
        params: dict[str, Any] = copy.deepcopy(dict(prepared_params.get(expert, {})))
        for key in PER_LAYER_KEYS:
            if key not in declared:
                continue
            default = float(snap.shared.get(key, spec.param(key).default))
            layer_map = {k: float(v) for k, v in values[expert][key].items()}
            if key in params or any(not math.isclose(v, default, abs_tol=1e-12) for v in layer_map.values()):
                params[key] = layer_map
        if params:
            out[expert] = params
    return out


def _prepared_or_none(session: Session, snap: MergeInputs, progress: Progress | None = None) -> dict | None:
    """The method's prepared inputs when it can run now (a recipe of a method that cannot — APL before
    importance — records the page's values only, and Merge refuses it with the reason)."""
    if method_spec(snap.method).prepare is None or method_available(session, snap.method) is not None:
        return None
    return prepared(models_for(session), snap, progress)


def build_recipe(session: Session, method: str, shared: Mapping[str, Any], seed: int = 0, dtype: str = "float32"):
    """The recipe of the merge the page describes (what Export writes and the CLI replays)."""
    snap = snapshot(session, method, shared, seed)
    recipe = _recipe(session, snap, _prepared_or_none(session, snap))
    recipe.dtype = dtype
    return recipe


def _recipe(session: Session, snap: MergeInputs, prepared_result: Mapping | None):
    """The recipe of ``snap``: the effective per-expert values, the method's suggestion beside the user's
    overrides, the few-shot data by reference, and ``calibrated`` when the values are all ``prepare``
    made (no extras), so replay needs no data."""
    from ..io.recipe import ExpertRef, Recipe

    prepared_params = (prepared_result or {}).get("expert_params") or {}
    per_expert = recipe_expert_params(snap, session.experts, session.layers, prepared_result)
    experts = [ExpertRef(name, ref, per_expert.get(name, {})) for name, ref in session.refs.items()]
    suggested: dict[str, Any] = {}
    if prepared_params:
        suggested[snap.method] = copy.deepcopy(prepared_result.get("suggestion") or {"expert_params": prepared_params})
    sugg = layer_values(snap.method, session.experts, session.layers, snap.shared, prepared_params)
    overrides = listed_overrides(snap.override_map(), sugg)
    if overrides:
        suggested["overrides"] = overrides
    calibrated = None
    if prepared_result is not None and not prepared_result.get("extras"):
        calibrated = {"from": "few_shot", "by": "the Merge Lab app"}
        if snap.importance is not None:
            imp = snap.importance
            calibrated["importance"] = {"mode": imp.mode, "intervention": imp.intervention, "seed": imp.seed}
    return Recipe(method=snap.method, base=str(session.base_ref), experts=experts, parameters=dict(snap.shared),
                  seed=snap.seed, suggested=suggested, few_shot=copy.deepcopy(snap.fewshot) if snap.examples else {},
                  calibrated=calibrated, notes="made with the Merge Lab app", tokenizer=session.tokenizer)


def settings_for(session: Session, snap: MergeInputs, progress: Progress | None = None):
    """(engine settings, recipe) of a frozen snapshot: the one place a merge's settings are built."""
    from ..engine import MergeSettings

    models = models_for(session)
    prepared_result = prepared(models, snap, progress)
    recipe = _recipe(session, snap, prepared_result)
    recipe.device = None if models.engine.device.type == "cpu" else models.engine.device.type  # where it merges
    extras = dict((prepared_result or {}).get("extras") or {})
    settings = MergeSettings.build(models.expert_set, method_spec(snap.method), recipe.parameters,
                                   recipe.expert_params(), snap.seed, extras)
    return settings, recipe


@dataclass
class MergeSummary:
    label: str
    method: str
    seconds: float
    recomputed: int
    changed_layers: list[str]
    settings: str
    reused: bool = False  # an identical merge was already in memory (made by this or another session)


def key_settings(recipe, session: Session) -> str:
    """A one-line description of a merge for the history."""
    parts = [f"{k}={_short(v)}" for k, v in recipe.parameters.items()]
    n_over = len((recipe.suggested or {}).get("overrides") or [])
    if n_over:
        parts.append(f"{n_over} override(s)")
    return ", ".join(parts) or "defaults"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "per-layer"
    return str(value)


def merge_key(models: Models, snap: MergeInputs) -> str:
    """Content hash of everything a merge's tensors depend on: the models' files and the frozen inputs
    (method, declared parameters, seed, overrides, and for a data-aware method its few-shot examples and
    importance map — what its ``prepare`` is a function of)."""
    return content_hash("merge", models.fingerprint, snap.method, snap.shared, snap.seed, list(snap.overrides),
                        snap.examples, importance_id(snap.importance))


def _merge_result(session: Session, models: Models, snap: MergeInputs, progress: Progress):
    """(key, recipe, MergeResult, reused?) — an identical merge already in memory is reused, whoever made it.

    The method's inputs are prepared before the models' lock is taken (see :func:`.prepare.prepared`)."""
    key = merge_key(models, snap)
    settings, recipe = settings_for(session, snap, progress)
    with models.lock:
        result = models.results.get(key)
        if result is not None:
            MERGE_STATS["hits"] += 1
            models.results.move_to_end(key)
            return key, recipe, result, True
        MERGE_STATS["misses"] += 1
        result = models.engine.merge(settings, progress)
        models.results[key] = result
        models.owners.setdefault(key, set())
        while len(models.results) > MAX_MERGES_KEPT:
            unowned = [k for k in models.results if not models.owners.get(k) and k != key]
            models.drop_result(unowned[0] if unowned else next(iter(models.results)))
    return key, recipe, result, False


def _own(session: Session, models: Models, key: str) -> None:
    with models.lock:
        if session.merge_key and session.merge_key != key:
            owners = models.owners.get(session.merge_key)
            if owners is not None:
                owners.discard(session.id)
        models.owners.setdefault(key, set()).add(session.id)
    session.merge_key = key


def merge(session: Session, method: str, shared: Mapping[str, Any], seed: int = 0,
          progress: Progress | None = None) -> MergeSummary:
    """Merge with the page's values; keeps the merged body in the shared cache for probe and export."""
    progress = progress or no_progress
    method = check_method(method)
    shared = check_shared(method, shared)
    seed = check_seed(seed)
    if not session.refs:  # the first thing missing, before what the method needs of loaded experts
        models_for(session)
    why = method_available(session, method)
    if why:
        raise MergeLabError(why)
    models = models_for(session)
    check_memory(models, "merge")
    snap = snapshot(session, method, shared, seed)
    key, recipe, result, reused = _merge_result(session, models, snap, progress)
    _own(session, models, key)
    session.merge_inputs = snap
    session.method, session.shared, session.seed = method, dict(shared), int(seed)
    session.merges += 1
    label = f"#{session.merges} {method}"
    if method_spec(method).per_task_bodies:  # never listed beside single-model merges without saying so
        from ..methods.base import PER_TASK_LABEL

        label += f" ({PER_TASK_LABEL})"
    session.last_recipe, session.last_label = recipe, label
    seconds = 0.0 if reused else result.seconds
    summary = MergeSummary(label, method, seconds, 0 if reused else len(result.recomputed),
                           [] if reused else list(result.changed_layers), key_settings(recipe, session))
    summary.reused = reused
    session.history.append({"label": label, "method": method, "settings": summary.settings, "metrics": None,
                            "seconds": round(seconds, 3), "key": key, "recipe": recipe.to_dict()})
    CACHE.trim()
    return summary


def merged_tensors(session: Session) -> dict[str, torch.Tensor]:
    """The session's last merged body; rebuilt from its frozen inputs if memory pressure evicted it. (For a
    method of one body per task, its labelled unified body: score tasks on ``merged_result().body_for``.)"""
    return merged_result(session).tensors


def merged_result(session: Session):
    """The session's last MergeResult (bodies per task included); rebuilt if memory pressure evicted it."""
    models = models_for(session)
    result = models.results.get(session.merge_key) if session.merge_key else None
    if result is not None:
        if session.id not in models.owners.get(session.merge_key, set()):
            _own(session, models, session.merge_key)
        return result
    if session.merge_inputs is None:
        raise MergeLabError("no merge yet in this session: press Merge first")
    key, _, result, _ = _merge_result(session, models, session.merge_inputs, no_progress)
    _own(session, models, key)
    return result
