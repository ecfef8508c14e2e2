"""The page's long steps, timed through the workbench (what each button calls), on a demo zoo:
first probe of a process, Merge + Run probe after one per-layer slider change (at layer 0 and at the
last layer, as the page's slider handler, Merge and Run probe do it), exact importance at layer level
(the quick choice) and with modules, the restore/ablate comparison and the drop-ratio sweep — each next
to the page's own estimate of it, made before the step from this machine's measured rate.

    python benchmarks/bench_page_steps.py [--zoo NAME] [--only STEP ...] [--skip-modules] [--skip-sweep] [--threads N]

Prints the load average with each figure: on a shared 2-core machine timings swing 4–20×.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}"


def timed(label: str, estimate, fn):
    text = estimate.text() if hasattr(estimate, "text") else str(estimate)
    t = time.perf_counter()
    out = fn()
    print(f"{label}: {time.perf_counter() - t:.1f} s  (page's estimate before: {text}; {load()})", flush=True)
    return out


def slider_change(wb, session, layer: str, value: float):
    """What the page does for one per-layer drop-ratio slider moved on the first expert, then Merge, then
    Run probe (components/layout.py: on_slider → set_cell, on_merge → merge, on_probe → run_probe); prints
    when the probe's first look (its progress line) came, counted from the slider change."""
    expert, start, seen = session.experts[0], time.perf_counter(), []

    def progress(fraction, message):
        if message.startswith("first look"):
            seen.append(time.perf_counter() - start)

    wb.set_cell(session, expert, layer, wb.DROP, value, "apl")
    summary = wb.merge(session, "apl", {}, 0)
    merged = time.perf_counter() - start
    wb.run_probe(session, progress=progress)
    look = f"first look at {seen[0]:.2f} s" if seen else "no first-look line"
    print(f"  merge {merged:.2f} s; {look}", flush=True)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", default=os.environ.get("MERGE_LAB_ZOO", "default"))
    parser.add_argument("--skip-modules", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--only", nargs="*", default=None,
                        help="steps to time after the set-up (gradient, merge, first probe): slider, layers, "
                             "modules, compare, sweep")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: one core's figure; 2: what the page's server uses on a 2-vCPU Space)")
    args = parser.parse_args()
    import torch

    from merging import workbench as wb
    from merging.workbench import estimates as est
    from merging.zoo.zoo import open_zoo

    torch.set_num_threads(args.threads)
    shutil.rmtree(Path(tempfile.gettempdir()) / "merge-lab-probe", ignore_errors=True)  # a fresh machine: only the zoo's rows
    zoo = open_zoo(args.zoo)
    base, refs = wb.zoo_refs(zoo)
    session = wb.load_experts(wb.Session(), base, refs, zoo=zoo)
    print(f"zoo {zoo.name}: {len(refs)} experts; {load()}")
    session = timed("gradient importance (32 examples)", est.importance_estimate(session, "gradient", n=32),
                    lambda: wb.compute_importance(session, 32, "gradient"))
    wb.merge(session, "apl", {})
    timed("first probe (machine-wide probe cache cleared; the zoo's rows written at build)", est.probe_estimate(session), lambda: wb.run_probe(session))
    wanted = set(args.only) if args.only is not None else {"slider", "layers", "modules", "compare", "sweep"}
    if args.skip_modules:
        wanted.discard("modules")
    if args.skip_sweep:
        wanted.discard("sweep")
    if "slider" in wanted:
        for layer in (session.layers[1], session.layers[-2]):  # block 0 and the last block
            summary = timed(f"merge + probe after one slider change at layer {layer}", "none (a quick step)",
                            lambda layer=layer: slider_change(wb, session, layer, 0.42))
            print(f"  re-merged {summary.recomputed} tensors of layers {', '.join(summary.changed_layers)}")
    if "layers" in wanted:
        timed("exact importance, layers (quick)", est.importance_estimate(session, "exact", wb.QUICK_SCOPE, 32),
          lambda: wb.compute_importance(session, 32, "exact", scope=wb.QUICK_SCOPE))
    if "modules" in wanted:
        timed("exact importance, with modules", est.importance_estimate(session, "exact", wb.FULL_SCOPE, 32),
              lambda: wb.compute_importance(session, 32, "exact", scope=wb.FULL_SCOPE))
    if "compare" in wanted:
        timed("compare restore and ablate", est.compare_estimate(session), lambda: wb.compare_interventions(session))
    if "sweep" in wanted:
        timed("drop-ratio sweep", est.sweep_estimate(session, wb.sweep_steps(session)), lambda: wb.drop_sweep(session))
    return 0


if __name__ == "__main__":
    sys.exit(main())
