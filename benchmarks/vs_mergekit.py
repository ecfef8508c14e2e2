"""Merge Lab against mergekit 0.1.5, disk to disk, on the same inputs (``bench_merge.py --vs-mergekit PYTHON``).

mergekit is a reference, never a dependency: it runs from the python of another environment, given on the
command line. Make that environment once (torch first, so pip keeps the CPU build)::

    python -m venv /tmp/mergekit-venv
    /tmp/mergekit-venv/bin/pip install torch==2.13.0
    /tmp/mergekit-venv/bin/pip install mergekit==0.1.5
    python benchmarks/bench_merge.py --skip-speed --skip-stream --vs-mergekit /tmp/mergekit-venv/bin/python

What it does: writes a synthetic Llama-shaped base and three experts (fp32 safetensors with a
``config.json``) under a temp folder; for every method both tools have, writes a Merge Lab recipe and
the mergekit config Merge Lab exports for it (``merging.io.mergekit_yaml``), then runs, interleaved
round by round, ``python -m merging merge recipe.yaml --out A`` and mergekit's own ``mergekit-yaml``
entry point on the config into ``B``, each in a fresh process, timing the wall clock and reading the
child's peak RSS (``ru_maxrss`` from ``wait4``, which counts mmapped inputs too). Interpreter start-up
and imports are part of both tools' time, as a user sees it; a separate "import only" row measures that
floor for each (and for torch alone), and a "read + add + write" row the plainest torch script for a merge of
these folders (start, read every tensor of the K + 1 models, one add pass, write the sum), against which each
method's "÷ plain" is taken. Deterministic methods' outputs are compared tensor by tensor (max |Δ|); for the random
ones (DARE, DELLA) the masks differ by design (Merge Lab draws one generator per seed, expert and tensor),
so only the run is checked.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
#: methods both tools have, with the recipe parameters used (Merge Lab's defaults otherwise)
METHODS = {
    "linear": {}, "task_arithmetic": {"lambda": 1.0}, "ties": {"drop_ratio": 0.7},
    "dare_linear": {"drop_ratio": 0.7}, "dare_ties": {"drop_ratio": 0.7},
    "breadcrumbs": {"drop_ratio": 0.7, "gamma": 0.01}, "della": {"drop_ratio": 0.7, "epsilon": 0.2},
    "slerp": {"t": 0.3}, "model_stock": {},
}
RANDOM_METHODS = {"dare_linear", "dare_ties", "della"}
SEED = 0
_MERGEKIT_MAIN = "import sys; from mergekit.scripts.run_yaml import main; sys.argv[0] = 'mergekit-yaml'; main()"
#: the plainest torch tool for a merge of these folders: start, import torch and safetensors, read every tensor
#: of the K + 1 models, add them (one pass, one thread) and write the sum — what a merge costs with no merge
#: logic at all; "÷ plain" in the table is each method's time over this one's.
_READ_ADD_WRITE = """
import sys
from safetensors import safe_open
from safetensors.torch import save_file
*folders, out = sys.argv[1:]
files = [safe_open(folder + '/model.safetensors', 'pt') for folder in folders]
merged = {}
for name in files[0].keys():
    total = files[0].get_tensor(name)
    for other in files[1:]:
        total += other.get_tensor(name)
    merged[name] = total
