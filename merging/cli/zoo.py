"""CLI subcommands for the demo zoo and the probe: ``zoo build``, ``zoo list``, ``probe``.

``merging/cli.py`` calls :func:`add_commands`; each handler returns an exit code, and a
:class:`MergeLabError` raised by a handler becomes one line on stderr with exit code 2 in
:func:`merging.cli.main` (no traceback: the message already says what to fix).
"""

from __future__ import annotations

import argparse


def _zoo_build(args: argparse.Namespace) -> int:
    """Build (or reuse) a zoo and print where it is and the measured margins."""
    from ..zoo.lm_zoo import lm_zoo_names
    from ..zoo.zoo import build_zoo

    if args.name in lm_zoo_names():
        return _lm_zoo_build(args)
    zoo = build_zoo(name=args.name, tasks=args.tasks or None, steps=args.steps, seed=args.seed,
                    n_probe=200 if args.n_probe is None else args.n_probe)
    print(f"zoo {zoo.name!r} at {zoo.root}")
    for task in zoo.tasks:
        acc = zoo.task_record(task)["probe_accuracy"]
        print(f"  {task}: {zoo.steps.get(task)} steps, probe accuracy base+head {acc['base_with_head']:.3f} -> expert {acc['expert']:.3f}")
    for task, reason in zoo.skipped.items():
        print(f"  skipped {task}: {reason}")
    return 0


def _lm_zoo_build(args: argparse.Namespace) -> int:
    """Build (or reuse) an LM zoo (``tasks.yaml`` ``lm_zoos``) and print each expert's perplexities and s/step."""
    from ..zoo.lm_zoo import build_lm_zoo

    zoo = build_lm_zoo(name=args.name, tasks=args.tasks or None, steps=args.steps, seed=args.seed,
                       n_probe=args.n_probe)
    print(f"LM zoo {zoo.name!r} at {zoo.root}")
    for task in zoo.tasks:
        record = zoo.task_record(task)
        ppl, timing = record["probe_perplexity"], record["timing"]
        print(f"  {task}: {record['steps']} steps, {timing['seconds_per_step']} s/step; perplexity on its own text "
              f"base {ppl['base'][task]:.1f} -> expert {ppl['expert'][task]:.1f} (x{record['own_ratio']:.2f})")
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    """List the usable zoos with their tasks."""
    from ..paths import zoos_root
    from ..zoo.zoo import list_zoos

    zoos = list_zoos()
    if not zoos:
        print(f"no zoo in {zoos_root()}: run `python -m merging zoo build`")
    for zoo in zoos:
        print(f"{zoo.name}\t{', '.join(zoo.tasks)}\t{zoo.root}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    """Probe base and experts of a zoo (or of folders given with --base), plus the merge of a recipe when given."""
    if args.base is not None or args.expert:
        from .importance import _probe_folders

        return _probe_folders(args)
    from ..zoo.probe import Prober
    from ..zoo.zoo import open_zoo

    zoo = open_zoo(args.zoo)
    prober = _lm_prober(zoo, args) if zoo.kind == "causal_lm" else Prober.for_zoo(zoo)
    merged = {}
    if args.recipe:
        from ..io.recipe import load_recipe
        from ..io.replay import merge_recipe

        merged[args.label] = merge_recipe(load_recipe(args.recipe))  # EMR: each task on its own body
    report = prober.report(merged)
    print(report.to_json() if args.json else report.markdown())
    return 0


def _lm_prober(zoo, args: argparse.Namespace):
    """The LM probe of an LM zoo: each expert's held-out text (its ``probe.jsonl``), reference rows cached
    under the zoo."""
    from ..io.experts import ExpertSet
    from ..io.taskdata import tokenizer_of
    from ..lm.model import resolve_device
    from ..lm.probe import LMProber

    expert_set = ExpertSet.load(zoo.base_path, dict(zoo.experts))
    return LMProber(expert_set, {t: zoo.probe(t) for t in zoo.experts}, tokenizer_of(expert_set),
                    max_length=args.max_length, cache_dir=zoo.root / "probe_cache",
                    device=resolve_device(args.device))


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``zoo build``, ``zoo list`` and ``probe`` to the ``python -m merging`` parser."""
    zoo = subparsers.add_parser("zoo", help="build or list demo zoos of fine-tuned experts")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="fine-tune one expert per task from the packaged base (idempotent)")
    build.add_argument("--tasks", nargs="+", help="task names (default: the manifest's default zoo)")
    build.add_argument("--steps", type=int, help="training steps per expert (default: each task's manifest value)")
    build.add_argument("--name", default="default", help="zoo name (folder under the cache root); 'lm' builds the "
                                                         "causal-LM zoo (a Llama base pretrained here, and its experts)")
    build.add_argument("--seed", type=int, default=0, help="seed of splits, head init and data order")
    build.add_argument("--n-probe", type=int, default=None, help="probe examples per task (default 200)")
    build.set_defaults(handler=_zoo_build)
    listing = zoo_sub.add_parser("list", help="list built zoos")
    listing.set_defaults(handler=_zoo_list)

    from .importance import add_model_arguments, add_probe_arguments

    probe = subparsers.add_parser("probe", help="accuracy/loss (classifiers) or loss/perplexity (causal LMs) of base, "
                                                "experts and a recipe's merge on probe sets")
    add_model_arguments(probe)
    add_probe_arguments(probe)
    probe.add_argument("--recipe", help="recipe YAML to merge and probe")
    probe.add_argument("--label", default="merged", help="row name of the merged model")
    probe.add_argument("--json", action="store_true", help="print the report as JSON")
    probe.set_defaults(handler=_probe)

