"""Merge-engine speed and streaming-memory measurements (a script, not part of the test suite).

    python benchmarks/bench_merge.py                 # full run (~100M in memory, ~0.5B streamed from disk)
    python benchmarks/bench_merge.py --quick         # smaller models, fewer repeats
    python benchmarks/bench_merge.py --skip-stream   # speed part only
    python benchmarks/bench_merge.py --write         # also rewrite benchmarks/RESULTS-merge.md
    python benchmarks/bench_merge.py --threads 1     # single-threaded torch (steadier on a busy machine)
    python benchmarks/bench_merge.py --skip-speed --skip-stream --vs-mergekit VENV/bin/python   # vs mergekit 0.1.5

Speed: every registered method (``merging.methods.available()``; slerp with 2 experts) merges base +
3 experts of a synthetic BERT-base-like model (random float32, in memory) through
``MergeEngine(cache=False)``, next to two references timed in the same run and interleaved with the
methods, round by round, so that the load from other jobs on the machine hits all of them alike.
Data-aware methods get synthetic inputs of the real shapes in place of what ``prepare`` measures
(built once, outside the timing; the merge time is what is measured): Fisher random positive
diagonals, RegMean one random Gram matrix XᵀX/n per expert and input width, shared by every linear
weight of that width (the solve costs the same as with measured Grams). A data-aware method without
such synthetic inputs here (APL: its calibration table; later ones) is skipped with a printed line.

- ``bandwidth``: base + Σ experts, tensor by tensor, float32 (a pure memory pass);
- ``bandwidth-kept``: the same, keeping every sum as a merge keeps its outputs (each written into fresh
  pages, whose first touch costs about as much as the pass itself here) — for context, no target is read
  against it;
- ``rng``: only the uniforms DARE draws (``kernels.uniforms`` for every tensor of every expert);
- ``torch.rand`` (for context): the same count of uniforms from one global generator.

Figures are medians over the rounds; ratios are taken between medians.

Memory: a streaming export (``export_recipe(..., dtype="float16")``, i.e. ``iter_merged`` +
``ShardWriter``) of base + 2 experts of a synthetic ~0.5B Llama-like model stored as fp16
safetensors in a temp folder under /tmp, run in a fresh child process that samples
/proc/self/status RssAnon every ~10 ms and reports ``ru_maxrss`` (which also counts mmapped
file pages). The temp folder is deleted at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.apl.defaults import FISHER_EXTRAS  # noqa: E402
from merging.engine import MergeEngine, MergeSettings  # noqa: E402
from merging.io.experts import check_homology  # noqa: E402
from merging.io.layout import EMBEDDINGS, ROLE_MERGE  # noqa: E402
from merging.io.sources import ModelSource  # noqa: E402
from merging.methods import (  # noqa: E402
    available,
    get_method,
    kernels,
)
from merging.methods.base import PerTensor  # noqa: E402
from merging.methods.regmean import REGMEAN_GRAMS, REGMEAN_INPUT_AXIS  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS-merge.md")
SEED = 1234
# issue targets: method → (reference, max ratio). DELLA's "≤ 10×" is read against the RNG pass, as DELLA
# draws one uniform per entry as DARE does (the RNG pass alone is 6-8× the bandwidth pass on these machines)
TARGETS = {"task_arithmetic": ("bandwidth", 2.0), "ties": ("bandwidth", 6.0), "magnitude": ("bandwidth", 6.0),
           "dare_linear": ("rng", 1.5), "della": ("rng", 10.0)}
RSS_TARGET_GB = 1.5


# ---- synthetic models -------------------------------------------------------------

def bert_shapes(layers: int = 12, hidden: int = 768, inter: int = 3072, vocab: int = 30522) -> dict:
    """BERT-base names and shapes (≈110M parameters at the defaults)."""
    shapes = {
        "embeddings.word_embeddings.weight": (vocab, hidden),
        "embeddings.position_embeddings.weight": (512, hidden),
        "embeddings.token_type_embeddings.weight": (2, hidden),
        "embeddings.LayerNorm.weight": (hidden,), "embeddings.LayerNorm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + m + ".weight"], shapes[p + m + ".bias"] = (hidden, hidden), (hidden,)
        shapes[p + "attention.output.LayerNorm.weight"] = shapes[p + "attention.output.LayerNorm.bias"] = (hidden,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (inter, hidden), (inter,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (hidden, inter), (hidden,)
        shapes[p + "output.LayerNorm.weight"] = shapes[p + "output.LayerNorm.bias"] = (hidden,)
    shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (hidden, hidden), (hidden,)
    return shapes


def llama_shapes(layers: int = 24, hidden: int = 896, inter: int = 4864, vocab: int = 151936,
                 kv: int = 128) -> dict:
    """Llama names with Qwen2-0.5B-like sizes (≈0.49B parameters at the defaults, tied embeddings)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def llama_config(layers, hidden, inter, vocab, kv) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": kv // 64, "vocab_size": vocab, "tie_word_embeddings": True,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "torch_dtype": "float16"}


