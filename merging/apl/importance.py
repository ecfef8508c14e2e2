"""APL importance: how much each part of an expert's delta matters for its own task.

For expert t with few-shot loss L_t and delta Δ_t = Θ_t − Θ_b, the importance of partition k
(the whole model, a layer, a module, or one hidden-state unit) is measured by a causal
intervention (docs/ARCHITECTURE.md, "APL as Merge Lab implements it"):

- ``restore`` (default): start at the base, switch partition k to the expert's values,
  I = |L(Θ_b + Δ^k) − L(Θ_b)|;
- ``ablate``: start at the expert, switch partition k back to the base,
  I = |L(Θ_t − Δ^k) − L(Θ_t)|.

``exact`` mode runs one forward pass per partition, patching parameters in place. ``gradient``
mode takes one backward pass at the start point and scores every partition at every level as
the first-order change ⟨g, target − start⟩ summed inside the partition — the gradient is taken
where the intervention starts, never elsewhere, so signs and scales match the exact scores.
Both keep the signed change: a partition whose change *raises* the loss is not "helpful".
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cancel import checkpoint
from ..errors import MergeLabError
from ..io.experts import ExpertSet
from ..io.layout import MODULE_KINDS, ROLE_MERGE, Layout, unit_slice
from ..io.taskdata import draw_fewshot  # noqa: F401  (re-exported: one few-shot draw)
from .replay import BlockReplay
from .taskloss import MAX_LENGTH, Example, FunctionLoss, StateLoss, TaskLoss, body_state, task_loss

LEVELS = ("model", "layer", "module", "hidden")
MODES = ("exact", "gradient")
INTERVENTIONS = ("restore", "ablate")
FORMAT = 1
Progress = Callable[[float, str], None]


# ---- the result ------------------------------------------------------------------------------

@dataclass
class Heatmap:
    """A layer × module-kind matrix for one expert (NaN where a layer has no such module)."""

    rows: list[str]
    cols: list[str]
    values: np.ndarray
    modules: list[list[str | None]]


@dataclass
class ImportanceMap:
    """APL scores of every expert at every computed level, with how they were obtained.

    ``signed[level]`` is an [experts × partitions] array of loss changes (``partitions[level]``
    names the columns); absolute importance is its magnitude. ``units[module]`` is an
    [experts × units] array of signed hidden-state scores, NaN for units not measured (exact
    mode measures a seeded sample). ``fewshot[expert]`` are the indices of the few-shot
    examples used (into the expert's pool), ``start_loss`` the loss where the intervention
    starts, ``timings[expert]`` seconds per stage.
    """

    experts: list[str]
    layers: list[str]
    mode: str
    intervention: str
    seed: int
    partitions: dict[str, list[str]] = field(default_factory=dict)
    signed: dict[str, np.ndarray] = field(default_factory=dict)
    units: dict[str, np.ndarray] = field(default_factory=dict)
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)
    fewshot: dict[str, list[int]] = field(default_factory=dict)
    start_loss: dict[str, float] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    sample: int | None = None
    max_length: int = MAX_LENGTH

    # ---- queries ------------------------------------------------------------------------
    @property
    def levels(self) -> list[str]:
        return [lv for lv in LEVELS if lv in self.signed or (lv == "hidden" and self.units)]

    def _row(self, expert: str) -> int:
        if expert not in self.experts:
            raise MergeLabError(f"no importance for expert '{expert}' (have: {', '.join(self.experts)})")
        return self.experts.index(expert)

    def matrix(self, level: str, absolute: bool = True) -> np.ndarray:
        """[experts × partitions] scores at ``level`` (model, layer or module)."""
        if level not in self.signed:
            raise MergeLabError(f"importance was not computed at level '{level}' "
                                f"(computed: {', '.join(self.levels) or 'none'}); recompute with level='{level}' or 'all'")
        values = self.signed[level]
        return np.abs(values) if absolute else values.copy()

    def scores(self, expert: str, level: str, absolute: bool = True) -> dict[str, float]:
        """Partition → score of one expert at one level."""
        row = self.matrix(level, absolute)[self._row(expert)]
        return dict(zip(self.partitions[level], (float(v) for v in row)))

    def unit_scores(self, expert: str, module: str, absolute: bool = True) -> np.ndarray:
        """Hidden-state scores of one module's units (NaN = not measured)."""
        if module not in self.units:
            raise MergeLabError(f"no hidden-state scores for module '{module}': compute importance with "
                                "level='hidden' or 'all' (norms and embeddings have no units)")
        row = self.units[module][self._row(expert)]
        return np.abs(row) if absolute else row.copy()

    def unit_modules(self, layer: str | None = None) -> list[str]:
        """Modules with hidden-state scores, optionally only those of one layer."""
        return [m for m in self.units if layer is None or self.modules[m][0] == str(layer)]

    def layer_module_matrix(self, expert: str, absolute: bool = True) -> Heatmap:
        """Module-level scores of one expert laid out layer × module kind (for heatmaps)."""
        row = self.matrix("module", absolute)[self._row(expert)]
        labels = module_columns(self.modules)
        cols = sorted(set(labels.values()), key=_column_order)
        rows = [layer for layer in self.layers if any(self.modules[m][0] == layer for m in labels)]
        values = np.full((len(rows), len(cols)), np.nan)
        where: list[list[str | None]] = [[None] * len(cols) for _ in rows]
        for module, score in zip(self.partitions["module"], row):
            r, c = rows.index(self.modules[module][0]), cols.index(labels[module])
            values[r, c] = score
            where[r][c] = module
        return Heatmap(rows, cols, values, where)

    # ---- serialisation ---------------------------------------------------------------------
    def few_shot_record(self, draw_seed: int) -> dict[str, dict]:
        """What a recipe records under ``few_shot``: per expert the size, draw seed and pool indices used,
        so a replay draws the same examples."""
        return {e: {"n": len(ix), "seed": draw_seed, "indices": list(ix)} for e, ix in self.fewshot.items()}

    def _meta(self) -> dict:
        return {
            "format": FORMAT, "experts": self.experts, "layers": self.layers, "mode": self.mode,
            "intervention": self.intervention, "seed": self.seed, "sample": self.sample,
            "max_length": self.max_length, "partitions": self.partitions,
            "modules": {m: list(v) for m, v in self.modules.items()}, "unit_modules": list(self.units),
            "fewshot": self.fewshot, "start_loss": self.start_loss, "timings": self.timings,
        }

    def to_json(self) -> str:
        data = self._meta()
        data["signed"] = {lv: _nan_to_none(a) for lv, a in self.signed.items()}
        data["absolute"] = {lv: _nan_to_none(np.abs(a)) for lv, a in self.signed.items()}
        data["units"] = {m: _nan_to_none(a) for m, a in self.units.items()}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ImportanceMap:
        try:
            data = json.loads(text)
            signed = {lv: _array(v) for lv, v in data["signed"].items()}
            units = {m: _array(v) for m, v in data.get("units", {}).items()}
            return cls._from_meta(data, signed, units)
        except (ValueError, KeyError, TypeError) as exc:
            raise MergeLabError(f"not an importance JSON file ({type(exc).__name__}: {exc}); "
                                "export it again from Merge Lab") from exc

    def save_npz(self, path: str | Path) -> None:
        arrays = {f"signed__{lv}": a for lv, a in self.signed.items()}
        arrays.update({f"units__{i}": a for i, a in enumerate(self.units.values())})
        np.savez_compressed(path, meta=np.array(json.dumps(self._meta())), **arrays)

    @classmethod
    def load_npz(cls, path: str | Path) -> ImportanceMap:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                signed = {k.split("__", 1)[1]: data[k].astype(float) for k in data.files if k.startswith("signed__")}
                units = {m: data[f"units__{i}"].astype(float) for i, m in enumerate(meta["unit_modules"])}
            return cls._from_meta(meta, signed, units)
        except (OSError, ValueError, KeyError) as exc:
            raise MergeLabError(f"{path} is not an importance .npz file ({exc}); export it again") from exc

    @classmethod
    def _from_meta(cls, meta: dict, signed: dict, units: dict) -> ImportanceMap:
        if meta.get("format") != FORMAT:
            raise MergeLabError(f"importance file format {meta.get('format')!r} is not supported (expected {FORMAT})")
        return cls(meta["experts"], meta["layers"], meta["mode"], meta["intervention"], int(meta["seed"]),
                   {k: list(v) for k, v in meta["partitions"].items()}, signed, units,
                   {m: (v[0], v[1]) for m, v in meta["modules"].items()},
                   {k: list(v) for k, v in meta.get("fewshot", {}).items()},
                   dict(meta.get("start_loss", {})), dict(meta.get("timings", {})),
                   meta.get("sample"), int(meta.get("max_length", MAX_LENGTH)))


def _nan_to_none(array: np.ndarray) -> list:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.asarray(array, float)]


