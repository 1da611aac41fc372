"""Python client of the retrieval models (`retrieval` ensemble and `unified`), HTTP or gRPC.

    from client import Retriever
    with Retriever("127.0.0.1:8000") as r:
        result = r.query(user_id=42, filter="category:comedy AND NOT language:en", k=10)
        result.item_ids, result.scores, result.task_scores
        # the user's latest items as this request knows them (newest first, at most 1000),
        # instead of the history the server built from its logs; [] = a user with none
        r.query(user_id=42, k=10, history=[1017, 33, 4096])

`build_inputs` / `parse_outputs` are the pure request/response halves, shared by the CLI,
the demo, the load test and the benchmarks.

Fresh items (the `item_updates` model): `r.upsert_items([item_id], [embedding],
["category=comedy,language=en,creator=7,tags=funny|live"])` adds or replaces items and
`r.retire_items([item_id])` retires them; both return once the server has made the update
durable, and the next query sees it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from filtering.spelling import join_values

TASKS = ("click", "like", "share")  # the synthetic world's; a catalog has its own
DEFAULT_MODEL = "retrieval"
UPDATE_MODEL = "item_updates"
MAX_ROWS_PER_UPDATE = 64  # the update model's max_batch_size


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


def history_array(history: Sequence[int]) -> np.ndarray:
    """The `history` input's value: int64 [1, n], newest first. Ids are taken as integers
    (operator.index), so a float or a string is a TypeError here rather than an id silently
    truncated by numpy; their range (>= 0, at most MAX_HISTORY of the server) is the server's
    to check, which names `history` in its error."""
    return np.array([[operator.index(i) for i in history]], dtype=np.int64)


def build_inputs(module, user_id: int, filter: str = "", k: int = 10,
                 task_weights: Optional[Sequence[float]] = None,
                 history: Optional[Sequence[int]] = None) -> list:
    """The InferInputs of one query for `module` (tritonclient.http or tritonclient.grpc).

    `history` (raw item ids, newest first) is sent only when given: None leaves the input out
    and the server uses the history it built from its logs; an empty sequence is sent as
    [1, 0], a user known to have no history."""
    arrays = [("user_id", np.array([[user_id]], dtype=np.int64), "INT64"),
              ("filter", np.array([[filter.encode("utf-8")]], dtype=np.object_), "BYTES"),
              ("k", np.array([[k]], dtype=np.int32), "INT32")]
    if task_weights is not None:
        arrays.append(("task_weights", np.asarray([task_weights], dtype=np.float32), "FP32"))
    if history is not None:
        arrays.append(("history", history_array(history), "INT64"))
    inputs = []
    for name, value, dtype in arrays:
        tensor = module.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def format_features(features: Union[str, Mapping[str, Union[str, int, Sequence]]]) -> str:
    """{"category": "comedy", "tags": ["funny", "live"]} -> "category=comedy,tags=funny|live"
    (a string is passed through)."""
    if isinstance(features, str):
        return features
    parts = []
    for name, value in features.items():
        values = [value] if isinstance(value, (str, int)) else list(value)
        parts.append(f"{name}=" + join_values([str(v) for v in values]))
    return ",".join(parts)


def build_update_inputs(module, item_ids: Sequence[int],
                        embeddings: Optional[np.ndarray] = None,
                        features: Optional[Sequence] = None, retire: bool = False) -> list:
    """The InferInputs of one `item_updates` request: upserts (embeddings [n, D] and one
    feature spelling per item) or, with `retire`, retires of `item_ids`."""
    n = len(item_ids)
    arrays = [("item_id", np.asarray(item_ids, dtype=np.int64).reshape(n, 1), "INT64")]
    if retire:
        arrays.append(("retire", np.ones((n, 1), dtype=bool), "BOOL"))
    else:
        arrays.append(("embedding", np.asarray(embeddings, dtype=np.float32).reshape(n, -1),
                       "FP32"))
        spelled = [format_features(f).encode("utf-8") for f in features]
        arrays.append(("features", np.array(spelled, dtype=np.object_).reshape(n, 1), "BYTES"))
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


def _closed() -> None:
    """A closed client's close: nothing left to do."""


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
              task_weights: Optional[Sequence[float]] = None,
              history: Optional[Sequence[int]] = None) -> Result:
        """Top-k items for `user_id` passing `filter`. `history`: the user's latest raw item
        ids, newest first (at most 1000; ids the server does not know are skipped), in place
        of the history the server built from its logs; None = the server's, [] = none."""
        inputs = build_inputs(self.module, user_id, filter, k, task_weights, history)
        kwargs = {}
        if self.timeout is not None and self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        response = self.client.infer(self.model, inputs, outputs=requested_outputs(self.module),
                                     **kwargs)
        return parse_outputs(response)

    def upsert_items(self, item_ids: Sequence[int], embeddings, features: Sequence
                     ) -> np.ndarray:
        """Add or replace items in the fresh index; returns their fresh rows (int64 [n]).
        Returns after the server has written them durably; the next query can find them.

        Args:
            item_ids: raw item ids (new ones, or ids of indexed items to replace).
            embeddings: float32 [n, D] in the catalog's embedding space.
            features: per item, `"category=comedy,language=en,creator=7,tags=funny|live"` or
                the same as a dict; every single-valued feature is required.
        """
        embeddings = np.asarray(embeddings, dtype=np.float32).reshape(len(item_ids), -1)
        return self._update(item_ids, embeddings, list(features), retire=False)

    def retire_items(self, item_ids: Sequence[int]) -> np.ndarray:
        """Stop serving items (fresh or indexed); returns their fresh rows (-1: none)."""
        return self._update(item_ids, None, None, retire=True)

    def _update(self, item_ids, embeddings, features, retire: bool) -> np.ndarray:
        rows = []
        for start in range(0, len(item_ids), MAX_ROWS_PER_UPDATE):
            part = slice(start, start + MAX_ROWS_PER_UPDATE)
            inputs = build_update_inputs(
                self.module, item_ids[part], None if retire else embeddings[part],
                None if retire else features[part], retire)
            kwargs = {}
            if self.timeout is not None and self.protocol == "grpc":
                kwargs["client_timeout"] = self.timeout
            response = self.client.infer(
                UPDATE_MODEL, inputs, outputs=[self.module.InferRequestedOutput("fresh_row")],
                **kwargs)
            rows.append(response.as_numpy("fresh_row").reshape(-1))
        return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)

    def tasks(self) -> tuple:
        """The served Value Model's task names, in the order of `task_weights` and the
        columns of `task_scores` (the model config's `tasks` parameter)."""
        if self.protocol == "http":
            params = self.client.get_model_config(self.model).get("parameters", {})
            text = params.get("tasks", {}).get("string_value", "")
        else:
            config = self.client.get_model_config(self.model).config
            text = config.parameters["tasks"].string_value if "tasks" in config.parameters \
                else ""
        return tuple(t for t in text.split(",") if t) or TASKS

    def input_names(self) -> tuple:
        """The names of the served model's inputs (from its config): e.g. whether a repository
        built by an older version takes `history`."""
        if self.protocol == "http":
            inputs = self.client.get_model_config(self.model).get("input", [])
            return tuple(i["name"] for i in inputs)
        return tuple(i.name for i in self.client.get_model_config(self.model).config.input)

    def is_ready(self) -> bool:
        try:
            return bool(self.client.is_model_ready(self.model))
        except Exception:
            return False

    def close(self) -> None:
        """Closes the connection, once: later calls, and the client's own close when it is
        garbage-collected (tritonclient's `__del__`), do nothing. A gRPC channel closed a
        second time at interpreter exit under gevent (Locust) blocked forever: the load
        generator printed its results and never exited (docs/reliability.md)."""
        close, self.client.close = self.client.close, _closed
        close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
