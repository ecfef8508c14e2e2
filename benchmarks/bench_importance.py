"""APL importance on a zoo: gradient cost against a plain forward+backward, exact cost, fidelity.

    python benchmarks/bench_importance.py [--zoo NAME] [--n-fewshot 64] [--skip-fidelity] [--out RESULTS.md]
    python benchmarks/bench_importance.py --zoo lm --interventions restore --hidden-sample 64 --out RESULTS.md

Per expert it prints the gradient-importance time (all levels from one backward pass at the
base) against a plain forward+backward over the same batch measured in the same run (target:
ratio ≤ 1.5), and the exact module-level time. Then fidelity: Spearman exact vs gradient at
module / layer / sampled hidden units for restore and ablate, stability over few-shot draws,
and the cost ratio exact / gradient. Timings are medians of ``--repeats`` runs: the machine is
shared, so single timings swing. ``--out`` also writes everything printed (with the command, the
machine and its load average) to a markdown file, e.g. ``benchmarks/RESULTS-importance.md``.

An LM zoo (``--zoo lm``) is measured the same way on its causal-LM loss (each expert's few-shot text);
its report replaces only the file's "LM demo zoo" section, so the classifier figures stay beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.apl.importance import draw_fewshot, exact_partition_scores, gradient_scores  # noqa: E402
from merging.apl.taskloss import body_state, task_loss  # noqa: E402
from merging.errors import MergeLabError  # noqa: E402


def _paired_medians(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of two callables timed alternately, so load swings on a shared machine hit both."""
    first(), second()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, out in ((first, times[0]), (second, times[1])):
            clock = time.perf_counter()
            run()
            out.append(time.perf_counter() - clock)
    return statistics.median(times[0]), statistics.median(times[1])


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def plain_forward_backward(task) -> None:
    """The reference: every parameter tracked, one forward and one backward over the batch."""
    for p in task.model.parameters():
        p.requires_grad_(True)
        p.grad = None
    with torch.enable_grad():
        task.loss().backward()
    for p in task.model.parameters():
        p.requires_grad_(False)
        p.grad = None


def bench_costs(expert_set, examples, tokenizer, repeats: int) -> None:
    base = body_state(expert_set, "base")
    layout = expert_set.layout
    print(f"{'expert':<14}{'fwd+bwd s':>10}{'gradient s':>12}{'ratio':>7}{'exact module s':>16}{'forwards':>9}")
    ratios = []
    for expert in expert_set.experts:
        own = body_state(expert_set, expert)
        task = task_loss(expert_set, expert, examples, tokenizer, base, purpose="the benchmark")  # LM or classifier
        reference, gradient = _paired_medians(lambda task=task: plain_forward_backward(task),
                                              lambda task=task, own=own: gradient_scores(task, layout, base, own), repeats)
        parts = layout.partitions("module")
        clock = time.perf_counter()
        exact_partition_scores(task, base, own, parts)
        exact = time.perf_counter() - clock
        ratios.append(gradient / reference)
        print(f"{expert:<14}{reference:>10.3f}{gradient:>12.3f}{gradient / reference:>7.2f}{exact:>16.2f}{len(parts):>9}")
    print(f"gradient importance / plain forward+backward: median ratio {statistics.median(ratios):.2f} (target ≤ 1.5)")


def bench_fidelity(expert_set, pools, tokenizer, args) -> None:
    from merging.apl.fidelity import measure_fidelity

    def progress(fraction: float, message: str) -> None:
        print(f"\r{100 * fraction:5.1f}% {message[:60]:<60}", end="", file=sys.stderr, flush=True)

    report = measure_fidelity(expert_set, pools, tokenizer, n_fewshot=args.n_fewshot, hidden_sample=args.hidden_sample,
                              draws=args.draws, seed=args.seed, progress=progress,
                              interventions=tuple(args.interventions.split(",")))
    print(file=sys.stderr)
    print(f"\nfidelity (few-shot {report.settings['n_fewshot']}, {args.hidden_sample} sampled units, "
          f"stability over {args.draws} draws of {report.settings['draw_size']})")
    for iv, levels in report.spearman.items():
        for level, values in levels.items():
            cells = "  ".join(f"{t} {v:.2f}" for t, v in values.items())
            print(f"  spearman {iv:<8}{level:<7} {cells}")
    for key, levels in report.stability.items():
        for level, values in levels.items():
            cells = "  ".join(f"{t} {v:.2f}" for t, v in values.items())
            print(f"  stability {key:<17}{level:<7} {cells}")
    for iv, cost in report.cost.items():
        print(f"  cost {iv:<8} gradient {cost['gradient_s']:.2f} s; exact layer {cost['exact_layer_s']:.1f} s "
              f"({cost['ratio_layer']:.1f}×), module {cost['exact_module_s']:.1f} s ({cost['ratio_module']:.1f}×), "
              f"all hidden units ≈ {_duration(cost['exact_hidden_all_units_s'])} ({cost['ratio_hidden_all_units']:.0f}×)")
    print("\n".join(report.summary()))


