"""The LM importance and merge on a GPU, against the same steps on the CPU (issue #12's device check).

Every step is the command line a user runs (``python -m merging …`` in a fresh process), once with
``--device DEVICE`` and once with ``--device cpu``:

1. gradient importance, every level (``importance --mode gradient --level all``);
2. exact importance at module level (``importance --mode exact --level module``);
3. TIES, DARE-TIES and APL merges (``merge --device …``), APL calibrated once from the CPU's gradient
   importance (``calibrate``: random drop, and a magnitude drop as a deterministic APL), so the merges
   differ only by where their kernels ran.

It prints seconds per step (wall, a fresh interpreter each; the interpreter floor is measured once) and
how far the device's results are from the CPU's: importance as Spearman per expert (the one Spearman,
``merging.apl.fidelity``) and max |Δ| relative to the largest score; merges as max |Δ| over every tensor.
Deterministic methods must agree within float rounding; a random drop draws from the device's own
generator (CUDA's Philox is not the CPU's Mersenne Twister), so DARE-TIES and APL (random) differ by
design — the summary says so instead of calling it a failure.

Models: an LM zoo (``--zoo lm``, built with ``python -m merging zoo build --name lm`` when missing; that
needs Debian's fortunes under /usr/share/games/fortunes), or a folder made by ``--pack`` (base and a few
experts copied from the zoo, small enough to carry to a GPU machine that has no fortunes)::

    python benchmarks/gpu_check.py --pack .gpu-check-models             # here: base + de + es (≈ 51 MB)
    python benchmarks/gpu_check.py --models .gpu-check-models --device cuda --out OUT   # on the GPU
    python benchmarks/gpu_check.py --models .gpu-check-models --device cpu --out /tmp/x # dry run: cpu vs cpu

Writes ``summary.json`` and ``summary.md`` to ``--out``. Exit 0 when every deterministic comparison is
within tolerance, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DETERMINISTIC_ATOL = 1e-4  # max |Δ| of a merged tensor (float32 rounding of sums of a few deltas, TF32 off)
SPEARMAN_MIN = 0.99  # importance ranks on the device against the CPU's


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.pack:
        return _pack(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from merging.devices import resolve_device

    device = resolve_device(args.device)
    models, build_seconds = _models(args)
    machine = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
               "load_average": os.getloadavg()[0], "experts": list(models["experts"]),
               "model_build_seconds": build_seconds}
    floor = _timed([sys.executable, "-m", "merging", "methods", "--json"], out / "floor.log")[1]
    steps, checks = [], []
    gradient = _importance(models, out, device, args, "gradient", "all", steps, checks)
    _importance(models, out, device, args, "exact", "module", steps, checks)
    recipes = _recipes(models, out, gradient["cpu"], args)
    for label, (recipe, randomised) in recipes.items():
        outputs = {}
        for key, where in zip(("device", "cpu"), _pair(device)):
            folder = out / f"merge-{label}-{key}"
            shutil.rmtree(folder, ignore_errors=True)
            _, seconds = _timed([sys.executable, "-m", "merging", "merge", str(recipe), "--out", str(folder),
                                 "--device", where, "--json"], out / f"merge-{label}-{key}.log")
            steps.append({"step": f"merge {label}", "device": where, "wall_s": round(seconds, 2)})
            outputs[key] = folder
        checks.append(_compare_merges(label, outputs["device"], outputs["cpu"], randomised and device != "cpu"))
    summary = {"machine": machine, "interpreter_floor_s": round(floor, 2), "steps": steps, "checks": checks}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = _markdown(summary)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(c["ok"] for c in checks) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device checked against the CPU (cpu: a dry run)")
    parser.add_argument("--zoo", default="lm", help="LM zoo to use (built when missing) unless --models is given")
    parser.add_argument("--models", help="a folder written by --pack: base/ and one folder per expert")
    parser.add_argument("--experts", default="de,es", help="experts to use (and to pack), comma-separated")
    parser.add_argument("--n-fewshot", type=int, default=32, help="few-shot rows per expert (default 32)")
    parser.add_argument("--out", default="/tmp/merge-lab-gpu-check", help="folder for outputs and the summary")
    parser.add_argument("--pack", metavar="DIR", help="copy the zoo's base and --experts into DIR, then stop")
    return parser


# ---- models ---------------------------------------------------------------------------------------------

def _zoo(name: str):
    """The LM zoo ``name`` (built first when missing) and the seconds its build took here (0: reused)."""
    from merging.errors import MergeLabError
    from merging.zoo.zoo import open_zoo

    try:
        return open_zoo(name), 0.0
    except MergeLabError:
        pass
    _, seconds = _timed([sys.executable, "-m", "merging", "zoo", "build", "--name", name], None)
    return open_zoo(name), seconds


def _models(args) -> tuple[dict, float]:
    """{"base": dir, "experts": {name: dir}, "data": {name: few-shot file}} and the build seconds."""
    wanted = [e for e in args.experts.split(",") if e]
    if args.models:
        root = Path(args.models).resolve()
        experts = {e: root / e for e in wanted}
        base, seconds = root / "base", 0.0
    else:
        zoo, seconds = _zoo(args.zoo)
        experts = {e: Path(p) for e, p in zoo.experts.items() if e in wanted}
        base = Path(zoo.base_path)
    missing = [e for e in wanted if e not in experts or not (experts[e] / "model.safetensors").is_file()]
    if missing or not (base / "model.safetensors").is_file():
        raise SystemExit(f"models missing: base at {base}, experts {missing}: --pack them first or build the zoo")
    return {"base": base, "experts": experts, "data": {e: p / "fewshot.jsonl" for e, p in experts.items()}}, seconds


def _pack(args) -> int:
    """Copy base and experts (weights, configs, tokenizer, few-shot file) into ``args.pack``."""
    zoo, _ = _zoo(args.zoo)
    target = Path(args.pack).resolve()
    sources = {"base": Path(zoo.base_path)}
    sources.update({e: Path(p) for e, p in zoo.experts.items() if e in args.experts.split(",")})
    for name, source in sources.items():
        folder = target / name
        folder.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if file.is_file() and file.suffix in (".json", ".jsonl", ".safetensors"):
                shutil.copy2(file, folder / file.name)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"packed {', '.join(sources)} into {target} ({size / 1e6:.1f} MB)")
    return 0


def _model_args(models) -> list[str]:
    out = ["--base", str(models["base"])]
    for name, folder in models["experts"].items():
        out += ["--expert", f"{name}={folder}", "--data", f"{name}={models['data'][name]}"]
    return out


# ---- steps ----------------------------------------------------------------------------------------------

def _pair(device: str) -> list[str]:
    return [device, "cpu"] if device != "cpu" else ["cpu", "cpu"]


def _timed(command: list[str], log: Path | None) -> tuple[str, float]:
    """Run ``command`` from the repository root; (stdout, wall seconds). A failure stops the check."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if log is not None:
        log.write_text(f"$ {' '.join(command)}\n{done.stdout}\n{done.stderr}")
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    return done.stdout, seconds


