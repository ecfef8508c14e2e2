"""CLI: ``python -m merging importance`` — APL importance of a zoo's experts, headless — and
``python -m merging calibrate``, which turns that importance into an APL recipe.

The chain a notebook or a script runs without the app::

    python -m merging importance --zoo default --out imp.json
    python -m merging calibrate --zoo default --importance imp.json --drop-ratio 0.5 --out apl.yaml
    python -m merging merge apl.yaml --out merged/          # or: python -m merging probe --recipe apl.yaml

``merging/cli.py`` calls :func:`add_commands`. Handlers return exit codes; a
:class:`MergeLabError` becomes one line on stderr and exit code 2 (the message says what to fix).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..apl.importance import INTERVENTIONS, LEVELS, MODES
from ..errors import MergeLabError
from ..methods import get_method


def zoo_inputs(zoo_name: str | None):
    """(zoo, expert set, few-shot pools, tokenizer) of a built zoo: what importance needs."""
    from ..io.experts import ExpertSet
    from ..io.taskdata import tokenizer_of
    from ..zoo.zoo import open_zoo

    zoo = open_zoo(zoo_name)
    expert_set = ExpertSet.load(zoo.base_path, {task: path for task, path in zoo.experts.items()})
    pools = {task: zoo.fewshot(task) for task in zoo.experts}
    return zoo, expert_set, pools, tokenizer_of(expert_set)


def _importance(args: argparse.Namespace) -> int:
    """Compute importance for every expert of a zoo and write it as JSON or .npz."""
    from ..apl.importance import compute_importance, draw_fewshot

    _, expert_set, pools, tokenizer = zoo_inputs(args.zoo)
    drawn = {t: draw_fewshot(pool, args.n_fewshot, args.seed) for t, pool in pools.items()}
    examples = {t: d[0] for t, d in drawn.items()}
    short = {t: len(e) for t, e in examples.items() if len(e) < args.n_fewshot}
    if short:  # said, not silently shrunk: the zoo ships a fixed few-shot set per task
        print(f"note: asked for {args.n_fewshot} few-shot examples per expert; the zoo ships fewer, so all of them are "
              f"used: {', '.join(f'{t} {n}' for t, n in short.items())}", file=sys.stderr)

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
               "fewshot": {t: len(e) for t, e in examples.items()},
               "model": {t: result.scores(t, "model", absolute=False)["model"] for t in result.experts}
               if "model" in result.signed else None}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"\rwrote {out} ({result.mode}/{result.intervention}, levels {', '.join(result.levels)}, "
              f"{seconds:.1f} s)", file=sys.stderr)
    return 0


def load_importance(path: str | Path):
    """An :class:`ImportanceMap` from a ``.json`` or ``.npz`` file written by ``importance`` or the app."""
    from ..apl.importance import ImportanceMap

    path = Path(path)
    if not path.is_file():
        raise MergeLabError(f"importance file '{path}' not found: write one with python -m merging importance --out")
    if path.suffix == ".npz":
        return ImportanceMap.load_npz(path)
    return ImportanceMap.from_json(path.read_text(encoding="utf-8"))


def _calibrate(args: argparse.Namespace) -> int:
    """Calibrate APL from an importance file into a recipe: per-layer drop ratios and weights for every
    expert, the APL parameters, the few-shot indices and the importance file it came from. The recipe
    holds every calibrated cell, so `merge` and `probe --recipe` replay it without recomputing anything."""
    from ..apl.calibration import calibrate
    from ..io.experts import ExpertSet
    from ..io.recipe import ExpertRef, Recipe
    from ..zoo.zoo import open_zoo

    zoo = open_zoo(args.zoo)
    importance = load_importance(args.importance)
    expert_set = ExpertSet.load(zoo.base_path, {task: path for task, path in zoo.experts.items()})
    table = calibrate(importance, expert_set, drop_ratio=args.drop_ratio, tau1=args.tau1, tau2=args.tau2,
                      q_min=args.q_min)
    params = table.to_expert_params()
    parameters = {"lambda": args.lam, "drop_ratio": args.drop_ratio, "tau1": args.tau1, "tau2": args.tau2,
                  "q_min": args.q_min, "within_layer": "uniform", "drop": args.drop}
    out = Path(args.out)
    recipe = Recipe(
        method="apl", base=f"zoo:{zoo.name}/base",
        experts=[ExpertRef(task, f"zoo:{zoo.name}/{task}", params[task]) for task in importance.experts],
        parameters=parameters, seed=args.seed, dtype="float32",
        importance=str(Path(args.importance).resolve()),
        few_shot=_few_shot(importance, zoo.name),
        suggested={"apl": table.recipe_suggestion()},
        calibrated={"from": str(Path(args.importance).resolve()), "mode": importance.mode,
                    "intervention": importance.intervention},
        notes=f"calibrated by python -m merging calibrate from {Path(args.importance).name} "
              f"({importance.mode}, {importance.intervention})")
    recipe.validate(expert_set.layout.layers)  # every value within APL's declared ranges before it is written
    recipe.save(out)
    summary = {"out": str(out), "experts": list(params), "drop_ratio": table.drop, "weight": table.weight}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for task in params:
            drops = ", ".join(f"{layer} {value:.2f}" for layer, value in table.drop[task].items())
            print(f"{task}: drop {drops}")
        print(f"wrote {out}: replay with python -m merging merge {out} --out DIR", file=sys.stderr)
    return 0


def _few_shot(importance, zoo_name: str) -> dict:
    """The recipe's few-shot record: each expert's zoo few-shot file by reference, at the indices the
    importance was measured on (the CLI draws with the importance seed)."""
    from ..io.taskdata import fewshot_record

    return {e: fewshot_record(f"zoo:{zoo_name}/{e}", ix, importance.seed) for e, ix in importance.fewshot.items()}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``importance`` and ``calibrate`` to the ``python -m merging`` parser."""
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

    parser = subparsers.add_parser("calibrate", help="turn an importance file into a calibrated APL recipe",
                                   description=_calibrate.__doc__)
    parser.add_argument("--zoo", default=None, help="zoo name (default: MERGE_LAB_ZOO or 'default')")
    parser.add_argument("--importance", required=True, help="importance file (.json or .npz) of that zoo's experts")
    apl = get_method("apl")  # defaults, choices and help from APL's declaration (ranges are checked against it)
    for flag, name, dest in (("--drop-ratio", "drop_ratio", None), ("--tau1", "tau1", None), ("--tau2", "tau2", None),
                             ("--q-min", "q_min", None), ("--lambda", "lambda", "lam"), ("--drop", "drop", None)):
        declared = apl.param(name)
        extra = {"dest": dest} if dest else {}
        if declared.kind == "choice":
            parser.add_argument(flag, choices=declared.choices, default=declared.default, help=declared.help, **extra)
        else:
            bounds = f" [{declared.low:g}, {declared.high:g}]" if declared.low is not None else ""
            parser.add_argument(flag, type=float, default=declared.default, help=declared.help + bounds, **extra)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random drop masks")
    parser.add_argument("--out", required=True, help="recipe YAML to write")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.set_defaults(handler=_calibrate)
