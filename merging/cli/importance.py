"""CLI: ``python -m merging importance`` — APL importance of a zoo's experts, headless — and
``python -m merging calibrate``, which turns that importance into an APL recipe.

The chain a notebook or a script runs without the app::

    python -m merging importance --zoo default --out imp.json
    python -m merging calibrate --zoo default --importance imp.json --drop-ratio 0.5 --out apl.yaml
    python -m merging merge apl.yaml --out merged/          # or: python -m merging probe --recipe apl.yaml

Any model folders work the same way instead of a zoo — causal LMs included, whose task data is text
(``.txt`` lines, JSONL ``text`` or ``prompt``/``completion`` rows)::

    python -m merging importance --base BASE --expert code=DIR --data code=code.jsonl … --out imp.json
    python -m merging calibrate --base BASE --expert code=DIR --data code=code.jsonl … --importance imp.json --out apl.yaml
    python -m merging probe --base BASE --expert code=DIR --data code=code.jsonl … --recipe apl.yaml --json

``merging/cli.py`` calls :func:`add_commands`. Handlers return exit codes; a
:class:`MergeLabError` becomes one line on stderr and exit code 2 (the message says what to fix).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..apl.importance import INTERVENTIONS, LEVELS, MODES
from ..apl.taskloss import MAX_LENGTH
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


def parse_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """``NAME=VALUE`` options (repeatable) → {name: value}; names are identifiers, each given once."""
    from ..io.names import check_name

    out: dict[str, str] = {}
    for text in values or []:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise MergeLabError(f"{flag} expects NAME=PATH, got {text!r}", field=flag.lstrip("-"))
        name = check_name(name.strip())
        if name in out:
            raise MergeLabError(f"{flag} names '{name}' twice: give each expert once", field=flag.lstrip("-"))
        out[name] = value.strip()
    return out


@dataclass
class Inputs:
    """What importance, calibrate and probe need, from a zoo or from folders: the opened expert set, each
    expert's task examples (its whole file, in order), where they came from (for the recipe's few-shot
    record and model refs) and the tokenizer."""

    expert_set: object
    pools: dict[str, list]
    tokenizer: object
    base_ref: str
    expert_refs: dict[str, str]
    data_refs: dict[str, str]
    zoo: object = None


def task_inputs(args: argparse.Namespace, *, tokenizer: bool = True, optional: frozenset = frozenset()) -> Inputs:
    """The inputs the options name: ``--zoo`` or ``--base DIR --expert NAME=DIR --data NAME=FILE``."""
    if getattr(args, "base", None) is None:
        if getattr(args, "expert", None) or getattr(args, "data", None):
            raise MergeLabError("--expert and --data need --base DIR (the model the experts were fine-tuned from)",
                                field="base")
        zoo, expert_set, pools, tok = zoo_inputs(args.zoo)
        return Inputs(expert_set, pools, tok, f"zoo:{zoo.name}/base",
                      {t: f"zoo:{zoo.name}/{t}" for t in zoo.experts},
                      {t: f"zoo:{zoo.name}/{t}" for t in zoo.experts}, zoo)
    if args.zoo is not None:
        raise MergeLabError("give either --zoo or --base with --expert, not both", field="zoo")
    return folder_inputs(args.base, parse_pairs(args.expert, "--expert"), parse_pairs(args.data, "--data"),
                         tokenizer=tokenizer, optional=optional)


def folder_inputs(base: str, experts: dict[str, str], data: dict[str, str], *, tokenizer: bool = True,
                  optional: frozenset = frozenset()) -> Inputs:
    """Open ``base`` and ``experts`` (folders), read each expert's task file (the one reader); experts in
    ``optional`` may have none (the probe, given their held-out file)."""
    from ..io.experts import ExpertSet
    from ..io.taskdata import fewshot_file, read_examples, tokenizer_of

    if not experts:
        raise MergeLabError("--base needs at least one --expert NAME=DIR", field="expert")
    unknown = sorted(set(data) - set(experts))
    if unknown:
        raise MergeLabError(f"--data names '{unknown[0]}', which is not an --expert (experts: {', '.join(experts)})",
                            field="data")
    lacking = [e for e in experts if e not in data and e not in optional]
    if lacking:
        raise MergeLabError(f"expert '{lacking[0]}' has no task data: give --data {lacking[0]}=FILE (.jsonl rows, "
                            "or a .txt file with one text per line)", field="data")
    expert_set = ExpertSet.load(base, experts)
    files = {e: fewshot_file(ref) for e, ref in data.items()}
    pools = {e: read_examples(f) for e, f in files.items()}
    empty = [e for e, rows in pools.items() if not rows]
    if empty:
        raise MergeLabError(f"the task data of '{empty[0]}' ({files[empty[0]]}) has no examples", field="data")
    return Inputs(expert_set, pools, tokenizer_of(expert_set) if tokenizer else None, _recipe_ref(base),
                  {e: _recipe_ref(r) for e, r in experts.items()},
                  {e: str(f.resolve()) for e, f in files.items()})


def _recipe_ref(ref: str) -> str:
    """A model ref as a recipe written anywhere can follow it: a local path made absolute, anything else
    (``hf:…``, a registered scheme) as given."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def _importance(args: argparse.Namespace) -> int:
    """Compute importance for every expert (of a zoo, or of folders with their task data) and write it
    as JSON or .npz."""
    from ..apl.importance import compute_importance, draw_fewshot
    from ..lm.model import resolve_device

    inputs = task_inputs(args)
    expert_set, pools, tokenizer = inputs.expert_set, inputs.pools, inputs.tokenizer
    drawn = {t: draw_fewshot(pool, args.n_fewshot, args.seed) for t, pool in pools.items()}
    examples = {t: d[0] for t, d in drawn.items()}
    short = {t: len(e) for t, e in examples.items() if len(e) < args.n_fewshot}
    if short:  # said, not silently shrunk: the zoo ships a fixed few-shot set per task
        print(f"note: asked for {args.n_fewshot} few-shot examples per expert; the task data holds fewer, so all of "
              "them are "
              f"used: {', '.join(f'{t} {n}' for t, n in short.items())}", file=sys.stderr)

    def progress(fraction: float, message: str) -> None:
        if not args.json:
            print(f"\r{100 * fraction:5.1f}% {message[:70]:<70}", end="", file=sys.stderr, flush=True)

    clock = time.perf_counter()
    result = compute_importance(expert_set, examples, tokenizer, mode=args.mode, level=args.level,
                                intervention=args.intervention, sample=args.sample, seed=args.seed,
                                progress=progress, fewshot_indices={t: d[1] for t, d in drawn.items()},
                                max_length=args.max_length, device=resolve_device(args.device))
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


