"""Soak: a bounded, high-concurrency Locust run of good and bad requests against a server
started with the default (`make serve`) settings and its supervisor, on loopback only.
Measures requests, failures among the good ones, unexpected answers to the bad ones, and the
memory of the server and its stub processes before, during and after (docs/reliability.md).

    .venv/bin/python benchmarks/soak.py                       # 64 users, 3 minutes
    .venv/bin/python benchmarks/soak.py --users 128 --duration 600 --model retrieval

It builds a small repository into runs/soak/ the first time (or serves --repository, whose
items.csv is --items-csv), starts tritonserver on free loopback ports, runs Locust
(benchmarks/soak_locustfile.py, the load test's users plus bad requests) as a subprocess that
stops by itself, and writes runs/soak/result-<model>.json. Exit status 1 when a good request
failed, a bad one got another answer than its error, or the server needed recovering.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.build import BuildConfig, build, is_built  # noqa: E402
from serving.launcher import SHM_DIR, ServerConfig, TritonServer, free_ports  # noqa: E402
from serving.supervisor import Supervisor  # noqa: E402
from world.synthetic import WorldConfig  # noqa: E402

OUT = ROOT / "runs" / "soak"
SOAK_WORLD = WorldConfig(seed=11, num_items=20_000, num_users=4_000, num_creators=800,
                         impressions_per_user=30)



def memory_mb(server: TritonServer) -> Dict[str, float]:
    """RSS of the server process and of its stubs (MiB; shared pages count in each), and the
    size of the stubs' shared-memory regions in /dev/shm."""
    def rss(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/status") as fh:
                line = next(x for x in fh if x.startswith("VmRSS:"))
            return int(line.split()[1]) / 1024
        except (OSError, StopIteration):
            return 0.0

    stubs = [s for group in server.stubs().values() for s in group]
    shm = sum((SHM_DIR / s.shm_region).stat().st_size for s in stubs
              if (SHM_DIR / s.shm_region).exists()) / 2**20
    stub_rss = sum(rss(s.pid) for s in stubs)
    server_rss = rss(server.process.pid)
    return {"server_rss": round(server_rss, 1), "stubs_rss": round(stub_rss, 1),
            "total_rss": round(server_rss + stub_rss, 1), "shm": round(shm, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="unified", help="retrieval or unified")
    p.add_argument("--users", type=int, default=64, help="concurrent Locust users")
    p.add_argument("--duration", type=int, default=180, help="seconds of load")
    p.add_argument("--bad-share", type=float, default=0.25, help="share of bad requests")
    p.add_argument("--protocol", choices=("http", "grpc", "both"), default="both")
    p.add_argument("--repository", type=Path, default=OUT / "model_repository")
    p.add_argument("--items-csv", type=Path, default=OUT / "items.csv")
    a = p.parse_args(argv)

    OUT.mkdir(parents=True, exist_ok=True)
    if not is_built(a.repository):
        print(f"building a {SOAK_WORLD.num_items:,}-item repository in {a.repository} ...")
        build(BuildConfig(world=SOAK_WORLD, repository=a.repository, items_csv=a.items_csv))
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=a.repository, host="127.0.0.1", http_port=http,
                          grpc_port=grpc, metrics_port=metrics, log_path=OUT / "tritonserver.log")
    print(f"soak: {a.users} users for {a.duration} s on {a.model} ({a.protocol}), "
          f"{a.bad_share:.0%} bad requests; model control {config.model_control}")
    server = TritonServer(config).start()
    supervisor = Supervisor(server).start()
    samples: List[dict] = []
    try:
        _warm_up(config, a.model)
        before = memory_mb(server)
        print(f"memory before: {before}")
        stop = threading.Event()
        sampler = threading.Thread(target=_sample, args=(server, samples, stop), daemon=True)
        sampler.start()
        result_path = OUT / f"counts-{a.model}.json"
        result_path.unlink(missing_ok=True)
        users = {"http": ["SoakHttpUser"], "grpc": ["SoakGrpcUser"],
                 "both": ["SoakHttpUser", "SoakGrpcUser"]}[a.protocol]
        command = [sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" /
                                                              "soak_locustfile.py"), *users,
                   "--headless", "--only-summary", "-u", str(a.users), "-r", str(a.users),
                   "-t", f"{a.duration}s", "--stop-timeout", "10",
                   "--host", f"http://{config.http_url}", "--triton-grpc-url", config.grpc_url,
                   "--triton-metrics-url", f"http://127.0.0.1:{metrics}/metrics",
                   "--triton-model", a.model, "--triton-items-csv", str(a.items_csv),
                   "--soak-bad-share", str(a.bad_share), "--soak-json", str(result_path),
                   "--csv", str(OUT / f"locust-{a.model}")]
        t0 = time.monotonic()
        # bounded twice: Locust's own run time, and a hard limit on the subprocess
        locust = subprocess.run(command, cwd=ROOT, timeout=a.duration + 120,
                                capture_output=True, text=True)
        wall = time.monotonic() - t0
        stop.set()
        sampler.join()
        time.sleep(5)  # let the last batches finish and the allocators settle
        after = memory_mb(server)
        print(f"memory after:  {after}")
    finally:
        supervisor.stop()
        server.stop()
    summary = [line for line in locust.stdout.splitlines() + locust.stderr.splitlines()
               if line.startswith("summary:")]
    if not result_path.exists():
        print(locust.stdout[-3000:], locust.stderr[-3000:])
        return 1
    counts = json.loads(result_path.read_text())
    peak = max((s["total_rss"] for s in samples), default=after["total_rss"])
    result = {"model": a.model, "users": a.users, "duration_s": a.duration,
              "protocol": a.protocol, "bad_share": a.bad_share, "wall_s": round(wall, 1),
              **counts, "memory_before_mb": before, "memory_after_mb": after,
              "peak_total_rss_mb": peak, "memory_samples": samples,
              "recoveries": [vars(e) for e in supervisor.events],
              "locust_summary": summary, "locust_exit": locust.returncode}
    path = OUT / f"result-{a.model}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"good: {counts['good_requests']} requests, {counts['good_failures']} failed; "
          f"bad: {counts['bad_requests']} requests, {counts['bad_unexpected']} answered "
          f"unexpectedly; {counts['requests_per_s']:.1f} req/s, p99 {counts['p99_ms']:.0f} ms")
    print(f"memory (MiB) before {before['total_rss']}, peak {peak}, after "
          f"{after['total_rss']} (shm {before['shm']} -> {after['shm']}); "
          f"recoveries: {len(supervisor.events)}; details in {path}")
    if counts["errors"]:
        print("errors:", json.dumps(counts["errors"], indent=1))
    ok = not counts["good_failures"] and not counts["bad_unexpected"] and not supervisor.events
    return 0 if ok else 1


def _warm_up(config: ServerConfig, model: str) -> None:
    from client import Retriever

    with Retriever(config.http_url, "http", model) as r:
        for k in (1, 10, 100):
            r.query(1, "", k)


def _sample(server: TritonServer, samples: List[dict], stop: threading.Event) -> None:
    t0 = time.monotonic()
    while not stop.wait(10):
        samples.append({"t": round(time.monotonic() - t0), **memory_mb(server)})


if __name__ == "__main__":
    sys.exit(main())
