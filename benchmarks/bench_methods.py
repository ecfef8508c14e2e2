"""Merge quality against the baselines on the demo zoo (a script, not part of the test suite).

    python benchmarks/bench_methods.py                 # full run (≈45 min on 2 cores at load ≈2, estimated); writes RESULTS-methods.md
    python benchmarks/bench_methods.py --quick         # smoke run (2 seeds, tiny grids, 100 probe examples); no file
                                                       # (27.6 min at mean load 8.2, ≈7 min at load 2)
    python benchmarks/bench_methods.py --pair sentiment,subjectivity --settings pair --no-ablation
    python benchmarks/bench_methods.py --out /tmp/r.md # write the results elsewhere (also with --quick)
    python benchmarks/bench_methods.py --methods pcb,tsv,apl   # a subset of the rows (APL is needed for the verdict)
    python benchmarks/bench_methods.py --zoo lm --no-ablation --out /tmp/lm.md  # the LM zoo (RESULTS-methods.md, LM section)
    python benchmarks/bench_methods.py --zoo my-csv-zoo        # any zoo, e.g. one built from user CSV tasks

Protocol (printed and written with the results):

- Settings: all experts of the zoo, and one pair (default: the interfering sentiment + subjectivity,
  the same tweets labelled two ways; ``--pair`` picks another).
- Methods: task arithmetic, TIES, DARE (dare_linear, dare_ties), magnitude, Fisher, Model Stock,
  Consensus (TALL masks), PCB, TSV-M, RegMean, EMR, Localize-and-Stitch and APL. Each gets a small grid
  of at most ``BUDGET`` = 24 configurations (λ, drop ratio…; for APL also p̄, τ1, τ2, within-layer),
  built from the method's declaration: a parameter it does not declare is left out (printed), values
  are clipped to the declared range, λ values only where the method declares λ (else λ = 1), and a
  method id that is not registered is skipped with a printed line.
- Data-aware methods (Fisher, RegMean, Localize-and-Stitch…) get their inputs from each seed's few-shot
  draw through the method's declared ``prepare`` (the call the app and recipe replay make).
- Methods with one body per task (``MethodSpec.per_task_bodies``, EMR): each task is scored and probed
  on its own body with its own head; the configuration's few-shot loss is the mean over tasks of each
  task's loss on its own body. Such a row is labelled "(one body per task)", is not a single merged
  model, and is therefore never the "best baseline" nor ranked against single-model merges.
- Selection: the configuration with the lowest few-shot LOSS = the mean over the setting's tasks of the
  mean cross-entropy of the merged body + that task's own head on that task's few-shot set. Probe data
  is never used to choose anything.
- Seeds s = 0, 1, 2: each draws the few-shot sets (``draw_fewshot(pool, 32, s)``; they feed APL's
  importance, Fisher's diagonals and the selection loss alike) and is the merge seed (DARE/APL masks).
  The few-shot pools come from each task's own data, on any zoo: the zoo's shipped few-shot examples
  plus training-split examples no training batch drew (the expert's batches are replayed; on an LM
  zoo the base's pretraining batches too), minus every text of any task's probe set. Built-in tasks
  read their corpus; user CSV/JSONL tasks re-read the file their expert's record names (its split is
  checked against the recorded few-shot indices); a task whose data is not readable keeps the shipped
  set alone. The zoo ships 32 few-shot examples per task, and ``draw_fewshot`` of 32 from 32 is the
  whole pool in order — no seed variation at all — so a pool whose seeds' draws coincide is refused
  with what to change (a smaller --n-fewshot, fewer --seeds, more data); the header gives every task's
  pool and probe sizes and how much two seeds' draws share.
- Probe: 400 held-out examples per task (the zoo's split with its seed, as in bench_zoo.py; a user task
  holds out at most a quarter of its rows), accuracy of the merged body + each task's own head; per
  task and the mean, mean ± std over seeds.
- LM zoo (``--zoo lm``; same grids, budget, seeds and selection): the few-shot loss is the mean over
  tasks of the merged body's mean next-token cross-entropy on each task's few-shot texts (≤ 64 tokens);
  the probe is each task's held-out text (the 200 the zoo holds out, never trained on by base or
  expert): per-task perplexity (lower is better) and, to rank and pair, the mean over tasks of
  perplexity / the base's perplexity (scale-free: German's high perplexity does not outweigh the rest);
  paired differences are in percentage points of the base's perplexity (negative: APL lower). The
  pair setting is the pair of experts that raise each other's perplexity most in the zoo's build
  records (expert vs base perplexity on every task's held-out text) unless ``--pair`` names one. A
  method that cannot run on the zoo is reported in one line and left out.
- Grid edges: every selected configuration sitting on the smallest or largest value of a numeric axis
  of its grid block (λ, drop ratio, …) is flagged in the selected-configuration lines and named in the
  verdict: there the grid, not the method, decided.
- Paired differences: APL − baseline per seed (same few-shot draw, same merge seed), against the best
  baseline (highest mean over seeds) and every other baseline; APL's rank among the single-model
  merges by mean probe accuracy.
- Ablation (same protocol, 4 λ values, p̄ = 0.8): APL at the design defaults τ1 = τ2 = 2, uniform
  within layers, gradient importance, random drop; then one factor changed at a time: unit weights
  (τ2 = ∞), uniform drops (τ1 = ∞), within-layer hidden, exact (layer-level, restore) importance,
  magnitude drop (λ values above 1: it does not rescale).

Reuse: the reference probe rows (base, experts) are computed once and cached on disk by the Prober;
every few-shot and probe set is tokenised once (one ``Prober`` per few-shot draw serves as the few-shot
loss: one body forward for all tasks); importance (gradient, all levels from one backward pass; exact
layer level for the ablation), Fisher diagonals and APL's delta support once per (setting, seed);
λ enters every kernel here as ``base + λ·(mixed delta)``, so each configuration without λ is merged
once (λ = 1) and the λ grid is evaluated as ``base + λ·(merged − base)``; the selected configuration
is merged again by the engine at its λ for the probe (the largest difference to the scaled body is
printed). Deterministic methods (TA, TIES, magnitude) merge once per configuration for all seeds.
Tensors that no expert changed (the frozen word/position/type embeddings, half of the model) are
taken from the base instead of being pushed through the kernels: every kernel maps a zero delta to
the base (checked once at start-up against the plain engine).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.apl.calibration import DeltaSupport, calibrate
from merging.apl.fisher import prepare_fisher
from merging.apl.importance import compute_importance, draw_fewshot
from merging.apl.taskloss import ClassifierLoss, encode_examples, tokenizer_of
from merging.engine import MergeEngine, MergeSettings
from merging.errors import MergeLabError
from merging.io.experts import ExpertSet
from merging.io.layout import ROLE_MERGE
from merging.zoo.probe import Prober
from merging.zoo.tasks import available_tasks, split_task
from merging.zoo.training import TrainConfig, _batches
from merging.zoo.zoo import open_zoo

RESULTS = Path(__file__).with_name("RESULTS-methods.md")
BUDGET = 24
INF = math.inf
SETTINGS_TAU_CAP = 1e12  # the apl method's declared maximum for τ; calibration takes math.inf itself


# ---- grids ----------------------------------------------------------------------------------

def _grid(**axes) -> list[dict]:
    out = [{}]
    for key, values in axes.items():
        out = [{**cfg, key: v} for cfg in out for v in values]
    return out


@dataclass
class MethodRun:
    """One row of a table: a merge method and its configurations.

    ``blocks`` are (configurations without λ, λ values) pairs: every configuration of a block is
    merged once and tried at each of the block's λ values (λ is a scale of the merged delta here).
    """

    label: str
    method: str
    blocks: list[tuple[list[dict], list[float]]]
    deterministic: bool = False  # merge does not depend on the seed nor on the few-shot draw
    importance: str = "gradient"  # apl only: gradient | exact
    baseline: bool = True
    per_task: bool = False  # one body per task (MethodSpec.per_task_bodies): never a single-model baseline

    @property
    def size(self) -> int:
        return sum(len(configs) * len(lambdas) for configs, lambdas in self.blocks)

    def lambdas_of(self, cfg: dict) -> list[float]:
        for configs, lambdas in self.blocks:
            if cfg in configs:
                return lambdas
        raise KeyError(cfg)


def run_of(label: str, method: str, configs: list[dict], lambdas: list[float], **kw) -> MethodRun:
    return MethodRun(label, method, [(configs, list(lambdas))], **kw)


def _one(fixed: dict) -> dict:
    return {k: [v] for k, v in fixed.items()}


APL_RANDOM = {"q_min": 0.01, "within_layer": "uniform", "drop": "random"}
APL_MAGNITUDE_SIGN = {"q_min": 0.01, "within_layer": "uniform", "drop": "magnitude", "sign_election": True}


def _tau_pairs(pairs: list[tuple[float, float]], **fixed) -> list[dict]:
    return [{"tau1": t1, "tau2": t2, **fixed} for t1, t2 in pairs]


def apl_wide_lambda() -> MethodRun:
    """A post-hoc APL grid (``--apl-grid wide-lambda``): the design grid's magnitude+sign block stopped at
    λ = 2 and was selected at that edge on the interfering pair, while TIES and magnitude may reach λ = 3.
    Same budget of 24: the never-selected τ pair (0.5, 1) goes, the magnitude block gets λ up to 3."""
    return MethodRun("APL", "apl", [  # the same row label, so the verdict and paired table read it
        (_tau_pairs([(2.0, 2.0), (2.0, 1.0)], drop_ratio=0.8, **APL_RANDOM), [0.5, 0.7, 0.9, 1.2]),
        ([{**c, "drop_ratio": p} for p in (0.8, 0.9) for c in _tau_pairs([(2.0, 2.0), (2.0, 1.0)], **APL_MAGNITUDE_SIGN)],
         [1.5, 2.0, 2.5, 3.0]),
    ], baseline=False)


def _declared(method: str):
    """The method's declaration, or None (with a printed line) when this checkout does not register it."""
    from merging.methods import available, get_method

    if method not in available():
        print(f"  (skipping '{method}': not registered in this checkout; registered: {', '.join(available())})")
        return None
    return get_method(method)


