"""`make demo`: build (if needed), start a real Triton server, query it, measure, stop."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from rich.console import Console

from builder.build import ROOT, TEMPLATE, is_built
from client import Retriever
from client.__main__ import print_results
from client.catalog import DEFAULT_ITEMS_CSV
from serving.launcher import ServerConfig, TritonServer

console = Console()

SAMPLES = [
    ("", None, "no filter"),
    ("category:comedy AND NOT language:en", None, "comedy, not English"),
    ("(tags:funny OR tags:live) AND language:es", None, "multi-valued tags, Spanish"),
    ("creator:42", None, "one creator (a rare term)"),
    ("category:music", (0.0, 0.0, 1.0), "music, ranked by share probability only"),
]


def throughput(url: str, model: str, users: list, seconds: float = 5.0, concurrency: int = 8):
    """Closed-loop load: `concurrency` threads query for `seconds`; returns (qps, latencies)."""
    deadline = time.perf_counter() + seconds
    filters = [s[0] for s in SAMPLES]

    def worker(seed: int):
        rng = np.random.default_rng(seed)
        lat = []
        with Retriever(url, "http", model) as r:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                r.query(int(rng.choice(users)), filters[rng.integers(len(filters))], 10)
                lat.append(time.perf_counter() - t)
        return lat

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sum(pool.map(worker, range(concurrency)), [])
    return len(latencies) / (time.perf_counter() - start), np.array(latencies) * 1000


def main() -> int:
    if not is_built(TEMPLATE):
        console.rule("[bold]1/4 building the model repository from a synthetic catalog")
        subprocess.run([sys.executable, "-m", "builder"], check=True)
    else:
        console.rule("[bold]1/4 model repository already built (python -m builder rebuilds)")
    info = json.loads((DEFAULT_ITEMS_CSV.with_name("build_info.json")).read_text())
    console.print(f"catalog: {info['num_items']:,} items -> {DEFAULT_ITEMS_CSV}")
    with open(DEFAULT_ITEMS_CSV.with_name("users.csv")) as fh:
        users = [int(row["user_id"]) for row in csv.DictReader(fh)]

    console.rule("[bold]2/4 starting tritonserver")
    config = ServerConfig()
    t0 = time.perf_counter()
    with TritonServer(config):
        console.print(f"ready in {time.perf_counter() - t0:.1f} s  (http {config.http_url}, "
                      f"grpc {config.grpc_url}; log {config.log_path})")
        console.rule("[bold]3/4 sample requests to the `retrieval` ensemble")
        with Retriever(config.http_url) as r:
            for filter, weights, label in SAMPLES:
                res = r.query(users[7], filter, 5, weights)
                print_results(res, users[7], filter, DEFAULT_ITEMS_CSV,
                              title=f"{label}: user {users[7]}, filter {filter!r}"
                                    + (f", task weights {weights}" if weights else ""))
            unknown = 12345
            res = r.query(unknown, "language:fr", 3)
            print_results(res, unknown, "language:fr", DEFAULT_ITEMS_CSV,
                          title=f"unknown user {unknown} (cold start), filter 'language:fr'")
            try:
                r.query(users[0], "category:comedy AND (language:en", 5)
            except Exception as e:  # show what a bad request gets
                console.print(f"[yellow]a malformed filter is answered with:[/] {e}")
        console.rule("[bold]4/4 throughput (HTTP, 8 concurrent clients, 5 s)")
        qps, lat = throughput(config.http_url, "retrieval", users)
        console.print(f"retrieval: [bold]{qps:.1f} requests/s[/], latency p50 "
                      f"{np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms "
                      f"({len(lat)} requests, k=10, mixed filters, on this machine)")
        console.print("stopping tritonserver ...")
    console.print(f"done. Server log: {config.log_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
