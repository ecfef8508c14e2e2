"""Replaying a recipe: open the models it names, turn it into engine settings, merge.

Beside the recipe rather than inside the engine: the engine merges settings and never knows where
they came from; this module is what turns a file into settings (data-aware methods add their inputs
through their declared ``prepare``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine import MergeEngine, MergeResult, MergeSettings, Progress
from ..errors import MergeLabError
from ..methods import get_method
from .experts import ExpertSet


def expert_set_from_recipe(recipe, *, allow_pickle: bool = False) -> ExpertSet:
    """Open and check the base and experts a recipe names (paths resolve against the recipe's folder)."""
    base_dir = recipe.resolve_dir()
    return ExpertSet.load(recipe.base, {e.name: e.model for e in recipe.experts},
                          allow_pickle=allow_pickle, base_dir=base_dir, tokenizer=recipe.tokenizer)


def settings_from_recipe(recipe, expert_set: ExpertSet) -> MergeSettings:
    """The engine settings a recipe describes.

    A data-aware method's inputs come from its declared ``prepare``, fed the few-shot examples the
    recipe's ``few_shot`` record references — unless the recipe says it is ``calibrated`` (its experts'
    parameters already hold what ``prepare`` computed), when nothing is recomputed. The recipe's own
    per-expert values win over prepared ones (they are the user's overrides, or the same values)."""
    recipe.validate(expert_set.layout.layers)
    spec = get_method(recipe.method)
    expert_params = recipe.expert_params()
    extras: dict[str, Any] = {}
    if spec.prepare is not None and recipe.calibrated is None:
        from .taskdata import recipe_examples, tokenizer_of

        examples = recipe_examples(recipe)
        prepared = spec.prepare(expert_set, examples, tokenizer_of(expert_set, required=False),
                                params=recipe.parameters)
        extras.update(prepared.get("extras") or {})
        for name, values in (prepared.get("expert_params") or {}).items():
            expert_params[name] = {**values, **expert_params.get(name, {})}
    return MergeSettings.build(expert_set, spec, recipe.parameters, expert_params, recipe.seed, extras)


def merge_recipe(recipe, *, expert_set: ExpertSet | None = None, engine: MergeEngine | None = None,
                 progress: Progress | None = None) -> MergeResult:
    expert_set = expert_set or (engine.experts if engine else expert_set_from_recipe(recipe))
    engine = engine or MergeEngine(expert_set)
    return engine.merge(settings_from_recipe(recipe, expert_set), progress)


def merge_recipe_body(recipe) -> dict[str, torch.Tensor]:
    """Merged body tensors (base names) of a recipe, in memory. A method of one body per task (EMR) has no
    one body: refused, so its unified vector is never taken for its model (use :func:`merge_recipe_task_bodies`)."""
    if get_method(recipe.method).per_task_bodies:
        raise MergeLabError(f"{get_method(recipe.method).pretty_name} makes one body per task, not one merged "
                            "body: score or export each task's own body (merge_recipe(recipe).task_bodies, or "
                            "python -m merging merge recipe.yaml --out DIR for one folder per task)", field="method")
    return merge_recipe(recipe).tensors


def merge_recipe_task_bodies(recipe) -> dict[str, dict[str, torch.Tensor]]:
    """expert → that expert's body (base names) of a recipe whose method makes one body per task."""
    result = merge_recipe(recipe)
    if not result.task_bodies:
        raise MergeLabError(f"{get_method(recipe.method).pretty_name} makes one merged body for every task: use "
                            "merge_recipe_body", field="method")
    return result.task_bodies
