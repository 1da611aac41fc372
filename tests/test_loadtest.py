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
from loadtest.workload import BROAD, KINDS, SELECTIVE, Workload, parse_history_sizes, parse_mix
from serving.runners import RUNNERS
from stages.history import MAX_HISTORY

ROOT = Path(__file__).resolve().parents[1]


def test_parse_mix():
    assert parse_mix("mixed") == {k: 1 for k in KINDS}
    assert parse_mix("filtered") == {"broad": 1, "selective": 1, "one_creator": 1}
    assert parse_mix("unfiltered=3, selective=1,broad=0") == {"unfiltered": 3, "selective": 1}
    for bad in ("most", "broad=x", "unfiltered=0", "tiny=1"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_parse_history_sizes():
    """benchmarks/serving.py --history: one size (as before) or several, each 0..MAX_HISTORY
    (the server refuses longer histories), in the order given, none twice."""
    assert parse_history_sizes("0,100", MAX_HISTORY) == [0, 100]
    assert parse_history_sizes("20", MAX_HISTORY) == [20]
    assert parse_history_sizes(" 100 , 0 ", MAX_HISTORY) == [100, 0]
    assert parse_history_sizes(str(MAX_HISTORY), MAX_HISTORY) == [MAX_HISTORY]
    most = f"0 to {MAX_HISTORY}"
    for bad, says in (("-1", most), ("0,-5", most), (str(MAX_HISTORY + 1), most),
                      ("x", "integers"), ("0,1.5", "integers"), ("", "integers"),
                      ("0,,3", "integers"), ("3,3", "twice")):
        with pytest.raises(ValueError, match=says):
            parse_history_sizes(bad, MAX_HISTORY)


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


def tiny_catalog(directory: Path, num_items: int = 60) -> Path:
    """items.csv (+ users.csv) of a few synthetic items: enough for the unfiltered kind and the
    item ids histories are drawn from, with no build."""
    items = directory / "items.csv"
    with open(items, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["item_id", "category", "language", "creator", "tags"])
        for i in range(num_items):
            writer.writerow([10_000 + 7 * i, ("comedy", "news")[i % 2], ("en", "de")[i % 3 % 2],
                             i % 5, "funny|live" if i % 4 else "live"])
    (directory / "users.csv").write_text("user_id\n" + "".join(f"{u}\n" for u in range(1, 9)))
    return items


def test_workload_history_draws_reproducible_distinct_catalog_ids(tmp_path):
    items = tiny_catalog(tmp_path)
    catalog_ids = {10_000 + 7 * i for i in range(60)}
    plain = Workload.from_catalog(items, "unfiltered", 10)
    with_history = Workload.from_catalog(items, "unfiltered", 10, history=3)
    assert set(with_history.item_ids.tolist()) == catalog_ids

    drawn = with_history.evaluation_set(50, seed=4)
    assert all(len(r.history) == 3 and len(set(r.history)) == 3 for r in drawn)
    assert all(set(r.history) <= catalog_ids and all(type(i) is int for i in r.history)
               for r in drawn)
    assert with_history.evaluation_set(50, seed=4) == drawn  # reproducible from the seed
    assert with_history.evaluation_set(50, seed=5) != drawn
    assert len({r.history for r in drawn}) > 40  # drawn per request, not fixed per run
    assert "history: 3 distinct item ids per request" in with_history.describe()

    # without a history nothing is sent and the draws are those of before histories existed;
    # the history is drawn last, so the first request has the same user and filter either way
    before = plain.evaluation_set(50, seed=4)
    assert all(r.history is None for r in before)
    assert (before[0].user_id, before[0].filter) == (drawn[0].user_id, drawn[0].filter)
    assert plain.with_history(3).evaluation_set(50, seed=4) == drawn
    assert plain.history == 0 and "history" not in plain.describe()

    for bad in (-1, 61):
        with pytest.raises(ValueError, match="history"):
            Workload.from_catalog(items, "unfiltered", 10, history=bad)
    assert len(Workload.from_catalog(items, "unfiltered", 10, history=60).sample(
        random.Random(0)).history) == 60


def test_locust_triton_history_option_reaches_the_requests(tmp_path):
    """`--triton-history 3` (Locust's parser, the locustfile's own option) builds the workload
    whose requests carry 3 ids, the same in another process for the same seed. No server: the
    users are not started."""
    items = tiny_catalog(tmp_path)
    script = f"""
import json, random, types
import loadtest.locustfile as lf
from locust.argument_parser import get_parser
options = get_parser().parse_args(["--triton-history", "3", "--triton-mix", "unfiltered",
                                   "--triton-items-csv", {str(items)!r}])
workload = lf.workload(types.SimpleNamespace(parsed_options=options))
rng = random.Random("0/0")  # a user's generator: --triton-seed / user number
print(json.dumps([list(workload.sample(rng).history) for _ in range(5)]))
"""
    runs = [subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                           text=True, timeout=60) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    histories = [json.loads(run.stdout.strip().splitlines()[-1]) for run in runs]
    assert histories[0] == histories[1]
    rng = random.Random("0/0")
    local = Workload.from_catalog(items, "unfiltered", 10, history=3)
    assert histories[0] == [list(local.sample(rng).history) for _ in range(5)]
    assert all(len(h) == 3 for h in histories[0])


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


@pytest.mark.server
def test_locust_exit_code_and_files(server, small_build, tmp_path):
    """A run whose requests all fail (no such model) ends on its own, with Locust's error
    code, 1, having written its CSV and summary."""
    c = server.config
    out = tmp_path / "missing"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
           "HttpTritonUser", "GrpcTritonUser", "--headless", "--only-summary",
           "-u", "2", "-r", "2", "-t", "2s", "--stop-timeout", "5",
           "--host", f"http://{c.http_url}", "--triton-grpc-url", c.grpc_url,
           "--triton-metrics-url", f"http://{c.host}:{c.metrics_port}/metrics",
           "--triton-model", "no_such_model",
           "--triton-items-csv", str(small_build.config.items_csv),
           "--csv", str(out), "--triton-summary-json", str(out) + "-summary.json"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    with open(str(out) + "_stats.csv", newline="") as fh:
        total = next(r for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
    assert int(total["Failure Count"]) == int(total["Request Count"]) > 0
    summary = json.loads(Path(str(out) + "-summary.json").read_text())
    assert summary["failures"] == summary["requests"] > 0
    assert "Shutting down (exit code 1)" in run.stderr
