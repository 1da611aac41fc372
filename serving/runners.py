"""What each Triton model does with a batch of requests, independent of Triton.

A runner takes the requests of one dynamic batch as dicts of numpy arrays (batch dimension
first, one row per request), runs its TorchScript module once on the whole batch and returns,
per request, a dict of output arrays or a `RequestError`. `serving/python_backend.py` adapts it
to the Python backend; tests call runners directly to run the stages in-process.

Each runner declares its tensors (`INPUTS`, `OUTPUTS`); tests check them against
`model_repository/*/config.pbtxt` and the exported modules.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import kernels  # noqa: F401  (registers torch.ops.iam.* before TorchScript graphs load)
from filtering.expression import FilterError, batch_plans, parse_plan
from fresh.tables import FreshView
from stages import archive
from stages.history import MAX_HISTORY, batch_history
from world.schema import Schema

MAX_K = 1000  # largest k a request may ask for
DEVICE_ENV = "IAM_DEVICE"  # where the modules run when the config does not say: cpu|cuda|auto
# The Value Model's tasks come from the config's `tasks` parameter (the builder writes a
# catalog's tasks there); a TensorSpec dimension TASKS_DIM stands for their number.
DEFAULT_TASKS = ("click", "like", "share")
TASKS_DIM = -2
ARTIFACT = archive.ARTIFACT

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A problem with one request; the message is sent to its client as the error.

    `status` is the Triton error code of the response: INVALID_ARG (HTTP 400, gRPC
    INVALID_ARGUMENT) for a request the caller got wrong."""

    status = "INVALID_ARG"


class RequestFailed(RequestError):
    """The module failed on this request while its batch-mates succeeded (INTERNAL, HTTP 500):
    reported to this request alone, the server keeps serving."""

    status = "INTERNAL"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton data type without the TYPE_ prefix
    dims: Tuple[int, ...]
    optional: bool = False


Arrays = Dict[str, np.ndarray]
Result = Union[Arrays, RequestError]

NUMPY_DTYPES = {"INT64": np.dtype(np.int64), "INT32": np.dtype(np.int32),
                "FP32": np.dtype(np.float32), "BOOL": np.dtype(np.bool_)}


def config_tasks(params: Dict[str, str]) -> Tuple[str, ...]:
    """The task names of a model config's `tasks` parameter (comma-separated)."""
    text = params.get("tasks", "")
    return tuple(t for t in text.split(",") if t) or DEFAULT_TASKS


def resolve_specs(specs: Sequence[TensorSpec], num_tasks: int) -> Tuple[TensorSpec, ...]:
    """`specs` with every TASKS_DIM dimension set to `num_tasks`."""
    return tuple(TensorSpec(s.name, s.dtype, tuple(num_tasks if d == TASKS_DIM else d
                                                   for d in s.dims), s.optional)
                 for s in specs)


def _wire_name(dtype: str) -> str:
    return "BYTES" if dtype == "STRING" else dtype  # the name clients send