def n_params(shapes: dict) -> int:
    return sum(torch.Size(s).numel() for s in shapes.values())


def synthetic_state(shapes: dict, model: int, dtype=torch.float32) -> dict:
    """Model 0 is the base; model i > 0 is the base plus seeded noise (a fake fine-tune)."""
    out = {}
    for index, (name, shape) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(10_000 + index)
        tensor = torch.randn(shape, generator=g).mul_(0.02)
        if model:
            g.manual_seed(1_000_000 * model + index)
            tensor.add_(torch.randn(shape, generator=g), alpha=0.002)
        out[name] = tensor.to(dtype)
    return out


# ---- speed ------------------------------------------------------------------------

def bandwidth_pass(base: dict, experts: list[dict]) -> None:
    for name, tensor in base.items():
        out = tensor + experts[0][name]
        for expert in experts[1:]:
            out.add_(expert[name])


def kept_bandwidth_pass(base: dict, experts: list[dict]) -> int:
    """The bandwidth pass keeping every sum, as a merge keeps its outputs: each lands in fresh pages (the plain
    pass reuses the memory its previous sum freed), which is the part of a merge's time no kernel removes."""
    kept = {}
    for name, tensor in base.items():
        out = tensor + experts[0][name]
        for expert in experts[1:]:
            out.add_(expert[name])
        kept[name] = out
    return len(kept)


def rng_pass(shapes: dict, expert_names: list[str]) -> None:
    for expert in expert_names:
        for name, shape in shapes.items():
            numel = torch.Size(shape).numel()
            kernels.uniforms(SEED, expert, name, numel)


def raw_rand_pass(shapes: dict, expert_names: list[str]) -> None:
    for _ in expert_names:
        for shape in shapes.values():
            torch.rand(torch.Size(shape).numel())


def synthetic_extras(method: str, expert_set) -> dict | None:
    """Inputs of the shapes a data-aware method's ``prepare`` returns, random (seeded), or None where this
    benchmark has none for ``method``."""
    gen = torch.Generator().manual_seed(SEED)
    layout = expert_set.layout
    merged = [n for n, i in layout.tensors.items() if i.role == ROLE_MERGE]
    if method == "fisher":
        values = {n: {e: torch.rand(layout[n].shape, generator=gen) + 1e-3 for e in expert_set.experts}
                  for n in merged}
        return {FISHER_EXTRAS: PerTensor(values, row_axis=0)}
    if method == "regmean":
        grams: dict[str, dict] = {}
        by_width: dict[tuple[str, int], torch.Tensor] = {}
        for name in merged:
            shape = layout[name].shape
            if len(shape) != 2 or layout[name].layer in (EMBEDDINGS,):  # nn.Linear weights [out, in] only
                continue
            for expert in expert_set.experts:
                key = (expert, shape[1])
                if key not in by_width:
                    x = torch.randn(256, shape[1], generator=gen)
                    by_width[key] = x.T @ x / 256
                grams.setdefault(name, {})[expert] = by_width[key]
        axes = {name: torch.tensor(1) for name in grams}
        return {REGMEAN_GRAMS: PerTensor(grams, row_axis=None), REGMEAN_INPUT_AXIS: PerTensor(axes, row_axis=None)}
    return None


