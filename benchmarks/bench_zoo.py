"""Demo-zoo measurements: build time, per-expert margins, task-arithmetic interference, probe speed.

    python benchmarks/bench_zoo.py --build            # build (or reuse) the default zoo, print timings and margins
    python benchmarks/bench_zoo.py --interference     # TA of all experts and of every pair at lambda 1 and 0.5
    python benchmarks/bench_zoo.py --speed            # merged probe vs a plain base forward, same run
    python benchmarks/bench_zoo.py --all --write      # everything, and rewrite benchmarks/RESULTS-zoo.md

Interference is measured on 400 probe examples per task, drawn with the zoo's seed: the
split reserves its first 400 examples for probing, so they never overlap training data.
Task arithmetic here is written out by hand (merged = base + lambda * sum(expert - base),
body tensors only; each task keeps its own expert's head) so the numbers do not depend
on the merge engine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.zoo.probe import Prober, body_from_expert, load_safetensors  # noqa: E402
from merging.zoo.tasks import available_tasks, split_task  # noqa: E402
from merging.zoo.zoo import build_zoo, open_zoo  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS-zoo.md")


def probe_sets_400(zoo) -> dict:
    """400 probe examples per task with the zoo's seed (a superset of the zoo's own probe set)."""
    available, _ = available_tasks()
    sets = {}
    for task in zoo.tasks:
        if task in available:
            split = split_task(available[task], zoo.seed, n_probe=400)
            assert split.probe[: len(zoo.task_record(task)["probe_indices"])] == zoo.task_record(task)["probe_indices"]
            sets[task] = split.probe_examples
        else:
            sets[task] = zoo.probe(task)
    return sets


def task_vectors(zoo, prober: Prober) -> tuple[dict, dict]:
    """Base body (float tensors) and each expert's body delta, in base naming."""
    base = {k: v.clone() for k, v in prober.body.params.items() if v.is_floating_point()}
    deltas = {}
    for task in zoo.tasks:
        body, _ = body_from_expert(load_safetensors(zoo.experts[task] / "model.safetensors"), prober.body.prefix)
        deltas[task] = {k: body[k] - base[k] for k in base}
    return base, deltas


def task_arithmetic(base: dict, deltas: dict, tasks: tuple, lam: float) -> dict:
    return {k: base[k] + lam * sum(deltas[t][k] for t in tasks) for k in base}


def measure_interference(zoo) -> tuple[list[str], list[str]]:
    """Markdown lines with the reference rows and the TA matrix, plus a list of findings."""
    prober = Prober.for_zoo(zoo, probe_sets=probe_sets_400(zoo), disk_cache=False)
    ref = prober.reference()
    base, deltas = task_vectors(zoo, prober)
    expert_acc = {t: ref.row(t).metrics[t]["accuracy"] for t in zoo.tasks}
    base_acc = {t: ref.row("base").metrics[t]["accuracy"] for t in zoo.tasks}
    lines = ["### Reference (400 probe examples per task)", "", ref.markdown(), "",
             "### Task arithmetic: merged accuracy on each member task (change vs that task's expert, points)", "",
             "| merge | λ | " + " | ".join(zoo.tasks) + " | worst Δ |", "|---|---|" + "---|" * (len(zoo.tasks) + 1)]
    subsets = [tuple(zoo.tasks)] + list(itertools.combinations(zoo.tasks, 2))
    worst_all = {}
    for subset in subsets:
        for lam in (1.0, 0.5):
            row = prober.probe_body(task_arithmetic(base, deltas, subset, lam), name=f"TA {'+'.join(subset)} λ={lam}")
            cells, worst = [], 0.0
            for t in zoo.tasks:
                if t in subset:
                    d = 100 * (row.metrics[t]["accuracy"] - expert_acc[t])
                    worst = min(worst, d)
                    cells.append(f"{row.metrics[t]['accuracy']:.3f} ({d:+.1f})")
                else:
                    cells.append("")
            label = "all" if len(subset) == len(zoo.tasks) else " + ".join(subset)
            lines.append(f"| {label} | {lam} | " + " | ".join(cells) + f" | {worst:+.1f} |")
            worst_all[(label, lam)] = worst
            print(lines[-1], flush=True)
    margins = {t: 100 * (expert_acc[t] - base_acc[t]) for t in zoo.tasks}
    findings = ["- margin expert vs base+head on 400 probe examples: " + ", ".join(f"{t} {m:+.1f}" for t, m in margins.items()),
                f"- TA all experts λ=1: worst task loses {-worst_all[('all', 1.0)]:.1f} points vs its expert"]
    return lines, findings


