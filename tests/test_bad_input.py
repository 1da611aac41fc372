"""Every kind of bad request against the real server, for `retrieval` and `unified` over HTTP
and gRPC: each gets an error whose text names the input and the problem, with status 400 /
INVALID_ARGUMENT (the caller's mistake), while good requests sent at the same time (and so
batched with it) still get their exact answers. Some bad requests never reach model code
(Triton checks names, data types, shapes and batch size against config.pbtxt first); the
table checks Triton's wording for those too.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from client import build_inputs, parse_outputs, requested_outputs
from filtering.expression import MAX_EXPRESSION_BYTES, MAX_NESTING
from serving.runners import MAX_K
from stages.history import MAX_HISTORY

pytestmark = pytest.mark.server

MODELS = ["retrieval", "unified"]
PROTOCOLS = ["http", "grpc"]
GOOD = dict(filter="language:en OR category:comedy", k=10, task_weights=[1.0, 0.5, 2.0])

Tensor = Tuple[str, np.ndarray, str]  # name, value, Triton data type


def tensors(**given) -> List[Tensor]:
    """A request's tensors: user_id 7, filter "", k 10 and no task_weights unless `given`;
    a given value is encoded as the contract says, a (array, dtype) pair is sent as it is, and
    None leaves the input out."""
    values = {"user_id": 7, "filter": "", "k": 10, **given}
    encode = {"user_id": lambda v: (np.array([[v]], dtype=np.int64), "INT64"),
              "filter": lambda v: (np.array([[v.encode()]], dtype=np.object_), "BYTES"),
              "k": lambda v: (np.array([[v]], dtype=np.int32), "INT32"),
              "task_weights": lambda v: (np.array([v], dtype=np.float32), "FP32"),
              "history": lambda v: (np.array([v], dtype=np.int64).reshape(1, -1), "INT64")}
    out = []
    for name, value in values.items():
        if value is None:
            continue
        array, dtype = value if isinstance(value, tuple) else encode[name](value)
        out.append((name, array, dtype))
    return out


def raw_filter(blob: bytes):
    return np.array([[blob]], dtype=np.object_), "BYTES"


@dataclass
class Case:
    id: str
    request: Callable[[], List[Tensor]]
    words: List[str]  # all must appear in the error message
    by_triton: bool = False  # rejected by Triton before any model code runs
    extra_words: dict = field(default_factory=dict)  # model -> more words


def _deep(n: int) -> str:
    return "(" * n + "category:comedy" + ")" * n


CASES = [
    # --- missing inputs (Triton) ---
    Case("missing user_id", lambda: tensors(user_id=None), ["missing required input",
                                                             "'user_id'"], True),
    Case("missing filter", lambda: tensors(filter=None), ["missing required input",
                                                           "'filter'"], True),
    Case("missing k", lambda: tensors(k=None), ["missing required input", "'k'"], True),
    Case("unknown input", lambda: tensors(colour=(np.array([[1]], np.int64), "INT64")),
         ["unexpected inference input 'colour'"], True),
    # --- wrong data types (Triton) ---
    Case("FP32 user_id", lambda: tensors(user_id=(np.array([[7.0]], np.float32), "FP32")),
         ["input 'user_id' data-type is 'FP32'", "expects 'INT64'"], True),
    Case("INT64 k", lambda: tensors(k=(np.array([[10]], np.int64), "INT64")),
         ["input 'k' data-type is 'INT64'", "expects 'INT32'"], True),
    Case("INT64 filter", lambda: tensors(filter=(np.array([[5]], np.int64), "INT64")),
         ["input 'filter' data-type is 'INT64'", "expects 'BYTES'"], True),
    Case("FP64 task_weights",
         lambda: tensors(task_weights=(np.ones((1, 3), np.float64), "FP64")),
         ["input 'task_weights' data-type is 'FP64'", "expects 'FP32'"], True),
    # --- wrong shapes (Triton) ---
    Case("user_id [1, 2]", lambda: tensors(user_id=(np.array([[7, 8]], np.int64), "INT64")),
         ["unexpected shape for input 'user_id'", "Expected [-1,1], got [1,2]"], True),
    Case("user_id without batch dim",
         lambda: tensors(user_id=(np.array([7], np.int64), "INT64")),
         ["unexpected shape for input 'user_id'", "got [1]"], True),
    Case("2 task_weights", lambda: tensors(task_weights=[1.0, 2.0]),
         ["unexpected shape for input 'task_weights'", "Expected [-1,3], got [1,2]"], True),
    Case("4 task_weights", lambda: tensors(task_weights=[1.0, 2.0, 3.0, 4.0]),
         ["unexpected shape for input 'task_weights'", "Expected [-1,3], got [1,4]"], True),
    Case("empty batch", lambda: [(n, np.zeros((0,) + v.shape[1:], v.dtype), d)
                                 for n, v, d in tensors()],
         ["input byte size mismatch for input", "got 0"], True),
    Case("65 rows", lambda: [(n, np.repeat(v, 65, axis=0), d) for n, v, d in tensors()],
         ["batch-size must be <= 64"], True),
    # --- checked by the models ---
    Case("2 rows", lambda: [(n, np.repeat(v, 2, axis=0), d) for n, v, d in tensors()],
         ["batch of 2 rows in one request", "send one query per request"]),
    Case("k 0", lambda: tensors(k=0), [f"k: must be between 1 and {MAX_K}, got 0"]),
    Case("k negative", lambda: tensors(k=-5), [f"k: must be between 1 and {MAX_K}, got -5"]),
    Case("k over max", lambda: tensors(k=MAX_K + 1),
         [f"k: must be between 1 and {MAX_K}, got {MAX_K + 1}"]),
    Case("k int32 min", lambda: tensors(k=-(2**31)),
         [f"k: must be between 1 and {MAX_K}, got {-(2**31)}"]),
    Case("NaN task_weights", lambda: tensors(task_weights=[1.0, float("nan"), 1.0]),
         ["task_weights: must be finite numbers"]),
    Case("inf task_weights", lambda: tensors(task_weights=[float("inf"), 1.0, 1.0]),
         ["task_weights: must be finite numbers"]),
    Case("negative task_weights", lambda: tensors(task_weights=[1.0, -2.0, 1.0]),
         ["task_weights: must be non-negative, got [1.0, -2.0, 1.0]"]),
    Case("1 MB filter", lambda: tensors(filter="category:comedy OR " * 55_000),
         [f"filter: filter error at position {MAX_EXPRESSION_BYTES}",
          f"over the {MAX_EXPRESSION_BYTES}-byte limit"]),
    Case("malformed filter", lambda: tensors(filter="category:comedy AND (language:en"),
         ["filter: filter error at position 32", "expected ')' to close the '(' at position 20"]),
    Case("dangling operator", lambda: tensors(filter="category:comedy AND"),
         ["filter: filter error at position 19", "found the end of the expression"]),
    Case("nested too deep", lambda: tensors(filter=_deep(MAX_NESTING + 1)),
         [f"filter: filter error at position {MAX_NESTING}",
          f"nested deeper than {MAX_NESTING} levels"]),
    Case("unknown feature", lambda: tensors(filter="colour:red"),
         ["filter: filter error at position 0", "unknown feature 'colour'"]),
    Case("unknown value", lambda: tensors(filter="category:nosuch"),
         ["filter: filter error at position 9", "has no value nosuch"]),
    Case("unknown feature id", lambda: tensors(filter="99:1"), ["unknown feature id 99"]),
    # --- the optional request history ---
    Case("INT32 history", lambda: tensors(history=(np.array([[5, 6]], np.int32), "INT32")),
         ["input 'history' data-type is 'INT32'", "expects 'INT64'"], True),
    Case("history [1, 2, 2]",
         lambda: tensors(history=(np.ones((1, 2, 2), np.int64), "INT64")),
         ["unexpected shape for input 'history'"], True),
    Case(f"{MAX_HISTORY + 1} history ids", lambda: tensors(history=list(range(MAX_HISTORY + 1))),
         [f"history: at most {MAX_HISTORY} item ids", f"got {MAX_HISTORY + 1}"]),
    Case("negative history id", lambda: tensors(history=[5, -3, 8]),
         ["history: item ids are non-negative, got -3"]),
    Case("binary garbage", lambda: tensors(filter=raw_filter(b"\xff\xfe\x00\x80garbage")),
         ["filter: filter error at position 0", "not valid UTF-8"]),
    Case("control character", lambda: tensors(filter=raw_filter(b"category:comedy\x07")),
         ["filter: filter error at position 15", "control character"]),
]


def _protocol_module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


def send(server, protocol: str, model: str, request: List[Tensor]):
    """The response of one request (an InferResult) or the InferenceServerException."""
    module = _protocol_module(protocol)
    url = server.config.http_url if protocol == "http" else server.config.grpc_url
    client = module.InferenceServerClient(url)
    try:
        inputs = []
        for name, value, dtype in request:
            tensor = module.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return client.infer(model, inputs, outputs=requested_outputs(module))
    except InferenceServerException as e:
        return e
    finally:
        client.close()


def send_good(server, protocol: str, model: str, user: int):
    module = _protocol_module(protocol)
    url = server.config.http_url if protocol == "http" else server.config.grpc_url
    with module.InferenceServerClient(url) as client:
        inputs = build_inputs(module, user, **GOOD)
        return parse_outputs(client.infer(model, inputs, outputs=requested_outputs(module)))


@pytest.fixture(scope="module")
def reference(server, small_build):
    """Good requests' answers, each sent alone."""
    users = [int(u) for u in small_build.world.user_ids[20:23]]
    return users, {(m, p): [send_good(server, p, m, u) for u in users]
                   for m in MODELS for p in PROTOCOLS}


