"""Chart data for the page (numbers only; plotting lives in components/)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import MergeLabError
from .experts import models_for, task_vector_stats
from .limits import DROP
from .plan import plan
from .session import Session


def importance_maps(session: Session) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """expert → (layers, module kinds, |importance| matrix) for the layer × module heatmaps."""
    imp = session.importance
    if imp is None or "module" not in imp.signed:
        return {}
    out = {}
    for expert in imp.experts:
        heat = imp.layer_module_matrix(expert)
        out[expert] = (list(heat.rows), list(heat.cols), np.asarray(heat.values, float))
    return out


def unit_module_choices(session: Session) -> dict[str, list[str]]:
    """layer → modules with hidden-state scores."""
    imp = session.importance
    if imp is None or not imp.units:
        return {}
    out: dict[str, list[str]] = {}
    for module in imp.units:
        out.setdefault(imp.modules[module][0], []).append(module)
    return out


def hidden_view(session: Session, expert: str, module: str) -> tuple[np.ndarray, list[str], list[np.ndarray]]:
    """(unit scores of one module, layers, same-kind modules' unit scores per layer)."""
    imp = session.importance
    if imp is None or module not in imp.units:
        raise MergeLabError("no hidden-state scores for that module: compute importance (gradient mode scores "
                            "every unit)")
    kind = imp.modules[module][1]
    same = [(imp.modules[m][0], m) for m in imp.units if imp.modules[m][1] == kind
            and module.split(".")[-1] == m.split(".")[-1]]
    order = {k: i for i, k in enumerate(imp.layers)}
    same.sort(key=lambda lm: order.get(lm[0], 0))
    return (imp.unit_scores(expert, module), [lm[0] for lm in same],
            [imp.unit_scores(expert, m) for _, m in same])


def fidelity_data(session: Session, level: str = "module") -> tuple[list[float], list[float], list[str]] | None:
    """Exact and gradient scores of the same partitions (same intervention), if both were computed."""
    for intervention in ("restore", "ablate"):
        exact = session.importance_runs.get(f"exact/{intervention}")
        grad = session.importance_runs.get(f"gradient/{intervention}")
        if exact is not None and grad is not None and level in exact.signed and level in grad.signed:
            x = [float(v) for v in exact.matrix(level).ravel()]
            y = [float(v) for v in grad.matrix(level).ravel()]
            labels = [f"{e}: {p}" for e in exact.experts for p in exact.partitions[level]]
            return x, y, labels
    return None


def magnitude_data(session: Session) -> tuple[list[str], dict[str, list[float]], dict[str, list[float]]]:
    """(layers, importance per layer per expert, delta norm per layer per expert)."""
    imp = session.importance
    models = models_for(session)
    stats = task_vector_stats(models)
    layers = [k for k in session.layers if k in imp.partitions.get("layer", [])]
    importance = {e: [imp.scores(e, "layer")[k] for k in layers] for e in imp.experts}
    norms = {e: [stats.layer_norms(e).get(k, 0.0) for k in layers] for e in imp.experts}
    return layers, importance, norms


def conflict_data(session: Session, method: str | None = None, shared: Mapping[str, Any] | None = None
                  ) -> tuple[list[str], list[float], list[float]]:
    """Per layer: sign-conflict rate of the deltas, and its expected value after the planned drop.

    After independent random drops, a disagreeing entry stays a conflict only if both disagreeing
    experts keep it: the estimate multiplies the rate by the two largest keep rates of the layer.
    """
    models = models_for(session)
    stats = task_vector_stats(models)
    values = plan(session, method, shared)
    layers, before, after = [], [], []
    for layer in session.layers:
        kinds = stats.conflict.get(layer)
        if not kinds:
            continue
        counts = {k: 1 for k in kinds}  # equal weight per module kind is misleading: weight by entries
        sizes: dict[str, int] = {}
        for name in models.expert_set.layout.merged_names():
            info = models.expert_set.layout[name]
            if info.layer == layer and info.kind in kinds:
                sizes[info.kind] = sizes.get(info.kind, 0) + math.prod(info.shape)
        total = sum(sizes.get(k, counts[k]) for k in kinds)
        rate = sum(kinds[k] * sizes.get(k, counts[k]) for k in kinds) / max(total, 1)
        keeps = sorted((1.0 - values[e][DROP][layer] for e in values), reverse=True)
        factor = keeps[0] * keeps[1] if len(keeps) >= 2 else 1.0
        layers.append(layer)
        before.append(rate)
        after.append(rate * factor)
    return layers, before, after


def cosine_data(session: Session) -> tuple[list[str], list[list[float]]]:
    stats = task_vector_stats(models_for(session))
    return list(stats.experts), stats.cosine_matrix("model")


# ---------------------------------------------------------------- "which layer matters most?": one answer


def layer_importance(session: Session) -> tuple[list[str], dict[str, list[float]], dict[str, list[float]]]:
    """(layers, layer-level intervention share per expert, summed module-score share per expert).

    The first is what APL's drop ratios are calibrated from: |ΔL| of switching the whole layer at once,
    as a share of the expert's total over layers. The second is what the heatmap's rows add up to: the
    modules' |ΔL| summed per layer, as a share of the expert's total. Empty lists where a level is missing."""
    imp = session.importance
    if imp is None or "layer" not in imp.signed:
        return [], {}, {}
    layers = [k for k in imp.partitions["layer"]]
    layer = {e: _shares([imp.scores(e, "layer")[k] for k in layers]) for e in imp.experts}
    modules: dict[str, list[float]] = {}
    if "module" in imp.signed:
        for e in imp.experts:
            sums = dict.fromkeys(layers, 0.0)
            for module, value in imp.scores(e, "module").items():
                owner = imp.modules.get(module, (None,))[0]
                if owner in sums and math.isfinite(value):
                    sums[owner] += value
            modules[e] = _shares([sums[k] for k in layers])
    return layers, layer, modules


def _shares(values: list[float]) -> list[float]:
    finite = [v if math.isfinite(v) else 0.0 for v in values]
    total = sum(finite)
    return [v / total if total > 0 else 0.0 for v in finite]


def layer_answer(session: Session) -> str:
    """One sentence per expert: the layer that matters most by the layer intervention (what APL uses), and
    where the summed module scores disagree, why."""
    layers, layer, modules = layer_importance(session)
    if not layers:
        return ""
    parts, disagree = [], False
    for e, shares in layer.items():
        top = layers[max(range(len(layers)), key=shares.__getitem__)]
        text = f"**{e}**: layer {top} ({shares[layers.index(top)]:.0%} of the layer-level total)"
        if e in modules and any(modules[e]):
            msum = modules[e]
            mtop = layers[max(range(len(layers)), key=msum.__getitem__)]
            if mtop != top:
                disagree = True
                text += (f"; summed module scores point to layer {mtop} ({msum[layers.index(mtop)]:.0%}), where "
                         f"the layer intervention gives {shares[layers.index(mtop)]:.0%}")
        parts.append(text)
    line = "Which layer matters most (switching the whole layer, as APL's drop ratios do): " + "; ".join(parts) + "."
    if disagree:
        line += (" The two differ because a layer's modules act together: one module's change can raise the loss "
                 "and another's lower it, so their effects cancel when the whole layer is switched, while the "
                 "heatmap adds each module's effect measured alone.")
    return line


def fidelity_by_expert(session: Session) -> tuple[str, dict[str, dict[str, float]]] | None:
    """(intervention, level → expert → Spearman ρ of exact vs gradient) for the first intervention run in
    both modes, with ``"all experts"`` pooled as well (the one Spearman, merging.apl.fidelity)."""
    from ..apl.fidelity import compare_maps, rank_correlation

    for intervention in ("restore", "ablate"):
        exact = session.importance_runs.get(f"exact/{intervention}")
        grad = session.importance_runs.get(f"gradient/{intervention}")
        if exact is None or grad is None or list(exact.experts) != list(grad.experts):
            continue
        table = {lv: v for lv, v in compare_maps(exact, grad).items() if lv in ("layer", "module")}
        if not table:
            continue
        for lv in table:
            table[lv]["all experts"] = rank_correlation(exact.matrix(lv).ravel(), grad.matrix(lv).ravel())
        return intervention, table
    return None


GENERIC_FOLDER_NAMES = {"model", "models", "checkpoint", "weights", "snapshot"}


def base_model_name(path) -> str:
    """A base model's name for the page: "all-MiniLM-L6-v2" rather than the folder it sits in ("model", which
    is what the packaged base's folder is called). The packaged base is named by what it is; another folder
    with a generic name by its parent (where a hub snapshot or a package keeps the real name)."""
    from pathlib import Path

    path = Path(path)
    try:
        from ..paths import packaged_base_path

        if path.resolve() == packaged_base_path().resolve():
            return "all-MiniLM-L6-v2"
    except Exception:  # noqa: BLE001 - the package may be absent (a zoo built elsewhere): fall back to the folder
        pass
    if path.name.lower() in GENERIC_FOLDER_NAMES and path.parent.name:
        return path.parent.name
    return path.name