def speed(args) -> dict:
    shapes = bert_shapes(layers=4, hidden=512, inter=2048, vocab=30522) if args.quick else bert_shapes()
    count = n_params(shapes)
    print(f"\n== speed: synthetic BERT-like model, {count / 1e6:.1f}M parameters, base + 3 experts, float32 ==")
    t0 = time.perf_counter()
    base = synthetic_state(shapes, 0)
    experts = {f"e{i}": synthetic_state(shapes, i) for i in (1, 2, 3)}
    print(f"   (built in {time.perf_counter() - t0:.1f}s; torch threads {torch.get_num_threads()})")
    base_src = ModelSource.from_state_dict("base", base)
    set3 = check_homology(base_src, {n: ModelSource.from_state_dict(n, sd) for n, sd in experts.items()})
    set2 = check_homology(base_src, {n: ModelSource.from_state_dict(n, experts[n]) for n in ("e1", "e2")})
    methods = list(available())
    if args.methods:
        methods = [m for m in methods if m in args.methods.split(",")]
    extras: dict[str, dict] = {}
    for method in list(methods):
        if get_method(method).prepare is None:
            continue
        made = synthetic_extras(method, set3)
        if made is None:
            print(f"   (skipping {method}: data-aware, no synthetic inputs for it in this benchmark)")
            methods.remove(method)
        else:
            extras[method] = made
    expert_list = list(experts.values())

    def run_method(method):
        expert_set = set2 if get_method(method).max_experts == 2 else set3
        settings = MergeSettings.build(expert_set, method, {}, None, SEED, extras=extras.get(method))
        result = MergeEngine(expert_set, cache=False).merge(settings)
        assert len(result.tensors) == len(shapes)
        del result

    jobs = {"bandwidth": lambda: bandwidth_pass(base, expert_list),
            "bandwidth-kept": lambda: kept_bandwidth_pass(base, expert_list),
            "rng": lambda: rng_pass(shapes, list(experts)),
            "torch.rand": lambda: raw_rand_pass(shapes, list(experts))}
    jobs.update({m: (lambda m=m: run_method(m)) for m in methods})
    times: dict[str, list[float]] = {k: [] for k in jobs}
    slow_cap = args.slow_cap
    for round_index in range(args.repeats):
        for key, job in jobs.items():
            if round_index and times[key] and min(times[key]) > slow_cap and len(times[key]) >= 2:
                continue  # very slow method: two rounds are enough to stay within the time budget
            gc.collect()
            t = time.perf_counter()
            job()
            times[key].append(time.perf_counter() - t)
            print(f"     {key} {times[key][-1]:.2f}s (1-min load {os.getloadavg()[0]:.1f})", flush=True)
        print(f"   round {round_index + 1}/{args.repeats}: " +
              ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if len(v) == round_index + 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for key in jobs:
        ref = TARGETS.get(key, ("rng" if key in ("dare_linear", "dare_ties") else "bandwidth", None))[0]
        target = TARGETS.get(key, (None, None))[1]
        ratio_bw = med[key] / med["bandwidth"]
        ratio_rng = med[key] / med["rng"]
        ratio = med[key] / med[ref]
        ok = "" if target is None else ("yes" if ratio <= target else "NO")
        rows.append(dict(name=key, median=med[key], runs=len(times[key]), spread=(min(times[key]), max(times[key])),
                         ratio_bw=ratio_bw, ratio_rng=ratio_rng, ref=ref, target=target, ok=ok))
    print(f"\n   {'':16s} {'median s':>9s} {'min..max s':>13s} {'runs':>4s} {'÷bandwidth':>10s} {'÷rng':>7s}  target")
    for r in rows:
        tgt = f"≤ {r['target']}× {r['ref']}: {r['ok']}" if r["target"] else ""
        print(f"   {r['name']:16s} {r['median']:9.3f} {r['spread'][0]:6.2f}..{r['spread'][1]:<6.2f} {r['runs']:4d} "
              f"{r['ratio_bw']:10.2f} {r['ratio_rng']:7.2f}  {tgt}")
    jobs.clear()  # the closures hold the models: dropping them frees the memory for the next measurement
    gc.collect()
    return {"params": count, "rows": rows, "repeats": args.repeats}


# ---- streaming memory ---------------------------------------------------------------

def write_checkpoints(root: Path, quick: bool) -> tuple[int, float]:
    from safetensors.torch import save_file

    dims = dict(layers=6, hidden=512, inter=1408, vocab=65536, kv=128) if quick else \
        dict(layers=24, hidden=896, inter=4864, vocab=151936, kv=128)
    shapes = llama_shapes(**dims)
    config = llama_config(**dims)
    t = time.perf_counter()
    for model, folder in enumerate(("base", "expert_a", "expert_b")):
        path = root / folder
        path.mkdir(parents=True)
        state = synthetic_state(shapes, model, torch.float16)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config))
        del state
        gc.collect()
    return n_params(shapes), time.perf_counter() - t