def measure_speed(zoo, repeats: int = 5) -> list[str]:
    """One merged probe (every layer changed, and only the last layer changed) vs one plain base forward.

    Each repeat probes a new task-arithmetic merge (a different λ, so every layer differs from
    the previously probed body), then the same merge with only its last encoder layer nudged.
    """
    prober = Prober.for_zoo(zoo, disk_cache=False)
    prober.reference()
    base, deltas = task_vectors(zoo, prober)
    last_layer = f"encoder.layer.{prober.body.n_layers - 1}."
    ref_t, ratios, part_ratios = [], [], []
    for r in range(repeats):
        before = prober.reference_forward_seconds()
        merged = task_arithmetic(base, deltas, tuple(zoo.tasks), 0.3 + 0.05 * r)
        t0 = time.perf_counter()
        prober.probe_body(merged)
        full = time.perf_counter() - t0
        nudged = {k: (v + 1e-3 * deltas[zoo.tasks[0]][k] if k.startswith(last_layer) else v) for k, v in merged.items()}
        t0 = time.perf_counter()
        prober.probe_body(nudged)
        part = time.perf_counter() - t0
        after = prober.reference_forward_seconds()
        plain = (before + after) / 2  # bracket the merged probe: load on shared machines swings 4-6x
        ref_t.append(plain)
        ratios.append(full / plain)
        part_ratios.append(part / plain)
        print(f"repeat {r}: plain {before:.2f}/{after:.2f} s, merged (all layers) {full:.2f} s = {ratios[-1]:.2f}x, "
              f"merged (last layer) {part:.2f} s = {part_ratios[-1]:.2f}x", flush=True)
    lines = [f"- probe set: {prober.n_texts} texts, {prober.n_tokens} tokens, {len(prober.batches)} batches; {repeats} repeats, "
             "each merged probe bracketed by two plain forwards (mean taken as its reference)",
             f"- plain base forward (HF BertModel) over the same batches: median {statistics.median(ref_t):.2f} s (all: {', '.join(f'{x:.2f}' for x in ref_t)})",
             f"- merged probe, every layer changed (compare + load + forward + heads): median ratio **{statistics.median(ratios):.2f}×** "
             f"the plain forward (all: {', '.join(f'{x:.2f}' for x in ratios)}; target ≤ 1.3×)",
             f"- merged probe, only the last encoder layer changed: median ratio **{statistics.median(part_ratios):.2f}×**"]
    print("\n".join(lines), flush=True)
    return lines


def build(seed: int) -> list[str]:
    start = time.perf_counter()
    zoo = build_zoo("default", seed=seed)
    wall = time.perf_counter() - start
    lines = ["| expert | steps | s/step | train s | probe acc base+head | probe acc expert | margin (points) |", "|---|---|---|---|---|---|---|"]
    for t in zoo.tasks:
        rec = zoo.task_record(t)
        acc, tim = rec["probe_accuracy"], rec["timing"]
        lines.append(f"| {t} | {rec['steps']} | {tim['seconds_per_step']} | {tim['train_seconds']} | {acc['base_with_head']:.3f} | "
                     f"{acc['expert']:.3f} | {100 * (acc['expert'] - acc['base_with_head']):+.1f} |")
    meta = json.loads((zoo.root / "zoo.json").read_text(encoding="utf-8"))
    lines.append(f"\nFresh build time recorded in zoo.json: {meta.get('build_seconds', 'not recorded')} s; "
                 f"wall time of this `build_zoo` call: {wall:.1f} s (about 1 s when the zoo is reused).")
    print("\n".join(lines), flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--interference", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--zoo", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help=f"rewrite {RESULTS.name}")
    args = ap.parse_args()
    torch.manual_seed(0)
    sections = []
    if args.build or args.all:
        sections += ["## Default zoo build (200 probe examples per task)", ""] + build(args.seed) + [""]
    zoo = open_zoo(args.zoo)
    if args.interference or args.all:
        lines, findings = measure_interference(zoo)
        sections += ["## Interference"] + [""] + findings + [""] + lines + [""]
    if args.speed or args.all:
        sections += ["## Probe speed", ""] + measure_speed(zoo) + [""]
    if args.write:
        header = ["# Demo zoo: measured results", "", f"Generated by `python benchmarks/bench_zoo.py {' '.join(sys.argv[1:])}` "
                  f"on {torch.get_num_threads()} torch threads; zoo {zoo.name!r}, seed {zoo.seed}, steps {zoo.steps}.", ""]
        RESULTS.write_text("\n".join(header + sections) + "\n", encoding="utf-8")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