def _importance(models, out: Path, device: str, args, mode: str, level: str, steps: list, checks: list) -> dict:
    """Importance of ``mode`` at ``level`` on the device and the CPU; the files, keyed "device" and "cpu"."""
    files = {}
    for key, where in zip(("device", "cpu"), _pair(device)):
        path = out / f"importance-{mode}-{key}.json"
        _, seconds = _timed([sys.executable, "-m", "merging", "importance", *_model_args(models), "--mode", mode,
                             "--level", level, "--n-fewshot", str(args.n_fewshot), "--device", where,
                             "--out", str(path)], out / f"importance-{mode}-{key}.log")
        inner = sum(sum(t.values()) for t in json.loads(path.read_text())["timings"].values())
        steps.append({"step": f"importance {mode} ({level})", "device": where, "wall_s": round(seconds, 2),
                      "in_process_s": round(inner, 2)})
        files[key] = path
    checks.extend(_compare_importance(mode, files["device"], files["cpu"]))
    return files


def _compare_importance(mode: str, device_file: Path, cpu_file: Path) -> list[dict]:
    from merging.apl.fidelity import spearman

    a, b = json.loads(device_file.read_text()), json.loads(cpu_file.read_text())
    out = []
    for level in ("layer", "module"):
        if level not in a["absolute"]:
            continue
        for index, expert in enumerate(a["experts"]):
            x, y = a["absolute"][level][index], b["absolute"][level][index]
            rho = spearman(x, y)
            scale = max(max(abs(v) for v in y), 1e-30)
            delta = max(abs(p - q) for p, q in zip(x, y)) / scale
            out.append({"check": f"importance {mode} {level} {expert}", "spearman": round(rho, 6),
                        "max_rel_delta": float(f"{delta:.3g}"), "ok": rho >= SPEARMAN_MIN or math.isnan(rho)})
    return out


