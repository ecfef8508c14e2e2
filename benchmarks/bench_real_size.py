"""Real sizes: a Qwen2-0.5B-shaped base + 2 experts through every CLI step, with time and peak memory each.

    nice -n 19 python benchmarks/bench_real_size.py            # write models, run every step, print the table
    nice -n 19 python benchmarks/bench_real_size.py --write    # also rewrite benchmarks/RESULTS-real-size.md
    python benchmarks/bench_real_size.py --small               # the same pipeline on a tiny model (a smoke run)
    python benchmarks/bench_real_size.py --steps inspect,ties  # only some steps (models written first)
    python benchmarks/bench_real_size.py --root DIR --keep     # keep the models (a rerun reuses them, and
                                                               # --write tables every step recorded in DIR)

Why: a CPU Space has 16 GB; every step a user runs on a 0.5B model (inspect, gradient importance on a short
few-shot set, calibrate, TIES / DARE-TIES / APL merges exported to disk, the perplexity probe) must fit in
it. Each step is the real command line, ``python -m merging …``, run in a fresh child process, so a step's
peak is its own: the parent samples the child's ``/proc/PID/status`` every ~20 ms (RssAnon: heap and
tensors; RssFile: memory-mapped weight pages, which the kernel can drop under pressure) and reads the
child's ``ru_maxrss`` from ``wait4`` (anonymous + file pages at their highest).

The models: Qwen2Config (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151,936,
tied embeddings) written as bf16 safetensors with config.json. The base is seeded random (σ 0.02, norms
at 1); each expert is the base plus a seeded random delta whose scale differs per layer (so importance
and APL's per-layer drop ratios have something to tell apart). The tokenizer is a byte-level BPE trained
here on the packaged Debian fortunes, its vocabulary padded with never-produced entries to exactly
151,936 ids (so every embedding row has a token, and the model's vocab size is the tokenizer's). Task
data: German and Spanish fortunes, 12 few-shot texts per expert and 8 held out for the probe.
Nothing comes from a hub.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import machine  # noqa: E402  (one machine line for every benchmark)

RESULTS = Path(__file__).with_name("RESULTS-real-size.md")
SEED = 1234
BUDGET_GB = 16.0
N_FEWSHOT, N_PROBE, MAX_LENGTH = 12, 8, 48
TASKS = ("de", "es")
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=4096)
#: the line in RESULTS-real-size.md after which the notes (written by hand) start; --write keeps them
NOTES = "<!-- notes: kept by --write -->"
STEPS = ("inspect", "importance", "calibrate", "ties", "dare_ties", "apl", "probe")


# ---- models ------------------------------------------------------------------------

def qwen2_config(dims: dict) -> dict:
    """A Qwen2ForCausalLM config.json (built by transformers' own Qwen2Config, so every default is its)."""
    from transformers import Qwen2Config

    config = Qwen2Config(**dims, tie_word_embeddings=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.architectures = ["Qwen2ForCausalLM"]
    data = config.to_dict()
    data["torch_dtype"] = "bfloat16"
    return data


def qwen2_shapes(dims: dict) -> dict[str, tuple[int, ...]]:
    """Qwen2's tensor names and shapes (q/k/v carry biases; the LM head is tied to the embeddings)."""
    hidden, inter = dims["hidden_size"], dims["intermediate_size"]
    kv = dims["num_key_value_heads"] * hidden // dims["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (dims["vocab_size"], hidden)}
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter)})
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def _layer_scale(name: str, expert: int) -> float:
    """The expert's delta scale for a tensor: seeded per (expert, layer), 0.2 … 2 × 0.002."""
    layer = int(name.split(".")[2]) + 1 if ".layers." in name else 0  # embeddings and final norm: row 0
    g = torch.Generator().manual_seed(7_919 * expert + layer)
    return 0.002 * (0.2 + 1.8 * float(torch.rand((), generator=g)))


def model_state(shapes: dict, expert: int) -> dict[str, torch.Tensor]:
    """The base (expert 0) or an expert: seeded tensors, made bf16 one at a time (no float32 copy of the model)."""
    out = {}
    for index, (name, shape) in enumerate(shapes.items()):
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        elif name.endswith(".bias"):
            tensor = torch.zeros(shape)
        else:
            tensor = torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + index)).mul_(0.02)
        if expert:
            g = torch.Generator().manual_seed(1_000_003 * expert + index)
            tensor.add_(torch.randn(shape, generator=g), alpha=_layer_scale(name, expert))
        out[name] = tensor.to(torch.bfloat16)
        del tensor
    return out