#: APL drops that need more than the per-layer table a calibration writes, and what they need
CALIBRATION_FREE_DROPS = {
    "locate": "per-unit importance profiles, measured with within_layer hidden",
    "saliency": "each entry's |gradient × delta| from the few-shot gradients",
}


def _calibrate(args: argparse.Namespace) -> int:
    """Calibrate APL from an importance file into a recipe: per-layer drop ratios and weights for every
    expert, the APL parameters, the few-shot indices and the importance file it came from. The recipe
    holds every calibrated cell, so `merge` and `probe --recipe` replay it without recomputing anything."""
    from ..apl.calibration import calibrate
    from ..io.recipe import ExpertRef, Recipe

    if args.drop in CALIBRATION_FREE_DROPS:
        raise MergeLabError(f"--drop {args.drop} chooses entries from data a calibrated recipe does not hold ("
                            f"{CALIBRATION_FREE_DROPS[args.drop]}), so its merge could not replay: calibrate with "
                            "--drop random or --drop magnitude, or merge method apl from a recipe that names the "
                            "few-shot data (the page's Export writes one)", field="drop")
    inputs = task_inputs(args, tokenizer=False)
    importance = load_importance(args.importance)
    expert_set = inputs.expert_set
    strangers = [e for e in importance.experts if e not in expert_set.experts]
    if strangers:
        raise MergeLabError(f"the importance file scores expert '{strangers[0]}', which these options do not name "
                            f"(experts: {', '.join(expert_set.experts)}): calibrate with the experts it was computed on",
                            field="importance")
    table = calibrate(importance, expert_set, drop_ratio=args.drop_ratio, tau1=args.tau1, tau2=args.tau2,
                      q_min=args.q_min)
    params = table.to_expert_params()
    parameters = {"lambda": args.lam, "drop_ratio": args.drop_ratio, "tau1": args.tau1, "tau2": args.tau2,
                  "q_min": args.q_min, "within_layer": "uniform", "drop": args.drop}
    out = Path(args.out)
    recipe = Recipe(
        method="apl", base=inputs.base_ref,
        experts=[ExpertRef(task, inputs.expert_refs[task], params[task]) for task in importance.experts],
        parameters=parameters, seed=args.seed, dtype="float32",
        importance=str(Path(args.importance).resolve()),
        few_shot=_few_shot(importance, inputs.data_refs),
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


def _few_shot(importance, data_refs: dict[str, str]) -> dict:
    """The recipe's few-shot record: each expert's task file by reference (a zoo ref or an absolute path),
    at the indices the importance was measured on (the CLI draws with the importance seed)."""
    from ..io.taskdata import fewshot_record

    return {e: fewshot_record(data_refs[e], ix, importance.seed) for e, ix in importance.fewshot.items()}


def _probe_folders(args: argparse.Namespace) -> int:
    """Probe base, experts and a recipe's merge given as folders with task data: loss and perplexity per
    task for causal LMs, accuracy and loss for classifiers. Each task's held-out rows are its
    ``--probe-data`` file, else the rows of its ``--data`` file outside the few-shot draw (the recipe's
    recorded indices when it has them, else ``--n-fewshot`` drawn with ``--seed``, as importance does)."""
    from ..io.taskdata import is_lm_data, read_examples

    probe_files = parse_pairs(args.probe_data, "--probe-data")
    inputs = task_inputs(args, optional=frozenset(probe_files))
    recipe = _recipe(args.recipe)
    extra = {e: read_examples(_data_file(f)) for e, f in probe_files.items()}
    unknown = sorted(set(extra) - set(inputs.expert_set.experts))
    if unknown:
        raise MergeLabError(f"--probe-data names '{unknown[0]}', which is not an --expert", field="probe_data")
    held_out = {e: extra[e] if e in extra else _held_out(inputs, e, recipe, args) for e in inputs.expert_set.experts}
    kinds = {is_lm_data(rows) for rows in [*inputs.pools.values(), *held_out.values()] if rows}
    if len(kinds) > 1:
        raise MergeLabError("the task data mixes causal-LM text and labelled rows: a probe compares one kind of model",
                            field="data")
    merged = {}
    if recipe is not None:
        from ..io.replay import merge_recipe

        merged[args.label] = merge_recipe(recipe)  # the probers score EMR's task bodies task by task
    if kinds == {True}:
        from ..lm.model import resolve_device
        from ..lm.probe import LMProber
        from ..paths import cache_root

        prober = LMProber(inputs.expert_set, held_out, inputs.tokenizer, max_length=args.max_length,
                          cache_dir=cache_root() / "probe_cache", device=resolve_device(args.device))  # base and expert rows: once per content
        report = prober.report(merged)
    else:
        report = _classifier_probe(inputs, held_out, merged)
    print(report.to_json() if args.json else report.markdown())
    return 0


def _recipe(path: str | None):
    if not path:
        return None
    from ..io.recipe import load_recipe

    return load_recipe(path)


def _data_file(ref: str) -> Path:
    from ..io.taskdata import fewshot_file

    return fewshot_file(ref)


def _held_out(inputs: Inputs, expert: str, recipe, args) -> list:
    """The rows of an expert's task file that its few-shot draw does not use (disjoint from D_t)."""
    from ..io.taskdata import draw_fewshot

    pool = inputs.pools[expert]
    entry = (recipe.few_shot.get(expert) or {}) if recipe is not None else {}
    same_file = bool(entry.get("file")) and _same_file(str(entry["file"]), recipe, inputs.data_refs[expert])
    used = set(entry.get("indices") or []) if same_file else set(draw_fewshot(pool, args.n_fewshot, args.seed)[1])
    rows = [row for index, row in enumerate(pool) if index not in used]
    if not rows:
        raise MergeLabError(f"every row of the task data of '{expert}' is few-shot data ({len(pool)} rows): give "
                            f"held-out rows with --probe-data {expert}=FILE, or a smaller --n-fewshot", field="probe_data")
    return rows


def _same_file(ref: str, recipe, data_ref: str) -> bool:
    """Whether a recipe's few-shot file is this task file (then its indices say which rows were few-shot)."""
    from ..io.taskdata import fewshot_file

    try:
        return fewshot_file(ref, recipe.resolve_dir()).resolve() == Path(data_ref).resolve()
    except MergeLabError:
        return False


def _classifier_probe(inputs: Inputs, held_out: dict, merged: dict):
    """The classifier probe over folders (each expert's own head on its task)."""
    from ..lm.model import is_causal_lm
    from ..zoo.probe import Prober

    if is_causal_lm(inputs.expert_set.base.config):
        raise MergeLabError("these models are causal LMs but their task data has labels: probe them on text "
                            '(.txt lines, or JSONL {"text": …} / {"prompt": …, "completion": …} rows)', field="data")
    prober = Prober(inputs.base_ref, inputs.expert_refs, held_out)
    return prober.report(merged)


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """The probe's options for models given as folders (the zoo's probe needs none of them)."""
    parser.add_argument("--probe-data", action="append", metavar="NAME=FILE",
                        help="an expert's held-out probe data (repeatable; default: its --data rows outside the "
                             "few-shot draw)")
    parser.add_argument("--n-fewshot", type=int, default=64,
                        help="few-shot rows drawn from each --data file and kept out of the probe (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of that few-shot draw (as in importance)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per probe text (default 64)")
    add_device_argument(parser)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` (auto, cpu, cuda, cuda:N): one option, one help text, one resolver (merging.devices) for
    importance, probe and merge."""
    from ..devices import AUTO_DEVICE, DEVICE_HELP

    parser.add_argument("--device", default=AUTO_DEVICE, help=DEVICE_HELP)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--zoo`` or ``--base DIR --expert NAME=DIR --data NAME=FILE`` (repeatable): where models and task data are."""
    parser.add_argument("--zoo", default=None, help="zoo name (default: MERGE_LAB_ZOO or 'default'); or give --base")
    parser.add_argument("--base", default=None, help="base model folder (instead of --zoo)")
    parser.add_argument("--expert", action="append", metavar="NAME=DIR", help="an expert folder (repeatable)")
    parser.add_argument("--data", action="append", metavar="NAME=FILE",
                        help="an expert's task data (repeatable): JSONL rows {text, label} for a classifier; "
                             "{text} or {prompt, completion} rows, or a .txt file (one text per line), for a causal LM")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``importance`` and ``calibrate`` to the ``python -m merging`` parser."""
    parser = subparsers.add_parser("importance", help="APL importance of experts (exact or gradient)",
                                   description=_importance.__doc__)
    add_model_arguments(parser)
    parser.add_argument("--mode", choices=MODES, default="gradient")
    parser.add_argument("--level", choices=[*LEVELS, "all"], default="layer")
    parser.add_argument("--intervention", choices=INTERVENTIONS, default="restore")
    parser.add_argument("--sample", type=int, default=None, help="exact mode: hidden units to measure (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the unit sample and the few-shot draw")
    parser.add_argument("--n-fewshot", type=int, default=64, help="few-shot examples per expert (default 64)")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH,
                        help=f"tokens per example (default {MAX_LENGTH}; an LM prompt loses its oldest tokens first)")
    parser.add_argument("--out", required=True, help="output file: .json or .npz")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_device_argument(parser)
    parser.set_defaults(handler=_importance)

    parser = subparsers.add_parser("calibrate", help="turn an importance file into a calibrated APL recipe",
                                   description=_calibrate.__doc__)
    add_model_arguments(parser)
    parser.add_argument("--importance", required=True, help="importance file (.json or .npz) of those experts")
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