def _recipes(models, out: Path, gradient_cpu: Path, args) -> dict[str, tuple[Path, bool]]:
    """label → (recipe file, randomised?): APL calibrated from the CPU's gradient importance (random and
    magnitude drops), TIES and DARE-TIES on the same models."""
    import yaml

    recipes = {}
    for drop in ("random", "magnitude"):
        path = out / f"apl-{drop}.yaml"
        _timed([sys.executable, "-m", "merging", "calibrate", *_model_args(models), "--importance", str(gradient_cpu),
                "--drop", drop, "--out", str(path)], out / f"calibrate-{drop}.log")
        recipes[f"apl-{drop}"] = (path, drop == "random")
    template = yaml.safe_load(recipes["apl-random"][0].read_text())
    for method, randomised in (("ties", False), ("dare_ties", True)):
        data = {"merge_lab": template.get("merge_lab", 1), "method": method, "base": template["base"],
                "experts": [{"name": e["name"], "model": e["model"]} for e in template["experts"]],
                "parameters": {"drop_ratio": 0.5}, "seed": 0, "dtype": "float32"}
        path = out / f"{method}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        recipes[method] = (path, randomised)
    return recipes


def _compare_merges(label: str, device_folder: Path, cpu_folder: Path, randomised: bool) -> dict:
    """max |Δ| between the two exports, over every tensor; ``randomised``: masks from two generators."""
    from safetensors.torch import load_file

    worst, differing, total, scale = 0.0, 0, 0, 0.0
    for file in sorted(cpu_folder.rglob("*.safetensors")):
        a, b = load_file(device_folder / file.relative_to(cpu_folder)), load_file(file)
        for name, tensor in b.items():
            x, y = a[name].double(), tensor.double()
            worst = max(worst, float((x - y).abs().max()) if y.numel() else 0.0)
            differing += int((x != y).sum())
            total += y.numel()
            scale = max(scale, float(y.abs().max()) if y.numel() else 0.0)
    record = {"check": f"merge {label}", "max_abs_delta": float(f"{worst:.3g}"), "largest_weight": round(scale, 4),
              "entries_differing": float(f"{differing / max(total, 1):.3g}"), "randomised": randomised}
    record["ok"] = True if randomised else worst <= DETERMINISTIC_ATOL
    if randomised:
        record["note"] = "random drop: the device's generator draws other masks from the same seed (by design)"
    return record


def _markdown(summary: dict) -> str:
    m = summary["machine"]
    lines = [f"# GPU check — {m['device']} ({m['gpu'] or 'no GPU'}) against the CPU",
             "", f"torch {m['torch']}, {m['threads']} CPU threads, load average {m['load_average']:.2f}, experts "
             f"{', '.join(m['experts'])}; model build {m['model_build_seconds']:.1f} s (0: reused); interpreter "
             f"floor (`python -m merging methods`) {summary['interpreter_floor_s']} s per step.", "",
             "| step | device | wall s | in-process s |", "| --- | --- | ---: | ---: |"]
    for step in summary["steps"]:
        lines.append(f"| {step['step']} | {step['device']} | {step['wall_s']} | {step.get('in_process_s', '')} |")
    lines += ["", "| check | result | ok |", "| --- | --- | --- |"]
    for check in summary["checks"]:
        result = ", ".join(f"{k} {v}" for k, v in check.items() if k not in ("check", "ok"))
        lines.append(f"| {check['check']} | {result} | {'yes' if check['ok'] else 'NO'} |")
    if m["device"] == "cpu":
        lines += ["", "Dry run: both sides ran on the CPU, so every comparison must be exact (random drops included)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