def stream_child(root: str, method: str) -> None:
    """Runs in a fresh process: export base + 2 experts from ``root``, report memory as JSON on stdout."""
    from merging.io.export import export_recipe
    from merging.io.recipe import ExpertRef, Recipe

    def rss_anon() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    root_path = Path(root)
    start_anon = rss_anon()
    peak = {"anon": start_anon}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], rss_anon())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    recipe = Recipe(method=method, base=str(root_path / "base"),
                    experts=[ExpertRef("a", str(root_path / "expert_a")), ExpertRef("b", str(root_path / "expert_b"))],
                    parameters={}, seed=SEED, dtype="float16")
    t = time.perf_counter()
    report = export_recipe(recipe, root_path / f"out_{method}", dtype="float16")
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    peak["anon"] = max(peak["anon"], rss_anon())
    out_bytes = sum(f.stat().st_size for f in report.files if f.suffix == ".safetensors")
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss_anon": peak["anon"], "start_rss_anon": start_anon,
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "out_bytes": out_bytes, "files": len(report.files)}))


def stream(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench_merge_", dir="/tmp"))
    try:
        count, build_s = write_checkpoints(root, args.quick)
        size = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
        print(f"\n== streaming export: synthetic Llama-like model, {count / 1e6:.0f}M parameters, fp16 on disk "
              f"({size / 1e9:.2f} GB for 3 checkpoints, written in {build_s:.0f}s), base + 2 experts ==")
        results = []
        for method in args.stream_methods.split(","):
            proc = subprocess.run([sys.executable, __file__, "--stream-child", str(root), method],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stdout, proc.stderr)
                raise SystemExit(f"streaming child failed for {method}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["ok"] = "yes" if r["peak_rss_anon"] <= RSS_TARGET_GB * 1e9 else "NO"
            results.append(r)
            print(f"   {method:16s} {r['seconds']:6.1f}s  peak RssAnon {r['peak_rss_anon'] / 1e9:.2f} GB "
                  f"(at start {r['start_rss_anon'] / 1e9:.2f})  ru_maxrss {r['ru_maxrss'] / 1e9:.2f} GB  "
                  f"output {r['out_bytes'] / 1e9:.2f} GB  target ≤ {RSS_TARGET_GB} GB: {r['ok']}")
            shutil.rmtree(root / f"out_{method}", ignore_errors=True)
        return {"params": count, "disk_bytes": size, "results": results}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- report -----------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{cpu}, {os.cpu_count()} cores visible (shared with other jobs), {mem:.0f} GiB RAM; "
            f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def write_results(args, sp: dict | None, st: dict | None) -> None:
    lines = ["# Merge engine: speed and streaming memory", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `python benchmarks/bench_merge.py"
             f"{' --quick' if args.quick else ''} --write` on {machine()}.", "",
             "The machine's cores are shared with other jobs, so absolute times swing several-fold between runs; "
             "the ratios compare figures measured in the same run, interleaved round by round. "
             f"torch threads: {torch.get_num_threads()}; 1-minute load average {args.load[0]:.1f} at the start, "
             f"{args.load[1]:.1f} at the end.", ""]
    if sp:
        lines += [f"## Speed: base + 3 experts, {sp['params'] / 1e6:.1f}M-parameter BERT-like model, float32, in memory",
                  "", f"`MergeEngine(cache=False).merge`, method defaults, seed {SEED}; median of up to "
                  f"{sp['repeats']} runs (very slow methods: 2). References: **bandwidth** = base + Σ experts "
                  "tensor by tensor; **bandwidth-kept** = the same keeping every sum, as a merge keeps its outputs "
                  "(context only); **rng** = `kernels.uniforms` for every tensor of every expert (what DARE draws); "
                  "**torch.rand** = the same count of uniforms from the global generator (context only).", "",
                  "| job | median s | min–max s | runs | ÷ bandwidth | ÷ rng | target | met |",
                  "|---|---:|---:|---:|---:|---:|---|---|"]
        for r in sp["rows"]:
            tgt = f"≤ {r['target']}× {r['ref']}" if r["target"] else ""
            lines.append(f"| {r['name']} | {r['median']:.3f} | {r['spread'][0]:.2f}–{r['spread'][1]:.2f} | {r['runs']} | "
                         f"{r['ratio_bw']:.2f} | {r['ratio_rng']:.2f} | {tgt} | {r['ok']} |")
        lines.append("")
    if st:
        lines += [f"## Streaming export: base + 2 experts, {st['params'] / 1e6:.0f}M-parameter Llama-like model, "
                  "fp16 safetensors", "",
                  f"`export_recipe(recipe, out, dtype=\"float16\")` from disk ({st['disk_bytes'] / 1e9:.2f} GB of "
                  "inputs), in a fresh process; RssAnon sampled every 10 ms; `ru_maxrss` also counts mmapped file "
                  "pages.", "",
                  "| method | seconds | peak RssAnon GB | ru_maxrss GB | output GB | target ≤ 1.5 GB RssAnon |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in st["results"]:
            lines.append(f"| {r['method']} | {r['seconds']:.1f} | {r['peak_rss_anon'] / 1e9:.2f} | "
                         f"{r['ru_maxrss'] / 1e9:.2f} | {r['out_bytes'] / 1e9:.2f} | {r['ok']} |")
        lines.append("")
    RESULTS.write_text("\n".join(lines))
    print(f"\nwrote {RESULTS}")


def main() -> None:
    from merging.engine import keep_freed_memory

    keep_freed_memory()  # as the CLI's merge does (merging/cli/main.py): the figures are the CLI's
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of the speed part (default 3, quick 2)")
    parser.add_argument("--slow-cap", type=float, default=20.0,
                        help="jobs slower than this many seconds run only 2 rounds")
    parser.add_argument("--methods", default="", help="comma-separated subset of methods for the speed part")
    parser.add_argument("--stream-methods", default="ties,dare_linear", help="methods for the streaming export")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--write", action="store_true", help=f"rewrite {RESULTS.name}")
    parser.add_argument("--vs-mergekit", metavar="PYTHON",
                        help="also run mergekit 0.1.5 from this python (another venv) on the same inputs, disk to "
                             "disk, and print times, ratios, peak RSS and output differences (see vs_mergekit.py)")
    parser.add_argument("--stream-child", nargs=2, metavar=("DIR", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_child:
        stream_child(*args.stream_child)
        return
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load = [os.getloadavg()[0]]
    print(machine(), f"; load average {args.load[0]:.1f}")
    sp = None if args.skip_speed else speed(args)
    st = None if args.skip_stream else stream(args)
    if args.vs_mergekit:
        from vs_mergekit import compare

        compare(args, llama_shapes, llama_config, synthetic_state)
    args.load.append(os.getloadavg()[0])
    print(f"load average (1 min) at start {args.load[0]:.1f}, at end {args.load[1]:.1f}")
    if args.write:
        write_results(args, sp, st)


if __name__ == "__main__":
    main()
