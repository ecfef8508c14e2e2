"""CLI: ``python -m merging importance`` — APL importance of a zoo's experts, headless.

``merging/cli.py`` calls :func:`add_commands`. Handlers return exit codes; a
:class:`MergeLabError` becomes one line on stderr and exit code 2 (the message says what to fix).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import MergeLabError
from .importance import INTERVENTIONS, LEVELS, MODES


def zoo_inputs(zoo_name: str | None):
    """(zoo, expert set, few-shot pools, tokenizer) of a built zoo: what importance needs."""
    from transformers import AutoTokenizer

    from .experts import ExpertSet
    from .zoo import open_zoo

    zoo = open_zoo(zoo_name)
    expert_set = ExpertSet.load(zoo.base_path, {task: path for task, path in zoo.experts.items()})
    pools = {task: zoo.fewshot(task) for task in zoo.experts}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(zoo.base_path))
    except (OSError, ValueError) as exc:
        raise MergeLabError(f"zoo '{zoo.name}': no usable tokenizer in its base folder {zoo.base_path} ({exc})") from exc
    return zoo, expert_set, pools, tokenizer


def _importance(args: argparse.Namespace) -> int:
    """Compute importance for every expert of a zoo and write it as JSON or .npz."""
    from .importance import compute_importance, draw_fewshot

    _, expert_set, pools, tokenizer = zoo_inputs(args.zoo)
    drawn = {t: draw_fewshot(pool, args.n_fewshot, args.seed) for t, pool in pools.items()}
    examples = {t: d[0] for t, d in drawn.items()}

    def progress(fraction: float, message: str) -> None:
        if not args.json:
            print(f"\r{100 * fraction:5.1f}% {message[:70]:<70}", end="", file=sys.stderr, flush=True)

    clock = time.perf_counter()
    result = compute_importance(expert_set, examples, tokenizer, mode=args.mode, level=args.level,
                                intervention=args.intervention, sample=args.sample, seed=args.seed,
                                progress=progress, fewshot_indices={t: d[1] for t, d in drawn.items()})
    seconds = time.perf_counter() - clock
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        result.save_npz(out)
    else:
        out.write_text(result.to_json(), encoding="utf-8")
    summary = {"out": str(out), "mode": result.mode, "intervention": result.intervention, "levels": result.levels,
               "experts": result.experts, "seconds": round(seconds, 2),
               "model": {t: result.scores(t, "model", absolute=False)["model"] for t in result.experts}
               if "model" in result.signed else None}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"\rwrote {out} ({result.mode}/{result.intervention}, levels {', '.join(result.levels)}, "
              f"{seconds:.1f} s)", file=sys.stderr)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``importance`` to the ``python -m merging`` parser."""
    parser = subparsers.add_parser("importance", help="APL importance of a zoo's experts (exact or gradient)",
                                   description=_importance.__doc__)
    parser.add_argument("--zoo", default=None, help="zoo name (default: MERGE_LAB_ZOO or 'default')")
    parser.add_argument("--mode", choices=MODES, default="gradient")
    parser.add_argument("--level", choices=[*LEVELS, "all"], default="layer")
    parser.add_argument("--intervention", choices=INTERVENTIONS, default="restore")
    parser.add_argument("--sample", type=int, default=None, help="exact mode: hidden units to measure (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the unit sample and the few-shot draw")
    parser.add_argument("--n-fewshot", type=int, default=64, help="few-shot examples per expert (default 64)")
    parser.add_argument("--out", required=True, help="output file: .json or .npz")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.set_defaults(handler=_importance)