def decode(request: Arrays, specs: Sequence[TensorSpec], max_rows: int = 1) -> Arrays:
    """The one row of each input of `specs`, checked: present unless optional, the declared data
    type, shape [1, *dims] (one query per request; -1 = any length), BYTES elements that are
    bytes. Triton checks type and rank for its clients; this also guards direct callers of the
    runners, so that a malformed tensor never reaches a batched module.

    With `max_rows` > 1 (a model whose request carries several rows, `item_updates`), every
    input has the same 1..max_rows rows and the whole arrays are returned."""
    rows = {}
    count = None
    for spec in specs:
        value = request.get(spec.name)
        if value is None:
            if spec.optional:
                continue
            raise RequestError(f"{spec.name}: missing required input")
        if not isinstance(value, np.ndarray):
            raise RequestError(f"{spec.name}: expected a {_wire_name(spec.dtype)} tensor, got "
                               f"{type(value).__name__}")
        if spec.dtype == "STRING":
            if value.dtype.kind not in "OS":
                raise RequestError(f"{spec.name}: expected BYTES data, got {value.dtype}")
        elif value.dtype != NUMPY_DTYPES[spec.dtype]:
            raise RequestError(f"{spec.name}: expected {spec.dtype} data, got {value.dtype}")
        lead = "1" if max_rows == 1 else "rows"
        want = f"[{lead}, " + ", ".join("n" if d < 0 else str(d) for d in spec.dims) + "]"
        if value.ndim != 1 + len(spec.dims) or any(
                d >= 0 and got != d for got, d in zip(value.shape[1:], spec.dims)):
            raise RequestError(f"{spec.name}: expected shape {want}"
                               + (" (one query per request)" if max_rows == 1 else "")
                               + f", got {list(value.shape)}")
        if value.shape[0] == 0:
            raise RequestError(f"{spec.name}: empty batch (shape {list(value.shape)}); send "
                               "exactly one query per request")
        if max_rows > 1:
            if value.shape[0] > max_rows or (count is not None and value.shape[0] != count):
                raise RequestError(f"{spec.name}: {value.shape[0]} rows; every input of a "
                                   f"request has the same number of rows, at most {max_rows}")
            count = value.shape[0]
        elif value.shape[0] != 1:
            raise RequestError(f"{spec.name}: batch of {value.shape[0]} rows in one request; "
                               "send one query per request (Triton's dynamic batcher batches "
                               "requests)")
        if spec.dtype == "STRING":
            for x in value.reshape(-1):
                if not isinstance(x, (bytes, str)):
                    raise RequestError(f"{spec.name}: expected BYTES elements, got "
                                       f"{type(x).__name__}")
        rows[spec.name] = value[0] if max_rows == 1 else value
    return rows


def check_k(k: np.ndarray) -> int:
    """The row of input `k`: an integer in 1..MAX_K."""
    value = int(k.reshape(-1)[0])
    if not 1 <= value <= MAX_K:
        raise RequestError(f"k: must be between 1 and {MAX_K}, got {value}")
    return value


