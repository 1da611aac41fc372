"""`make demo [CATALOG=DIR]`: build (if needed), start a real Triton server, query it, measure,
stop.

    python -m serving.demo                       # the synthetic world (model_repository/)
    python -m serving.demo --catalog DIR         # your catalog, or a MovieLens directory
                                                 #   (built into build/catalogs/<DIR>/)

The sample requests use the catalog's own features: its most common values, a value that
needs quoting when the catalog has one, a NOT, two features combined, and task weights that
rank by the last task only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from rich.console import Console

from builder.build import ROOT, TEMPLATE, catalog_build_dir, is_built, served_tasks
from client import Retriever
from client.__main__ import load_titles, print_results
from client.catalog import DEFAULT_ITEMS_CSV, load_items
from filtering.spelling import spell_value
from loadtest.workload import read_users
from serving.launcher import ServerConfig, TritonServer

console = Console()

# (filter, task weights or None, label); the synthetic world's are hand-picked
SYNTHETIC_SAMPLES = [
    ("", None, "no filter"),
    ("category:comedy AND NOT language:en", None, "comedy, not English"),
    ("(tags:funny OR tags:live) AND language:es", None, "multi-valued tags, Spanish"),
    ("creator:42", None, "one creator (a rare term)"),
    ("category:music", (0.0, 0.0, 1.0), "music, ranked by share probability only"),
]

Sample = Tuple[str, Optional[Tuple[float, ...]], str]


def catalog_samples(items: dict, tasks: Sequence[str]) -> List[Sample]:
    """Sample requests over the catalog's own features (`items`: load_items, raw values)."""
    def term(name: str, value: str) -> str:
        return f"{name}:{spell_value(value)}"

    counts = {}
    for features in items.values():
        for name, values in features.items():
            counts.setdefault(name, Counter()).update(values)
    names = [n for n, c in counts.items() if c]
    samples: List[Sample] = [("", None, "no filter")]
    if not names:
        return samples
    first = names[0]
    common = [v for v, _ in counts[first].most_common(3)]
    samples.append((term(first, common[0]), None, f"the most common {first}"))
    quoted = next(((n, v) for n in names for v, _ in counts[n].most_common()
                   if spell_value(v) != v), None)
    if quoted:
        samples.append((term(*quoted), None, "a value that needs quotes"))
    if len(common) > 1:
        samples.append((f"{term(first, common[1])} AND NOT {term(first, common[0])}", None,
                        f"one {first} but not another"))
    if len(names) > 1:
        second = names[1]
        top = counts[second].most_common(1)[0][0]
        samples.append((f"({term(first, common[0])} OR {term(first, common[-1])}) AND "
                        f"{term(second, top)}", None, "two features"))
    if len(tasks) > 1:
        weights = tuple(float(i == len(tasks) - 1) for i in range(len(tasks)))
        samples.append((term(first, common[0]), weights,
                        f"{first} {common[0]}, ranked by p({tasks[-1]}) only"))
    return samples


def throughput(url: str, model: str, users: list, filters: Sequence[str], seconds: float = 5.0,
               concurrency: int = 8):
    """Closed-loop load: `concurrency` threads query for `seconds`; returns (qps, latencies)."""
    deadline = time.perf_counter() + seconds

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", type=Path, default=None,
                   help="a catalog directory (docs/catalog.md) or MovieLens directory; "
                        "default: the synthetic world")
    p.add_argument("--seconds", type=float, default=5.0, help="length of the throughput step")
    a = p.parse_args(argv)
    if a.catalog is not None and not a.catalog.is_dir():
        p.error(f"--catalog {a.catalog}: no such directory")
    if a.catalog is None:
        repository, items_csv, build_cmd = TEMPLATE, DEFAULT_ITEMS_CSV, []
        what = "the synthetic world"
    else:
        repository = catalog_build_dir(a.catalog) / "model_repository"
        items_csv = repository.parent / "items.csv"
        build_cmd = ["--catalog", str(a.catalog)]
        what = f"catalog {a.catalog}"
    if not is_built(repository) or not items_csv.exists():
        console.rule(f"[bold]1/4 building the model repository from {what}")
        done = subprocess.run([sys.executable, "-m", "builder", *build_cmd])
        if done.returncode != 0:
            return done.returncode
    else:
        console.rule(f"[bold]1/4 model repository of {what} already built "
                     f"(python -m builder {' '.join(build_cmd)} rebuilds)")
    info = json.loads(items_csv.with_name("build_info.json").read_text())
    console.print(f"catalog: {info['num_items']:,} items -> {items_csv}; repository "
                  f"{repository}")
    users = read_users(items_csv)
    items, titles = load_items(items_csv), load_titles(items_csv)
    tasks = served_tasks(repository)
    samples = SYNTHETIC_SAMPLES if a.catalog is None else catalog_samples(items, tasks)

    console.rule("[bold]2/4 starting tritonserver")
    config = ServerConfig(repository=repository)
    t0 = time.perf_counter()
    with TritonServer(config):
        console.print(f"ready in {time.perf_counter() - t0:.1f} s  (http {config.http_url}, "
                      f"grpc {config.grpc_url}; log {config.log_path})")
        console.rule("[bold]3/4 sample requests to the `retrieval` ensemble")
        user = users[min(7, len(users) - 1)]
        with Retriever(config.http_url) as r:
            shown: List[int] = []  # items recommended to `user`, for the history example
            for filter, weights, label in samples:
                res = r.query(user, filter, 5, weights)
                shown += [int(i) for i in res.item_ids if int(i) not in shown]
                print_results(res, user, filter, items_csv, tasks=tasks, items=items,
                              titles=titles,
                              title=f"{label}: user {user}, filter {filter!r}"
                                    + (f", task weights {weights}" if weights else ""))
            unknown = 12345
            while unknown in set(users):
                unknown += 1
            res = r.query(unknown, samples[1][0] if len(samples) > 1 else "", 3)
            print_results(res, unknown, samples[1][0] if len(samples) > 1 else "", items_csv,
                          tasks=tasks, items=items, titles=titles,
                          title=f"unknown user {unknown} (cold start)")
            # a request may carry the user's recent items (input `history`): the user side
            # pools them instead of the history built from the logs, or the cold start
            history = shown[:3]
            if "history" in r.input_names():
                res = r.query(unknown, "", 5, history=history)
                print_results(res, unknown, "", items_csv, tasks=tasks, items=items,
                              titles=titles,
                              title=f"unknown user {unknown} whose request says they just "
                                    f"engaged with items {history} (input `history`)")
            else:
                console.print("[yellow]this repository was built before request histories "
                              f"(input `history`): rebuild it to try them: python -m builder "
                              f"{' '.join(build_cmd)}[/]")
            bad = (samples[1][0] if len(samples) > 1 else "x:y") + " AND ("
            try:
                r.query(users[0], bad, 5)
            except Exception as e:  # show what a bad request gets
                console.print(f"[yellow]a malformed filter is answered with:[/] {e}")
        console.rule(f"[bold]4/4 throughput (HTTP, 8 concurrent clients, {a.seconds:g} s)")
        qps, lat = throughput(config.http_url, "retrieval", users, [s[0] for s in samples],
                              a.seconds)
        console.print(f"retrieval: [bold]{qps:.1f} requests/s[/], latency p50 "
                      f"{np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms "
                      f"({len(lat)} requests, k=10, the sample filters, on this machine)")
        console.print("stopping tritonserver ...")
    console.print(f"done. Server log: {config.log_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
