"""Triton's Prometheus metrics (port 8002): the batch sizes the dynamic batcher really formed.

Triton counts per model `nv_inference_count` (queries, i.e. batch rows: one per request here)
and `nv_inference_exec_count` (executions, i.e. batches run). Over an interval,

    average batch size = delta nv_inference_count / delta nv_inference_exec_count

(Triton's documented reading; with one query per request it equals
`nv_inference_request_success / nv_inference_exec_count`). An ensemble does not batch itself;
its member models' batch sizes are the ones to read.
"""

from __future__ import annotations

import re
import urllib.request
from typing import Dict, Tuple

Counters = Dict[Tuple[str, str], float]  # (metric, model) -> value

_LINE = re.compile(r'^(nv_inference_\w+)\{([^}]*)\}\s+([0-9.eE+-]+)\s*$')
_MODEL = re.compile(r'model="([^"]*)"')
COUNTED = ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success",
           "nv_inference_request_failure")


def parse(text: str) -> Counters:
    """The per-model inference counters of a Prometheus text exposition (all versions summed)."""
    counters: Counters = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or m.group(1) not in COUNTED:
            continue
        model = _MODEL.search(m.group(2))
        if model:
            key = (m.group(1), model.group(1))
            counters[key] = counters.get(key, 0.0) + float(m.group(3))
    return counters


def scrape(url: str, timeout: float = 5.0) -> Counters:
    """GET `url` (e.g. http://127.0.0.1:8002/metrics) and parse it."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode("utf-8", errors="replace"))


def batch_sizes(before: Counters, after: Counters) -> Dict[str, float]:
    """model -> average batch size over the interval, for every model that ran a batch."""
    sizes = {}
    for (metric, model), value in after.items():
        if metric != "nv_inference_exec_count":
            continue
        executions = value - before.get((metric, model), 0.0)
        rows = after.get(("nv_inference_count", model), 0.0) - before.get(
            ("nv_inference_count", model), 0.0)
        if executions > 0:
            sizes[model] = rows / executions
    return sizes