save_file(merged, out)
"""


def write_models(root: Path, dims: dict, shapes_fn, config_fn, state_fn) -> list[Path]:
    """Base + 3 experts as HF folders (fp32 safetensors, untied lm_head so both tools see a plain Llama)."""
    from safetensors.torch import save_file

    shapes = shapes_fn(**dims)
    shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    config = dict(config_fn(**dims), tie_word_embeddings=False, torch_dtype="float32")
    folders = []
    for model, name in enumerate(("base", "e1", "e2", "e3")):
        folder = root / name
        folder.mkdir(parents=True)
        state = state_fn(shapes, model, torch.float32)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(folder)
        del state
        gc.collect()
    return folders


def recipe_for(method: str, folders: list[Path]) -> dict:
    experts = folders[1:3] if method == "slerp" else folders[1:]
    return {"method": method, "base": str(folders[0]), "seed": SEED, "dtype": "float32",
            "parameters": dict(METHODS[method]),
            "experts": [{"name": f.name, "model": str(f)} for f in experts]}


def run_child(argv: list[str], cwd: Path) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stderr tail) of one fresh process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed ({proc.returncode}): {stderr[-2000:]}")
    return seconds, usage.ru_maxrss * 1024, stderr[-300:]


def max_abs_difference(ours: Path, theirs: Path) -> tuple[float, float]:
    """(max |Δ| over the norm tensors, over every other tensor): mergekit elects signs on norms and sparsifies
    them, which Merge Lab never does (its export says so), so the two are reported apart."""
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        out = {}
        for file in sorted(folder.rglob("*.safetensors")):
            out.update(load_file(str(file)))
        return out

    a, b = tensors(ours), tensors(theirs)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise RuntimeError(f"no common tensors between {ours} and {theirs}")
    def worst(names):
        return max((float((a[n].float() - b[n].float()).abs().max()) for n in names), default=0.0)

    norms = [n for n in shared if "norm" in n]
    return worst(norms), worst([n for n in shared if n not in norms])


def compare(args, shapes_fn, config_fn, state_fn) -> dict:
    """Run both tools per method, interleaved; print and return the table."""
    import yaml

    from merging.io.mergekit_yaml import to_mergekit_yaml
    from merging.io.recipe import Recipe
    from merging.io.replay import expert_set_from_recipe

    python = Path(args.vs_mergekit)
    dims = dict(layers=4, hidden=512, inter=1408, vocab=32000, kv=128) if args.quick else \
        dict(layers=12, hidden=768, inter=2048, vocab=32000, kv=256)
    work = Path(tempfile.mkdtemp(prefix="ml-vs-mergekit-", dir="/tmp"))
    methods = [m for m in METHODS if not args.methods or m in args.methods.split(",")]
    try:
        folders = write_models(work / "models", dims, shapes_fn, config_fn, state_fn)
        size = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
        print(f"\n== vs mergekit: synthetic Llama, {size / 4e6:.0f}M parameters ({size / 1e6:.0f} MB fp32 each), "
              f"base + 3 experts (slerp: 2), disk → disk, {args.repeats} interleaved rounds ==")
        configs = {}
        for method in methods:
            folder = work / method
            folder.mkdir()
            recipe = recipe_for(method, folders)
            (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            loaded = Recipe.from_yaml(yaml.safe_dump(recipe), source=folder / "recipe.yaml")
            layout = expert_set_from_recipe(loaded).layout
            (folder / "mergekit.yaml").write_text(to_mergekit_yaml(loaded, layout))
            configs[method] = folder
        times = {(m, tool): [] for m in methods for tool in ("merge-lab", "mergekit")}
        rss = dict.fromkeys(times, 0)
        floor = {"merge-lab": [], "mergekit": [], "torch": [], "read-add-write": []}
        diffs: dict[str, tuple[float, float]] = {}  # outputs compared after the first round
        for _ in range(args.repeats):
            floor["merge-lab"].append(run_child([sys.executable, "-c", "import merging.io.export"], work)[0])
            floor["mergekit"].append(run_child([str(python), "-c", "import mergekit.scripts.run_yaml"], work)[0])
            floor["torch"].append(run_child([sys.executable, "-c", "import torch"], work)[0])
            floor["read-add-write"].append(run_child(
                [sys.executable, "-c", _READ_ADD_WRITE, *map(str, folders), str(work / "floor.safetensors")], work)[0])
            print(f"     import only: merge-lab {floor['merge-lab'][-1]:.2f}s, mergekit {floor['mergekit'][-1]:.2f}s, "
                  f"torch alone {floor['torch'][-1]:.2f}s; read + add + write (base + 3) "
                  f"{floor['read-add-write'][-1]:.2f}s", flush=True)
            for method in methods:
                folder = configs[method]
                for tool in ("merge-lab", "mergekit"):
                    out = folder / f"out-{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    argv = [sys.executable, "-m", "merging", "merge", "recipe.yaml", "--out", str(out)] \
                        if tool == "merge-lab" else \
                        [str(python), "-c", _MERGEKIT_MAIN, "mergekit.yaml", str(out), "--random-seed", str(SEED)]
                    seconds, peak, _ = run_child(argv, folder)
                    times[(method, tool)].append(seconds)
                    rss[(method, tool)] = max(rss[(method, tool)], peak)
                    print(f"     {method} {tool} {seconds:.2f}s peak RSS {peak / 1e9:.2f} GB "
                          f"(1-min load {os.getloadavg()[0]:.1f})", flush=True)  # partial figures survive a cut-off run
                if method not in diffs and method not in RANDOM_METHODS:
                    diffs[method] = max_abs_difference(folder / "out-merge-lab", folder / "out-mergekit")
                    print(f"     {method} max |Δ| weights {diffs[method][1]:.2e}, norms {diffs[method][0]:.2e}",
                          flush=True)
        rows = []
        for method in methods:
            ours, theirs = (statistics.median(times[(method, t)]) for t in ("merge-lab", "mergekit"))
            diff = diffs.get(method)
            rows.append(dict(method=method, merge_lab=ours, mergekit=theirs, ratio=theirs / ours,
                             rss_ours=rss[(method, "merge-lab")], rss_theirs=rss[(method, "mergekit")], diff=diff))
        floors = {tool: statistics.median(values) for tool, values in floor.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"   import only: merge-lab {floors['merge-lab']:.2f} s, mergekit {floors['mergekit']:.2f} s, "
          f"torch alone {floors['torch']:.2f} s")
    print(f"   plain torch script (start, import torch, read base + 3, add, write): {floors['read-add-write']:.2f} s")
    print(f"   {'method':16s} {'mergekit s':>10s} {'merge-lab s':>11s} {'mergekit ÷ ours':>15s} "
          f"{'mk past import':>14s} {'ours past import':>16s} {'ours ÷ plain':>12s} "
          f"{'RSS mk GB':>9s} {'RSS ours GB':>11s}  max |Δ| (weights; norms)")
    for r in rows:
        diff = "random masks (not compared)" if r["diff"] is None else f"{r['diff'][1]:.2e}; {r['diff'][0]:.2e}"
        print(f"   {r['method']:16s} {r['mergekit']:10.2f} {r['merge_lab']:11.2f} {r['ratio']:15.2f} "
              f"{r['mergekit'] - floors['mergekit']:14.2f} {r['merge_lab'] - floors['merge-lab']:16.2f} "
              f"{r['merge_lab'] / floors['read-add-write']:12.2f} "
              f"{r['rss_theirs'] / 1e9:9.2f} {r['rss_ours'] / 1e9:11.2f}  {diff}")
    return {"rows": rows, "floors": floors, "params": size / 4, "repeats": args.repeats}