def _array(rows: list) -> np.ndarray:
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=float).reshape(len(rows), -1)


def module_columns(modules: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """Module → heatmap column: its kind, numbered where a layer holds several of that kind
    (BERT has two norms per block), so every cell is exactly one module."""
    per_layer: dict[tuple[str, str], list[str]] = {}
    for module, (layer, kind) in modules.items():
        per_layer.setdefault((layer, kind), []).append(module)
    ambiguous = {kind for (_, kind), found in per_layer.items() if len(found) > 1}
    labels = {}
    for (_layer, kind), found in per_layer.items():
        for index, module in enumerate(found, 1):
            labels[module] = f"{kind}{index}" if kind in ambiguous else kind
    return labels


def _column_order(label: str) -> tuple[int, str]:
    kind = label.rstrip("0123456789")
    return (MODULE_KINDS.index(kind) if kind in MODULE_KINDS else len(MODULE_KINDS), label)


# ---- scoring one expert ------------------------------------------------------------------

def _nonzero(start: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], names) -> bool:
    return any(not torch.equal(start[n], target[n]) for n in names)


@torch.no_grad()
def exact_partition_scores(task: TaskLoss, start: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                           partitions: Mapping[str, Sequence[str]], progress: Progress | None = None,
                           reference: float | None = None, *, replay: BlockReplay | None = None,
                           known: dict | None = None) -> dict[str, float]:
    """Signed L(start with partition k switched to target) − L(start), one forward per partition.

    The live tensors must hold ``start``; they hold it again afterwards (each patch is undone by
    copying the start values back, not by subtracting, so no rounding drift accumulates).
    Partitions whose delta is exactly zero score 0 without a forward pass. ``reference`` is
    L(start) when already known. ``replay`` (its :meth:`BlockReplay.start_loss` run at ``start``): blocks
    below each patch replay their start outputs instead of running. ``known``: losses already measured, keyed
    by the set of tensors whose delta is non-zero — a partition that patches exactly what another did (a layer
    that is one module, the model when one layer holds the whole delta) is not run again; pass one dict to
    several calls (the levels of one expert) to share them.
    """
    reference = float(task.loss()) if reference is None else reference
    known = {} if known is None else known
    out = {}
    for index, (key, names) in enumerate(partitions.items()):
        checkpoint()  # Stop ends an exact run between partitions
        moving = frozenset(n for n in names if not torch.equal(start[n], target[n]))
        if not moving:
            out[key] = 0.0
            continue
        if moving not in known:
            for name in moving:
                task.live[name].copy_(target[name])
            try:
                known[moving] = replay.loss(sorted(moving)) if replay is not None else float(task.loss())
            finally:
                for name in moving:
                    task.live[name].copy_(start[name])
        out[key] = known[moving] - reference
        if progress:
            progress((index + 1) / len(partitions), key)
    return out


