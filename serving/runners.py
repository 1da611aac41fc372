"""What each Triton model does with a batch of requests, independent of Triton.

A runner takes the requests of one dynamic batch as dicts of numpy arrays (batch dimension
first, one row per request), runs its TorchScript module once on the whole batch and returns,
per request, a dict of output arrays or a `RequestError`. `serving/python_backend.py` adapts it
to the Python backend; tests call runners directly to run the stages in-process.

Each runner declares its tensors (`INPUTS`, `OUTPUTS`); tests check them against
`model_repository/*/config.pbtxt` and the exported modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import kernels  # noqa: F401  (registers torch.ops.iam.* before TorchScript graphs load)
from filtering.expression import FilterError, batch_plans, parse_plan
from world.schema import Schema

MAX_K = 1000  # largest k a request may ask for
NUM_TASKS = 3
ARTIFACT = "model.pt"


class RequestError(Exception):
    """A problem with one request; the message is sent to its client as the error."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton data type without the TYPE_ prefix
    dims: Tuple[int, ...]
    optional: bool = False


Arrays = Dict[str, np.ndarray]
Result = Union[Arrays, RequestError]


def _one_row(request: Arrays, name: str) -> np.ndarray:
    value = request[name]
    if value.shape[0] != 1:
        raise RequestError(f"{name}: batch of {value.shape[0]} rows in one request; send one "
                           "query per request (Triton's dynamic batcher batches requests)")
    return value[0]


def check_k(request: Arrays) -> int:
    k = int(_one_row(request, "k").reshape(-1)[0])
    if not 1 <= k <= MAX_K:
        raise RequestError(f"k: must be between 1 and {MAX_K}, got {k}")
    return k


def check_task_weights(request: Arrays, default: np.ndarray) -> np.ndarray:
    raw = request.get("task_weights")
    if raw is None:
        return default
    w = _one_row(request, "task_weights").astype(np.float32).reshape(-1)
    if w.shape[0] != default.shape[0]:
        raise RequestError(f"task_weights: expected {default.shape[0]} weights (one per task), "
                           f"got {w.shape[0]}")
    if not np.all(np.isfinite(w)):
        raise RequestError("task_weights: must be finite numbers (got NaN or infinity)")
    if np.any(w < 0):
        raise RequestError(f"task_weights: must be non-negative, got {w.tolist()}")
    return w


class StageRunner(ABC):
    INPUTS: Sequence[TensorSpec] = ()
    OUTPUTS: Sequence[TensorSpec] = ()

    def __init__(self, version_dir: Path, params: Optional[Dict[str, str]] = None):
        self.version_dir = Path(version_dir)
        self.params = params or {}
        artifact = self.version_dir / ARTIFACT
        if not artifact.exists():
            raise FileNotFoundError(f"missing model artifact {artifact}: run `make build`")
        try:
            self.module = torch.jit.load(str(artifact), map_location="cpu")
        except Exception as e:  # a truncated or foreign file
            raise RuntimeError(f"cannot load model artifact {artifact}: {e}") from e
        self.module.eval()

    def run(self, requests: List[Arrays]) -> List[Result]:
        results: List[Result] = [RequestError("internal: no result")] * len(requests)
        prepared, index = [], []
        for i, req in enumerate(requests):
            try:
                prepared.append(self.prepare(req))
                index.append(i)
            except RequestError as e:
                results[i] = e
        if prepared:
            with torch.inference_mode():
                for i, out in zip(index, self.compute(prepared)):
                    results[i] = out
        return results

    @abstractmethod
    def prepare(self, request: Arrays):
        """Validate and decode one request (raise RequestError); cheap, before any heavy work."""

    @abstractmethod
    def compute(self, prepared: list) -> List[Result]:
        """Run the module once on the whole batch."""


class FilterRunner(StageRunner):
    INPUTS = (TensorSpec("filter", "STRING", (1,)),)
    OUTPUTS = (TensorSpec("filter_bits", "INT64", (-1,)),)

    def __init__(self, version_dir, params=None):
        super().__init__(version_dir, params)
        self.schema = Schema.from_json((self.version_dir / "schema.json").read_text())

    def prepare(self, request):
        raw = _one_row(request, "filter").reshape(-1)[0]
        try:
            return parse_plan(raw, self.schema)
        except FilterError as e:
            raise RequestError(f"filter: {e}") from None

    def compute(self, prepared):
        bits = self.module(batch_plans(prepared)).numpy()
        return [{"filter_bits": bits[i: i + 1]} for i in range(len(prepared))]


class AnnRunner(StageRunner):
    INPUTS = (TensorSpec("user_id", "INT64", (1,)), TensorSpec("filter_bits", "INT64", (-1,)),
              TensorSpec("k", "INT32", (1,)))
    OUTPUTS = (TensorSpec("candidate_rows", "INT64", (-1,)),
               TensorSpec("user_embedding", "FP32", (-1,)))

    def prepare(self, request):
        k = check_k(request)
        user = int(_one_row(request, "user_id").reshape(-1)[0])
        bits = _one_row(request, "filter_bits").astype(np.int64, copy=False)
        return user, bits, k

    def compute(self, prepared):
        users = torch.tensor([p[0] for p in prepared], dtype=torch.int64)
        bits = torch.from_numpy(np.stack([p[1] for p in prepared]))
        ks = torch.tensor([p[2] for p in prepared], dtype=torch.int64)
        rows, _, counts, user_emb = (t.numpy() for t in self.module(users, bits, ks))
        return [{"candidate_rows": rows[i: i + 1, : counts[i]],
                 "user_embedding": user_emb[i: i + 1]} for i in range(len(prepared))]


