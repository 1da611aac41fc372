"""Locust users for the retrieval models on a running Triton server (HTTP and gRPC).

    make serve                                  # in another shell
    make loadtest MODEL=unified USERS=16 DURATION=30s
    .venv/bin/locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 20s \\
        --host http://127.0.0.1:8000 --triton-model unified --triton-mix filtered
    make loadtest HISTORY=20                    # every request sends a 20-item history

`TritonUser` wraps the project's client (`client.Retriever`) and reports every call to
Locust's request event: name `<model> <kind>`, response time in ms from
`time.perf_counter()`, response_length = number of items returned, and the exception if any
(an error answer, a timeout, or more than k results). Requests come from a `Workload`
(loadtest/workload.py): filters of several selectivities built from the catalog, mixed by
`--triton-mix`; with `--triton-history N` each request also sends the optional `history`
input, N distinct item ids of the catalog drawn by the user's seeded generator (`retrieval`
and `unified` take it, at most 1000 ids; 0, the default, sends none). Each user is a closed
loop (`wait_time = constant(0)`): N users keep N requests in flight. At the end one summary
line gives requests/s, p50/p95/p99, failures and the average batch size Triton formed per
model (loadtest/metrics.py). It never starts a server.

Options (command line or environment): --triton-model (LOCUST_TRITON_MODEL), --triton-k,
--triton-mix, --triton-history, --triton-items-csv, --triton-grpc-url, --triton-metrics-url,
--triton-timeout, --triton-summary-json, with their help text in `_options` below (Locust
2.47 prints its --help before it loads a locustfile, so they are not listed there).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import gevent
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, events, task
from locust.runners import WorkerRunner

from client import DEFAULT_MODEL, Retriever
from client.catalog import DEFAULT_ITEMS_CSV
from loadtest import metrics
from loadtest.workload import Workload

# gRPC's own threads would block gevent's loop: route its I/O through gevent. Locust has
# already monkey-patched the standard library; this must run before any channel exists.
grpc_gevent.init_gevent()


@events.init_command_line_parser.add_listener
def _options(parser):
    group = parser.add_argument_group("Triton retrieval", "what to query and how")
    group.add_argument("--triton-model", env_var="LOCUST_TRITON_MODEL", default=DEFAULT_MODEL,
                       help="model to query: retrieval, unified or baseline")
    group.add_argument("--triton-k", env_var="LOCUST_TRITON_K", type=int, default=10,
                       help="results per request")
    group.add_argument("--triton-mix", env_var="LOCUST_TRITON_MIX", default="mixed",
                       help="request mix: mixed, unfiltered, filtered, broad, selective, "
                            "one_creator, or weights like 'unfiltered=2,selective=1'")
    group.add_argument("--triton-history", env_var="LOCUST_TRITON_HISTORY", type=int,
                       default=0, metavar="N",
                       help="send a history of N item ids with every request, drawn (seeded) "
                            "from the catalog's items.csv; retrieval and unified take it, at "
                            "most 1000 (0: no history input, the server's own)")
    group.add_argument("--triton-items-csv", env_var="LOCUST_TRITON_ITEMS_CSV",
                       default=str(DEFAULT_ITEMS_CSV),
                       help="the served catalog (the builder's items.csv; users.csv beside it)")
    group.add_argument("--triton-grpc-url", env_var="LOCUST_TRITON_GRPC_URL", default="",
                       help="gRPC endpoint host:port (default: --host's name, port 8001)")
    group.add_argument("--triton-metrics-url", env_var="LOCUST_TRITON_METRICS_URL", default="",
                       help="Triton metrics URL (default: http://<--host's name>:8002/metrics)")
    group.add_argument("--triton-timeout", env_var="LOCUST_TRITON_TIMEOUT", type=float,
                       default=30.0, help="seconds per call")
    group.add_argument("--triton-seed", env_var="LOCUST_TRITON_SEED", type=int, default=0,
                       help="seed of the filters drawn from the catalog and of each user's draws")
    group.add_argument("--triton-summary-json", env_var="LOCUST_TRITON_SUMMARY_JSON",
                       default="", help="also write the end-of-run summary to this JSON file")


DEFAULT_HTTP = "127.0.0.1:8000"
_user_numbers = itertools.count()  # seeds each user's draws reproducibly


def _bare(host: Optional[str]) -> str:
    """host:port without a scheme or path."""
    host = host or DEFAULT_HTTP
    return host.split("://", 1)[-1].split("/", 1)[0]


def _hostname(host: Optional[str]) -> str:
    bare = _bare(host)
    return bare if bare.endswith("]") or ":" not in bare else bare.rsplit(":", 1)[0]


def grpc_url(environment) -> str:
    return environment.parsed_options.triton_grpc_url or f"{_hostname(environment.host)}:8001"


def metrics_endpoint(environment) -> str:
    return environment.parsed_options.triton_metrics_url or \
        f"http://{_hostname(environment.host)}:8002/metrics"


def workload(environment) -> Workload:
    """The request mix of this run, built once per process from the catalog."""
    cached = getattr(environment, "triton_workload", None)
    if cached is None:
        o = environment.parsed_options
        cached = Workload.from_catalog(Path(o.triton_items_csv), o.triton_mix, o.triton_k,
                                       o.triton_seed, o.triton_history)
        environment.triton_workload = cached
    return cached


class TritonUser(User):
    """One client of one model; subclasses pick the protocol.

    Tasks are the request kinds of loadtest/workload.py; `--triton-mix` weights them.
    """

    abstract = True
    protocol = "http"
    wait_time = constant(0)  # closed loop: the next request leaves when the last is answered

    def __init__(self, environment):
        super().__init__(environment)
        options = environment.parsed_options
        self.model = options.triton_model
        self.workload = workload(environment)
        self.rng = random.Random(f"{options.triton_seed}/{next(_user_numbers)}")
        kinds = {t.__name__: t for t in type(self).tasks}
        self.tasks = [kinds[kind] for kind, weight in self.workload.mix.items()
                      for _ in range(weight)]
        url = grpc_url(environment) if self.protocol == "grpc" else _bare(self.host)
        self.retriever = Retriever(url, self.protocol, self.model, options.triton_timeout)

    def on_stop(self):
        self.retriever.close()

    def query(self, kind: str) -> None:
        request = self.workload.sample(self.rng, kind)
        exception, returned = None, 0
        start = time.perf_counter()
        try:
            result = self.retriever.query(request.user_id, request.filter, request.k,
                                          history=request.history)
            returned = len(result.item_ids)
            if returned > request.k:
                raise AssertionError(f"{returned} results for k={request.k}")
        except Exception as e:  # reported to Locust as a failure, the user goes on
            exception = e
        self.environment.events.request.fire(
            request_type=self.protocol, name=f"{self.model} {kind}",
            response_time=(time.perf_counter() - start) * 1000.0, response_length=returned,
            exception=exception,
            context={"filter": request.filter, "history": len(request.history or ())})

    @task
    def unfiltered(self):
        self.query("unfiltered")

    @task
    def broad(self):
        self.query("broad")

    @task
    def selective(self):
        self.query("selective")

    @task
    def one_creator(self):
        self.query("one_creator")


class HttpTritonUser(TritonUser):
    """HTTP/REST (`--host`, default 127.0.0.1:8000); the client is gevent-native."""

    protocol = "http"
    host = f"http://{DEFAULT_HTTP}"


class GrpcTritonUser(TritonUser):
    """gRPC (`--triton-grpc-url`, default port 8001 on `--host`'s machine)."""

    protocol = "grpc"
    host = f"http://{DEFAULT_HTTP}"


# --- the end-of-run summary ------------------------------------------------------------------
@dataclass
class Summary:
    model: str
    mix: str
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    batch_sizes: Dict[str, float]  # model -> average batch Triton formed during the run
    history: int = 0  # item ids in every request's history input (0: none sent)

    def line(self) -> str:
        batches = ", ".join(f"{m} {b:.2f}" for m, b in sorted(self.batch_sizes.items())) or \
            "(no metrics)"
        share = self.failures / self.requests if self.requests else 0.0
        sent = f", history {self.history}" if self.history else ""
        return (f"{self.model} [{self.mix}{sent}]: {self.requests_per_s:.1f} req/s, p50 "
                f"{self.p50_ms:.0f} ms, p95 {self.p95_ms:.0f} ms, p99 {self.p99_ms:.0f} ms, "
                f"failures {self.failures}/{self.requests} ({share:.2%}); "
                f"avg batch: {batches}")


def summarize(environment, before: Optional[metrics.Counters],
              after: Optional[metrics.Counters]) -> Summary:
    total = environment.stats.total
    batches = metrics.batch_sizes(before, after) if before is not None and after else {}
    return Summary(
        model=environment.parsed_options.triton_model, mix=environment.parsed_options.triton_mix,
        requests=total.num_requests, failures=total.num_failures,
        requests_per_s=total.total_rps,
        p50_ms=float(total.get_response_time_percentile(0.50) or 0),
        p95_ms=float(total.get_response_time_percentile(0.95) or 0),
        p99_ms=float(total.get_response_time_percentile(0.99) or 0),
        batch_sizes=batches, history=environment.parsed_options.triton_history)


def _scrape(environment) -> Optional[metrics.Counters]:
    try:
        return metrics.scrape(metrics_endpoint(environment))
    except OSError as e:
        print(f"(no Triton metrics from {metrics_endpoint(environment)}: {e})")
        return None


@events.init.add_listener
def _build_workload(environment, **_):
    if environment.parsed_options is not None and not isinstance(environment.runner,
                                                                 WorkerRunner):
        print(workload(environment).describe())
    # gevent's loop caches the time; the imports and the catalog read above ran before the
    # loop did, so refresh it or the --run-time timer, armed next, fires that much too early
    gevent.get_hub().loop.update_now()


@events.test_start.add_listener
def _metrics_at_start(environment, **_):
    if not isinstance(environment.runner, WorkerRunner):
        environment.triton_metrics_start = _scrape(environment)


@events.test_stop.add_listener
def _summary(environment, **_):
    if isinstance(environment.runner, WorkerRunner):
        return
    summary = summarize(environment, getattr(environment, "triton_metrics_start", None),
                        _scrape(environment))
    print(f"summary: {summary.line()}", flush=True)
    if environment.parsed_options.triton_summary_json:
        path = Path(environment.parsed_options.triton_summary_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(summary), indent=1))