def padded_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on ``texts`` (BOS before each text), its vocabulary padded with entries no merge
    produces up to exactly ``vocab_size`` ids — as large as the model's embedding, with no hub download."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from merging.zoo.lm_zoo import train_tokenizer

    trained = train_tokenizer(texts, min(vocab_size, 4096))
    data = json.loads(trained.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    next_id = 0
    while len(taken) < vocab_size:
        while next_id in taken:
            next_id += 1
        vocab[f"<unused_{next_id}>"] = next_id
        taken.add(next_id)
    core = Tokenizer.from_str(json.dumps(data))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def task_texts() -> dict[str, list[str]]:
    """Per task, N_FEWSHOT + N_PROBE fortunes (seeded), plus every task's first 2000 for the tokenizer."""
    import random

    from merging.zoo.lm_zoo import lm_zoo_spec, read_texts

    spec = lm_zoo_spec("lm")
    out = {}
    for task in TASKS:
        items = read_texts(spec, task)
        random.Random(SEED).shuffle(items)
        out[task] = items[:2000]
    return out


def write_models(root: Path, dims: dict) -> dict:
    """base/, de/, es/ (bf16 safetensors, config, tokenizer) and data/TASK.jsonl; skipped when already there."""
    from safetensors.torch import save_file

    marker = root / "written.json"
    if marker.is_file() and json.loads(marker.read_text())["dims"] == dims:
        return json.loads(marker.read_text())
    clock = time.perf_counter()
    texts = task_texts()
    tokenizer = padded_tokenizer([t for rows in texts.values() for t in rows], dims["vocab_size"])
    if len(tokenizer) != dims["vocab_size"]:
        raise SystemExit(f"tokenizer has {len(tokenizer)} ids, the model {dims['vocab_size']}")
    shapes, config = qwen2_shapes(dims), qwen2_config(dims)
    for expert, folder in enumerate(("base", *TASKS)):
        path = root / folder
        path.mkdir(parents=True, exist_ok=True)
        state = model_state(shapes, expert)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        del state
        (path / "config.json").write_text(json.dumps(config, indent=1))
        tokenizer.save_pretrained(str(path))
    (root / "data").mkdir(exist_ok=True)
    for task, rows in texts.items():
        with open(root / "data" / f"{task}.jsonl", "w", encoding="utf-8") as fh:
            for text in rows[:N_FEWSHOT + N_PROBE]:
                fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    info = {"dims": dims, "params": sum(torch.Size(s).numel() for s in shapes.values()),
            "disk_bytes": sum(f.stat().st_size for f in root.rglob("model.safetensors")),
            "seconds": round(time.perf_counter() - clock, 1)}
    marker.write_text(json.dumps(info))
    return info


def write_recipes(root: Path) -> None:
    """ties.yaml and dare_ties.yaml: the declared defaults, bf16 output (APL's comes from calibrate)."""
    from merging.io.recipe import ExpertRef, Recipe

    for method in ("ties", "dare_ties"):
        Recipe(method=method, base=str(root / "base"),
               experts=[ExpertRef(t, str(root / t)) for t in TASKS], parameters={}, seed=SEED,
               dtype="bfloat16").save(root / f"{method}.yaml")


# ---- steps ---------------------------------------------------------------------------

def step_commands(root: Path) -> dict[str, list[str]]:
    """Each step's command line (what a user types), base and experts given as folders."""
    models = ["--base", str(root / "base")] + [a for t in TASKS for a in ("--expert", f"{t}={root / t}")]
    data = [a for t in TASKS for a in ("--data", f"{t}={root / 'data' / f'{t}.jsonl'}")]
    few = ["--n-fewshot", str(N_FEWSHOT), "--seed", "0"]
    out = root / "out"
    return {
        "inspect": ["inspect", str(root / "base"), *(str(root / t) for t in TASKS), "--json"],
        "importance": ["importance", *models, *data, *few, "--mode", "gradient", "--level", "all",
                       "--max-length", str(MAX_LENGTH), "--out", str(root / "importance.json"), "--json"],
        "calibrate": ["calibrate", *models, *data, "--importance", str(root / "importance.json"),
                      "--drop-ratio", "0.7", "--out", str(root / "apl.yaml"), "--json"],
        "ties": ["merge", str(root / "ties.yaml"), "--out", str(out / "ties"), "--force"],
        "dare_ties": ["merge", str(root / "dare_ties.yaml"), "--out", str(out / "dare_ties"), "--force"],
        "apl": ["merge", str(root / "apl.yaml"), "--dtype", "bfloat16", "--out", str(out / "apl"), "--force"],
        "probe": ["probe", *models, *data, *few, "--recipe", str(root / "apl.yaml"), "--label", "apl",
                  "--max-length", str(MAX_LENGTH), "--json"],
    }


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmRSS"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def run_step(name: str, argv: list[str], env: dict, log: Path) -> dict:
    """Run one CLI step in a fresh child; its wall time, peak RssAnon / RssFile (sampled) and ru_maxrss."""
    with open(log, "w") as out:
        clock = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "merging", *argv], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                for key, value in _status(proc.pid).items():
                    peak[key] = max(peak[key], value)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - clock
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"step {name} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return {"step": name, "seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "ru_maxrss": usage.ru_maxrss * 1024, "anon": peak["RssAnon"],
            "file": peak["RssFile"], "command": "python -m merging " + " ".join(argv)}


