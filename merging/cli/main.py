"""``python -m merging``: the library's command line, a second face over the same calls as the app.

Commands: ``methods``, ``merge``, ``inspect`` here; ``zoo``, ``probe`` and ``importance`` come from
their modules' ``add_commands``. Errors a user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import zoo as _zoo  # noqa: F401  (registers the zoo: reference scheme recipes and commands accept)
from ..errors import MergeLabError

# Modules that add their own sub-commands (each exposes ``add_commands(subparsers)``).
COMMAND_MODULES = ("merging.cli.zoo", "merging.cli.importance")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own = bool(argv) and argv[0] in BUILTIN_COMMANDS  # `merge` need not import the importance code to start
    parser = build_parser(with_modules=not own)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 1
    try:
        return int(args.handler(args) or 0)
    except MergeLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not a user error: one line still, the traceback on request
        if os.environ.get("MERGE_LAB_DEBUG") == "1":
            raise
        print(f"error: unexpected {type(exc).__name__}: {str(exc)[:300]} — this is a Merge Lab bug; rerun with "
              "MERGE_LAB_DEBUG=1 for the traceback and report it", file=sys.stderr)
        return 1


BUILTIN_COMMANDS = ("methods", "merge", "inspect")


def build_parser(with_modules: bool = True) -> argparse.ArgumentParser:
    """The command line; ``with_modules=False`` leaves out the sub-commands of :data:`COMMAND_MODULES` (a
    built-in command's run does not pay for importing them)."""
    parser = argparse.ArgumentParser(prog="python -m merging", description="Merge Lab: merge fine-tuned experts.")
    sub = parser.add_subparsers(dest="command")
    _add_methods(sub)
    _add_merge(sub)
    _add_inspect(sub)
    for module_name in COMMAND_MODULES if with_modules else ():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_commands(sub)
    return parser


def _command(sub, name: str, help_text: str, handler: Callable[[argparse.Namespace], int]):
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    return parser


def _print(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else text)


# ---- methods -------------------------------------------------------------------

def _add_methods(sub) -> None:
    parser = _command(sub, "methods", "List merge methods and their declared parameters.", _run_methods)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _run_methods(args) -> int:
    from ..methods import all_specs

    specs = [s.describe() for s in all_specs()]
    lines = []
    for s in specs:
        params = ", ".join(f"{p['name']}={p['default']}" for p in s["params"])
        lines.append(f"{s['name']:<16} {s['pretty_name']:<20} {params}\n{'':<16} {s['summary']}")
        lines += [f"{'':<16} {line}" for line in textwrap.wrap(s["explanation"], 84)]
        lines.append(f"{'':<16} paper: {s['paper']}")
    _print(specs, args.json, "\n".join(lines))
    return 0


# ---- merge ---------------------------------------------------------------------

def _add_merge(sub) -> None:
    parser = _command(sub, "merge", "Merge the models a recipe names and export them (or print mergekit YAML).",
                      _run_merge)
    parser.add_argument("recipe", help="recipe YAML file, or a mergekit YAML config (recognised by its top-level "
                                       "merge_method: read as the equivalent Merge Lab recipe, or refused with "
                                       "the reason)")
    parser.add_argument("--out", help="output folder (written atomically)")
    parser.add_argument("--format", choices=("hf", "mergekit"), default="hf",
                        help="hf: export merged model folder(s); mergekit: print the equivalent mergekit YAML")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="override the recipe's dtype")
    parser.add_argument("--tasks", nargs="*", help="tasks whose folders to export (default: all)")
    parser.add_argument("--shard-mb", type=int, default=500, help="maximum shard size in MB")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled .bin weights (loaded with weights_only=True)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for a mergekit config's random methods (mergekit takes it on its command line, "
                             "--random-seed; a Merge Lab recipe carries its own)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out folder that is not a previous export (your files there "
                             "are never deleted or overwritten)")
    parser.add_argument("--configs-from", metavar="NAME",
                        help="the model whose generation_config.json (stop tokens, sampling defaults) and chat "
                             "template the export keeps: base, or an expert's name (default: the recipe's "
                             "configs_from, else base); recorded in the exported recipe")
    parser.add_argument("--tokenizer", metavar="CHOICE",
                        help="for experts whose tokenizers differ (added tokens): whose vocabulary the merge uses — "
                             "base, union or an expert's name; embedding and LM-head rows are aligned by token "
                             "(default: the recipe's tokenizer; recorded in the exported recipe)")
    parser.add_argument("--workers", type=int, default=None,
                        help="tensors merged at once (default: one per torch thread, at most the cores); the output "
                             "is the same whatever the count")
    from ..devices import AUTO_DEVICE, DEVICE_HELP  # the option importance and probe take, the same help

    parser.add_argument("--device", default=AUTO_DEVICE,
                        help=DEVICE_HELP + "; the merge's kernels run there, tensor by tensor (a random drop's "
                                           "masks differ between CUDA and the CPU for one seed; the exported "
                                           "recipe records the device)")
    parser.add_argument("--json", action="store_true")


