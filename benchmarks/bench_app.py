"""App speed: time from `python app.py` to page served; Merge + Run probe through the API after one per-layer
slider change (first vs last layer); Compute importance (gradient).

    python benchmarks/bench_app.py [--zoo NAME]

Uses the configured zoo (MERGE_LAB_ZOO / --zoo; built on first start if missing). Timings on shared
machines swing 4–6×: compare the printed ratios, not the seconds.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
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

        from merging.zoo import open_zoo

        zoo = open_zoo(args.zoo)
        client = Client(url, verbose=False)
        client.predict(f"zoo:{zoo.name}/base", list(zoo.tasks), "", None, "apl", api_name="/load_experts")
        t = time.perf_counter()
        client.predict(32, "gradient", "restore", "apl", api_name="/compute_importance")
        print(f"Compute importance (gradient, 32 examples, {len(zoo.tasks)} experts): {time.perf_counter() - t:.2f} s")
        client.predict("apl", 0, api_name="/merge")
        client.predict(api_name="/run_probe")  # warm: reference rows cached
        expert = zoo.tasks[0]
        layers = ["embeddings", "head"]
        results = {}
        for layer, value in (("embeddings", 0.7), ("head", 0.7)):
            client.predict(expert, layer, "drop_ratio", value, "apl", api_name="/set_layer")
            t = time.perf_counter()
            client.predict("apl", 0, api_name="/merge")
            merged = time.perf_counter() - t
            t = time.perf_counter()
            client.predict(api_name="/run_probe")
            probed = time.perf_counter() - t
            results[layer] = (merged, probed)
            print(f"slider at layer {layer}: Merge {merged:.2f} s, Run probe {probed:.2f} s")
        first, last = (sum(results[k]) for k in layers)
        print(f"ratio first-layer change / last-layer change (Merge + Run probe): {first / max(last, 1e-9):.2f}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
