"""Locust users of the soak (benchmarks/soak.py): the load test's users (loadtest/locustfile.py)
plus bad requests.

Each user mixes the load test's good requests (its workload of filter selectivities) with bad
ones in the share `--soak-bad-share`. A bad request counts as a success when the server answers
it with the expected error (400 / INVALID_ARGUMENT and the expected words), as a failure
otherwise. At the end, `--soak-json` gets requests and failures of the good and the bad ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from locust import events
from locust.runners import WorkerRunner

from loadtest.locustfile import TritonUser

MAX_NESTING = 64

# name -> (inputs as (name, array, datatype), words the error must contain)
BAD_CASES = {
    "k 0": ({"k": (np.array([[0]], np.int32), "INT32")}, "k: must be between 1 and"),
    "k over max": ({"k": (np.array([[5000]], np.int32), "INT32")}, "k: must be between 1 and"),
    "NaN weights": ({"task_weights": (np.array([[1, np.nan, 1]], np.float32), "FP32")},
                    "task_weights: must be finite"),
    "negative weights": ({"task_weights": (np.array([[1, -1, 1]], np.float32), "FP32")},
                         "task_weights: must be non-negative"),
    "2 weights": ({"task_weights": (np.array([[1, 1]], np.float32), "FP32")},
                  "unexpected shape for input 'task_weights'"),
    "malformed filter": ({"filter": (np.array([[b"category:comedy AND ("]], object), "BYTES")},
                         "filter: filter error at position"),
    "unknown feature": ({"filter": (np.array([[b"colour:red"]], object), "BYTES")},
                        "unknown feature 'colour'"),
    "nested filter": ({"filter": (np.array([[b"(" * (MAX_NESTING + 1) + b"tags:live" +
                                             b")" * (MAX_NESTING + 1)]], object), "BYTES")},
                      "nested deeper than"),
    "64 KB filter": ({"filter": (np.array([[b"tags:live OR " * 5000]], object), "BYTES")},
                     "byte limit"),
    "binary filter": ({"filter": (np.array([[b"\xff\xfe\x00\x01"]], object), "BYTES")},
                      "not valid UTF-8"),
    "FP32 user_id": ({"user_id": (np.array([[3.0]], np.float32), "FP32")},
                     "input 'user_id' data-type is 'FP32'"),
    "missing k": ({"k": None}, "missing required input(s) ['k']"),
    "2 rows": ({"user_id": (np.array([[1], [2]], np.int64), "INT64"),
                "filter": (np.array([[b""], [b""]], object), "BYTES"),
                "k": (np.array([[5], [5]], np.int32), "INT32")}, "batch of 2 rows"),
}


@events.init_command_line_parser.add_listener
def _options(parser):
    group = parser.add_argument_group("Soak", "bad requests among the good ones")
    group.add_argument("--soak-bad-share", type=float, default=0.25, env_var="SOAK_BAD_SHARE",
                       help="share of the requests that are bad")
    group.add_argument("--soak-json", default="", env_var="SOAK_JSON",
                       help="write good/bad request and failure counts to this file")


class SoakUser(TritonUser):
    abstract = True

    def __init__(self, environment):
        super().__init__(environment)
        share = environment.parsed_options.soak_bad_share
        good = len(self.tasks)
        bad = round(good * share / (1 - share)) if share < 1 else good
        self.tasks = self.tasks + [SoakUser.bad_request] * max(bad, 1 if share > 0 else 0)

    def bad_request(self):
        name = self.rng.choice(sorted(BAD_CASES))
        changes, words = BAD_CASES[name]
        module = self.retriever.module
        tensors = {"user_id": (np.array([[7]], np.int64), "INT64"),
                   "filter": (np.array([[b""]], object), "BYTES"),
                   "k": (np.array([[10]], np.int32), "INT32"), **changes}
        inputs = []
        for tensor_name, value in tensors.items():
            if value is None:
                continue
            array, dtype = value
            tensor = module.InferInput(tensor_name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        exception = None
        start = time.perf_counter()
        try:
            self.retriever.client.infer(self.model, inputs)
            exception = AssertionError(f"bad request {name!r} was answered")
        except Exception as e:
            status = str(e.status()) if hasattr(e, "status") else ""
            message = e.message() if hasattr(e, "message") else str(e)
            if status not in ("400", "StatusCode.INVALID_ARGUMENT") or words not in message:
                exception = AssertionError(f"bad request {name!r}: [{status}] {message[:200]}")
        self.environment.events.request.fire(
            request_type=self.protocol, name=f"bad {name}",
            response_time=(time.perf_counter() - start) * 1000.0, response_length=0,
            exception=exception, context={})


class SoakHttpUser(SoakUser):
    protocol = "http"
    host = "http://127.0.0.1:8000"


class SoakGrpcUser(SoakUser):
    protocol = "grpc"
    host = "http://127.0.0.1:8000"


@events.test_stop.add_listener
def _counts(environment, **_):
    if isinstance(environment.runner, WorkerRunner) or not environment.parsed_options.soak_json:
        return
    counts = {"good": [0, 0], "bad": [0, 0]}
    errors = {}
    for entry in environment.stats.entries.values():
        side = "bad" if entry.name.startswith("bad ") else "good"
        counts[side][0] += entry.num_requests
        counts[side][1] += entry.num_failures
    for error in environment.stats.errors.values():
        errors[f"{error.name}: {error.error}"[:300]] = error.occurrences
    result = {"good_requests": counts["good"][0], "good_failures": counts["good"][1],
              "bad_requests": counts["bad"][0], "bad_unexpected": counts["bad"][1],
              "requests_per_s": environment.stats.total.total_rps,
              "p99_ms": float(environment.stats.total.get_response_time_percentile(0.99) or 0),
              "errors": errors}
    Path(environment.parsed_options.soak_json).write_text(json.dumps(result, indent=1))