@torch.no_grad()
def exact_unit_scores(task: TaskLoss, layout: Layout, start: Mapping[str, torch.Tensor],
                      target: Mapping[str, torch.Tensor], units: Mapping[str, Sequence[int]],
                      progress: Progress | None = None, reference: float | None = None,
                      replay: BlockReplay | None = None) -> dict[str, dict[int, float]]:
    """Signed loss change of switching one hidden-state unit (its weight row/column and bias
    entry) at a time; ``units`` maps module → unit indices to measure (``replay``: see
    :func:`exact_partition_scores`)."""
    modules = layout.unit_modules()
    reference = float(task.loss()) if reference is None else reference
    total = sum(len(v) for v in units.values()) or 1
    done, out = 0, {}
    for module, indices in units.items():
        names = modules[module]
        zero = not _nonzero(start, target, names)
        out[module] = {}
        for unit in indices:
            out[module][int(unit)] = 0.0 if zero else _switch_unit(task, layout, names, unit, start, target, replay) - reference
            done += 1
            if progress and done % 16 == 0:
                progress(done / total, f"{module}[{unit}]")
    return out


def _switch_unit(task: TaskLoss, layout: Layout, names: Sequence[str], unit: int,
                 start: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                 replay: BlockReplay | None = None) -> float:
    slices = {n: unit_slice(layout[n], [unit]) for n in names}
    for name, where in slices.items():
        task.live[name][where] = target[name][where]
    try:
        return replay.loss(names) if replay is not None else float(task.loss())
    finally:  # a Stop or an error must not leave the unit patched in the live model
        for name, where in slices.items():
            task.live[name][where] = start[name][where]