def check_task_weights(w: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The row of the optional input `task_weights` (None when absent): finite, >= 0."""
    if w is None:
        return None
    if not np.all(np.isfinite(w)):
        raise RequestError("task_weights: must be finite numbers (got NaN or infinity)")
    if np.any(w < 0):
        raise RequestError(f"task_weights: must be non-negative, got {w.tolist()}")
    return w


def check_history(history: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The row of the optional input `history` (None when absent): at most MAX_HISTORY raw
    item ids, none negative."""
    if history is None:
        return None
    if history.shape[0] > MAX_HISTORY:
        raise RequestError(f"history: at most {MAX_HISTORY} item ids (the most recent first), "
                           f"got {history.shape[0]}")
    if history.size and history.min() < 0:
        raise RequestError(f"history: item ids are non-negative, got {int(history.min())}")
    return history


def check_filter(raw, schema: Schema) -> torch.Tensor:
    """The row of input `filter` parsed into a plan (filtering/expression.py)."""
    try:
        return parse_plan(raw[0], schema)
    except FilterError as e:
        raise RequestError(f"filter: {e}") from None


def check_rows(name: str, rows: np.ndarray) -> np.ndarray:
    """Candidate rows handed between stages: index rows, never negative."""
    if rows.size and rows.min() < 0:
        raise RequestError(f"{name}: negative row {int(rows.min())}")
    return rows


def check_finite(name: str, values: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise RequestError(f"{name}: must be finite numbers (got NaN or infinity)")
    return values


def resolve_device(requested: Optional[str]) -> torch.device:
    """The device the modules run on: the model config's `device` parameter, else the
    IAM_DEVICE environment variable, else the CPU. `auto` is CUDA when torch sees a GPU."""
    name = (requested or os.environ.get(DEVICE_ENV) or "cpu").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: expected cpu, cuda, cuda:N or auto") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested ({DEVICE_ENV} or the config's `device` "
                           "parameter) but torch sees no CUDA device")
    return device


class StageRunner(ABC):
    """Args:
        version_dir: <repository>/<model>/<version>, holding model.pt.
        params: the model config's parameters; `device` (cpu, cuda, cuda:N, auto) places the
            module (default: $IAM_DEVICE, else cpu). Requests arrive and leave as numpy
            arrays on the host; a batch crosses to the device once and back once.
    """

    STAGE = ""  # the model's name, in messages
    INPUTS: Sequence[TensorSpec] = ()
    OUTPUTS: Sequence[TensorSpec] = ()

    def __init__(self, version_dir: Path, params: Optional[Dict[str, str]] = None):
        self.version_dir = Path(version_dir)
        self.params = params or {}
        self.tasks = config_tasks(self.params)
        # this model's tensors, the task dimension resolved (the class keeps the template)
        self.INPUTS = resolve_specs(type(self).INPUTS, len(self.tasks))
        self.OUTPUTS = resolve_specs(type(self).OUTPUTS, len(self.tasks))
        self.device = resolve_device(self.params.get("device"))
        artifact = self.version_dir / ARTIFACT
        if not artifact.exists():
            raise FileNotFoundError(f"missing model artifact {artifact}: run `make build`")
        try:
            # TorchScript archives are read by torch's own restricted unpickler (tensors and
            # TorchScript types only), never by Python's pickle, and its large tensors are
            # .npy files, mapped (shared by every model of the build) and read without
            # pickles (stages/archive.py): no code runs from a file
            self.module = archive.load(self.version_dir, self.device)
        except Exception as e:  # a truncated or foreign file
            raise RuntimeError(f"cannot load model artifact {artifact}: {_summary(e)}") from e
        self.module.eval()
        # fresh items (fresh/tables.py): the store's tables, handed to every forward; a model
        # that parses filters checks that the store speaks its schema
        schema = _load_schema(self.version_dir) \
            if (self.version_dir / "schema.json").exists() else None
        self.fresh = FreshView.for_model(self.version_dir, self.module, schema, self.device)
        self._fresh_on_device: Tuple[object, object] = (None, None)

    def forward(self, *args):
        """The module on one batch (host tensors in, host tensors out), with the fresh store's
        tables when it takes them."""
        on_cpu = self.device.type == "cpu"
        if not on_cpu:
            args = tuple(_to_device(a, self.device) for a in args)
        if self.fresh is None:
            out = self.module(*args)
        else:
            out = self.module(*args, self._fresh_tables())
        if on_cpu:
            return out
        if isinstance(out, tuple):  # a NamedTuple (AnnResult, Ranked) keeps its type
            return type(out)(*(t.cpu() for t in out))
        return out.cpu()

    def _fresh_tables(self):
        tables = self.fresh.current()
        if self.device.type == "cpu" or tables is None:
            return tables
        host, moved = self._fresh_on_device
        if host is not tables:  # the store changed: copy its tables once, not per batch
            moved = type(tables)(*(t.to(self.device) for t in tables))
            self._fresh_on_device = (tables, moved)
        return moved

    def run(self, requests: List[Arrays]) -> List[Result]:
        """One result per request: outputs, or the RequestError that answers it."""
        results: List[Result] = [RequestFailed("internal: no result")] * len(requests)
        prepared, index = [], []
        for i, req in enumerate(requests):
            try:
                prepared.append(self.prepare(decode(req, self.INPUTS)))
                index.append(i)
            except RequestError as e:
                results[i] = e
        if prepared:
            for i, out in zip(index, self._compute_isolated(prepared)):
                results[i] = out
        return results

    def _compute_isolated(self, prepared: list) -> List[Result]:
        """compute() on the batch; should it raise, on each request alone, so that a request
        the module cannot process (e.g. a direct caller's out-of-range rows) fails by itself
        and its batch-mates still get their results."""
        with torch.inference_mode():
            try:
                return self.compute(prepared)
            except Exception as e:
                if len(prepared) == 1:
                    return [self._failed(e)]
                log.warning("%s: a batch of %d failed (%s); running its requests one by one",
                            self.STAGE, len(prepared), _summary(e))
            results: List[Result] = []
            for p in prepared:
                try:
                    results.extend(self.compute([p]))
                except Exception as e:
                    results.append(self._failed(e))
            return results

    def _failed(self, e: Exception) -> RequestFailed:
        return RequestFailed(f"{self.STAGE}: the model failed on this request: {_summary(e)}")

    @abstractmethod
    def prepare(self, row: Arrays):
        """Check and convert one request (`decode`d rows; raise RequestError): cheap, before
        any heavy work."""

    @abstractmethod
    def compute(self, prepared: list) -> List[Result]:
        """Run the module once on the whole batch."""


def _to_device(arg, device: torch.device):
    """A module argument on `device`: a tensor, a NamedTuple of tensors, or None."""
    if arg is None:
        return None
    if isinstance(arg, tuple):
        return type(arg)(*(t.to(device, non_blocking=True) for t in arg))
    return arg.to(device, non_blocking=True)


def _summary(e: Exception, limit: int = 300) -> str:
    """`Type: message` of an exception in one line; for TorchScript errors the last line (the
    first is "The following operation failed in the TorchScript interpreter")."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [""]
    line = lines[-1] if "TorchScript interpreter" in lines[0] else lines[0]
    return (line if line.startswith(f"{type(e).__name__}:")
            else f"{type(e).__name__}: {line}")[:limit]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"cannot read model artifact {path}: {e.strerror}: "
                                "run `make build`") from e


def _load_schema(version_dir: Path) -> Schema:
    path = version_dir / "schema.json"
    try:
        return Schema.from_json(_read_text(path))
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"cannot load model artifact {path}: {_summary(e)}") from e


class FilterRunner(StageRunner):
    STAGE = "filter"
    INPUTS = (TensorSpec("filter", "STRING", (1,)),)
    OUTPUTS = (TensorSpec("filter_bits", "INT64", (-1,)),)

    def __init__(self, version_dir, params=None):
        super().__init__(version_dir, params)
        self.schema = _load_schema(self.version_dir)

    def prepare(self, row):
        return check_filter(row["filter"], self.schema)

    def compute(self, prepared):
        bits = self.forward(batch_plans(prepared)).numpy()
        return [{"filter_bits": bits[i: i + 1]} for i in range(len(prepared))]


class RetrievalFilterRunner(FilterRunner):
    """The `filter` stage of the `retrieval` ensemble, its first step. The ensemble also hands
    it `k` and `task_weights` (used downstream) so that a bad request is rejected before the
    ANN and scorer run; they are optional here only so that the stage can be run on filters
    alone."""

    INPUTS = FilterRunner.INPUTS + (
        TensorSpec("k", "INT32", (1,), optional=True),
        TensorSpec("task_weights", "FP32", (TASKS_DIM,), optional=True))

    def prepare(self, row):
        if "k" in row:
            check_k(row["k"])
        check_task_weights(row.get("task_weights"))
        return super().prepare(row)


class AnnRequest(NamedTuple):
    user_id: int
    filter_bits: np.ndarray  # int64 [W]
    k: int
    history: Optional[np.ndarray] = None  # int64 [n] raw item ids, or None: not given


class ScorerRequest(NamedTuple):
    user_embedding: np.ndarray  # float32 [D]
    rows: np.ndarray  # int64 [C]
    history_rows: Optional[np.ndarray] = None  # int64 [L] rows the user vector was made of


class AggregatorRequest(NamedTuple):
    rows: np.ndarray  # int64 [C]
    task_scores: np.ndarray  # float32 [C, T]
    k: int
    weights: np.ndarray  # float32 [T]: the request's, or the model's defaults


class UnifiedRequest(NamedTuple):
    plan: torch.Tensor  # int64 [L, 3]
    user_id: int
    k: int
    weights: np.ndarray  # float32 [T]
    history: Optional[np.ndarray]  # int64 [n] raw item ids, or None: not given


def answers(ranked, count: int) -> List[Result]:
    """Per query, the first counts[b] results of a `Ranked` batch (stages/aggregator.py)."""
    ids, values, tasks, n = (t.numpy() for t in ranked)
    return [{"item_ids": ids[i: i + 1, : n[i]], "scores": values[i: i + 1, : n[i]],
             "task_scores": tasks[i: i + 1, : n[i]]} for i in range(count)]


HISTORY = TensorSpec("history", "INT64", (-1,), optional=True)


class AnnRunner(StageRunner):
    STAGE = "ann"
    INPUTS = (TensorSpec("user_id", "INT64", (1,)), TensorSpec("filter_bits", "INT64", (-1,)),
              TensorSpec("k", "INT32", (1,)), HISTORY)
    OUTPUTS = (TensorSpec("candidate_rows", "INT64", (-1,)),
               TensorSpec("user_embedding", "FP32", (-1,)),
               TensorSpec("history_rows", "INT64", (-1,)))

    def prepare(self, row):
        return AnnRequest(int(row["user_id"][0]), row["filter_bits"], check_k(row["k"]),
                          check_history(row.get("history")))

    def compute(self, prepared: List[AnnRequest]):
        users = torch.tensor([p.user_id for p in prepared], dtype=torch.int64)
        bits = torch.from_numpy(np.stack([p.filter_bits for p in prepared]))
        ks = torch.tensor([p.k for p in prepared], dtype=torch.int64)
        history = batch_history([p.history for p in prepared])
        found = self.forward(users, bits, ks, history)
        rows, counts, user_emb, history = (t.numpy() for t in (
            found.rows, found.counts, found.user_embedding, found.history_rows))
        # a request history's uncounted ids leave -1 holes: only the counted rows are sent
        return [{"candidate_rows": rows[i: i + 1, : counts[i]],
                 "user_embedding": user_emb[i: i + 1],
                 "history_rows": history[i: i + 1][:, history[i] >= 0]}
                for i in range(len(prepared))]


class ScorerRunner(StageRunner):
    STAGE = "scorer"
    # history_rows: the rows of the history the `ann` stage made the user vector of, which the
    # target-aware OverArch attends over (stages/scorer.py); absent: no history
    INPUTS = (TensorSpec("user_embedding", "FP32", (-1,)),
              TensorSpec("candidate_rows", "INT64", (-1,)),
              TensorSpec("history_rows", "INT64", (-1,), optional=True))
    OUTPUTS = (TensorSpec("candidate_task_scores", "FP32", (-1, TASKS_DIM)),)

    def prepare(self, row):
        history = row.get("history_rows")
        return ScorerRequest(check_finite("user_embedding", row["user_embedding"]),
                             check_rows("candidate_rows", row["candidate_rows"]),
                             None if history is None else check_rows("history_rows", history))

    def compute(self, prepared: List[ScorerRequest]):
        user = torch.from_numpy(np.stack([p.user_embedding for p in prepared]))
        rows = pad_rows([p.rows for p in prepared])
        history = None
        if any(p.history_rows is not None for p in prepared):
            history = pad_rows([np.zeros(0, np.int64) if p.history_rows is None
                                else p.history_rows for p in prepared])
        scores = self.forward(user, rows, history).numpy()
        return [{"candidate_task_scores": scores[i: i + 1, : len(p.rows)]}
                for i, p in enumerate(prepared)]


class AggregatorRunner(StageRunner):
    STAGE = "aggregator"
    INPUTS = (TensorSpec("candidate_rows", "INT64", (-1,)),
              TensorSpec("candidate_task_scores", "FP32", (-1, TASKS_DIM)),
              TensorSpec("k", "INT32", (1,)),
              TensorSpec("task_weights", "FP32", (TASKS_DIM,), optional=True))
    OUTPUTS = (TensorSpec("item_ids", "INT64", (-1,)), TensorSpec("scores", "FP32", (-1,)),
               TensorSpec("task_scores", "FP32", (-1, TASKS_DIM)))

    def __init__(self, version_dir, params=None):
        super().__init__(version_dir, params)
        self.default_weights = default_weights(self.module, self.tasks, self.version_dir)

    def prepare(self, row):
        k = check_k(row["k"])
        weights = check_task_weights(row.get("task_weights"))
        rows = check_rows("candidate_rows", row["candidate_rows"])
        tasks = check_finite("candidate_task_scores", row["candidate_task_scores"])
        if len(tasks) != len(rows):
            raise RequestError(f"candidate_task_scores: {len(tasks)} rows for {len(rows)} "
                               "candidate_rows")
        return AggregatorRequest(rows, tasks, k,
                                 self.default_weights if weights is None else weights)

    def compute(self, prepared: List[AggregatorRequest]):
        rows = pad_rows([p.rows for p in prepared])
        tasks = torch.zeros(rows.shape + (len(self.tasks),), dtype=torch.float32)
        for i, p in enumerate(prepared):
            tasks[i, : len(p.rows)] = torch.from_numpy(p.task_scores)
        counts = torch.tensor([len(p.rows) for p in prepared], dtype=torch.int64)
        ks = torch.tensor([p.k for p in prepared], dtype=torch.int64)
        weights = torch.from_numpy(np.stack([p.weights for p in prepared]))
        return answers(self.forward(rows, tasks, counts, ks, weights), len(prepared))


class UnifiedRunner(StageRunner):
    """The whole retrieval in one module: same contract as the `retrieval` ensemble, and the
    same checks in the same order (k, task_weights, filter), so both give the same errors."""

    STAGE = "unified"
    INPUTS = (TensorSpec("user_id", "INT64", (1,)), TensorSpec("filter", "STRING", (1,)),
              TensorSpec("k", "INT32", (1,)),
              TensorSpec("task_weights", "FP32", (TASKS_DIM,), optional=True), HISTORY)
    OUTPUTS = AggregatorRunner.OUTPUTS

    def __init__(self, version_dir, params=None):
        super().__init__(version_dir, params)
        self.schema = _load_schema(self.version_dir)
        self.default_weights = default_weights(self.module.aggregator, self.tasks,
                                               self.version_dir)

    def prepare(self, row):
        k = check_k(row["k"])
        weights = check_task_weights(row.get("task_weights"))
        history = check_history(row.get("history"))
        plan = check_filter(row["filter"], self.schema)
        return UnifiedRequest(plan, int(row["user_id"][0]), k,
                              self.default_weights if weights is None else weights, history)

    def compute(self, prepared: List[UnifiedRequest]):
        plans = batch_plans([p.plan for p in prepared])
        users = torch.tensor([p.user_id for p in prepared], dtype=torch.int64)
        ks = torch.tensor([p.k for p in prepared], dtype=torch.int64)
        weights = torch.from_numpy(np.stack([p.weights for p in prepared]))
        history = batch_history([p.history for p in prepared])
        return answers(self.forward(plans, users, ks, weights, history), len(prepared))


def default_weights(aggregator, tasks: Tuple[str, ...], version_dir: Path) -> np.ndarray:
    """The Value Model's built-in weights, one per task of the config."""
    weights = aggregator.default_weights.cpu().numpy()
    if weights.shape != (len(tasks),):
        raise RuntimeError(f"{version_dir}: the model has {weights.shape[0]} task weights, its "
                           f"config names {len(tasks)} tasks ({', '.join(tasks)}): rebuild "
                           "the repository")
    return weights


def pad_rows(rows: List[np.ndarray]) -> torch.Tensor:
    """Stack variable-length candidate row lists into int64 [B, C] padded with -1."""
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.from_numpy(r)
    return out


RUNNERS = {"filter": RetrievalFilterRunner, "ann": AnnRunner, "scorer": ScorerRunner,
           "aggregator": AggregatorRunner, "unified": UnifiedRunner}