def _fit(spec, cfg: dict) -> dict | None:
    """``cfg`` restricted to the parameters ``spec`` declares, each value clipped to its declared range or
    checked against its declared choices; None when a choice value is not declared (the config is dropped)."""
    out = {}
    for key, value in cfg.items():
        try:
            param = spec.param(key)
        except KeyError:
            print(f"  ({spec.name}: no declared parameter '{key}'; its grid axis is left out)")
            continue
        if param.choices and value not in param.choices:
            print(f"  ({spec.name}: '{key}' = {value!r} is not among {list(param.choices)}; configuration left out)")
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if param.low is not None:
                value = max(value, param.low)
            if param.high is not None:
                value = min(value, param.high)
        out[key] = value
    return out


def declared_run(label: str, method: str, blocks: list[tuple[list[dict], list[float]]], **kw) -> MethodRun | None:
    """A row driven by the method's declaration (see the protocol): unknown method → None; undeclared
    parameters dropped, values clipped to the declared ranges, λ values only where λ is declared."""
    spec = _declared(method)
    if spec is None:
        return None
    has_lambda = "lambda" in spec.param_names()
    fitted = []
    for configs, lambdas in blocks:
        kept: list[dict] = []
        for cfg in configs:
            fit = _fit(spec, cfg)
            if fit is not None and fit not in kept:
                kept.append(fit)
        if kept:
            fitted.append((kept, list(lambdas) if has_lambda else [1.0]))
    if not fitted:
        fitted = [([{}], [1.0])]
    seen: list[dict] = []  # a configuration in two blocks (λ dropped, axes clipped) is tried once
    blocks_out = []
    for configs, lambdas in fitted:
        configs = [c for c in configs if c not in seen]
        seen.extend(configs)
        if configs:
            blocks_out.append((configs, lambdas))
    per_task = bool(getattr(spec, "per_task_bodies", False))
    if per_task:
        kw["baseline"] = False
        label = f"{label} (one body per task)"
    return MethodRun(label, method, blocks_out, per_task=per_task, **kw)


def new_methods(n_experts: int, quick: bool) -> list[MethodRun]:
    """The methods the field compares against beyond the classic ones (each ≤ BUDGET configurations).

    Grids follow each paper's recommended values (no exploration draw was run for these): where a
    method has no tunable parameter besides λ, λ gets the task-arithmetic range (or the sparse range
    where the method keeps a fraction of each task vector without rescaling it).
    """
    t = n_experts
    sparse = [1.0, 2.0] if quick else [0.7, 1.0, 1.5, 2.0, 2.5, 3.0]
    dense = [0.6, 1.0] if quick else [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.7, 2.0]
    runs = [
        # Model Stock (Jang et al. 2024) has no hyperparameter: t comes from the task vectors' angle; the only
        # declared switch is mergekit's filter_wise (one angle per row). No λ is declared: λ = 1.
        declared_run("Model Stock", "model_stock", [(_grid(filter_wise=[False, True]), [1.0])], deterministic=True),
        # Consensus / TALL masks (Wang et al. 2024): k = 2 is the paper's choice; λ_t is tuned per task in
        # 0.2–2.0 there (FusionBench fixes 0.6): here {0.4, 0.6, 1.0} shared by the tasks. Over task arithmetic
        # λ takes TA's peak region; over TIES (top 20 %) the sparse range. 3·4 + 2·4 = 20.
        declared_run("Consensus (TALL masks)", "consensus", [
            (_grid(base_method=["task_arithmetic"], k=[2], tall_lambda=[0.6] if quick else [0.4, 0.6, 1.0]),
             [0.6, 1.0] if quick else [0.5, 0.7, 1.0, 1.3]),
            (_grid(base_method=["ties"], k=[2], tall_lambda=[0.6], drop_ratio=[0.8] if quick else [0.8, 0.9]),
             [1.0, 2.0] if quick else [1.0, 1.5, 2.0, 2.5]),
        ], deterministic=True),
        # PCB (Du et al. 2024): the reference keeps pcb_ratio = 10 % (5 % and 20 % in its searches), i.e.
        # drop 0.9 / 0.95 / 0.8; the score-weighted mean over kept entries behaves like TIES' disjoint mean,
        # so λ takes the sparse range. 3·6 = 18.
        declared_run("PCB", "pcb", [(_grid(drop_ratio=[0.9] if quick else [0.8, 0.9, 0.95]), sparse)],
                     deterministic=True),
        # TSV-M (Gargiulo et al. 2025): no parameter but α (= λ, 1 in the paper); it sums decorrelated
        # low-rank task vectors like task arithmetic sums them, so TA's λ range. 12.
        declared_run("TSV-M", "tsv", [([{}], dense)], deterministic=True),
        # RegMean (Jin et al. 2023): α, the off-diagonal scale, is tuned in the paper; the authors' configs and
        # FusionBench use 0.6–0.95, with 1 the exact regression. λ = 1 is the exact solution; a small range
        # around it. 5·4 = 20. Grams from each seed's few-shot draw via the declared prepare.
        declared_run("RegMean", "regmean", [
            (_grid(alpha=[0.9] if quick else [0.5, 0.7, 0.9, 0.95, 1.0]), [1.0] if quick else [0.7, 0.85, 1.0, 1.2])]),
        # EMR-Merging (Huang et al. 2024) is tuning-free: elect a unified task vector, then a mask and a rescaler
        # per task. Declaration defaults; λ only if the declaration has it.
        declared_run("EMR", "emr", [([{}], [1.0] if quick else [0.8, 1.0, 1.2])]),
        # Localize-and-Stitch (He et al. 2024): trained masks keep 1 % in the paper (drop 0.99, trained once
        # per expert and draw: the mask cache makes λ free); the data-free variant (magnitude top-k) keeps
        # more in its reference scripts (5 %), so 1/5/10 %. Stitching has no λ in the paper; λ ∈ {1, 1.5}.
        # (1 + 3)·2 = 8.
        declared_run("Localize-and-Stitch", "localize_stitch", [
            (_grid(localize=["trained"], drop_ratio=[0.99]), [1.0] if quick else [1.0, 1.5]),
            (_grid(localize=["magnitude"], drop_ratio=[0.95] if quick else [0.99, 0.95, 0.9]),
             [1.0] if quick else [1.0, 1.5])]),
    ]
    del t
    return [r for r in runs if r is not None]


def main_methods(n_experts: int, quick: bool) -> list[MethodRun]:
    """The main table's methods and grids (each ≤ BUDGET configurations, λ values included).

    Ranges come from a few-shot-loss exploration on a separate draw (seed 100): the loss optimum
    of every method lies inside its grid there in both settings. Sparsifying methods without a
    rescale (TIES, magnitude, APL with magnitude drop) need λ > 1; DARE and task arithmetic peak
    at λ ≈ 0.6 (all experts) to 1.3 (the pair); Fisher is a weighted *average*, so its λ scales
    with the number of experts T.
    """
    t = n_experts
    if quick:
        return [
            run_of("task arithmetic", "task_arithmetic", [{}], [0.6, 0.8, 1.0, 1.2], deterministic=True),
            run_of("TIES", "ties", _grid(drop_ratio=[0.8, 0.9]), [1.0, 2.0], deterministic=True),
            run_of("DARE linear", "dare_linear", _grid(drop_ratio=[0.8]), [0.6, 1.0]),
            run_of("DARE TIES", "dare_ties", _grid(drop_ratio=[0.8]), [0.6, 1.0]),
            run_of("magnitude", "magnitude", _grid(drop_ratio=[0.8, 0.9]), [1.0, 2.0], deterministic=True),
            run_of("Fisher", "fisher", [{}], [0.4 * t, 0.6 * t]),
            *new_methods(t, quick),
            MethodRun("APL", "apl", [
                (_tau_pairs([(2.0, 2.0)], drop_ratio=0.8, **APL_RANDOM), [0.6, 1.0]),
                (_tau_pairs([(2.0, 1.0)], drop_ratio=0.9, **APL_MAGNITUDE_SIGN), [1.0, 2.0]),
            ], baseline=False),
        ]
    sparse_lambdas = [0.7, 1.0, 1.5, 2.0, 2.5, 3.0]
    dare_lambdas = [0.4, 0.5, 0.6, 0.8, 1.0, 1.3, 1.6]
    return [
        run_of("task arithmetic", "task_arithmetic", [{}],
               [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.7, 2.0], deterministic=True),
        run_of("TIES", "ties", _grid(drop_ratio=[0.5, 0.8, 0.9, 0.95]), sparse_lambdas, deterministic=True),
        run_of("DARE linear", "dare_linear", _grid(drop_ratio=[0.5, 0.8, 0.9]), dare_lambdas),
        run_of("DARE TIES", "dare_ties", _grid(drop_ratio=[0.5, 0.8, 0.9]), dare_lambdas),
        run_of("magnitude", "magnitude", _grid(drop_ratio=[0.5, 0.8, 0.9, 0.95]), sparse_lambdas, deterministic=True),
        run_of("Fisher", "fisher", [{}], [round(f * t, 3) for f in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25)]),
        *new_methods(t, quick),
        MethodRun("APL", "apl", [
            # DARE-style random drop with rescale (the design's default drop)
            (_tau_pairs([(2.0, 2.0), (2.0, 1.0), (0.5, 1.0)], drop_ratio=0.8, **APL_RANDOM), [0.5, 0.7, 0.9, 1.2]),
            # magnitude top-k drop + TIES sign election (APL's other declared drop and merge options)
            ([{**c, "drop_ratio": p} for p in (0.8, 0.9) for c in _tau_pairs([(2.0, 2.0), (2.0, 1.0)], **APL_MAGNITUDE_SIGN)],
             [1.0, 1.5, 2.0]),
        ], baseline=False),
    ]