@dataclass
class GradientScores:
    """First-order scores from one gradient: per tensor, per unit-module vector."""

    tensor_sums: dict[str, float]
    unit_vectors: dict[str, np.ndarray]
    loss: float


def gradient_scores(task: TaskLoss, layout: Layout, start: Mapping[str, torch.Tensor],
                    target: Mapping[str, torch.Tensor]) -> GradientScores:
    """One backward pass at ``start``; every partition's score is Σ g ⊙ (target − start) inside it.

    Only tensors whose delta is non-zero are differentiated (the others contribute exactly 0),
    and the sums are vectorised reductions: per tensor a full sum, per unit-bearing tensor a
    sum over every axis except the unit axis.
    """
    moving = [n for n in task.live if not torch.equal(start[n], target[n])]
    loss, grads = task.gradient(moving)
    tensor_sums = {n: 0.0 for n in task.live}
    unit_parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for name, grad in grads.items():
            product = grad * (target[name] - start[name]).to(grad.device)
            tensor_sums[name] = float(product.sum(dtype=torch.float64))
            info = layout[name]
            if info.droppable and info.unit_axis is not None:
                dims = [d for d in range(product.dim()) if d != info.unit_axis]
                unit_parts.setdefault(info.module, []).append(product.sum(dim=dims, dtype=torch.float64) if dims
                                                              else product.double())
    unit_vectors = {}
    for module, names in layout.unit_modules().items():
        parts = unit_parts.get(module)
        n_units = layout[names[0]].n_units
        unit_vectors[module] = torch.stack(parts).sum(0).numpy() if parts else np.zeros(n_units)
    return GradientScores(tensor_sums, unit_vectors, loss)


def aggregate(tensor_sums: Mapping[str, float], partitions: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Partition score = sum of its tensors' first-order terms (Taylor terms are additive)."""
    return {key: float(sum(tensor_sums[n] for n in names)) for key, names in partitions.items()}


def sample_units(layout: Layout, sample: int | None, seed: int) -> dict[str, list[int]]:
    """Module → unit indices: all units, or ``sample`` drawn uniformly over every (module, unit)."""
    modules = layout.unit_modules()
    counts = {m: layout[names[0]].n_units for m, names in modules.items()}
    if sample is None:
        return {m: list(range(n)) for m, n in counts.items()}
    total = sum(counts.values())
    if sample <= 0:
        raise MergeLabError(f"sample must be a positive number of hidden units, got {sample}")
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(sample, total), replace=False))
    out: dict[str, list[int]] = {m: [] for m in counts}
    offsets = np.cumsum([0] + list(counts.values()))
    names = list(counts)
    for pick in picks:
        module = int(np.searchsorted(offsets, pick, side="right") - 1)
        out[names[module]].append(int(pick - offsets[module]))
    return out


