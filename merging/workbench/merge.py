"""The Merge step: a merge per recipe, cached across sessions by content hash, rebuilt when evicted."""

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
from .experts import models_for, tokenizer_for
from .limits import (
    DROP,
    PER_LAYER_KEYS,
    WEIGHT,
    Progress,
    check_method,
    check_seed,
    check_shared,
    method_spec,
    no_progress,
)
from .plan import override_list, plan
from .session import Session


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


def expert_parameters(session: Session, method: str, shared: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-expert layer maps for the method's declared drop_ratio / weight (only what differs from the
    shared value, except for APL whose per-layer values are the whole point)."""
    spec = method_spec(method)
    declared = {p.name for p in spec.params}
    values = plan(session, method, shared)
    out: dict[str, dict[str, Any]] = {}
    for expert in session.refs:
        params: dict[str, Any] = {}
        for key in PER_LAYER_KEYS:
            if key not in declared:
                continue
            default = float(shared.get(key, spec.param(key).default))
            layer_map = {k: float(v) for k, v in values[expert][key].items()}
            if method == "apl" or any(not math.isclose(v, default, abs_tol=1e-12) for v in layer_map.values()):
                params[key] = layer_map
        if params:
            out[expert] = params
    return out


def build_recipe(session: Session, method: str, shared: Mapping[str, Any], seed: int = 0, dtype: str = "float32"):
    """The recipe of the merge the page describes (what Export writes and the CLI replays)."""
    from ..io.recipe import ExpertRef, Recipe

    shared_clean = clean_shared(method, shared)
    if method == "apl" and session.calibration is not None:
        shared_clean.setdefault(DROP, session.apl_params.get(DROP, 0.5))
    per_expert = expert_parameters(session, method, shared)
    experts = [ExpertRef(name, ref, per_expert.get(name, {})) for name, ref in session.refs.items()]
    suggested: dict[str, Any] = {}
    if session.calibration is not None:
        suggested["apl"] = session.calibration.recipe_suggestion()
    overrides = override_list(session, method, shared)
    if overrides:
        suggested["overrides"] = overrides
    few_shot = {}
    if session.importance is not None:
        few_shot = session.importance.few_shot_record(session.seed)
    return Recipe(method=method, base=str(session.base_ref), experts=experts, parameters=shared_clean, seed=int(seed),
                  dtype=dtype, suggested=suggested, few_shot=few_shot, notes="made with the Merge Lab app")


def build_settings(session: Session, method: str, shared: Mapping[str, Any], seed: int = 0,
                   progress: Progress | None = None):
    """Engine settings for the page's values (data-aware methods get their inputs prepared)."""
    from ..engine import MergeSettings

    why = method_available(session, method)
    if why:
        raise MergeLabError(why)
    models = models_for(session)
    recipe = build_recipe(session, method, shared, seed)
    spec = method_spec(method)
    extras: dict[str, Any] = {}
    expert_params = recipe.expert_params()
    if method == "apl" and session.calibration is not None:
        extras.update(session.calibration.extras() or {})
    elif spec.prepare is not None:
        examples = {e: session.data[e].fewshot[: session.fewshot_n] for e in session.refs}
        prepared = spec.prepare(models.expert_set, examples, tokenizer_for(models), params=recipe.parameters,
                                progress=progress)
        extras.update(prepared.get("extras", {}))
        for name, values in prepared.get("expert_params", {}).items():
            expert_params[name] = {**values, **expert_params.get(name, {})}
    settings = MergeSettings.build(models.expert_set, spec, recipe.parameters, expert_params, int(seed), extras)
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
    n_over = len(override_list(session, recipe.method, recipe.parameters))
    if n_over:
        parts.append(f"{n_over} override(s)")
    return ", ".join(parts) or "defaults"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "per-layer"
    return str(value)


def merge_key(session: Session, models: Models, method: str, recipe) -> str:
    """Content hash of everything a merge's tensors depend on: the models' files, method, global and
    per-expert per-layer parameters, seed, and the method's prepared inputs (APL's unit keep-rate
    percentiles; the few-shot data of data-aware methods)."""
    spec = method_spec(method)
    inputs: Any = None
    if method == "apl" and session.calibration is not None:
        inputs = session.calibration.extras() or None
    elif spec.prepare is not None:
        inputs = [[e, session.data[e].fewshot[: session.fewshot_n]] for e in session.refs if e in session.data]
    experts = [[e.name, str(e.model), e.parameters] for e in recipe.experts]
    return content_hash("merge", models.fingerprint, method, recipe.parameters, experts, recipe.seed, inputs)


def _merge_result(session: Session, models: Models, method: str, shared: Mapping[str, Any], seed: int,
                  progress: Progress):
    """(key, recipe, MergeResult, reused?) — an identical merge already in memory is reused, whoever made it."""
    recipe = build_recipe(session, method, shared, seed)
    why = method_available(session, method)
    if why:
        raise MergeLabError(why)
    key = merge_key(session, models, method, recipe)
    with models.lock:
        result = models.results.get(key)
        if result is not None:
            MERGE_STATS["hits"] += 1
            models.results.move_to_end(key)
            return key, recipe, result, True
        MERGE_STATS["misses"] += 1
        settings, recipe = build_settings(session, method, shared, seed, progress)
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
    """Merge with the page's settings; keeps the merged body in the shared cache for probe and export."""
    progress = progress or no_progress
    method = check_method(method)
    shared = check_shared(method, shared)
    seed = check_seed(seed)
    models = models_for(session)
    check_memory(models, "merge")
    key, recipe, result, reused = _merge_result(session, models, method, shared, seed, progress)
    _own(session, models, key)
    session.merge_inputs = {"method": method, "shared": dict(shared), "seed": seed,
                            "overrides": copy.deepcopy(session.overrides), "calibration": session.calibration,
                            "apl_params": dict(session.apl_params), "fewshot_n": session.fewshot_n}
    session.method, session.shared, session.seed = method, dict(shared), int(seed)
    session.merges += 1
    label = f"#{session.merges} {method}"
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
    """The session's last merged body; rebuilt from what it was made of if memory pressure evicted it."""
    models = models_for(session)
    result = models.results.get(session.merge_key) if session.merge_key else None
    if result is not None:
        if session.id not in models.owners.get(session.merge_key, set()):
            _own(session, models, session.merge_key)
        return result.tensors
    snap = session.merge_inputs
    if snap is None:
        raise MergeLabError("no merge yet in this session: press Merge first")
    saved = (session.overrides, session.calibration, session.apl_params, session.fewshot_n)
    try:
        session.overrides, session.calibration = snap["overrides"], snap["calibration"]
        session.apl_params, session.fewshot_n = snap["apl_params"], snap["fewshot_n"]
        key, _, result, _ = _merge_result(session, models, snap["method"], snap["shared"], snap["seed"], no_progress)
    finally:
        session.overrides, session.calibration, session.apl_params, session.fewshot_n = saved
    _own(session, models, key)
    return result.tensors


