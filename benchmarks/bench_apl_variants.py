"""APL's variants (issue #14) on the demo zoo, defaults chosen by few-shot loss only (a script, not a test).

    nice -n 19 python benchmarks/bench_apl_variants.py            # both settings, 3 seeds; writes RESULTS-apl-variants.md
    nice -n 19 python benchmarks/bench_apl_variants.py --quick    # smoke run: 1 seed, 2 λ, 100 probe examples, no file

Protocol — bench_methods.py's, through its helpers (same settings: all four experts and the interfering
pair sentiment + subjectivity; same few-shot pools and draws ``draw_fewshot(pool, 32, s)``, s = 0, 1, 2,
also the merge seed; selection of each row's λ by the lowest few-shot loss, never by probe data). To fit
the run on a shared 2-core machine (niced, under a load of 15–18 from other work): 3 λ values a row and
a probe of 100 held-out examples per task (the zoo's probe split with its seed, its first 100), where
bench_methods uses 4 and 400 — probe accuracies here are ±5 points per task at best, reported only.

- Rows, one factor changed at a time from APL's defaults (τ1 = τ2 = 2, p̄ = 0.8, gradient importance,
  random drop, uniform within layers, importance at the base): drop = locate (whole hidden units by
  importance, mass preserved; with within_layer = hidden, which it needs — RESULTS-methods.md's ablation
  measured random drop with hidden rates alone); drop = saliency without and with the 1/keep rescale (without: λ values above 1, as for magnitude); importance measured at the merged
  point (λ of θ_TA = the merge's λ, so each λ is its own calibration).
- Every APL row goes through the method's declared ``prepare`` with the base-point importance map
  passed in, as the page calls it; a variant measures what it needs itself (saliency's |g ⊙ Δ|, the
  merged-point map).
- Decision rule, per declared option: a variant becomes the default only if its selected few-shot loss
  (mean over seeds) is lower than the current default's in *both* settings; ``saliency_rescale`` (which
  only acts with drop = saliency) takes the setting with the lower few-shot loss summed over both
  settings. Probe accuracy is reported beside, never consulted.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_methods as bm  # noqa: E402  (the protocol's helpers: settings, selection, probe, tables)

from merging.engine import MergeSettings  # noqa: E402
from merging.errors import MergeLabError  # noqa: E402
from merging.io.taskdata import draw_fewshot  # noqa: E402
from merging.methods import get_method  # noqa: E402
from merging.zoo.probe import Prober  # noqa: E402
from merging.zoo.zoo import open_zoo  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS-apl-variants.md")
DEFAULT_ROW = "defaults (random, uniform, at base)"
COMBINED_ROW = "saliency (no rescale) + importance at the merged point"


def variant_runs(quick: bool, only: set[str] | None = None) -> list[bm.MethodRun]:
    """The rows: APL's defaults, one declared option changed at a time, and the two options that each won
    in the first run together (``only``: the labels to run)."""
    lam = [0.7, 1.0] if quick else [0.7, 0.9, 1.2]
    lam_sparse = [1.0, 2.0] if quick else [1.5, 2.0, 2.5]

    def apl(label, lambdas=lam, **change):
        cfg = {"tau1": 2.0, "tau2": 2.0, "drop_ratio": 0.8, **bm.APL_RANDOM, "importance_at": "base", **change}
        return bm.run_of(label, "apl", [cfg], lambdas, baseline=False)

    merged = bm.MethodRun("importance at the merged point", "apl", [
        ([{"tau1": 2.0, "tau2": 2.0, "drop_ratio": 0.8, **bm.APL_RANDOM, "importance_at": "merged", "point_lambda": x}], [x])
        for x in lam], baseline=False)
    combined = bm.MethodRun(COMBINED_ROW, "apl", [
        ([{"tau1": 2.0, "tau2": 2.0, "drop_ratio": 0.8, **bm.APL_RANDOM, "importance_at": "merged", "point_lambda": x,
           "drop": "saliency", "saliency_rescale": False}], [x]) for x in lam_sparse], baseline=False)
    rows = [
        apl(DEFAULT_ROW),
        apl("locate (hidden units, mass kept)", within_layer="hidden", drop="locate"),
        apl("saliency |g⊙Δ|, no rescale", lambdas=lam_sparse, drop="saliency", saliency_rescale=False),
        apl("saliency |g⊙Δ|, rescale 1/keep", drop="saliency", saliency_rescale=True),
        merged,
        combined,
    ]
    unknown = sorted(set(only or ()) - {r.label for r in rows})
    if unknown:
        raise SystemExit(f"--rows: no row labelled {', '.join(map(repr, unknown))}; the rows are: "
                         + "; ".join(r.label for r in rows))
    return [r for r in rows if not only or r.label in only]


_ORIGINAL_SETTINGS = bm.merge_settings


def variant_settings(setting, run, cfg: dict, lam: float, seed: int, tokenizer) -> MergeSettings:
    """APL through its declared ``prepare`` (the base-point importance map passed in, as the page does);
    ``point_lambda`` (bench only) is the λ of θ_TA for importance_at = merged, which must be the merge's
    own λ — run_method merges at λ = 1 and scales, so the row carries it per block."""
    if run.method != "apl":
        return _ORIGINAL_SETTINGS(setting, run, cfg, lam, seed, tokenizer)
    params = {k: v for k, v in cfg.items() if k != "point_lambda"}
    point_lambda = cfg.get("point_lambda", lam)
    importance = bm.importance_of(setting, seed, tokenizer, "gradient")
    key = ("apl-variant", seed, tuple(sorted({**params, "lambda": point_lambda}.items())))
    if key not in setting.prepared:
        with bm.Clock(setting, f"prepare apl ({params.get('drop')}, at {params.get('importance_at')})"):
            out = get_method("apl").prepare(setting.expert_set, setting.examples[seed], tokenizer,
                                            params={**params, "lambda": point_lambda}, importance=importance)
        while len(setting.prepared) >= len(setting.examples):  # a row's seeds at most: saliency extras are a
            setting.prepared.pop(next(iter(setting.prepared)))  # copy of the deltas (a first run was OOM-killed)
        setting.prepared[key] = {"expert_params": out["expert_params"], "extras": out["extras"]}
    inputs = setting.prepared[key]
    return MergeSettings.build(setting.expert_set, "apl", {**params, "lambda": lam},
                               expert_params=inputs["expert_params"], seed=seed, extras=inputs["extras"])


#: offset of the held-out selection draw's seed from the importance draw's (any fixed value: recorded here)
HELD_OUT_SEED_OFFSET = 10_000


def score_on_held_out_draws(setting, zoo, pools: dict, seeds: list[int], n_fewshot: int) -> None:
    """Score each seed's selection loss on a second few-shot draw, disjoint from the one APL measured its
    importance and saliency on: a variant that fits its mask to the draw's own gradient (saliency) is then
    judged on examples it did not see, like every other row."""
    for seed in seeds:
        used = {t: set(setting.indices[seed][t]) for t in setting.tasks}
        rest = {t: [ex for i, ex in enumerate(pools[t]) if i not in used[t]] for t in setting.tasks}
        short = [t for t in setting.tasks if len(rest[t]) < n_fewshot]
        if short:
            raise SystemExit(f"--select-on held-out: the pool of {short[0]} leaves {len(rest[short[0]])} examples "
                             f"beside the seed's draw, fewer than {n_fewshot}: raise --pool or lower --n-fewshot")
        held_out = {t: draw_fewshot(rest[t], n_fewshot, seed + HELD_OUT_SEED_OFFSET)[0] for t in setting.tasks}
        setting.scorers[seed] = Prober.for_zoo(zoo, tasks=setting.tasks, probe_sets=held_out, disk_cache=False)


def selected_loss(results: dict[int, bm.SeedResult]) -> float:
    return statistics.fmean(r.best.loss for r in results.values())


def decide(done: list[dict]) -> list[str]:
    """The decision rule of the protocol, in words, from the selected few-shot losses alone."""
    def loss(label: str) -> dict[str, float]:
        return {d["setting"].name: selected_loss(d["ablation"][label]) for d in done}

    base = loss(DEFAULT_ROW)
    lines = ["Selected few-shot loss (mean over seeds; lower is better) — the only number the choice reads:", "",
             "| row | " + " | ".join(base) + " | lower than defaults in every setting? |",
             "|---|" + "---|" * len(base) + "---|"]
    verdicts = {}
    for run in done[0]["ablation_runs"]:
        found = loss(run.label)
        better = all(found[s] < base[s] for s in base)
        verdicts[run.label] = better
        lines.append(f"| {run.label} | " + " | ".join(f"{found[s]:.4f}" for s in base) + " | "
                     + ("—" if run.label == DEFAULT_ROW else ("yes" if better else "no")) + " |")
    no_rescale = sum(loss("saliency |g⊙Δ|, no rescale").values())
    rescale = sum(loss("saliency |g⊙Δ|, rescale 1/keep").values())
    saliency_row = "saliency |g⊙Δ|, rescale 1/keep" if rescale < no_rescale else "saliency |g⊙Δ|, no rescale"
    drops = {"random": DEFAULT_ROW, "locate": "locate (hidden units, mass kept)", "saliency": saliency_row}
    winners = [d for d, row in drops.items() if d != "random" and verdicts[row]]
    drop = min(winners, key=lambda d: sum(loss(drops[d]).values())) if winners else "random"
    at = "merged" if verdicts["importance at the merged point"] else "base"
    lines += ["", "Decision:", "",
              f"- `drop`: **{drop}** — " + (f"{drop} had the lower few-shot loss in both settings" if drop != "random"
                                             else "no variant had a lower few-shot loss than random in both settings"),
              f"- `saliency_rescale`: **{'on' if rescale < no_rescale else 'off'}** — summed selected few-shot loss "
              f"{rescale:.4f} with 1/keep, {no_rescale:.4f} without",
              f"- `importance_at`: **{at}** — " + ("the merged point had the lower few-shot loss in both settings"
                                                    if at == "merged" else "the merged point did not have a lower "
                                                    "few-shot loss in both settings"),
              ""]
    return lines


def combined_lines(done: list[dict]) -> list[str]:
    """A run of the defaults and the combined row only: their selected few-shot losses."""
    lines = ["| row | " + " | ".join(d["setting"].name for d in done) + " |", "|---|" + "---|" * len(done)]
    for run in done[0]["ablation_runs"]:
        lines.append(f"| {run.label} | " + " | ".join(f"{selected_loss(d['ablation'][run.label]):.4f}" for d in done) + " |")
    return lines + [""]


def render(done: list[dict], reference, seeds, args, load: str, total: float, started) -> str:
    cmd = " ".join(["python benchmarks/bench_apl_variants.py", *sys.argv[1:]])
    out = ["# APL variants: which defaults few-shot loss picks", "",
           (f"Generated by `{cmd}` (niced) on {started:%Y-%m-%d %H:%M} (local time); {platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads. Runtime "
            f"**{total / 60:.1f} min**; {load}."), ""]
    if args.select_on == "held-out":
        out += [("Selection loss scored on a **held-out few-shot draw**: per seed s a second draw of the same size "
                 f"from the rest of the pool (seed s + {HELD_OUT_SEED_OFFSET}), disjoint from the draw APL measured "
                 "its importance and saliency on."), ""]
    labels = {r.label for r in done[0]["ablation_runs"]}
    whole = DEFAULT_ROW in labels and len(labels) == len(variant_runs(args.quick))
    out += ["## Decision (few-shot loss only)", ""] + (decide(done) if whole else combined_lines(done))
    for d in done:
        setting, runs, res = d["setting"], d["ablation_runs"], d["ablation"]
        out += [f"## Setting '{setting.name}': {', '.join(setting.tasks)}", ""]
        out += bm.setting_report(setting, reference, runs, res, "Probe accuracy (points), beside — not used to choose",
                                 args.n_probe)
        if DEFAULT_ROW in res:
            out += ["Paired differences, variant − defaults (mean probe accuracy, points; reported, not used):", ""]
            out += bm.paired_report(runs, res, DEFAULT_ROW, [r.label for r in runs if r.label != DEFAULT_ROW],
                                    header="variant − defaults", sign=-1)
        out += ["", "Selected configurations (by few-shot loss):", ""]
        out += [f"- {run.label}: {bm.selected_line(run, res[run.label])}" for run in runs] + [""]
        out += ["Few-shot loss of every configuration (mean over seeds):", ""]
        for run in runs:
            out += bm.loss_landscape(run, res[run.label])
        out += ["", f"Setting runtime {d['seconds'] / 60:.1f} min: " +
                ", ".join(f"{k} {v:.0f} s" for k, v in sorted(setting.timings.items(), key=lambda kv: -kv[1])), ""]
    out += ["## Protocol", "", __doc__.split("Protocol —", 1)[1].strip(), ""]
    out += [f"Seeds {', '.join(map(str, seeds))}; few-shot n = {args.n_fewshot}; probe {args.n_probe} per task.", ""]
    out += [bm.grid_description(run) for run in done[0]["ablation_runs"]] + [""]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="default")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pair", default="sentiment,subjectivity")
    parser.add_argument("--settings", default="all,pair")
    parser.add_argument("--seeds", default=None, help="default 0,1,2 (quick: 0)")
    parser.add_argument("--n-fewshot", type=int, default=32)
    parser.add_argument("--pool", type=int, default=256)
    parser.add_argument("--n-probe", type=int, default=None, help="default 100")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", default="", help="';'-separated row labels to run (default: every row)")
    parser.add_argument("--select-on", choices=("draw", "held-out"), default="draw",
                        help="few-shot set the selection loss is scored on: the seed's draw itself (what APL's "
                             "importance and saliency saw), or a second draw of the same size from the rest of "
                             "the pool (disjoint; still few-shot data, never probe data)")
    args = parser.parse_args(argv)
    only = {r.strip() for r in args.rows.split(";") if r.strip()} or None
    variant_runs(args.quick, only)  # an unknown row label stops here, before the zoo is read
    torch.set_num_threads(max(1, args.threads))
    args.n_probe = args.n_probe or 100
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])
    started, clock, sampler = datetime.datetime.now(), time.perf_counter(), bm.LoadSampler()
    bm.merge_settings = variant_settings  # run_method merges through this module-level hook
    try:
        zoo = open_zoo(args.zoo)
    except MergeLabError as exc:
        print(f"{exc}\nBuild the demo zoo first: python -m merging zoo build --name {args.zoo}", file=sys.stderr)
        return 1
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    pair = [t.strip() for t in args.pair.split(",")]
    wanted = [s.strip() for s in args.settings.split(",")]
    settings = [(s, list(zoo.tasks) if s == "all" else pair) for s in ("all", "pair") if s in wanted]
    inputs = bm.open_inputs(zoo, args.n_probe, args.pool, pair)
    probes, pools, reference, tokenizer = inputs.probes, inputs.pools, inputs.reference, inputs.tokenizer
    done = []
    for name, tasks in settings:
        t0 = time.perf_counter()
        print(f"\n== setting '{name}': {', '.join(tasks)}", flush=True)
        setting = bm.build_setting(name, tasks, zoo, pools, probes, seeds, args.n_fewshot, tokenizer)
        if args.select_on == "held-out":
            score_on_held_out_draws(setting, zoo, pools, seeds, args.n_fewshot)
        runs, results, probe_cache = variant_runs(args.quick, only), {}, {}
        for run in runs:
            started_run = time.perf_counter()
            results[run.label] = bm.run_method(setting, run, seeds, tokenizer, probe_cache, print)
            print(f"  ({run.label}: {time.perf_counter() - started_run:.0f} s)", flush=True)
        setting.prepared.clear()
        done.append({"setting": setting, "ablation_runs": runs, "ablation": results,
                     "seconds": time.perf_counter() - t0})
    text = render(done, reference, seeds, args, sampler.stop(), time.perf_counter() - clock, started)
    print("\n" + text)
    out = Path(args.out) if args.out else (None if args.quick else RESULTS)
    if out is not None:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