# ---- the high-level API ------------------------------------------------------------------

def _levels(level: str | Sequence[str]) -> list[str]:
    wanted = list(LEVELS) if level == "all" else [level] if isinstance(level, str) else list(level)
    bad = [lv for lv in wanted if lv not in LEVELS]
    if bad:
        raise MergeLabError(f"unknown importance level '{bad[0]}': use model, layer, module, hidden or all")
    return wanted


def _check_choices(mode: str, intervention: str) -> None:
    if mode not in MODES:
        raise MergeLabError(f"unknown importance mode '{mode}': use 'gradient' (one backward pass) or 'exact'")
    if intervention not in INTERVENTIONS:
        raise MergeLabError(f"unknown intervention '{intervention}': use 'restore' (base + one part of the "
                            "fine-tuning) or 'ablate' (expert minus one part)")


def _task_loss(expert_set: ExpertSet, expert: str, examples, tokenizer, loss_fn, device: str,
               max_length: int, start: Mapping[str, torch.Tensor]) -> TaskLoss:
    if loss_fn is not None:
        fn = loss_fn[expert] if isinstance(loss_fn, Mapping) else loss_fn
        return FunctionLoss(start, fn)
    return task_loss(expert_set, expert, examples, tokenizer, start, purpose="APL importance",
                                device=device, max_length=max_length)


def score_expert(task: TaskLoss, layout: Layout, start, target, *, mode: str, levels: Sequence[str],
                 units: Mapping[str, Sequence[int]], progress: Progress | None = None) -> tuple[dict, dict, dict, float]:
    """One expert: (level → partition → signed score, module → unit vector, timings, start loss)."""
    partitions = {lv: layout.partitions(lv) for lv in levels if lv != "hidden"}
    timings: dict[str, float] = {}
    scores: dict[str, dict[str, float]] = {}
    vectors: dict[str, np.ndarray] = {}
    if mode == "gradient":
        clock = time.perf_counter()
        result = gradient_scores(task, layout, start, target)
        scores = {lv: aggregate(result.tensor_sums, parts) for lv, parts in partitions.items()}
        if "hidden" in levels:
            vectors = result.unit_vectors
        timings["gradient"] = time.perf_counter() - clock
        return scores, vectors, timings, result.loss
    replay = BlockReplay(task, layout)
    with torch.no_grad():
        start_loss = replay.start_loss()
    known: dict = {}  # patched tensors → loss, shared by the levels (a one-module layer is measured once)
    for lv, parts in partitions.items():
        clock = time.perf_counter()
        scores[lv] = exact_partition_scores(task, start, target, parts,
                                            _sub(progress, lv) if progress else None, start_loss,
                                            replay=replay, known=known)
        timings[lv] = time.perf_counter() - clock
    if "hidden" in levels:
        clock = time.perf_counter()
        measured = exact_unit_scores(task, layout, start, target, units, progress, start_loss, replay)
        timings["hidden"] = time.perf_counter() - clock
        timings["hidden_units"] = float(sum(len(v) for v in units.values()))
        for module, found in measured.items():
            vector = np.full(layout[layout.unit_modules()[module][0]].n_units, np.nan)
            for unit, value in found.items():
                vector[unit] = value
            vectors[module] = vector
    return scores, vectors, timings, start_loss


def _sub(progress: Progress, label: str) -> Progress:
    return lambda fraction, message: progress(fraction, f"{label}: {message}")


