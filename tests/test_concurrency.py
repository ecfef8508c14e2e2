"""Many users on one public Space: sessions stay isolated under concurrent load, queued users learn their
position, identical work is done once (content-hash caches), closed sessions free their merges, and the
model cache keeps memory within ``MERGE_LAB_CACHE_BYTES`` (peak RSS measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from components import handlers as h
from merging import workbench as wb

ROOT = Path(__file__).resolve().parent.parent


def _perturbed_copy(folder: Path, to: Path, seed: int) -> Path:
    import shutil

    shutil.copytree(folder, to)
    state = load_file(str(to / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if tensor.is_floating_point() and name.startswith("bert.encoder"):
            state[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=g)
    save_file(state, str(to / "model.safetensors"))
    return to


def _configs(zoo, third: Path) -> list[dict]:
    topic, mood = zoo.experts["topic"], zoo.experts["mood"]
    return [
        dict(tasks=["topic", "mood"], extra="", method="dare_linear", params={"drop_ratio": 0.3}, seed=1,
             override=None),
        dict(tasks=["topic", "mood"], extra="", method="task_arithmetic", params={"lambda": 0.7}, seed=0,
             override=("topic", "0", "weight", 0.5)),
        dict(tasks=[], extra=f"t2={topic}\nm2={mood}", method="ties", params={"drop_ratio": 0.6}, seed=3,
             override=None),
        dict(tasks=["mood"], extra=f"third={third}", method="linear", params={}, seed=0,
             override=("third", "1", "weight", 2.0)),
    ]


def _refs(zoo, cfg) -> dict[str, str]:
    refs = {t: f"zoo:{zoo.name}/{t}" for t in cfg["tasks"]}
    refs.update(wb.parse_extra_refs(cfg["extra"]))
    return refs


def _expected(zoo, cfg) -> tuple[list, dict]:
    """What one session alone gets: the merged probe row and the recipe."""
    session = wb.load_experts(wb.Session(), f"zoo:{zoo.name}/base", _refs(zoo, cfg), zoo=zoo)
    if cfg["override"]:
        wb.set_cell(session, *cfg["override"])
    wb.merge(session, cfg["method"], cfg["params"], cfg["seed"])
    headers, rows = wb.run_probe(session).table()
    return rows[-1], session.history[-1]["recipe"]


@pytest.mark.slow  # waits on the served app's queue (3-6 s)
def test_four_concurrent_sessions_get_their_own_results(fake_app_url, app_zoo, tmp_path):
    from gradio_client import Client

    zoo, _ = app_zoo
    third = _perturbed_copy(Path(zoo.experts["topic"]), tmp_path / "third", seed=7)
    configs = _configs(zoo, third)
    expected = [_expected(zoo, cfg) for cfg in configs]
    assert len({json.dumps(e[0][1:]) for e in expected}) == 4, "configs must give distinct results to show cross-talk"
    wb.CACHE.clear()
    wb.RESULTS.clear()
    results: dict[int, object] = {}
    start = threading.Barrier(len(configs))

    def run(i: int, cfg: dict) -> None:
        try:
            client = Client(fake_app_url, verbose=False)
            start.wait(timeout=60)
            client.predict(f"zoo:{zoo.name}/base", cfg["tasks"], cfg["extra"], None, cfg["method"],
                           api_name="/load_experts")
            if cfg["override"]:
                client.predict(*cfg["override"], cfg["method"], api_name="/set_layer")
            row = [cfg["params"].get(n) for n in h.PARAM_NAMES]
            text = client.predict(cfg["method"], cfg["seed"], *row, api_name="/merge")
            table = client.predict(api_name="/run_probe")[0]
            saved = client.predict(api_name="/download_history")
            path = saved[0]["value"] if isinstance(saved[0], dict) else saved[0]
            results[i] = (text, table, json.loads(Path(path).read_text()))
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, cfg)) for i, cfg in enumerate(configs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.perf_counter() - t0
    for i, cfg in enumerate(configs):
        got = results.get(i)
        assert not isinstance(got, Exception) and got is not None, (i, got)
        text, table, history = got
        label = f"#1 {cfg['method']}"
        assert label in text
        merged = table["data"][-1]
        assert merged[0] == label and merged[1:] == pytest.approx(expected[i][0][1:], abs=1e-4), (i, merged)
        recipe = history["merges"][-1]["recipe"]
        assert recipe["method"] == cfg["method"] and recipe["seed"] == cfg["seed"]
        assert [e["name"] for e in recipe["experts"]] == [e["name"] for e in expected[i][1]["experts"]]
        assert recipe["experts"] == expected[i][1]["experts"] and recipe["parameters"] == expected[i][1]["parameters"]
        assert len(history["merges"]) == 1  # no other session's merge leaked into this history
    # the server still answers a fresh request, quickly
    t1 = time.perf_counter()
    out = Client(fake_app_url, verbose=False).predict(f"zoo:{zoo.name}/base", list(zoo.tasks), "", None, "apl",
                                                api_name="/load_experts")
    assert "homology check passed" in out[1]
    print(f"\n4 concurrent sessions: {elapsed:.1f} s; fresh request afterwards {time.perf_counter() - t1:.2f} s")


@pytest.mark.slow  # waits on the served app's queue (3-6 s)
def test_queued_users_see_their_position(fake_app_url, app_zoo, monkeypatch):
    """Heavy events share one concurrency slot; a waiting client is told its rank in the queue (the page shows
    it as 'queue: k/n' because show_progress stays on for heavy events)."""
    from gradio_client import Client
    from gradio_client.utils import Status

    zoo, _ = app_zoo
    assert h.HEAVY["concurrency_limit"] == 1 and h.HEAVY["show_progress"] == "full"
    real_merge = wb.merge

    def slow_merge(*args, **kwargs):
        time.sleep(1.0)  # long enough that the later two jobs wait (polled every 50 ms), short enough to be quick
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(wb, "merge", slow_merge)
    clients = [Client(fake_app_url, verbose=False) for _ in range(3)]
    for c in clients:
        c.predict(f"zoo:{zoo.name}/base", list(zoo.tasks), "", None, "apl", api_name="/load_experts")
    jobs = [c.submit("task_arithmetic", 0, api_name="/merge") for c in clients]
    ranks = set()
    deadline = time.time() + 20
    while time.time() < deadline and not all(j.done() for j in jobs):
        for j in jobs:
            status = j.status()
            if status.code == Status.IN_QUEUE and status.rank is not None:
                ranks.add((status.rank, status.queue_size))
        time.sleep(0.05)
    assert all("#1 task_arithmetic" in j.result() for j in jobs)
    assert ranks, "no client was ever told its place in the queue"


def test_identical_work_is_done_once_across_sessions(app_zoo):
    """A class of 30 pressing the guided buttons: importance, merge and probe computed once, then cache hits."""
    zoo, _ = app_zoo
    wb.RESULTS.clear()
    calls = {"importance": 0}
    import merging.apl.importance as importance

    real = importance.compute_importance

    def counting(*args, **kwargs):
        calls["importance"] += 1
        return real(*args, **kwargs)

    importance.compute_importance = counting
    try:
        merges_before = dict(wb.MERGE_STATS)
        students = []
        for _ in range(3):
            s = wb.load_experts(wb.Session(), *wb.zoo_refs(zoo), zoo=zoo)
            wb.compute_importance(s, n_fewshot=8)
            summary = wb.merge(s, "apl", {"drop_ratio": 0.5})
            wb.run_probe(s)
            students.append((s, summary))
    finally:
        importance.compute_importance = real
    assert calls["importance"] == 1
    assert wb.RESULTS.stats["importance"] == {"hits": 2, "misses": 1}
    assert wb.RESULTS.stats["probe"] == {"hits": 2, "misses": 1}
    assert wb.MERGE_STATS["misses"] - merges_before["misses"] == 1
    assert wb.MERGE_STATS["hits"] - merges_before["hits"] == 2
    assert [s.reused for _, s in students] == [False, True, True]
    assert len({s.merge_key for s, _ in students}) == 1
    # a different setting is a different key: computed, not served stale
    other = students[0][0]
    wb.set_cell(other, other.experts[0], other.layers[1], wb.DROP, 0.9)
    assert not wb.merge(other, "apl", {"drop_ratio": 0.5}).reused


def test_closed_sessions_free_their_merges(app_zoo):
    zoo, _ = app_zoo
    a = wb.load_experts(wb.Session(), *wb.zoo_refs(zoo), zoo=zoo)
    b = wb.load_experts(wb.Session(), *wb.zoo_refs(zoo), zoo=zoo)
    wb.merge(a, "task_arithmetic", {"lambda": 0.31})
    wb.merge(b, "task_arithmetic", {"lambda": 0.31})  # the same merge: shared, owned by both
    wb.merge(b, "task_arithmetic", {"lambda": 0.32})
    models = wb.models_for(a)
    shared_key = a.merge_key
    assert models.owners[shared_key] == {a.id}  # b moved on to its own merge
    h.release_state(a)  # gr.State delete_callback
    assert shared_key not in models.results
    wb.CLIENTS["tab-b"] = b.id
    h.on_unload(type("Request", (), {"session_hash": "tab-b"})())  # demo.unload
    assert b.merge_key not in models.results and "tab-b" not in wb.CLIENTS
    # a session whose merge was freed (or evicted) gets it rebuilt on demand, identical
    body = wb.merged_tensors(b)
    again = wb.load_experts(wb.Session(), *wb.zoo_refs(zoo), zoo=zoo)
    wb.merge(again, "task_arithmetic", {"lambda": 0.32})
    for name, tensor in wb.merged_tensors(again).items():
        assert torch.equal(tensor, body[name]), name


def test_cache_evicts_by_bytes():
    from merging.engine import MergeResult

    cache = wb.ModelCache(max_entries=10, max_bytes=3_000_000)
    for i in range(5):
        item = wb.Models(f"k{i}", None, None)
        shared = torch.zeros(250_000)  # 1 MB, held twice: counted once
        item.results["r"] = MergeResult({"w": shared, "w_view": shared[:10]}, {}, [], [], 0.0)
        assert item.nbytes() == 1_000_000
        cache.put(item)
    assert cache.total_bytes() <= 3_000_000 and len(cache) == 3 and cache.evictions == 2
    assert cache.get("k0") is None and cache.get("k4") is not None


MEMORY_SCRIPT = r'''
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
os.environ["MERGE_LAB_CACHE"] = sys.argv[2]
os.environ["MERGE_LAB_CACHE_BYTES"] = sys.argv[3]
from pathlib import Path
import torch
from transformers import BertConfig, BertModel
from merging import workbench as wb

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

root = Path(sys.argv[2]) / "models"
cfg = BertConfig(vocab_size=16000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024, max_position_embeddings=64)
torch.manual_seed(0)
base = BertModel(cfg)
base.save_pretrained(root / "base")
for i in range(2):
    m = BertModel(cfg)
    m.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    m.save_pretrained(root / f"e{i}")
del base, m
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.01)

def one(k):
    s = wb.load_experts(wb.Session(), str(root / "base"), {f"a{k}": str(root / "e0"), f"b{k}": str(root / "e1")})
    wb.merge(s, "dare_linear", {"drop_ratio": 0.5}, seed=k)
    return s

one(0)
wb._release_freed_memory()
warm = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
sizes = []
for k in range(1, int(sys.argv[4]) + 1):
    one(k)
    sizes.append(wb.CACHE.total_bytes())
stop.set()
thread.join()
import gc
gc.collect()
wb._release_freed_memory()
model_bytes = sum(f.stat().st_size for f in (root / "e0").glob("*.safetensors"))
print(json.dumps({"warm": warm, "peak": peak[0], "final": rss(), "cache_bytes": sizes, "entries": len(wb.CACHE),
                  "evictions": wb.CACHE.evictions, "entry_bytes": wb.CACHE.items()[-1].nbytes(),
                  "model_bytes": model_bytes}))
'''


def run_memory_probe(budget: int, selections: int, tmp: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(ROOT), str(tmp), str(budget), str(selections)],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh interpreter builds ~29 MB models and merges nine times (≈ 25 s on a loaded machine);
# test_cache_evicts_by_bytes keeps the cache's accounting in the fast inner loop
def test_peak_rss_stays_within_the_cache_budget(tmp_path):
    """Eight selections of ~29 MB models, each loaded and merged, with a 64 MB cache budget: the cache estimate
    never exceeds the budget; RSS once the jobs are done grows by at most the budget (+ slack), and the peak
    by at most the budget plus one job's working set (up to six models' worth: the weight scan, the
    task-vector statistics and the merge each stream a model or two, and the RSS sampled includes what the
    worker threads' heaps have freed but not yet returned). Measured peak growth: 208–234 MB in twenty runs
    on a quiet machine, 255 MB once in a CI run (over a five-model bound). Unbounded, the cache alone
    reaches ~235 MB here (see the report in benchmarks/bench_app.py) and the peak grows by ~348 MB, so the
    bound (~277 MB) still fails a cache that ignores its budget; the settled bound fails it by twice."""
    budget = 64 * 1024**2
    figures = run_memory_probe(budget, 8, tmp_path)
    grow, settled = figures["peak"] - figures["warm"], figures["final"] - figures["warm"]
    model = figures["model_bytes"]
    print(f"\nmemory: model {model / 1e6:.0f} MB, entry {figures['entry_bytes'] / 1e6:.0f} MB, cache after each "
          f"selection {[round(b / 1e6) for b in figures['cache_bytes']]} MB, evictions {figures['evictions']}, "
          f"RSS growth: peak {grow / 1e6:.0f} MB, settled {settled / 1e6:.0f} MB (budget {budget / 1e6:.0f} MB)")
    assert max(figures["cache_bytes"]) <= budget
    assert figures["evictions"] >= 6
    assert settled <= budget + 32 * 1024**2, figures
    assert grow <= budget + 6 * model + 32 * 1024**2, figures