class ScorerRunner(StageRunner):
    INPUTS = (TensorSpec("user_embedding", "FP32", (-1,)),
              TensorSpec("candidate_rows", "INT64", (-1,)))
    OUTPUTS = (TensorSpec("candidate_task_scores", "FP32", (-1, NUM_TASKS)),)

    def prepare(self, request):
        return (_one_row(request, "user_embedding").astype(np.float32, copy=False),
                _one_row(request, "candidate_rows").astype(np.int64, copy=False))

    def compute(self, prepared):
        user = torch.from_numpy(np.stack([p[0] for p in prepared]))
        rows = pad_rows([p[1] for p in prepared])
        scores = self.module(user, rows).numpy()
        return [{"candidate_task_scores": scores[i: i + 1, : len(p[1])]}
                for i, p in enumerate(prepared)]


class AggregatorRunner(StageRunner):
    INPUTS = (TensorSpec("candidate_rows", "INT64", (-1,)),
              TensorSpec("candidate_task_scores", "FP32", (-1, NUM_TASKS)),
              TensorSpec("k", "INT32", (1,)),
              TensorSpec("task_weights", "FP32", (NUM_TASKS,), optional=True))
    OUTPUTS = (TensorSpec("item_ids", "INT64", (-1,)), TensorSpec("scores", "FP32", (-1,)),
               TensorSpec("task_scores", "FP32", (-1, NUM_TASKS)))

    def __init__(self, version_dir, params=None):
        super().__init__(version_dir, params)
        self.default_weights = self.module.default_weights.numpy()

    def prepare(self, request):
        k = check_k(request)
        weights = check_task_weights(request, self.default_weights)
        rows = _one_row(request, "candidate_rows").astype(np.int64, copy=False)
        tasks = _one_row(request, "candidate_task_scores").astype(np.float32, copy=False)
        return rows, tasks, k, weights

    def compute(self, prepared):
        rows = pad_rows([p[0] for p in prepared])
        tasks = torch.zeros(rows.shape + (NUM_TASKS,), dtype=torch.float32)
        for i, p in enumerate(prepared):
            tasks[i, : len(p[0])] = torch.from_numpy(p[1])
        counts = torch.tensor([len(p[0]) for p in prepared], dtype=torch.int64)
        ks = torch.tensor([p[2] for p in prepared], dtype=torch.int64)
        weights = torch.from_numpy(np.stack([p[3] for p in prepared]))
        ids, values, task_scores, n = (t.numpy() for t in self.module(
            rows, tasks, counts, ks, weights))
        return [{"item_ids": ids[i: i + 1, : n[i]], "scores": values[i: i + 1, : n[i]],
                 "task_scores": task_scores[i: i + 1, : n[i]]} for i in range(len(prepared))]


class UnifiedRunner(StageRunner):
    """The whole retrieval in one module: same contract as the `retrieval` ensemble."""

    INPUTS = (TensorSpec("user_id", "INT64", (1,)), TensorSpec("filter", "STRING", (1,)),
              TensorSpec("k", "INT32", (1,)),
              TensorSpec("task_weights", "FP32", (NUM_TASKS,), optional=True))
    OUTPUTS = AggregatorRunner.OUTPUTS

    def __init__(self, version_dir, params=None):
        super().__init__(version_dir, params)
        self.schema = Schema.from_json((self.version_dir / "schema.json").read_text())
        self.default_weights = self.module.aggregator.default_weights.numpy()

    def prepare(self, request):
        k = check_k(request)
        weights = check_task_weights(request, self.default_weights)
        user = int(_one_row(request, "user_id").reshape(-1)[0])
        raw = _one_row(request, "filter").reshape(-1)[0]
        try:
            plan = parse_plan(raw, self.schema)
        except FilterError as e:
            raise RequestError(f"filter: {e}") from None
        return plan, user, k, weights

    def compute(self, prepared):
        plans = batch_plans([p[0] for p in prepared])
        users = torch.tensor([p[1] for p in prepared], dtype=torch.int64)
        ks = torch.tensor([p[2] for p in prepared], dtype=torch.int64)
        weights = torch.from_numpy(np.stack([p[3] for p in prepared]))
        ids, values, task_scores, n = (t.numpy() for t in self.module(plans, users, ks, weights))
        return [{"item_ids": ids[i: i + 1, : n[i]], "scores": values[i: i + 1, : n[i]],
                 "task_scores": task_scores[i: i + 1, : n[i]]} for i in range(len(prepared))]


def pad_rows(rows: List[np.ndarray]) -> torch.Tensor:
    """Stack variable-length candidate row lists into int64 [B, C] padded with -1."""
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.from_numpy(r)
    return out


RUNNERS = {"filter": FilterRunner, "ann": AnnRunner, "scorer": ScorerRunner,
           "aggregator": AggregatorRunner, "unified": UnifiedRunner}