def compute_importance(expert_set: ExpertSet, examples: Mapping[str, Sequence[Example]] | None, tokenizer, *,
                       mode: str = "gradient", level: str | Sequence[str] = "layer", intervention: str = "restore",
                       sample: int | None = None, seed: int = 0, device: str = "cpu",
                       progress: Progress | None = None,
                       loss_fn: StateLoss | Mapping[str, StateLoss] | None = None,
                       fewshot_indices: Mapping[str, Sequence[int]] | None = None,
                       max_length: int = MAX_LENGTH) -> ImportanceMap:
    """APL importance of every expert's delta on its own few-shot examples.

    ``examples[expert]`` is that expert's few-shot set D_t as (text, label) pairs; it is
    tokenised once. The loss is the expert's classifier (its body at the intervention's
    start point, its own task head) in eval mode. ``loss_fn`` replaces the classifier by a
    function of a state dict keyed by base tensor names (one for all experts or one per
    expert); then ``examples`` and ``tokenizer`` may be None. ``sample``/``seed`` choose the
    hidden units exact mode measures (gradient mode scores all of them at no extra cost).
    """
    _check_choices(mode, intervention)
    levels = _levels(level)
    layout = expert_set.layout
    units = sample_units(layout, sample if mode == "exact" else None, seed) if "hidden" in levels else {}
    base = body_state(expert_set, "base")
    result = _empty_map(expert_set, mode, intervention, seed, levels, sample)

    def points(expert: str):
        own = body_state(expert_set, expert)
        return (base, own) if intervention == "restore" else (own, base)

    return _score_experts(expert_set, result, points, examples, tokenizer, loss_fn, device, max_length,
                          fewshot_indices, mode, levels, units, progress)


def _score_experts(expert_set: ExpertSet, result: ImportanceMap, points, examples, tokenizer, loss_fn, device,
                   max_length, fewshot_indices, mode, levels, units, progress) -> ImportanceMap:
    """Score every expert's partitions between the intervention's two points, ``points(expert)`` →
    (start, target) states, and fill ``result``: one loop for importance at the base and at the merge."""
    layout = expert_set.layout
    collected: dict[str, list] = {lv: [] for lv in levels if lv != "hidden"}
    unit_rows: dict[str, list[np.ndarray]] = {m: [] for m in units}
    for index, expert in enumerate(expert_set.experts):
        checkpoint()
        clock = time.perf_counter()
        start, target = points(expert)
        task = _task_loss(expert_set, expert, examples, tokenizer, loss_fn, device, max_length, start)
        setup = time.perf_counter() - clock
        step = _expert_progress(progress, index, len(expert_set.experts), expert)
        scores, vectors, timings, start_loss = score_expert(task, layout, start, target, mode=mode,
                                                            levels=levels, units=units, progress=step)
        for lv in collected:
            collected[lv].append([scores[lv][k] for k in result.partitions[lv]])
        for module in unit_rows:
            unit_rows[module].append(vectors[module])
        result.timings[expert] = {"setup": setup, **timings}
        result.start_loss[expert] = start_loss
        n = len(examples[expert]) if examples is not None and expert in examples else 0
        result.fewshot[expert] = list(fewshot_indices[expert]) if fewshot_indices and expert in fewshot_indices \
            else list(range(n))
        del task, start, target
    result.signed = {lv: np.array(rows, dtype=float) for lv, rows in collected.items()}
    result.units = {m: np.stack(rows).astype(float) for m, rows in unit_rows.items()}
    return result


def _empty_map(expert_set: ExpertSet, mode, intervention, seed, levels, sample) -> ImportanceMap:
    layout = expert_set.layout
    modules = {info.module: (info.layer, info.kind) for info in layout.tensors.values() if info.role == ROLE_MERGE}
    partitions = {lv: list(layout.partitions(lv)) for lv in levels if lv != "hidden"}
    return ImportanceMap(list(expert_set.experts), list(layout.layers), mode, intervention, seed,
                         partitions, modules=modules, sample=sample if mode == "exact" else None)