class _Tee(io.TextIOBase):
    """stdout that is also kept, so the printed report can be written to a file as printed."""

    def __init__(self, stream):
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def _machine() -> str:
    """bench_merge's machine line (CPU, cores, RAM, Python, torch, threads) plus the load at the end."""
    from bench_merge import machine

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{machine()}; load average at the end {load}"


LM_SECTION = "## LM demo zoo"


def write_results(path: Path, argv: list[str], printed: str, seconds: float, lm: bool = False) -> None:
    """The report as markdown; an LM zoo's replaces only the file's LM section (appended when there is none)."""
    run = (f"`python benchmarks/bench_importance.py {' '.join(argv)}` — {datetime.date.today()}, "
           f"{seconds / 60:.1f} min; {_machine()}.\n\n")
    block = f"```\n{printed.rstrip()}\n```\n"
    if lm:
        section = (f"{LM_SECTION}\n\n{run}Causal-LM loss (mean next-token cross-entropy over each expert's few-shot "
                   f"text), otherwise as above.\n\n{block}")
        text = path.read_text(encoding="utf-8") if path.is_file() else "# APL importance: cost and fidelity\n"
        start = text.find(LM_SECTION)
        if start >= 0:
            end = text.find("\n## ", start + len(LM_SECTION))
            text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
        else:
            text = text.rstrip() + "\n\n" + section
        path.write_text(text, encoding="utf-8")
    else:
        path.write_text(
            "# APL importance: cost and fidelity on the demo zoo\n\n" + run +
            "Cost: gradient importance (all levels from one backward pass at the base) against a plain "
            "forward+backward over the same batch, medians of interleaved repeats; exact module level = one forward "
            "per module partition. Fidelity: Spearman between exact and gradient rankings, like with like (restore ↔ "
            "gradient at the base, ablate ↔ gradient at the expert); stability: mean pairwise Spearman over few-shot "
            "draws.\n\n" + block, encoding="utf-8")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="default")
    parser.add_argument("--n-fewshot", type=int, default=64)
    parser.add_argument("--hidden-sample", type=int, default=200)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--interventions", default="restore,ablate",
                        help="comma-separated: restore (exact vs gradient at the base) and/or ablate")
    parser.add_argument("--out", default=None, help="also write the report to this markdown file")
    parser.add_argument("--pool", type=int, default=None,
                        help="few-shot pool per task beyond the zoo's 32: its few-shot set plus training examples the "
                             "expert never saw, probe texts excluded (as bench_methods.py); needed for --n-fewshot > 32")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    started = time.perf_counter()
    tee = _Tee(sys.stdout)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from merging.cli.importance import zoo_inputs

        zoo, expert_set, pools, tokenizer = zoo_inputs(args.zoo)
        if args.pool:
            pools = larger_pools(zoo, args.pool)
    except MergeLabError as exc:
        print(f"{exc}\nBuild the demo zoo first: python -m merging zoo build --name {args.zoo}", file=sys.stderr)
        return 1
    with contextlib.redirect_stdout(tee):
        run(args, zoo, expert_set, pools, tokenizer)
    if args.out:
        write_results(Path(args.out), argv, tee.kept.getvalue(), time.perf_counter() - started,
                      lm=getattr(zoo, "kind", "") == "causal_lm")
    return 0


def larger_pools(zoo, size: int) -> dict:
    """The zoo's few-shot examples plus unseen training examples, minus every probe text (bench_methods.py)."""
    from bench_methods import fewshot_pools, probe_sets

    probes, _ = probe_sets(zoo, 400)
    pools, _ = fewshot_pools(zoo, size, {text for examples in probes.values() for text, _ in examples})
    return pools


def run(args, zoo, expert_set, pools, tokenizer) -> None:
    examples = {t: draw_fewshot(pool, args.n_fewshot, args.seed)[0] for t, pool in pools.items()}
    print(f"zoo {zoo.name}: experts {', '.join(expert_set.experts)}; few-shot "
          f"{', '.join(f'{t} {len(e)}' for t, e in examples.items())}; {torch.get_num_threads()} threads")
    bench_costs(expert_set, examples, tokenizer, args.repeats)
    if not args.skip_fidelity:
        bench_fidelity(expert_set, pools, tokenizer, args)


if __name__ == "__main__":
    raise SystemExit(main())
