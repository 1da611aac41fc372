"""Python client of the retrieval models (`retrieval` ensemble and `unified`), HTTP or gRPC.

    from client import Retriever
    with Retriever("127.0.0.1:8000") as r:
        result = r.query(user_id=42, filter="category:comedy AND NOT language:en", k=10)
        result.item_ids, result.scores, result.task_scores

`build_inputs` / `parse_outputs` are the pure request/response halves, shared by the CLI,
the demo, the load test and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

TASKS = ("click", "like", "share")
DEFAULT_MODEL = "retrieval"


@dataclass
class Result:
    item_ids: np.ndarray  # int64 [n], n = min(k, items passing the filter)
    scores: np.ndarray  # float32 [n], descending
    task_scores: np.ndarray  # float32 [n, T]


def _protocol_module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be 'http' or 'grpc', not {protocol!r}")
    return module


def build_inputs(module, user_id: int, filter: str = "", k: int = 10,
                 task_weights: Optional[Sequence[float]] = None) -> list:
    """The InferInputs of one query for `module` (tritonclient.http or tritonclient.grpc)."""
    arrays = [("user_id", np.array([[user_id]], dtype=np.int64), "INT64"),
              ("filter", np.array([[filter.encode("utf-8")]], dtype=np.object_), "BYTES"),
              ("k", np.array([[k]], dtype=np.int32), "INT32")]
    if task_weights is not None:
        arrays.append(("task_weights", np.asarray([task_weights], dtype=np.float32), "FP32"))
    inputs = []
    for name, value, dtype in arrays:
        tensor = module.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def requested_outputs(module) -> list:
    return [module.InferRequestedOutput(n) for n in ("item_ids", "scores", "task_scores")]


def parse_outputs(response) -> Result:
    """A Result from an InferResult of either protocol (one query)."""
    return Result(response.as_numpy("item_ids")[0], response.as_numpy("scores")[0],
                  response.as_numpy("task_scores")[0])


class Retriever:
    """Queries one model of a running server.

    Args:
        url: "host:port" (HTTP port 8000 or gRPC port 8001 by default).
        protocol: "http" or "grpc".
        model: "retrieval" (the ensemble) or "unified".
        timeout: seconds for each call (None = the library's default).
    """

    def __init__(self, url: str = "127.0.0.1:8000", protocol: str = "http",
                 model: str = DEFAULT_MODEL, timeout: Optional[float] = None,
                 verbose: bool = False, concurrency: int = 1):
        self.module = _protocol_module(protocol)
        self.protocol = protocol
        self.model = model
        self.timeout = timeout
        kwargs = {"verbose": verbose}
        if protocol == "http":
            kwargs["concurrency"] = concurrency
            if timeout is not None:
                kwargs["network_timeout"] = timeout
                kwargs["connection_timeout"] = timeout
        self.client = self.module.InferenceServerClient(url, **kwargs)

    def query(self, user_id: int, filter: str = "", k: int = 10,
              task_weights: Optional[Sequence[float]] = None) -> Result:
        inputs = build_inputs(self.module, user_id, filter, k, task_weights)
        kwargs = {}
        if self.timeout is not None and self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        response = self.client.infer(self.model, inputs, outputs=requested_outputs(self.module),
                                     **kwargs)
        return parse_outputs(response)

    def is_ready(self) -> bool:
        try:
            return bool(self.client.is_model_ready(self.model))
        except Exception:
            return False

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