def ablation_methods(quick: bool) -> list[MethodRun]:
    """APL's ablation: the design defaults, then one factor changed at a time (same small λ grid,
    except that the magnitude drop, which does not rescale, gets λ values above 1)."""
    lam = [0.6, 1.0] if quick else [0.5, 0.7, 0.9, 1.2]
    lam_magnitude = [1.0, 2.0] if quick else [1.0, 1.5, 2.0, 2.5]

    def apl(label, importance="gradient", lambdas=lam, **change):
        cfg = {"tau1": 2.0, "tau2": 2.0, "drop_ratio": 0.8, **APL_RANDOM, **change}
        return run_of(label, "apl", [cfg], lambdas, importance=importance, baseline=False)

    return [
        apl("APL defaults (τ1=τ2=2, p̄=0.8, uniform, gradient, random)"),
        apl("unit weights (τ2=∞): importance drops only", tau2=INF),
        apl("uniform drops (τ1=∞): importance weights only", tau1=INF),
        apl("within layer: hidden", within_layer="hidden"),
        apl("exact importance (layer level, restore)", importance="exact"),
        apl("magnitude drop (no rescale)", lambdas=lam_magnitude, drop="magnitude"),
    ]


# ---- data ---------------------------------------------------------------------------------

def is_lm_zoo(zoo) -> bool:
    """A causal-LM zoo (merging/zoo/lm_zoo.py): perplexity on held-out text instead of accuracy."""
    return getattr(zoo, "kind", "classifier") == "causal_lm"


def task_of(zoo, task: str):
    """A classifier task's own data: ``(Task, where it came from)``, or ``(None, why not)``.

    A built-in task whose corpus is installed, else a user task re-read from the CSV/JSONL file its
    expert's record names (``source``, written by ``load_user_task``) when that file is still readable
    and gives the same labels."""
    from merging.zoo.tasks import load_user_task

    record = zoo.task_record(task)
    source = Path(str(record.get("source", "")))
    # load_user_task records the file's absolute path; a built-in task records its loader ("tweets loader over …")
    if not (source.is_absolute() and source.suffix.lower() in (".csv", ".jsonl")):
        available, _ = available_tasks()
        if task in available:
            return available[task], "its corpus"
        return None, f"its corpus ({record.get('source', '?')}) is not installed"
    if not source.is_file():
        return None, f"its task file {source} is not readable here"
    user = load_user_task(source, name=task)
    if list(user.label_names) != list(record["label_names"]):
        return None, f"its task file {source} now has labels {user.label_names}, the expert was trained on {record['label_names']}"
    return user, f"its task file {source.name}"


def probe_sets(zoo, n_probe: int) -> tuple[dict, str]:
    """``n_probe`` probe examples per task from the task's own data with the zoo's seed (the split
    reserves up to 400 ahead of training); an LM zoo's shipped held-out text; else (with a note) the
    zoo's own probe set."""
    sets, notes = {}, []
    for task in zoo.tasks:
        if is_lm_zoo(zoo):
            sets[task] = zoo.probe(task)[:n_probe]
            if len(sets[task]) < n_probe:
                notes.append(f"{task}: the LM zoo holds out {len(sets[task])} texts")
            continue
        source, why = task_of(zoo, task)
        if source is not None:
            sets[task] = split_task(source, zoo.seed, n_probe=n_probe).probe_examples
            if len(sets[task]) < n_probe:
                notes.append(f"{task}: {len(sets[task])} probe examples (a quarter of its {len(source.examples())})")
        else:
            sets[task] = zoo.probe(task)[:n_probe]
            notes.append(f"{task}: {why}, the zoo's own {len(sets[task])} probe examples")
    return sets, "; ".join(notes)


def _unseen_classifier(zoo, task: str) -> tuple[list, str]:
    """Training-split examples the expert never saw (its batches replayed), and where they came from."""
    source, why = task_of(zoo, task)
    if source is None:
        return [], f"only the zoo's shipped few-shot set ({why})"
    record = zoo.task_record(task)
    split = split_task(source, zoo.seed, n_probe=record.get("n_probe_requested", 200))
    if split.fewshot != record["fewshot_indices"]:
        raise MergeLabError(f"{task}: the split of {why} no longer matches the zoo's few-shot indices (the data "
                            "changed since the zoo was built); rebuild the zoo")
    cfg = TrainConfig(**record["train_config"])
    batches = _batches(list(range(len(split.train))), cfg)
    seen: set[int] = set()
    for _ in range(cfg.steps):
        seen.update(int(i) for i in next(batches))
    data = source.examples()
    unseen = [data[split.train[i]] for i in range(len(split.train)) if i not in seen]
    return unseen, f"{why}: shipped few-shot + {len(unseen)} training-split examples the expert never saw"


def _lm_unseen(zoo, spec: dict | None = None) -> dict[str, list]:
    """Per expert of an LM zoo: its training-split texts that neither its fine-tuning nor the base's
    pretraining drew (both batch streams replayed with the zoo's seed), as ``LMExample("", text)``.

    The split is recomputed from the packaged fortunes with the zoo's settings (``spec``: the
    ``tasks.yaml`` entry, or the overrides a test built it with) and checked against the indices each
    expert recorded, so a changed text source is refused rather than silently giving other texts."""
    from merging.io.taskdata import LMExample
    from merging.zoo import lm_zoo

    spec = spec or lm_zoo.lm_zoo_spec(zoo.name)
    seed = zoo.seed
    texts = sorted({*spec["pretrain_texts"], *zoo.tasks})
    items = {t: lm_zoo.read_texts(spec, t) for t in texts}
    splits = {t: lm_zoo.split_texts(items[t], seed, int(spec["n_probe"]), int(spec["n_fewshot"]),
                                    int(spec["max_items"])) for t in texts}
    train = {t: [items[t][i] for i in splits[t]["train"]] for t in texts}
    mix = [r for t in spec["pretrain_texts"] for r in train[t]]
    pre = spec["pretrain"]
    stream = lm_zoo._batches(list(range(len(mix))), int(pre["batch_size"]), seed)
    seen_by_base = {mix[int(x.completion)] for _ in range(int(pre["steps"])) for x in next(stream)}
    out = {}
    for task in zoo.tasks:
        record = zoo.task_record(task)
        if splits[task]["fewshot"] != record["fewshot_indices"] or splits[task]["probe"] != record["probe_indices"]:
            raise MergeLabError(f"LM zoo '{zoo.name}', expert {task}: the split of its fortunes no longer matches the "
                                "indices it recorded (the installed text or tasks.yaml changed); rebuild the zoo")
        cfg = record["train_config"]
        stream = lm_zoo._batches(list(range(len(train[task]))), int(cfg["batch_size"]), seed)
        seen = {int(x.completion) for _ in range(int(cfg["steps"])) for x in next(stream)}
        out[task] = [LMExample("", text) for i, text in enumerate(train[task])
                     if i not in seen and text not in seen_by_base]
    return out


def example_text(example) -> str:
    """The text of a classifier ``(text, label)`` or an LM ``LMExample(prompt, completion)``."""
    return example.prompt + example.completion if hasattr(example, "completion") else example[0]


def fewshot_pools(zoo, size: int, probe_texts: set[str], *, lm_spec: dict | None = None) -> tuple[dict, dict]:
    """Per task: the zoo's few-shot examples plus training-split examples never used to train, minus probe texts.

    Classifier zoos (built-in corpora and user CSV/JSONL tasks alike): 'never used' = in no training
    batch of the expert (its batches are replayed with its recorded train config,
    ``merging.zoo.training._batches``). LM zoos: in no batch of the expert's fine-tuning nor of the
    base's pretraining (:func:`_lm_unseen`). A task whose data is not readable keeps the shipped set
    alone — usually too small for distinct draws, which :func:`check_draws` then refuses.
    """
    lm_unseen = _lm_unseen(zoo, lm_spec) if is_lm_zoo(zoo) else {}
    pools, info = {}, {}
    for task in zoo.tasks:
        own = zoo.fewshot(task)
        if is_lm_zoo(zoo):
            extra = lm_unseen[task]
            origin = (f"its fortunes: shipped few-shot + {len(extra)} training-split texts neither the expert nor the "
                      "base trained on")
        else:
            extra, origin = _unseen_classifier(zoo, task)
        pool, texts = [], set()
        for example in [*own, *extra]:
            text = example_text(example)
            if text in probe_texts or text in texts:
                continue
            texts.add(text)
            pool.append(example)
            if len(pool) >= size:
                break
        pools[task] = pool
        info[task] = {"pool": len(pool), "zoo_fewshot_kept": sum(1 for e in own if example_text(e) not in probe_texts),
                      "candidates": len(own) + len(extra), "origin": origin}
    return pools, info


def check_draws(pools: dict, n_fewshot: int, seeds: list[int]) -> dict[str, dict]:
    """Refuse pools whose seeded draws cannot differ; else per task the largest overlap of two seeds' draws.

    ``draw_fewshot(pool, n, seed)`` is the whole pool in order when ``n ≥ len(pool)``: every seed would then
    feed APL's importance, Fisher and the selection loss the same examples and the '± over seeds' would
    measure merge-seed noise only. Returns ``{task: {"pool", "max_overlap" (fraction of n), "pairs"}}``."""
    out = {}
    for task, pool in pools.items():
        draws = {s: set(draw_fewshot(pool, n_fewshot, s)[1]) for s in seeds}
        n = min(n_fewshot, len(pool))
        same = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:] if draws[a] == draws[b]]
        if same:
            why = (f"--n-fewshot {n_fewshot} takes the whole pool" if n_fewshot >= len(pool)
                   else f"seeds {same[0][0]} and {same[0][1]} draw the same {n} examples")
            raise MergeLabError(
                f"few-shot pool of task '{task}' has {len(pool)} examples: {why}, so the seeds' few-shot sets do not "
                f"differ (APL's importance, Fisher and the selection loss would not vary by seed). Use a smaller "
                f"--n-fewshot (at most {max(1, len(pool) // 2)} for half-disjoint draws), fewer --seeds, or give the "
                "task more data (a larger --pool, or more rows in its task file / its corpus installed).",
                field="n_fewshot")
        overlap = max((len(draws[a] & draws[b]) / max(n, 1) for i, a in enumerate(seeds) for b in seeds[i + 1:]),
                      default=0.0)
        out[task] = {"pool": len(pool), "max_overlap": overlap, "n": n}
    return out


