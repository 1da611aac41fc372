"""The load test: request mixes built from the catalog say what they match, Triton's metrics
are read right, and the Locust file runs headless against a real server with zero failures."""

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from filtering.bits import popcount
from loadtest import metrics
from loadtest.workload import BROAD, KINDS, SELECTIVE, Workload, parse_mix
from serving.runners import RUNNERS

ROOT = Path(__file__).resolve().parents[1]


def test_parse_mix():
    assert parse_mix("mixed") == {k: 1 for k in KINDS}
    assert parse_mix("filtered") == {"broad": 1, "selective": 1, "one_creator": 1}
    assert parse_mix("unfiltered=3, selective=1,broad=0") == {"unfiltered": 3, "selective": 1}
    for bad in ("most", "broad=x", "unfiltered=0", "tiny=1"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_workload_filters_match_what_they_claim(small_build):
    """Every generated filter's match count equals the exact filter stage's, and lies in its
    kind's range."""
    workload = Workload.from_catalog(small_build.config.items_csv, "mixed", 10)
    exact = RUNNERS["filter"](small_build.repository / "filter" / "1")
    n = small_build.world.catalog.num_items
    assert workload.num_items == n
    for kind in KINDS:
        cases = workload.filters[kind]
        assert cases, kind
        bits = exact.run([{"filter": np.array([[c.expression.encode()]], object)}
                          for c in cases])
        for case, b in zip(cases, bits):
            count = int(popcount(torch.from_numpy(b["filter_bits"]))[0])
            assert count == case.matches, case
    assert all(BROAD[0] <= c.matches / n <= BROAD[1] for c in workload.filters["broad"])
    assert all(SELECTIVE[0] <= c.matches / n <= SELECTIVE[1]
               for c in workload.filters["selective"])
    assert all(c.expression.startswith("creator:") for c in workload.filters["one_creator"])
    rng = random.Random(1)
    drawn = [workload.sample(rng) for _ in range(400)]
    assert {r.kind for r in drawn} == set(KINDS)
    assert {r.user_id for r in drawn} <= set(workload.users) and all(r.k == 10 for r in drawn)
    assert workload.evaluation_set(3, seed=5) == workload.evaluation_set(3, seed=5)


EXPOSITION = """\
# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="unified",version="1"} 120
nv_inference_count{model="filter",version="1"} 30
nv_inference_exec_count{model="unified",version="1"} 40
nv_inference_exec_count{model="filter",version="1"} 30
nv_inference_request_success{model="unified",version="1"} 120
nv_cpu_utilization 0.5
"""


def test_metrics_batch_sizes():
    before = metrics.parse(EXPOSITION)
    assert before[("nv_inference_count", "unified")] == 120
    after = metrics.parse(EXPOSITION.replace("} 120", "} 220").replace("} 40", "} 60"))
    # unified: 100 more rows in 20 more executions; filter: no execution in between
    assert metrics.batch_sizes(before, after) == {"unified": 5.0}


MEMBERS = {"retrieval": {"filter", "ann", "scorer", "aggregator"},
           "baseline": {"baseline_filter", "baseline_ann", "scorer", "aggregator"}}


@pytest.mark.server
@pytest.mark.parametrize("model", ["unified", "baseline", "retrieval"])
def test_locust_headless_against_the_server_has_no_failures(server, small_build, model,
                                                            tmp_path):
    c = server.config
    out = tmp_path / model
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
           "HttpTritonUser", "GrpcTritonUser", "--headless", "--only-summary",
           "-u", "4", "-r", "4", "-t", "5s", "--stop-timeout", "10",
           "--host", f"http://{c.http_url}", "--triton-grpc-url", c.grpc_url,
           "--triton-metrics-url", f"http://{c.host}:{c.metrics_port}/metrics",
           "--triton-model", model, "--triton-items-csv", str(small_build.config.items_csv),
           "--csv", str(out), "--triton-summary-json", str(out) + "-summary.json"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(str(out) + "_stats.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    assert {r["Type"] for r in rows if r["Name"] != "Aggregated"} == {"http", "grpc"}
    assert {r["Name"].split(" ", 1)[1] for r in rows if r["Name"] != "Aggregated"} == set(KINDS)
    summary = json.loads(Path(str(out) + "-summary.json").read_text())
    # Locust rewrites the CSV every second: it may miss the last requests, never add any
    assert summary["failures"] == 0 and summary["requests"] >= int(total["Request Count"])
    batched = MEMBERS.get(model, {model})
    assert batched <= set(summary["batch_sizes"]), summary["batch_sizes"]
    # 4 users with one request in flight each: a batch holds 1 to 4 requests
    assert all(1.0 <= summary["batch_sizes"][m] <= 4.0 for m in batched), summary
    assert "summary: " in run.stdout and "req/s" in run.stdout