def _load_recipe_or_mergekit(path_text: str, args):
    from ..io.mergekit_import import from_mergekit_yaml, is_mergekit_yaml
    from ..io.recipe import Recipe, read_recipe_text
    from ..io.replay import expert_set_from_recipe

    path = Path(path_text)
    text = read_recipe_text(path)
    if not is_mergekit_yaml(text):
        return Recipe.from_yaml(text, source=path.resolve())
    if args.seed < 0:
        raise MergeLabError("--seed must be a whole number ≥ 0", field="seed")

    def layers(draft):  # mergekit gradients run over the model's blocks: open the base to count them
        return expert_set_from_recipe(draft, allow_pickle=args.allow_pickle).layout.layers

    return from_mergekit_yaml(text, layers=layers, source=path.resolve(), seed=args.seed)


def _run_merge(args) -> int:
    recipe = _load_recipe_or_mergekit(args.recipe, args)
    if args.configs_from is not None:
        from ..io.recipe import check_configs_from

        recipe.configs_from = check_configs_from(args.configs_from, [e.name for e in recipe.experts])
    if args.tokenizer is not None:
        from ..io.vocab import check_tokenizer_choice

        recipe.tokenizer = check_tokenizer_choice(args.tokenizer, [e.name for e in recipe.experts])
    if args.format == "mergekit":
        from ..io.mergekit_yaml import to_mergekit_yaml
        from ..io.replay import expert_set_from_recipe

        try:  # the model's layout gives exact per-layer and norm filters (tensor names)
            layout = expert_set_from_recipe(recipe, allow_pickle=args.allow_pickle).layout
        except MergeLabError:
            if _has_layer_values(recipe):
                raise
            layout = None  # models not at hand: generic norm filters, scalar values only
        text = to_mergekit_yaml(recipe, layout)
        if args.out:
            out = Path(args.out)
            if out.is_dir() or ((out.exists() or out.is_symlink()) and not args.force):
                raise MergeLabError(f"{out} already exists: give a new file name for the mergekit YAML (or --force "
                                    "to replace that file)", field="out")
            out.write_text(text)
        print(text)
        return 0
    if not args.out:
        raise MergeLabError("merge needs --out DIR (or --format mergekit)", field="out")
    from ..devices import resolve_device
    from ..io.export import export_recipe
    from ..io.replay import expert_set_from_recipe

    device = resolve_device(args.device)  # a CUDA device asked for where none is visible fails here, in words
    expert_set = expert_set_from_recipe(recipe, allow_pickle=args.allow_pickle)
    report = export_recipe(recipe, args.out, expert_set=expert_set, tasks=args.tasks, dtype=args.dtype,
                           shard_bytes=args.shard_mb * 1000 * 1000, force=args.force, workers=args.workers,
                           device=device)
    text = "\n".join([f"exported to {report.root}"] + [f"  {k}: {v}" for k, v in report.folders.items()]
                     + [f"warning: {w}" for w in report.warnings])
    _print(report.to_dict(), args.json, text)
    return 0


def _has_layer_values(recipe) -> bool:
    values = list(recipe.parameters.values()) + [v for e in recipe.experts for v in e.parameters.values()]
    return any(isinstance(v, (dict, list)) for v in values)


# ---- inspect -------------------------------------------------------------------

def _add_inspect(sub) -> None:
    parser = _command(sub, "inspect", "Check that models can be merged and show task-vector statistics.",
                      _run_inspect)
    parser.add_argument("models", nargs="+", help="base first, then experts (folders, .safetensors, hf:ids, zoo:refs)")
    parser.add_argument("--allow-pickle", action="store_true")
    parser.add_argument("--json", action="store_true")


def _non_finite(expert_set) -> list[str]:
    """'model m has k NaN/Inf value(s) in tensor t' for every float tensor that is not finite."""
    from ..io.integrity import nonfinite_tensors

    return [f"model '{model}' has {count} NaN/Inf value(s) in tensor '{name}'"
            for model, tensors in nonfinite_tensors(expert_set).items() for name, count in tensors]


def _run_inspect(args) -> int:
    from ..io.experts import ExpertSet
    from ..task_vectors import TaskVectors

    if len(args.models) < 2:
        raise MergeLabError("inspect needs a base and at least one expert")
    expert_set = ExpertSet.load(args.models[0], args.models[1:], allow_pickle=args.allow_pickle)
    broken = _non_finite(expert_set)
    if broken:
        raise MergeLabError("; ".join(broken) + ": the checkpoint is broken, re-export it or pick another model")
    stats = TaskVectors(expert_set, cache=False).stats()
    data = {
        "base": expert_set.base.ref,
        "experts": {n: {"ref": e.source.ref, "task_head": e.head_names, "delta_norm": stats.model_norm(n)}
                    for n, e in expert_set.experts.items()},
        "layers": expert_set.layout.layers,
        "warnings": expert_set.warnings,
        "stats": stats.to_dict(),
    }
    lines = [f"mergeable: base {expert_set.base.ref} + {len(expert_set.experts)} expert(s), "
             f"{len(expert_set.layout.layers)} layer rows"]
    for name, info in data["experts"].items():
        lines.append(f"  {name:<20} |Δ| = {info['delta_norm']:.4f}  head: {', '.join(info['task_head']) or '-'}")
    for pair, cos in stats.cosine.items():
        lines.append(f"  cosine {pair}: {cos['model']:+.3f}")
    conflict = {layer: max(kinds.values()) for layer, kinds in stats.conflict.items()}
    lines.append("  max sign-conflict rate per layer: " + ", ".join(f"{k}={v:.2f}" for k, v in conflict.items()))
    lines += [f"warning: {w}" for w in expert_set.warnings]
    _print(data, args.json, "\n".join(lines))
    return 0