def pool_header(pool_info: dict, draws: dict, probes: dict, n_fewshot: int, seeds: list[int]) -> str:
    """One line per task: pool and probe sizes, where the pool came from, how much two seeds' draws share."""
    lines = [f"Few-shot draws: {n_fewshot} per task and seed ({', '.join(map(str, seeds))}) from each task's pool; "
             "probe sets disjoint from every pool:"]
    for task, info in pool_info.items():
        d = draws.get(task, {})
        overlap = d.get("max_overlap", float("nan"))
        lines.append(f"- {task}: pool {info['pool']} ({info['origin']}), probe {len(probes[task])}; two seeds' draws "
                     f"share at most {100 * overlap:.0f} % of their examples"
                     + (" — they overlap heavily" if overlap > 0.5 else " — they differ"))
    return "\n".join(lines)


# ---- the engine, skipping tensors no expert changed ---------------------------------------------

class SkipUnchangedEngine(MergeEngine):
    """The merge engine, except that tensors equal to the base in every expert come from the base.

    Every kernel benchmarked here maps an all-zero delta to the base (base + λ·0); the frozen
    word-embedding matrix alone costs ~2 s per TIES merge otherwise. ``check`` compares once.
    """

    def __init__(self, expert_set: ExpertSet, unchanged: set[str]):
        super().__init__(expert_set, cache=False)
        self.unchanged = unchanged

    def _merge_one(self, name, info, settings, resolver, dtype=None, task=None, stat=None):
        if name in self.unchanged:
            return self.experts.base.get(name).float(), False
        return super()._merge_one(name, info, settings, resolver, dtype, task, stat)

    def check(self, settings: MergeSettings) -> None:
        plain = MergeEngine(self.experts, cache=False)
        resolver = settings.resolver(self.experts)
        for name in sorted(self.unchanged):
            merged, _ = plain._merge_one(name, self.experts.layout[name], settings, resolver)
            if not torch.equal(merged, self.experts.base.get(name).float()):
                raise AssertionError(f"{settings.method.name} changes unchanged tensor {name}")


# ---- one setting --------------------------------------------------------------------------

