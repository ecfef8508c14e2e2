"""App speed: time from `python app.py` to page served; Merge + Run probe through the API after one per-layer
slider change (first vs last layer); Compute importance (gradient).

    python benchmarks/bench_app.py [--zoo NAME]

Uses the configured zoo (MERGE_LAB_ZOO / --zoo; built on first start if missing). Timings on shared
machines swing 4–6×: compare the printed ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_served(url: str, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", default=os.environ.get("MERGE_LAB_ZOO", "default"))
    parser.add_argument("--class-size", type=int, default=4,
                        help="students running the guided first merge at once (0: skip)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure RSS with and without the cache budget (tests/test_concurrency.py)")
    args = parser.parse_args()
    if args.memory:
        memory_figures()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "MERGE_LAB_ZOO": args.zoo}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_served(url)
        served = time.perf_counter() - start
        print(f"python app.py → page served: {served:.2f} s")
        from gradio_client import Client

        from merging.zoo.zoo import open_zoo

        zoo = open_zoo(args.zoo)
        client = Client(url, verbose=False)
        client.predict(f"zoo:{zoo.name}/base", list(zoo.tasks), "", None, "apl", api_name="/load_experts")
        t = time.perf_counter()
        client.predict(32, "gradient", "restore", "apl", api_name="/compute_importance")
        print(f"Compute importance (gradient, 32 examples, {len(zoo.tasks)} experts): {time.perf_counter() - t:.2f} s")
        client.predict("apl", 0, api_name="/merge")
        client.predict(api_name="/run_probe")  # warm: reference rows cached
        expert = zoo.tasks[0]
        # The first and last transformer layers and the head: the zoo's experts froze the embeddings, so a
        # slider there changes no tensor and would time a no-op.
        depth = json.loads((Path(zoo.base_path) / "config.json").read_text())["num_hidden_layers"]
        layers = ["0", str(depth - 1), "head"]
        results = {}
        for layer in layers:
            client.predict(expert, layer, "drop_ratio", 0.7, "apl", api_name="/set_layer")
            t = time.perf_counter()
            client.predict("apl", 0, api_name="/merge")
            merged = time.perf_counter() - t
            t = time.perf_counter()
            client.predict(api_name="/run_probe")
            probed = time.perf_counter() - t
            results[layer] = (merged, probed)
            print(f"slider at layer {layer}: Merge {merged:.2f} s, Run probe {probed:.2f} s")
        first, last = sum(results[layers[0]]), sum(results[layers[1]])
        print(f"Merge + Run probe, change in layer {layers[1]} / change in layer 0: {last / max(first, 1e-9):.2f}")
        if args.class_size:
            guided_class(url, zoo, args.class_size)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


def guided_class(url: str, zoo, students: int) -> None:
    """N sessions press Load → Compute importance → Merge → Run probe with the same settings, at once: the
    first computes, the rest wait in the queue and are served from the content-hash caches."""
    import threading

    from gradio_client import Client

    times: dict[int, float] = {}

    def student(i: int) -> None:
        client = Client(url, verbose=False)
        t = time.perf_counter()
        client.predict(f"zoo:{zoo.name}/base", list(zoo.tasks), "", None, "apl", api_name="/load_experts")
        client.predict(32, "gradient", "restore", "apl", api_name="/compute_importance")
        client.predict("apl", 0, api_name="/merge")
        client.predict(api_name="/run_probe")
        times[i] = time.perf_counter() - t

    threads = [threading.Thread(target=student, args=(i,)) for i in range(students)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    total = time.perf_counter() - t
    ordered = sorted(times.values())
    print(f"guided first merge, {students} students at once: all done in {total:.1f} s; per student "
          f"{ordered[0]:.1f}–{ordered[-1]:.1f} s (one computes, the rest hit the caches; the server was warm)")


def memory_figures() -> None:
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from test_concurrency import run_memory_probe

    for label, budget in (("64 MB budget", 64 * 1024**2), ("no budget (10 GB)", 10 * 1024**3)):
        with tempfile.TemporaryDirectory() as tmp:
            f = run_memory_probe(budget, 8, Path(tmp))
        print(f"8 selections of {f['model_bytes'] / 1e6:.0f} MB models, {label}: cache "
              f"{max(f['cache_bytes']) / 1e6:.0f} MB max, RSS growth peak {(f['peak'] - f['warm']) / 1e6:.0f} MB, "
              f"settled {(f['final'] - f['warm']) / 1e6:.0f} MB, evictions {f['evictions']}")


if __name__ == "__main__":
    sys.exit(main())