def probe_summary(log: Path) -> str:
    """Mean perplexity per row of the probe's JSON report (its last JSON object in the log)."""
    text = log.read_text()
    report = json.loads(text[text.index("{"):])
    return ", ".join(f"{r['name']} " + "/".join(f"{m['perplexity']:.0f}" for m in r["metrics"].values())
                     for r in report["rows"])


# ---- report ----------------------------------------------------------------------------

def table(results: list[dict]) -> list[str]:
    lines = ["| step | wall (s) | CPU (s) | load | peak RssAnon (GB) | peak RssFile (GB) | ru_maxrss (GB) | ≤ 16 GB |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ok = "yes" if r["ru_maxrss"] <= BUDGET_GB * 1e9 else "NO"
        cpu = "–" if r.get("cpu") is None or math.isnan(r["cpu"]) else f"{r['cpu']:.1f}"  # – : not recorded
        lines.append(f"| {r['step']} | {r['seconds']:.1f} | {cpu} | {r['load']:.1f} | {r['anon'] / 1e9:.2f} | {r['file'] / 1e9:.2f} | "
                     f"{r['ru_maxrss'] / 1e9:.2f} | {ok} |")
    return lines


def write_results(info: dict, results: list[dict], probe: str, args) -> None:
    lines = ["# Real sizes: a Qwen2-0.5B-shaped model, step by step on CPU", "",
             "Written by `nice -n 19 python benchmarks/bench_real_size.py --write` (see its docstring for how the "
             "models are made and measured). Every step is the command line, in a fresh process.", "",
             f"- Machine: {machine()}",
             "- Load: the 1-minute load average as each step ended is in the table (a shared machine); every step "
             "ran under `nice -n 19`",
             f"- Model: Qwen2 shape {info['dims']}, tied embeddings, {info['params'] / 1e6:.0f}M parameters, bf16 "
             f"safetensors; base + 2 experts = {info['disk_bytes'] / 1e9:.2f} GB on disk",
             f"- Task data: {N_FEWSHOT} few-shot texts per expert (gradient importance, all levels), {N_PROBE} held out "
             f"for the probe, {MAX_LENGTH} tokens each", "",
             *table(results), "",
             "RssAnon is the process's own memory (tensors, heap); RssFile the memory-mapped weight pages it touched, "
             "which are page cache the kernel drops under pressure; ru_maxrss is their peak sum as the kernel saw it. "
             "CPU is the child's user + system time (all its threads): on a shared machine wall time is mostly "
             "waiting for a core; load is the 1-minute load average when the step ended.",
             "", f"Probe (perplexity per task, de/es; random weights, so about the vocabulary size — the probe is timed, "
             f"not judged): {probe}", "", "Commands (ROOT is the models' folder):", ""]
    lines += [f"- {r['step']}: `{r['command'].replace(str(args.root_path), 'ROOT')}`" for r in results]
    kept = RESULTS.read_text(encoding="utf-8").partition(NOTES)[2] if RESULTS.is_file() else "\n"
    RESULTS.write_text("\n".join(lines) + "\n\n" + NOTES + kept, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny Qwen2 (a smoke run of the same pipeline)")
    parser.add_argument("--root", help="models' folder (default: a temporary folder under /tmp, deleted at the end)")
    parser.add_argument("--keep", action="store_true", help="keep --root's models for a rerun")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--write", action="store_true", help="rewrite benchmarks/RESULTS-real-size.md")
    args = parser.parse_args()
    steps = [s for s in args.steps.split(",") if s]  # --steps "": no step, the table of those recorded
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}: choose from {', '.join(STEPS)}")
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench_real_size_", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    args.root_path = root
    env = {**os.environ, "MERGE_LAB_CACHE": str(root / "cache"), "PYTHONPATH": str(ROOT)}
    try:
        info = write_models(root, SMALL if args.small else QWEN2_05B)
        write_recipes(root)
        print(f"== {info['params'] / 1e6:.0f}M-parameter Qwen2 shape, base + 2 experts, "
              f"{info['disk_bytes'] / 1e9:.2f} GB bf16 on disk (written in {info['seconds']}s) ==", flush=True)
        commands, record = step_commands(root), root / "results.json"
        done = json.loads(record.read_text()) if record.is_file() else {}  # earlier runs' steps (--steps)
        for name in steps:
            log = root / f"{name}.log"
            result = run_step(name, commands[name], env, log)
            result["load"] = os.getloadavg()[0]
            if name == "probe":
                result["perplexity"] = probe_summary(log)
                print(f"   probe perplexity: {result['perplexity']}", flush=True)
            done[name] = result
            record.write_text(json.dumps(done, indent=1))
            print(table([result])[-1], flush=True)
        results = [done[n] for n in STEPS if n in done]
        print("\n".join(table(results)))
        if args.write:
            write_results(info, results, done.get("probe", {}).get("perplexity", "-"), args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
