"""The page's long steps, timed through the workbench (what each button calls), on a demo zoo:
first probe of a process, exact importance at layer level (the quick choice) and with modules,
the restore/ablate comparison and the drop-ratio sweep — each next to the page's own estimate
of it, made before the step from this machine's measured rate.

    python benchmarks/bench_page_steps.py [--zoo NAME] [--skip-modules] [--skip-sweep]

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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", default=os.environ.get("MERGE_LAB_ZOO", "default"))
    parser.add_argument("--skip-modules", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    import torch

    from merging import workbench as wb
    from merging.workbench import estimates as est
    from merging.zoo.zoo import open_zoo

    torch.set_num_threads(1)
    shutil.rmtree(Path(tempfile.gettempdir()) / "merge-lab-probe", ignore_errors=True)  # a cold first probe
    zoo = open_zoo(args.zoo)
    base, refs = wb.zoo_refs(zoo)
    session = wb.load_experts(wb.Session(), base, refs, zoo=zoo)
    print(f"zoo {zoo.name}: {len(refs)} experts; {load()}")
    session = timed("gradient importance (32 examples)", est.importance_estimate(session, "gradient", n=32),
                    lambda: wb.compute_importance(session, 32, "gradient"))
    wb.merge(session, "apl", {})
    timed("first probe (reference rows cold)", est.probe_estimate(session), lambda: wb.run_probe(session))
    timed("exact importance, layers (quick)", est.importance_estimate(session, "exact", wb.QUICK_SCOPE, 32),
          lambda: wb.compute_importance(session, 32, "exact", scope=wb.QUICK_SCOPE))
    if not args.skip_modules:
        timed("exact importance, with modules", est.importance_estimate(session, "exact", wb.FULL_SCOPE, 32),
              lambda: wb.compute_importance(session, 32, "exact", scope=wb.FULL_SCOPE))
    timed("compare restore and ablate", est.compare_estimate(session), lambda: wb.compare_interventions(session))
    if not args.skip_sweep:
        timed("drop-ratio sweep", est.sweep_estimate(session, wb.sweep_steps(session)), lambda: wb.drop_sweep(session))
    return 0


if __name__ == "__main__":
    sys.exit(main())