def assert_invalid_argument(error, protocol: str) -> None:
    assert isinstance(error, InferenceServerException), f"no error: {error}"
    if protocol == "http":
        assert error.status() == "400", (error.status(), error.message())
    else:
        assert error.status() == "StatusCode.INVALID_ARGUMENT", (error.status(), error.message())


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_gets_a_clear_error_and_batch_mates_succeed(server, reference, case, model,
                                                                protocol):
    users, answers = reference
    want = answers[(model, protocol)]
    # one bad request among good ones, sent together so that the dynamic batcher can put them
    # in the same batch
    with ThreadPoolExecutor(4) as pool:
        goods = [pool.submit(send_good, server, protocol, model, u) for u in users[:1]]
        bad = pool.submit(send, server, protocol, model, case.request())
        goods += [pool.submit(send_good, server, protocol, model, u) for u in users[1:]]
        error = bad.result()
        got = [g.result() for g in goods]
    assert_invalid_argument(error, protocol)
    message = error.message()
    for words in case.words:
        assert words in message, f"{words!r} not in {message!r}"
    if model == "retrieval" and not case.by_triton:
        assert message.startswith("in ensemble 'retrieval', "), message
    assert len(message) < 1000, "an error message should be short"
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.item_ids, w.item_ids)
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-5, atol=1e-6)