def _expert_progress(progress: Progress | None, index: int, total: int, expert: str) -> Progress | None:
    if progress is None:
        return None
    return lambda fraction, message: progress((index + fraction) / total, f"{expert}: {message}")




# ---- measuring at the task-arithmetic merge, and element saliency (issue #14) ------------------
#
# A separate addition on top of the scoring functions above (score_expert, gradient passes): the
# paper measures each expert alone, at the base; measuring at the merge sees the other experts' changes.

#: ImportanceMap.intervention of a map measured at the merge point
MERGED_INTERVENTION = "ablate_at_merge"


def merge_point(expert_set: ExpertSet, lam: float) -> dict[str, torch.Tensor]:
    """θ_TA = θ0 + λ Σ_t Δ_t over the merged body tensors (float32): plain task arithmetic, no drop."""
    base = body_state(expert_set, "base")  # may be the source's own tensors: never written to
    theta = {n: t.clone() for n, t in base.items()}
    for expert in expert_set.experts:
        for name, value in body_state(expert_set, expert).items():
            theta[name] += lam * (value - base[name])
    return theta


def compute_importance_at_merge(expert_set: ExpertSet, examples: Mapping[str, Sequence[Example]] | None,
                                tokenizer, *, lam: float = 1.0, mode: str = "gradient",
                                level: str | Sequence[str] = "layer", sample: int | None = None, seed: int = 0,
                                device: str = "cpu", progress: Progress | None = None,
                                loss_fn: StateLoss | Mapping[str, StateLoss] | None = None,
                                fewshot_indices: Mapping[str, Sequence[int]] | None = None,
                                max_length: int = MAX_LENGTH) -> ImportanceMap:
    """APL importance at the merge: I_t^k = |L_t(θ_TA − λΔ_t^k) − L_t(θ_TA)|, gradient ⟨∇L_t(θ_TA), −λΔ_t^k⟩.

    The paper (Kong et al., arXiv 2408.09485) locates a partition by a causal intervention on the
    *fine-tuned* model: set the partition's parameters back to the pre-trained values and measure how
    much the task loss changes. Here the same intervention — remove this part of expert t's own change
    — starts at the point the merge actually uses, θ_TA, rather than at θ_t: that is the model the
    merged parts must work in, so a part whose effect the other experts' changes cancel (or amplify)
    scores by its effect there. (Restoring into θ_TA − λΔ_t would start from a model with expert t's
    change absent altogether, which is not a point the merge ever visits.) With one expert and λ = 1
    this is the paper's ablate at θ_t exactly. Same levels and modes as :func:`compute_importance`.
    """
    _check_choices(mode, "ablate")
    levels = _levels(level)
    layout = expert_set.layout
    units = sample_units(layout, sample if mode == "exact" else None, seed) if "hidden" in levels else {}
    base, theta = body_state(expert_set, "base"), merge_point(expert_set, lam)
    result = _empty_map(expert_set, mode, MERGED_INTERVENTION, seed, levels, sample)
    def points(expert: str):
        own = body_state(expert_set, expert)
        return theta, {n: theta[n] - lam * (own[n] - base[n]) for n in theta}

    return _score_experts(expert_set, result, points, examples, tokenizer, loss_fn, device, max_length,
                          fewshot_indices, mode, levels, units, progress)