@dataclass
class Setting:
    name: str
    tasks: list[str]
    expert_set: ExpertSet
    engine: SkipUnchangedEngine
    base_full: dict[str, torch.Tensor]  # every body tensor of the base (what the prober loads)
    base: dict[str, torch.Tensor]  # float32 base of the changed tensors
    support: DeltaSupport
    prober: Prober  # the probe sets of this setting's tasks
    examples: dict[int, dict[str, list]] = field(default_factory=dict)
    indices: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    scorers: dict[int, Prober] = field(default_factory=dict)
    importance: dict[tuple[str, int], Any] = field(default_factory=dict)
    fisher: dict[int, dict] = field(default_factory=dict)
    prepared: dict[tuple, dict] = field(default_factory=dict)  # (method, seed, prepare key) → prepare's output
    zoo: Any = None
    task_scorers: dict[tuple[int | None, str], Prober] = field(default_factory=dict)  # per-task-body methods
    loss_cache: dict[tuple, dict[str, float]] = field(default_factory=dict)
    scale_error: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    lm: bool = False  # a causal-LM zoo: perplexity on held-out text, few-shot LM loss
    tokenizer: Any = None
    base_metric: dict[str, float] = field(default_factory=dict)  # LM: the base's probe perplexity per task

    @property
    def metric(self) -> str:
        """The probe's per-task measure: accuracy (higher is better) or perplexity (lower is better)."""
        return "perplexity" if self.lm else "accuracy"

    def tick(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds


class Clock:
    def __init__(self, setting: Setting, key: str):
        self.setting, self.key = setting, key

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.setting.tick(self.key, time.perf_counter() - self.start)


LM_MAX_LENGTH = 64  # tokens: the LM zoo's training length and its probe's


@dataclass
class ScoreRow:
    metrics: dict[str, dict[str, float]]


class LMScorer:
    """The LM probe behind the two things the bench uses of a classifier ``Prober``: ``sets`` and
    ``probe_body(body, label).metrics[task]`` (here ``loss`` = mean next-token cross-entropy pooled over
    the task's target tokens, and ``perplexity`` = exp(loss))."""

    def __init__(self, expert_set: ExpertSet, sets: dict, tokenizer, tasks: list[str], cache_dir: Path | None = None):
        from merging.lm.probe import LMProber

        self.prober = LMProber(expert_set, sets, tokenizer, tasks=tasks, max_length=LM_MAX_LENGTH,
                               cache_dir=cache_dir)
        self.sets = self.prober.sets

    def probe_body(self, body: dict, label: str = "") -> ScoreRow:
        return ScoreRow(self.prober.probe_body(body))

    def reference(self):
        return self.prober.reference()


def scorer_for(setting: Setting, sets: dict, tasks: list[str]):
    """A scorer of ``tasks`` on ``sets`` (few-shot draws or probe sets): the zoo's kind decides which."""
    if setting.lm:
        return LMScorer(setting.expert_set, {t: sets[t] for t in tasks}, setting.tokenizer, tasks)
    return Prober.for_zoo(setting.zoo, tasks=tasks, probe_sets={t: sets[t] for t in tasks}, disk_cache=False)


def reference_metric(reference, name: str, task: str, metric: str) -> float:
    """``metric`` of reference row ``name`` (base or an expert) on ``task``, for either probe report."""
    row = reference.row(name)
    return float((row.metrics if hasattr(row, "metrics") else row)[task][metric])


def build_setting(name: str, tasks: list[str], zoo, pools: dict, probes: dict, seeds: list[int], n_fewshot: int,
                  tokenizer, reference=None) -> Setting:
    check_draws({t: pools[t] for t in tasks}, n_fewshot, seeds)  # refuses draws that cannot differ by seed
    expert_set = ExpertSet.load(zoo.base_path, {t: f"zoo:{zoo.name}/{t}" for t in tasks})
    layout = expert_set.layout
    merged = [n for n, i in layout.tensors.items() if i.role == ROLE_MERGE]
    unchanged = {n for n in merged
                 if all(torch.equal(expert_set.base.get(n), expert_set.experts[t].get(n)) for t in tasks)}
    base_full = {n: expert_set.base.get(n) for n, i in layout.tensors.items() if i.role in (ROLE_MERGE, "copy")}
    base = {n: expert_set.base.get(n).float() for n in merged if n not in unchanged}
    setting = Setting(name, list(tasks), expert_set, SkipUnchangedEngine(expert_set, unchanged), base_full, base,
                      DeltaSupport.of(expert_set), None, zoo=zoo, lm=is_lm_zoo(zoo), tokenizer=tokenizer)
    setting.prober = scorer_for(setting, probes, list(tasks))
    if setting.lm:
        if reference is None:
            reference = setting.prober.reference()
        setting.base_metric = {t: reference_metric(reference, "base", t, "perplexity") for t in tasks}
    for seed in seeds:
        drawn = {t: draw_fewshot(pools[t], n_fewshot, seed) for t in tasks}
        setting.examples[seed] = {t: d[0] for t, d in drawn.items()}
        setting.indices[seed] = {t: d[1] for t, d in drawn.items()}
        setting.scorers[seed] = scorer_for(setting, setting.examples[seed], list(tasks))
    first = seeds[0]
    check_fewshot_loss(setting, first, tokenizer)
    return setting


def check_fewshot_loss(setting: Setting, seed: int, tokenizer) -> None:
    """The prober over a few-shot set gives taskloss's loss: ClassifierLoss (expert body + its own head),
    or CausalLMLoss on an LM zoo."""
    task = setting.tasks[0]
    if setting.lm:
        from merging.apl.taskloss import CausalLMLoss
        from merging.lm.model import encode_lm_examples

        loss = CausalLMLoss(setting.expert_set, task,
                            encode_lm_examples(tokenizer, setting.examples[seed][task], LM_MAX_LENGTH))
    else:
        loss = ClassifierLoss(setting.expert_set, task, encode_examples(tokenizer, setting.examples[seed][task]))
    expert = {n: setting.expert_set.experts[task].get(n).float() for n in loss.live}
    loss.assign(expert)
    with torch.no_grad():
        reference = float(loss.loss())
    body = dict(setting.base_full)
    body.update(expert)
    found = setting.scorers[seed].probe_body(body, "check").metrics[task]["loss"]
    if abs(found - reference) > 1e-4:
        raise AssertionError(f"few-shot loss through the prober {found:.6f} ≠ {type(loss).__name__} {reference:.6f}")
    print(f"  few-shot loss check ({task}, seed {seed}): prober {found:.6f} = {type(loss).__name__} {reference:.6f}")


# What each importance mode computes here: gradient gives every level from one backward pass; exact only
# the layer level (one forward per layer), which is all APL's calibration needs.
IMPORTANCE_LEVEL = {"gradient": ("all", "importance gradient"), "exact": ("layer", "importance exact (layer)")}


def importance_of(setting: Setting, seed: int, tokenizer, mode: str):
    """APL's importance for one (setting, seed), computed once per mode."""
    key = (mode, seed)
    if key not in setting.importance:
        level, clock_label = IMPORTANCE_LEVEL[mode]
        with Clock(setting, clock_label):
            setting.importance[key] = compute_importance(
                setting.expert_set, setting.examples[seed], tokenizer, mode=mode, level=level, seed=seed,
                fewshot_indices=setting.indices[seed])
    return setting.importance[key]


def fisher_extras(setting: Setting, seed: int, tokenizer) -> dict:
    if seed not in setting.fisher:
        with Clock(setting, "fisher"):
            setting.fisher[seed] = prepare_fisher(setting.expert_set, setting.examples[seed], tokenizer)["extras"]
    return setting.fisher[seed]


#: prepare depends on none of these methods' grid parameters: one prepare per (setting, seed) serves every
#: configuration (RegMean's Gram matrices do not depend on α). Any other data-aware method is prepared
#: again for each configuration (its parameters may shape what prepare measures, e.g. trained masks).
PREPARE_INDEPENDENT = {"regmean"}


def prepared_inputs(setting: Setting, spec, cfg: dict, seed: int, tokenizer) -> dict:
    """The method's declared ``prepare`` on this seed's few-shot draw, as the app and replay call it."""
    key = (spec.name, seed, () if spec.name in PREPARE_INDEPENDENT else tuple(sorted(cfg.items())))
    if key not in setting.prepared:
        with Clock(setting, f"prepare {spec.name}"):
            out = spec.prepare(setting.expert_set, setting.examples[seed], tokenizer, params=dict(cfg), progress=None)
        setting.prepared[key] = {"expert_params": out.get("expert_params") or {}, "extras": out.get("extras") or {}}
    return setting.prepared[key]


# ---- merging and scoring ------------------------------------------------------------------

def merge_settings(setting: Setting, run: MethodRun, cfg: dict, lam: float, seed: int, tokenizer) -> MergeSettings:
    es = setting.expert_set
    if run.method == "fisher":
        return MergeSettings.build(es, "fisher", {**cfg, "lambda": lam}, seed=seed,
                                   extras=fisher_extras(setting, seed, tokenizer))
    if run.method not in ("apl",):
        from merging.methods import get_method

        spec = get_method(run.method)
        params = {**cfg, "lambda": lam} if "lambda" in spec.param_names() else dict(cfg)
        if "lambda" not in params and lam != 1.0:
            raise ValueError(f"{run.label}: λ = {lam} for a method that declares no λ")
        if spec.prepare is not None:
            inputs = prepared_inputs(setting, spec, cfg, seed, tokenizer)
            return MergeSettings.build(es, spec, params, expert_params=inputs["expert_params"], seed=seed,
                                       extras=inputs["extras"])
        return MergeSettings.build(es, spec, params, seed=seed)
    if run.method == "apl":
        importance = importance_of(setting, seed, tokenizer, run.importance)
        with Clock(setting, "calibration"):
            table = calibrate(importance, es, drop_ratio=cfg["drop_ratio"], tau1=cfg["tau1"], tau2=cfg["tau2"],
                              q_min=cfg["q_min"], within_layer=cfg["within_layer"], support=setting.support)
        params = {**cfg, "lambda": lam, "tau1": min(cfg["tau1"], SETTINGS_TAU_CAP),
                  "tau2": min(cfg["tau2"], SETTINGS_TAU_CAP)}
        return MergeSettings.build(es, "apl", params, expert_params=table.to_expert_params(), seed=seed,
                                   extras=table.extras())
    return MergeSettings.build(es, run.method, {**cfg, "lambda": lam}, seed=seed)


SINGLE = "*"  # the key of a single merged body (per-task-body methods key theirs by task)


def engine_bodies(setting: Setting, settings: MergeSettings) -> dict[str, dict[str, torch.Tensor]]:
    """The merged body tensors: ``{SINGLE: tensors}``, or ``{task: its body}`` for a method that declares
    ``per_task_bodies`` (merged by the plain engine: the bench's skip of unchanged tensors is only checked
    for single bodies)."""
    if getattr(settings.method, "per_task_bodies", False):
        with Clock(setting, "merge"):
            result = MergeEngine(setting.expert_set, cache=False).merge(settings)
        bodies = getattr(result, "task_bodies", None) or {}
        missing = [t for t in setting.tasks if t not in bodies]
        if missing:
            raise MergeLabError(f"{settings.method.name} declares per_task_bodies but gave no body for {missing}")
        return {t: {**result.tensors, **bodies[t]} for t in setting.tasks}
    with Clock(setting, "merge"):
        return {SINGLE: setting.engine.merge(settings).tensors}


def merged_delta(setting: Setting, settings: MergeSettings) -> dict[str, dict[str, torch.Tensor]]:
    """(merged − base) of every changed tensor, merged at the settings' λ, per body."""
    return {key: {n: tensors[n].float() - b for n, b in setting.base.items()}
            for key, tensors in engine_bodies(setting, settings).items()}


def body_at(setting: Setting, delta: dict[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    body = dict(setting.base_full)
    for name, base in setting.base.items():
        body[name] = base + lam * delta[name]
    return body


def task_scorer(setting: Setting, seed: int | None, task: str) -> Prober:
    """A prober of one task: its few-shot draw of ``seed``, or (seed None) its probe set."""
    key = (seed, task)
    if key not in setting.task_scorers:
        examples = setting.examples[seed][task] if seed is not None else setting.prober.sets[task]
        setting.task_scorers[key] = scorer_for(setting, {task: examples}, [task])
    return setting.task_scorers[key]


def fewshot_loss(setting: Setting, seed: int, deltas: dict[str, dict], lam: float) -> dict[str, float]:
    """Each task's few-shot loss: all on the single body, or each task on its own body."""
    with Clock(setting, "few-shot loss"):
        if SINGLE in deltas:
            row = setting.scorers[seed].probe_body(body_at(setting, deltas[SINGLE], lam), "candidate")
            return {t: row.metrics[t]["loss"] for t in setting.tasks}
        return {t: task_scorer(setting, seed, t).probe_body(body_at(setting, deltas[t], lam), "candidate")
                .metrics[t]["loss"] for t in setting.tasks}


@dataclass
class Trial:
    cfg: dict
    lam: float
    loss: float
    task_loss: dict[str, float]


@dataclass
class SeedResult:
    trials: list[Trial]
    best: Trial
    accuracy: dict[str, float]  # the probe metric per task: accuracy, or perplexity on an LM zoo (``metric``)
    probe_loss: dict[str, float]
    scale_error: float  # max |engine merge at λ − scaled body| of the selected configuration
    metric: str = "accuracy"
    ratio: dict[str, float] = field(default_factory=dict)  # LM: perplexity / the base's perplexity, per task


def cfg_label(cfg: dict, lam: float) -> str:
    short = {"drop_ratio": "p", "tau1": "τ1", "tau2": "τ2", "within_layer": "in", "drop": "drop"}
    parts = [f"λ={lam:g}"]
    for key, value in cfg.items():
        if key == "q_min" or (key == "drop" and value == "random") or (key == "within_layer" and value == "uniform"):
            continue
        if isinstance(value, bool):
            if value:
                parts.append("sign" if key == "sign_election" else key)
            continue
        shown = "∞" if value == INF else value if isinstance(value, str) else f"{value:g}"
        parts.append(f"{short.get(key, key)}={shown}")
    return " ".join(parts)


def trial_key(run: MethodRun, cfg: dict, lam: float, seed: int) -> tuple:
    return (run.method, run.importance, tuple(sorted(cfg.items())), lam, seed)


def run_method(setting: Setting, run: MethodRun, seeds: list[int], tokenizer, probe_cache: dict,
               log: Callable[[str], None]) -> dict[int, SeedResult]:
    """Every configuration scored by few-shot loss per seed; the best one merged by the engine and probed.

    Few-shot losses are cached per setting by (method, importance, configuration, λ, seed), so a
    configuration shared by two rows (the ablation's reference and the main APL grid) is merged and
    scored once.
    """
    if run.size > BUDGET:
        raise ValueError(f"{run.label}: {run.size} configurations exceed the budget of {BUDGET}")
    trials: dict[int, list[Trial]] = {s: [] for s in seeds}
    best_delta: dict[int, dict | None] = {}
    for cfg, lambdas in [(c, lams) for configs, lams in run.blocks for c in configs]:
        groups = [(seeds[0], seeds)] if run.deterministic else [(s, [s]) for s in seeds]
        for merge_seed, eval_seeds in groups:
            keys = {(s, lam): trial_key(run, cfg, lam, s) for s in eval_seeds for lam in lambdas}
            delta = None
            if not all(k in setting.loss_cache for k in keys.values()):
                delta = merged_delta(setting, merge_settings(setting, run, cfg, 1.0, merge_seed, tokenizer))
            for seed in eval_seeds:
                for lam in lambdas:
                    key = keys[(seed, lam)]
                    if key not in setting.loss_cache:
                        setting.loss_cache[key] = fewshot_loss(setting, seed, delta, lam)
                    losses = setting.loss_cache[key]
                    trial = Trial(cfg, lam, statistics.fmean(losses.values()), losses)
                    if not trials[seed] or trial.loss < min(t.loss for t in trials[seed]):
                        best_delta[seed] = delta
                    trials[seed].append(trial)
            del delta
    out = {}
    for seed in seeds:
        best = min(trials[seed], key=lambda t: t.loss)
        probe_seed = None if run.deterministic else seed
        key = (run.method, run.importance, tuple(sorted(best.cfg.items())), best.lam, probe_seed)
        if key not in probe_cache:
            bodies = engine_bodies(setting, merge_settings(setting, run, best.cfg, best.lam, seed, tokenizer))
            unit = best_delta.get(seed)
            if unit is None:  # the loss came from the cache: merge at λ = 1 again for the check
                unit = merged_delta(setting, merge_settings(setting, run, best.cfg, 1.0, seed, tokenizer))
            error = 0.0
            for which, merged in bodies.items():
                scaled = body_at(setting, unit[which], best.lam)
                error = max([error, *(float((merged[n].float() - scaled[n]).abs().max()) for n in setting.base)])
            accuracy, probe_loss = {}, {}
            with Clock(setting, "probe"):
                for which, merged in bodies.items():
                    body = dict(setting.base_full)
                    body.update({n: merged[n] for n in setting.base})
                    if which == SINGLE:
                        row, tasks = setting.prober.probe_body(body, run.label), setting.tasks
                    else:  # this task on its own body
                        row, tasks = task_scorer(setting, None, which).probe_body(body, run.label), [which]
                    accuracy.update({t: row.metrics[t][setting.metric] for t in tasks})
                    probe_loss.update({t: row.metrics[t]["loss"] for t in tasks})
            probe_cache[key] = ({t: accuracy[t] for t in setting.tasks}, {t: probe_loss[t] for t in setting.tasks},
                                error)
            del bodies, unit
        accuracy, probe_loss, error = probe_cache[key]
        setting.scale_error = max(setting.scale_error, error)
        ratio = {t: accuracy[t] / setting.base_metric[t] for t in setting.tasks} if setting.lm else {}
        out[seed] = SeedResult(trials[seed], best, accuracy, probe_loss, error, setting.metric, ratio)
        edges = grid_edges(run, best.cfg, best.lam)
        summary_text = (f"probe ppl/base {summary(out[seed]):.4f}" if setting.lm
                        else f"probe mean acc {summary(out[seed]):.4f}")
        log(f"  {run.label[:40]:<40} seed {seed}: {cfg_label(best.cfg, best.lam):<40} few-shot loss {best.loss:.4f}  "
            f"{summary_text}  " + " ".join(f"{t[:4]} {a:.3f}" for t, a in accuracy.items())
            + f"  |scaled-engine| {error:.1e}" + (f"  EDGE {', '.join(edges)}" if edges else ""))
    return out


# ---- statistics and tables ------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired(diffs: list[float]) -> str:
    """mean ± standard error of paired differences (points), with the t statistic."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.1f}"
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    if se < 1e-6:
        return f"{mean:+.1f} ± 0.0 (same every seed)"
    return f"{mean:+.1f} ± {se:.1f} (t = {mean / se:+.1f})"


def summary(result: SeedResult) -> float:
    """The number a row is ranked by: mean probe accuracy, or (LM) the mean over tasks of perplexity / the
    base's perplexity — scale-free, so a high-perplexity language does not outweigh the others."""
    return statistics.fmean((result.ratio or result.accuracy).values())


mean_acc = summary  # the name bench_apl_analyses.py imports


def better_sign(results: dict[int, SeedResult]) -> int:
    """+1 where a higher summary is better (accuracy), −1 where lower is (perplexity ratio)."""
    return -1 if next(iter(results.values())).metric == "perplexity" else 1


def mean_summary(results: dict[int, SeedResult]) -> float:
    return statistics.fmean(summary(r) for r in results.values())


def grid_edges(run: MethodRun, cfg: dict, lam: float) -> list[str]:
    """The numeric grid axes on whose edge (smallest or largest value tried) ``(cfg, λ)`` sits.

    Axes are those of the configuration's own block (λ, and every numeric key whose value varies among
    the block's configurations); an axis with one value is no axis. A selection on an edge means the
    optimum may lie outside what was tried — the grid, not the method, decided."""
    def numeric(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    block = next(((configs, lambdas) for configs, lambdas in run.blocks if cfg in configs), None)
    if block is None:
        return []
    configs, lambdas = block
    edges = []
    if len(set(lambdas)) > 1 and lam in (min(lambdas), max(lambdas)):
        edges.append(f"λ={lam:g} ({'max' if lam == max(lambdas) else 'min'})")
    for key, value in cfg.items():
        values = {c[key] for c in configs if key in c and numeric(c[key])}
        if numeric(value) and len(values) > 1 and value in (min(values), max(values)):
            shown = "∞" if value == INF else f"{value:g}"
            edges.append(f"{key}={shown} ({'max' if value == max(values) else 'min'})")
    return edges


def table_header(tasks: list[str], extra: list[str], mean: str = "**mean**") -> list[str]:
    head = ["model", *tasks, mean, *extra]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def reference_lines(reference, tasks: list[str], extra: int, lm: bool = False) -> list[str]:
    """Base and expert rows (deterministic: probed once): accuracy in points, or (LM) perplexity and the mean
    ratio to the base's perplexity."""
    lines = []
    for name in ["base", *tasks]:
        if lm:
            values = [reference_metric(reference, name, t, "perplexity") for t in tasks]
            ratio = statistics.fmean(v / reference_metric(reference, "base", t, "perplexity")
                                     for v, t in zip(values, tasks))
            cells, mean = [f"{v:.1f}" for v in values], f"**{ratio:.3f}**"
            label = "base" if name == "base" else f"expert: {name}"
        else:
            accs = [100 * reference_metric(reference, name, t, "accuracy") for t in tasks]
            cells, mean = [f"{a:.1f}" for a in accs], f"**{statistics.fmean(accs):.1f}**"
            label = "base (each task's head)" if name == "base" else f"expert: {name}"
        lines.append("| " + " | ".join([label, *cells, mean, *([""] * extra)]) + " |")
    return lines


def method_line(label: str, results: dict[int, SeedResult], tasks: list[str], extra: list[str]) -> str:
    seeds = list(results)
    lm = better_sign(results) < 0
    cells = [pm([results[s].accuracy[t] for s in seeds], scale=1.0 if lm else 100.0) for t in tasks]
    mean = pm([summary(results[s]) for s in seeds], scale=1.0, digits=3) if lm else \
        pm([summary(results[s]) for s in seeds])
    return "| " + " | ".join([label, *cells, f"**{mean}**", *extra]) + " |"


def selected_line(run: MethodRun, results: dict[int, SeedResult]) -> str:
    """Each seed's selected configuration, flagged where it sits on an edge of a grid axis."""
    parts = []
    for seed, r in results.items():
        edges = grid_edges(run, r.best.cfg, r.best.lam)
        flag = f" **[edge: {', '.join(edges)}]**" if edges else ""
        parts.append(f"s{seed}: {cfg_label(r.best.cfg, r.best.lam)}{flag}")
    return "; ".join(parts)


def edge_sentence(runs: list[MethodRun], results: dict[str, dict[int, SeedResult]]) -> str:
    """One verdict sentence: which rows were selected on a grid edge, on which seeds."""
    hits = []
    for run in runs:
        seeds = [s for s, r in results[run.label].items() if grid_edges(run, r.best.cfg, r.best.lam)]
        if seeds:
            axes = sorted({e.split("=")[0] for s in seeds for e in grid_edges(run, results[run.label][s].best.cfg,
                                                                           results[run.label][s].best.lam)})
            hits.append(f"{run.label} ({'/'.join(axes)}; seed{'s' if len(seeds) > 1 else ''} "
                        f"{', '.join(map(str, seeds))} of {len(results[run.label])})")
    if not hits:
        return "  - Grid edges: no selected configuration sits on an edge of its grid."
    return ("  - Grid edges: selected on an edge of a grid axis — there the grid, not the method, decided (the "
            "optimum may lie outside what was tried): " + "; ".join(hits) + ".")


def setting_report(setting: Setting, reference, runs: list[MethodRun], results: dict[str, dict[int, SeedResult]],
                   title: str, n_probe: int, with_reference: bool = True) -> list[str]:
    """Markdown for one setting: the probe table (accuracy, or perplexity on an LM zoo)."""
    tasks = setting.tasks
    seeds = list(next(iter(results.values())))
    extra = ["few-shot loss (selected)", "configs"]
    mean = "**mean ppl / base ppl**" if setting.lm else "**mean**"
    lines = [f"### {title}", "", *table_header(tasks, extra, mean)]
    if with_reference:
        lines += reference_lines(reference, tasks, len(extra), lm=setting.lm)
    for run in runs:
        r = results[run.label]
        loss = pm([r[s].best.loss for s in seeds], scale=1.0, digits=3)
        lines.append(method_line(run.label, r, tasks, [loss, str(run.size)]))
    lines.append("")
    what = (f"Probe perplexity per task (lower is better; {n_probe} held-out texts per task, ≤ {LM_MAX_LENGTH} tokens "
            "each) and the mean over tasks of perplexity / the base's perplexity"
            if setting.lm else f"Probe accuracy in points ({n_probe} examples per task)")
    lines.append(f"{what}, mean ± std over seeds "
                 f"{', '.join(map(str, seeds))}" + ("; reference rows are deterministic." if with_reference else "."))
    lines.append("")
    return lines


def paired_report(runs: list[MethodRun], results: dict[str, dict[int, SeedResult]], target: str,
                  others: list[str], best_label: str | None = None, header: str | None = None,
                  sign: int = 1) -> list[str]:
    """Per seed ``sign · (target − other)`` of the summary (mean accuracy, or the LM's mean perplexity ratio),
    × 100: points of accuracy, or percentage points of the base's perplexity (negative = lower perplexity)."""
    seeds = list(results[target])
    lines = ["| " + " | ".join([header or f"{target} − …", *(f"seed {s}" for s in seeds), "mean ± SE (t)"]) + " |",
             "|" + "---|" * (len(seeds) + 2)]
    for other in others:
        diffs = [sign * 100 * (summary(results[target][s]) - summary(results[other][s])) for s in seeds]
        name = f"**{other}** (best baseline)" if other == best_label else other
        lines.append("| " + " | ".join([name, *(f"{d:+.1f}" for d in diffs), paired(diffs)]) + " |")
    return lines


def verdict_lines(d: dict, seeds: list[int]) -> list[str]:
    """Where APL stands in one setting: against the best baseline, its rank among single-model merges, and
    which selections the grid's edge decided."""
    res, runs, setting = d["results"], d["runs"], d["setting"]
    head = f"- {setting.name} ({', '.join(setting.tasks)}): "
    if "APL" not in res or not any(r.baseline for r in runs):
        return [head + "no verdict (APL or every baseline was left out by --methods).", edge_sentence(runs, res)]
    sign = better_sign(res["APL"])
    best = best_baseline(runs, res)
    apl, base = mean_summary(res["APL"]), mean_summary(res[best])
    diffs = [100 * (summary(res["APL"][s]) - summary(res[best][s])) for s in seeds]
    single = sorted((r.label for r in runs if not r.per_task), key=lambda lbl: -sign * mean_summary(res[lbl]))
    if sign > 0:
        ranked = ", ".join(f"{lbl} {100 * mean_summary(res[lbl]):.1f}" for lbl in single)
        met = "met" if apl >= base else "NOT met"
        lines = [head + f"APL {100 * apl:.1f} vs best baseline {best} {100 * base:.1f} — paired difference "
                 f"{paired(diffs)} points over {len(seeds)} seeds; target 'APL ≥ best baseline' {met}. APL ranks "
                 f"**{single.index('APL') + 1} of {len(single)}** single-model merges by mean probe accuracy ({ranked})."]
    else:
        ranked = ", ".join(f"{lbl} {mean_summary(res[lbl]):.3f}" for lbl in single)
        met = "met" if apl <= base else "NOT met"
        lines = [head + f"APL {apl:.3f} vs best baseline {best} {base:.3f} (mean perplexity / base perplexity, lower "
                 f"is better) — paired difference APL − {best} {paired(diffs)} percentage points of the base's "
                 f"perplexity over {len(seeds)} seeds (negative: APL lower); target 'APL ≤ best baseline' {met}. APL "
                 f"ranks **{single.index('APL') + 1} of {len(single)}** single-model merges ({ranked})."]
    for run in runs:
        if run.per_task:
            other = mean_summary(res[run.label])
            shown = f"{100 * other:.1f}" if sign > 0 else f"{other:.3f}"
            lines.append(f"  - {run.label}: {shown}, reported beside the ranking, not in it (one body per task).")
    lines.append(edge_sentence(runs, res))
    for label, reason in d.get("skipped", {}).items():
        lines.append(f"  - {label}: not run here — {reason}")
    return lines


def best_baseline(runs: list[MethodRun], results: dict[str, dict[int, SeedResult]]) -> str:
    baselines = [r.label for r in runs if r.baseline]
    sign = better_sign(results[baselines[0]])
    return max(baselines, key=lambda lbl: sign * mean_summary(results[lbl]))


def loss_landscape(run: MethodRun, results: dict[int, SeedResult]) -> list[str]:
    """Few-shot loss of every configuration, mean over seeds (what selection saw)."""
    by_cfg: dict[str, list[float]] = {}
    for r in results.values():
        for t in r.trials:
            by_cfg.setdefault(cfg_label(t.cfg, t.lam), []).append(t.loss)
    ranked = sorted(by_cfg.items(), key=lambda kv: statistics.fmean(kv[1]))
    cells = [f"{label}: {statistics.fmean(v):.3f}" for label, v in ranked]
    return [f"- {run.label} ({run.size} configs, best first): " + "; ".join(cells)]


# ---- machine load -------------------------------------------------------------------------

class LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds in a daemon thread."""

    def __init__(self, every: float = 20.0):
        import threading

        self.samples: list[float] = [os.getloadavg()[0]]
        self.start = os.getloadavg()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> str:
        self._stop.set()
        end = os.getloadavg()
        return (f"load average (1/5/15 min) at start {self.start[0]:.2f}/{self.start[1]:.2f}/{self.start[2]:.2f}, "
                f"at end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}; 1-min load sampled every 20 s: "
                f"mean {statistics.fmean(self.samples):.2f}, max {max(self.samples):.2f} ({len(self.samples)} samples)")


# ---- the run ------------------------------------------------------------------------------

def grid_description(run: MethodRun) -> str:
    parts = []
    for configs, lambdas in run.blocks:
        axes: dict[str, list] = {}
        for cfg in configs:
            for key, value in cfg.items():
                if value not in axes.setdefault(key, []):
                    axes[key].append(value)
        items = [f"λ ∈ {{{', '.join(f'{v:g}' for v in lambdas)}}}"]
        for key, values in axes.items():
            shown = ", ".join("∞" if v == INF else (f"{v:g}" if isinstance(v, float) else str(v)) for v in values)
            items.append(f"{key} ∈ {{{shown}}}" if len(values) > 1 else f"{key} = {shown}")
        pairs = sorted({(c.get("tau1"), c.get("tau2")) for c in configs if "tau1" in c})
        if len(pairs) > 1:
            items = [i for i in items if not i.startswith(("tau1", "tau2"))]
            items.append("(τ1, τ2) ∈ {" + ", ".join(f"({'∞' if a == INF else f'{a:g}'}, {'∞' if b == INF else f'{b:g}'})"
                                                    for a, b in pairs) + "}")
        parts.append("; ".join(items) + f" [{len(configs) * len(lambdas)}]")
    extra = f", importance: {run.importance}" if run.method == "apl" else ""
    return f"- {run.label} (`{run.method}`, {run.size} configs{extra}): " + " + ".join(parts)


def run_setting(name: str, tasks: list[str], zoo, pools, probes, seeds, args, tokenizer, reference,
                log: Callable[[str], None]) -> dict:
    clock = time.perf_counter()
    log(f"\n== setting '{name}': {', '.join(tasks)}")
    setting = build_setting(name, tasks, zoo, pools, probes, seeds, args.n_fewshot, tokenizer, reference=reference)
    if not args.quick:
        with Clock(setting, "engine check"):
            setting.engine.check(MergeSettings.build(setting.expert_set, "ties", {"drop_ratio": 0.8}))
    runs = main_methods(len(tasks), args.quick)
    if args.apl_grid == "wide-lambda":
        runs = [run if run.method != "apl" else apl_wide_lambda() for run in runs]
    if args.methods:
        wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
        runs = [run for run in runs if run.method in wanted]
        log(f"  --methods: running {', '.join(r.label for r in runs) or 'nothing'}")
    skipped: dict[str, str] = {}
    probe_cache: dict = {}
    results = {}
    for run in list(runs):
        started = time.perf_counter()
        try:
            results[run.label] = run_method(setting, run, seeds, tokenizer, probe_cache, log)
        except MergeLabError as exc:  # a method that cannot run on this zoo says why, the others go on
            skipped[run.label] = f"cannot run on this zoo: {exc}"
            runs.remove(run)
            log(f"  ({run.label}: skipped — {exc})")
            continue
        log(f"  ({run.label}: {time.perf_counter() - started:.0f} s)")
    ablation_runs, ablation = [], {}
    if not args.no_ablation and (not args.methods or "apl" in args.methods.split(",")):
        ablation_runs = ablation_methods(args.quick)
        for run in ablation_runs:
            started = time.perf_counter()
            ablation[run.label] = run_method(setting, run, seeds, tokenizer, probe_cache, log)
            log(f"  ({run.label}: {time.perf_counter() - started:.0f} s)")
    seconds = time.perf_counter() - clock
    return {"setting": setting, "runs": runs, "results": results, "ablation_runs": ablation_runs,
            "ablation": ablation, "seconds": seconds, "skipped": skipped}


def render(zoo, done: list[dict], reference, seeds, args, pool_info, probe_note, load: str, total: float,
           started: datetime.datetime, header: str = "", pair_note: str = "") -> str:
    out = ["# Merge methods against the baselines: measured results", ""]
    cmd = " ".join(["python benchmarks/bench_methods.py", *sys.argv[1:]])
    out += [(f"Generated by `{cmd}` on {started:%Y-%m-%d %H:%M} (local time); zoo '{zoo.name}' (seed {zoo.seed}, steps "
            f"{zoo.steps}); {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads."), "",
            f"Runtime **{total / 60:.1f} min**; {load}.", ""]
    if header:
        out += [header, ""]
    if pair_note:
        out += [pair_note, ""]
    verdict = ["## Verdict (from the numbers below)", ""]
    for d in done:
        verdict += verdict_lines(d, seeds)
    out += verdict + [""]
    for d in done:
        setting, runs, res = d["setting"], d["runs"], d["results"]
        out += [f"## Setting '{setting.name}': {', '.join(setting.tasks)}", ""]
        out += setting_report(setting, reference, runs, res,
                              "Probe perplexity" if setting.lm else "Probe accuracy (points)", args.n_probe)
        if "APL" in res and any(r.baseline for r in runs):
            best = best_baseline(runs, res)
            out += ["### APL − baselines, paired by seed (" + (
                "mean perplexity / base perplexity, percentage points; negative = APL lower)" if setting.lm
                else "mean probe accuracy, points)"), ""]
            out += paired_report(runs, res, "APL", [r.label for r in runs if r.baseline], best)
            out += ["", (f"Best baseline = {'lowest' if setting.lm else 'highest'} mean over seeds: **{best}**. SE = std of the paired differences / "
                    f"√{len(seeds)}; with {len(seeds)} seeds t must exceed {_t_crit(len(seeds)):.1f} for p < 0.05 "
                    "(two-sided)."), ""]
            per_task = [r.label for r in runs if r.per_task]
            if per_task:
                out += ["APL (one model) − methods with one body per task (not head-to-head: those keep "
                        f"{len(setting.tasks)} bodies, one per task, so they are no single merged model):", ""]
                out += paired_report(runs, res, "APL", per_task, header="APL − (one body per task)")
                out += [""]
        out += ["### Selected configurations (by few-shot loss; **[edge: …]** = on an edge of a grid axis)", ""]
        out += [f"- {run.label}: {selected_line(run, res[run.label])}" for run in runs]
        out += [f"- {label}: not run — {reason}" for label, reason in d.get("skipped", {}).items()] + [""]
        if d["ablation"]:
            out += [f"### APL ablation ({setting.name})", ""]
            abl_runs, abl = d["ablation_runs"], d["ablation"]
            out += setting_report(setting, reference, abl_runs, abl, "", args.n_probe, with_reference=False)[2:]
            ref_label = abl_runs[0].label
            out += ["Paired differences against the ablation's first row, variant − defaults (mean probe accuracy, points):", ""]
            out += paired_report(abl_runs, abl, ref_label, [r.label for r in abl_runs[1:]],
                                 header="variant − APL defaults", sign=-1)
            out += ["", "Selected configurations:", ""]
            out += [f"- {run.label}: {selected_line(run, abl[run.label])}" for run in abl_runs] + [""]
        out += [(f"Largest |engine merge at λ − (base + λ·(merge at 1 − base))| over the probed merges: "
                f"{setting.scale_error:.1e}."), ""]
        out += [f"Setting runtime {d['seconds'] / 60:.1f} min: " +
                ", ".join(f"{k} {v:.0f} s" for k, v in sorted(setting.timings.items(), key=lambda kv: -kv[1])), ""]
    out += ["## Protocol", ""]
    out += [line.strip() if not line.startswith("  ") else "  " + line.strip()
            for line in __doc__.split("Protocol (printed and written with the results):")[1].split("\nReuse:")[0].strip().splitlines()]
    out += ["", "Reuse:" + __doc__.split("\nReuse:")[1].rstrip(), ""]
    out += [f"Seeds {', '.join(map(str, seeds))}; few-shot n = {args.n_fewshot} per task from pools of "
            + ", ".join(f"{t} {i['pool']}" for t, i in pool_info.items())
            + f" examples; probe {args.n_probe} examples per task{'; ' + probe_note if probe_note else ''}.", ""]
    out += [("Grids (λ is applied as a scale of the merged delta; 'configs' counts λ values too; grid ranges were set "
            "from a few-shot-loss exploration on a separate draw, seed 100, never from probe data):"), ""]
    first = done[0]
    for run in first["runs"]:
        out.append(grid_description(run))
    for run in first["ablation_runs"]:
        out.append(grid_description(run))
    if len(done) > 1 and any(len(d["setting"].tasks) != len(first["setting"].tasks) for d in done):
        out.append("- Fisher's λ grid scales with the number of experts T (a weighted *average* of task vectors): "
                   "the values above are for the first setting.")
    out += ["", "## Few-shot loss of every configuration (mean over seeds; what selection saw)", ""]
    for d in done:
        out += [f"### {d['setting'].name}", ""]
        for run in d["runs"] + d["ablation_runs"]:
            source = d["results"] if run in d["runs"] else d["ablation"]
            out += loss_landscape(run, source[run.label])
        out.append("")
    return "\n".join(out) + "\n"


def interfering_pair(zoo) -> tuple[list[str], str]:
    """The LM zoo's pair of experts that hurt each other's text most, from the zoo's own build records (each
    expert's perplexity on every task's held-out text next to the base's) — never from merges' probe results.

    Interference of (a, b) = log(ppl_a(b) / ppl_base(b)) + log(ppl_b(a) / ppl_base(a)): how much fine-tuning on
    one task made the other task's text less likely, both ways. Returns the pair and a markdown note."""
    ppl = {t: zoo.task_record(t)["probe_perplexity"] for t in zoo.tasks}
    cross = {a: {b: ppl[a]["expert"][b] / ppl[a]["base"][b] for b in zoo.tasks} for a in zoo.tasks}
    pairs = [(a, b) for i, a in enumerate(zoo.tasks) for b in zoo.tasks[i + 1:]]
    score = {(a, b): math.log(cross[a][b]) + math.log(cross[b][a]) for a, b in pairs}
    chosen = max(pairs, key=lambda p: score[p])
    lines = ["Pair setting chosen from the zoo's build records (expert perplexity / base perplexity on each task's "
             "held-out text; row = expert, column = text; > 1: fine-tuning on the row's task hurt that text): the "
             "pair maximising log(r_ab) + log(r_ba) is "
             f"**{chosen[0]} + {chosen[1]}** ({score[chosen]:+.2f}; "
             + ", ".join(f"{a}+{b} {score[(a, b)]:+.2f}" for a, b in sorted(pairs, key=lambda p: -score[p])) + ").",
             "", "| expert \\ text | " + " | ".join(zoo.tasks) + " |", "|" + "---|" * (len(zoo.tasks) + 1)]
    lines += ["| " + a + " | " + " | ".join(f"{cross[a][b]:.2f}" for b in zoo.tasks) + " |" for a in zoo.tasks]
    return list(chosen), "\n".join(lines)


# ---- a zoo's inputs, shared by every bench that runs this protocol -----------------------------

@dataclass
class ZooInputs:
    """What a bench running this protocol reads from a zoo before its first merge, built one way for
    bench_methods, bench_apl_variants and bench_apl_analyses: probe sets, few-shot pools, the tokenizer
    and the reference rows (base and experts on the probe sets; an LM zoo's are perplexities)."""

    lm: bool
    probes: dict
    probe_note: str
    pools: dict
    pool_info: dict
    tokenizer: Any
    reference: Any
    n_probe: int  # probe examples per task in use: an LM zoo holds out fewer than the classifier default
    draws: dict = field(default_factory=dict)  # check_draws' overlaps, when draws were checked
    lm_spec: dict | None = None


def choose_pair(zoo, pair: str | None) -> tuple[list[str], str]:
    """(the pair setting's two tasks, a note on how they were chosen): ``pair`` ("a,b") if given; on an LM
    zoo the pair that interferes most in its build records; else the classifier zoo's sentiment +
    subjectivity. Refuses a pair that is not two of the zoo's tasks."""
    if pair is None and is_lm_zoo(zoo):
        return interfering_pair(zoo)
    chosen = [t.strip() for t in (pair or "sentiment,subjectivity").split(",")]
    if len(chosen) != 2 or any(t not in zoo.tasks for t in chosen):
        raise MergeLabError(f"--pair needs two of the zoo's tasks ({', '.join(zoo.tasks)}), got {','.join(chosen)!r}",
                            field="pair")
    return chosen, ""


def zoo_tokenizer(zoo, tasks: list[str]):
    """The zoo base's tokenizer (every expert of a zoo shares it)."""
    return tokenizer_of(ExpertSet.load(zoo.base_path, {t: f"zoo:{zoo.name}/{t}" for t in tasks}))


def reference_rows(zoo, probes: dict, tokenizer):
    """Base and expert rows on ``probes``, disk-cached by the prober: accuracy, or perplexity on an LM zoo."""
    if is_lm_zoo(zoo):
        every = ExpertSet.load(zoo.base_path, {t: f"zoo:{zoo.name}/{t}" for t in zoo.tasks})
        return LMScorer(every, probes, tokenizer, list(zoo.tasks), Path(zoo.root) / "probe_cache").reference()
    return Prober.for_zoo(zoo, probe_sets=probes, disk_cache=True).reference()


def lm_spec_of(zoo, overrides_json: str | None) -> dict | None:
    """An LM zoo's build settings (``tasks.yaml``, with a test's tiny-zoo overrides); None for a classifier zoo."""
    if not is_lm_zoo(zoo):
        return None
    import json

    from merging.zoo.lm_zoo import lm_zoo_spec

    return lm_zoo_spec(zoo.name, json.loads(overrides_json) if overrides_json else None)


def open_inputs(zoo, n_probe: int, pool: int, pair: list[str], *, lm_spec_json: str | None = None,
                draws: tuple[int, list[int]] | None = None, log: Callable[[str], None] = print) -> ZooInputs:
    """Probe sets, pools (checked for distinct draws when ``draws`` = (n_fewshot, seeds) is given, before
    any model runs), tokenizer and reference rows of ``zoo``. Raises MergeLabError where the data refuses."""
    lm = is_lm_zoo(zoo)
    probes, probe_note = probe_sets(zoo, n_probe)
    all_probe_texts = {example_text(e) for examples in probe_sets(zoo, 400)[0].values() for e in examples}
    spec = lm_spec_of(zoo, lm_spec_json)
    pools, pool_info = fewshot_pools(zoo, pool, all_probe_texts, lm_spec=spec)
    overlaps = check_draws(pools, draws[0], draws[1]) if draws else {}
    held = min(len(p) for p in probes.values())
    if lm and n_probe > held:
        log(f"(LM zoo: probe {held} held-out texts per task, all it holds out)")
        n_probe = held
    tokenizer = zoo_tokenizer(zoo, pair)
    t0 = time.perf_counter()
    reference = reference_rows(zoo, probes, tokenizer)
    log(f"reference rows (base, experts; disk-cached by the prober): {time.perf_counter() - t0:.1f} s")
    return ZooInputs(lm, probes, probe_note, pools, pool_info, tokenizer, reference, n_probe, overlaps, spec)


def _t_crit(n: int) -> float:
    table = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
    return table.get(n, 2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="default")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, tiny grids, 100 probe examples")
    parser.add_argument("--pair", default=None,
                        help="the two experts of the pair setting (default: sentiment,subjectivity on the classifier "
                             "zoo; on an LM zoo the pair that interferes most in the zoo's build records)")
    parser.add_argument("--settings", default="all,pair", help="which settings to run: all, pair or both")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick 0,1)")
    parser.add_argument("--n-fewshot", type=int, default=32)
    parser.add_argument("--pool", type=int, default=256, help="few-shot pool size per task")
    parser.add_argument("--n-probe", type=int, default=None, help="probe examples per task (default 400; quick 100)")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--methods", default="",
                        help="comma-separated method ids to run (default: all); the verdict needs apl, the ablation "
                             "runs only with apl")
    parser.add_argument("--apl-grid", choices=("design", "wide-lambda"), default="design",
                        help="APL's configurations: the design grid, or the post-hoc grid with λ up to 3 "
                             "for the magnitude-drop block (see apl_wide_lambda)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on the shared 2-core machine, under load 5-7, one thread ran "
                             "a few-shot forward 2× and per-example gradients 6-10× faster than two)")
    parser.add_argument("--lm-spec", default=None,
                        help="JSON of the tasks.yaml overrides an LM zoo was built with (build_lm_zoo's spec=; tests' "
                             "tiny zoos), so its training split can be replayed for the few-shot pools")
    parser.add_argument("--out", default=None, help="markdown output (default: RESULTS-methods.md; quick: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    args.n_probe = args.n_probe or (100 if args.quick else 400)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0, 1] if args.quick else [0, 1, 2])
    started, clock, sampler = datetime.datetime.now(), time.perf_counter(), LoadSampler()

    def log(message: str) -> None:
        print(message, flush=True)

    try:
        zoo = open_zoo(args.zoo)
    except MergeLabError as exc:
        print(f"{exc}\nBuild the demo zoo first: python -m merging zoo build --name {args.zoo}", file=sys.stderr)
        return 1
    try:
        pair, pair_note = choose_pair(zoo, args.pair)
    except MergeLabError as exc:
        print(exc, file=sys.stderr)
        return 2
    if pair_note:
        log(pair_note)
    wanted = [s.strip() for s in args.settings.split(",")]
    settings = [(s, list(zoo.tasks) if s == "all" else pair) for s in ("all", "pair") if s in wanted]
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        inputs = open_inputs(zoo, args.n_probe, args.pool, pair, lm_spec_json=args.lm_spec,
                             draws=(args.n_fewshot, seeds), log=log)
    except MergeLabError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    probes, probe_note, pools, pool_info = inputs.probes, inputs.probe_note, inputs.pools, inputs.pool_info
    tokenizer, reference, args.n_probe = inputs.tokenizer, inputs.reference, inputs.n_probe
    header = pool_header(pool_info, inputs.draws, probes, args.n_fewshot, seeds)
    log(f"zoo {zoo.name} ({zoo.kind}): {', '.join(zoo.tasks)}; seeds {seeds}; {torch.get_num_threads()} threads\n"
        + header)
    log(reference.markdown())
    done = [run_setting(name, tasks, zoo, pools, probes, seeds, args, tokenizer, reference, log)
            for name, tasks in settings]
    total = time.perf_counter() - clock
    load = sampler.stop()
    text = render(zoo, done, reference, seeds, args, pool_info, probe_note, load, total, started, header=header,
                  pair_note=pair_note)
    print("\n" + text)
    out = Path(args.out) if args.out else (None if args.quick else RESULTS)
    if out is not None:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