def _stats(server, model: str) -> Tuple[int, int]:
    """(successful, failed) requests of `model` so far, from Triton's statistics API."""
    url = f"http://{server.config.http_url}/v2/models/{model}/stats"
    with urllib.request.urlopen(url, timeout=10) as r:
        stats = json.load(r)["model_stats"][0]["inference_stats"]
    return int(stats["success"]["count"]), int(stats["fail"]["count"])


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=MAX_K + 1),
                                 dict(task_weights=[float("nan"), 1.0, 1.0]),
                                 dict(task_weights=[-1.0, 1.0, 1.0]),
                                 dict(filter="colour:red"), dict(filter="x" * 100_000)],
                         ids=["k 0", "k over max", "NaN weights", "negative weights",
                              "unknown feature", "huge filter"])
def test_retrieval_rejects_bad_requests_before_the_ann_runs(server, bad):
    """The ensemble's first stage rejects them: the `ann` stage (the heavy work) never sees
    them."""
    ann_before = _stats(server, "ann")
    filter_before = _stats(server, "filter")
    for protocol in PROTOCOLS:
        error = send(server, protocol, "retrieval", tensors(**bad))
        assert_invalid_argument(error, protocol)
    # Triton counts a request its model answered with an error response as a success, and
    # may record statistics just after the response leaves
    deadline = time.monotonic() + 5
    while sum(_stats(server, "filter")) < sum(filter_before) + len(PROTOCOLS):
        assert time.monotonic() < deadline, "the filter stage never saw the requests"
        time.sleep(0.05)
    assert sum(_stats(server, "filter")) == sum(filter_before) + len(PROTOCOLS)
    assert _stats(server, "ann") == ann_before
    # control: a good request does reach the ann stage, and its statistics show it
    assert not isinstance(send(server, "http", "retrieval", tensors()), Exception)
    while sum(_stats(server, "ann")) < sum(ann_before) + 1:
        assert time.monotonic() < deadline + 5, "the ann statistics never moved"
        time.sleep(0.05)


def test_optional_task_weights_may_be_left_out(server, small_build):
    """The optional input really is optional on both models (default Value Model weights)."""
    user = int(small_build.world.user_ids[3])
    for model in MODELS:
        with_defaults = send(server, "grpc", model, tensors(user_id=user, k=5))
        assert not isinstance(with_defaults, Exception), with_defaults
        assert with_defaults.as_numpy("item_ids").shape == (1, 5)