def element_saliency(expert_set: ExpertSet, examples: Mapping[str, Sequence[Example]] | None, tokenizer, *,
                     point: str = "base", lam: float = 1.0, device: str = "cpu",
                     loss_fn: StateLoss | Mapping[str, StateLoss] | None = None,
                     max_length: int = MAX_LENGTH, **_ignored) -> dict[str, dict[str, torch.Tensor]]:
    """Per droppable tensor and expert, the element saliency |g ⊙ Δ_t| (float32, the tensor's shape):
    g = ∇L_t at the base (``point="base"``, where gradient importance takes it for ``restore``) or at
    θ_TA (``"merged"``). One backward pass per expert; each entry is that entry's own first-order term
    of the gradient score, so summing it inside a partition gives the partition's |score| bound.
    Memory: one float32 copy of each expert's droppable tensors."""
    if point not in ("base", "merged"):
        raise MergeLabError(f"unknown importance point '{point}': use 'base' or 'merged'", field="parameters.importance_at")
    layout = expert_set.layout
    base = body_state(expert_set, "base")
    start = base if point == "base" else merge_point(expert_set, lam)
    droppable = [n for n in base if layout[n].droppable]
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in droppable}
    for expert in expert_set.experts:
        checkpoint()
        own = body_state(expert_set, expert)
        moving = [n for n in droppable if not torch.equal(own[n], base[n])]
        task = _task_loss(expert_set, expert, examples, tokenizer, loss_fn, device, max_length, start)
        _, grads = task.gradient(moving) if moving else (0.0, {})
        for name in droppable:
            if name in grads:
                out[name][expert] = (grads[name].cpu() * (own[name] - base[name])).abs().float()
            else:
                out[name][expert] = torch.zeros(base[name].shape)
        del task, own, grads
    return out


def _draw_key(examples, tokenizer, max_length: int, device: str) -> str | None:
    """What a measurement on these examples depends on besides the weights (None: not cacheable —
    a custom loss function has no content to hash)."""
    if examples is None:
        return None
    from ..hashing import content_hash

    vocab = getattr(tokenizer, "vocab_size", None)
    return content_hash({e: [list(map(str, x)) for x in rows] for e, rows in examples.items()},
                        type(tokenizer).__name__, vocab, max_length, device)


class _MeasureCache:
    """Per expert set (dropped when the set is collected), the latest measurement of each kind and point:
    a new few-shot draw replaces the old one, so saliency holds one copy of the droppable tensors."""

    def __init__(self):
        self._sets: dict[int, dict[tuple, tuple[str, object]]] = {}

    def get_or_compute(self, expert_set: ExpertSet, slot: tuple, key: str | None, compute: Callable[[], object]):
        if key is None:
            return compute()
        import weakref

        sid = id(expert_set)
        if sid not in self._sets:
            self._sets[sid] = {}
            weakref.finalize(expert_set, self._sets.pop, sid, None)
        found = self._sets[sid].get(slot)
        if found is not None and found[0] == key:
            return found[1]
        value = compute()
        self._sets[sid][slot] = (key, value)
        return value


MEASURED = _MeasureCache()


def cached_importance_at_merge(expert_set: ExpertSet, examples, tokenizer, *, lam: float, level="layer",
                               mode: str = "gradient", **kwargs) -> ImportanceMap:
    """:func:`compute_importance_at_merge`, cached per (expert set, few-shot draw, λ, level, mode)."""
    draw = _draw_key(examples, tokenizer, kwargs.get("max_length", MAX_LENGTH), kwargs.get("device", "cpu"))
    key = None if draw is None or kwargs.get("loss_fn") is not None else f"{draw}:{lam!r}:{level}:{mode}"
    return MEASURED.get_or_compute(expert_set, ("importance", "merged"), key, lambda: compute_importance_at_merge(
        expert_set, examples, tokenizer, lam=lam, level=level, mode=mode, **kwargs))


def cached_element_saliency(expert_set: ExpertSet, examples, tokenizer, *, point: str, lam: float,
                            **kwargs) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`element_saliency`, cached per (expert set, few-shot draw, point; λ at the merged point)."""
    draw = _draw_key(examples, tokenizer, kwargs.get("max_length", MAX_LENGTH), kwargs.get("device", "cpu"))
    key = None if draw is None or kwargs.get("loss_fn") is not None else \
        f"{draw}:{lam!r}" if point == "merged" else draw
    return MEASURED.get_or_compute(expert_set, ("saliency", point), key, lambda: element_saliency(
        expert_set, examples, tokenizer, point=point, lam=lam, **kwargs))
