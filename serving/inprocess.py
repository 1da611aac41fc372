"""The served stages run in this process, without Triton: the tests and benchmarks compare
every model's answers with these (never imported by a model.py).

`InProcessChain(repo)` is the baseline ensemble's four steps; `InProcessChain(repo, "filter",
"ann")` the retrieval ensemble's; `exact_reference(repo)` the ground truth recall is measured
against (exact filter, exact fp32 search, the repository's own scorer and aggregator).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from serving.baseline import RUNNERS as BASELINE_RUNNERS
from serving.runners import RUNNERS as STAGE_RUNNERS


class InProcessChain:
    """filter -> ann -> scorer -> aggregator runners in this process, on a built repository.

    `InProcessChain(repo)` is the baseline ensemble without Triton; `exact_reference(repo)`
    is the ground truth the benchmarks measure recall against.

    Args:
        repository: a built model repository.
        filter, ann: model names of the first two steps.
        ann_params: parameters for the ann runner (as config.pbtxt would give them).
        device: every runner's `device` parameter (serving/runners.py resolve_device);
            None: their default.
    """

    def __init__(self, repository: Path, filter: str = "baseline_filter",
                 ann: str = "baseline_ann", ann_params: Optional[Dict[str, str]] = None,
                 device: Optional[str] = None):
        runners = {**STAGE_RUNNERS, **BASELINE_RUNNERS}
        repository = Path(repository)
        common = {} if device is None else {"device": device}
        self.filter = runners[filter](repository / filter / "1", common)
        self.ann = runners[ann](repository / ann / "1", {**common, **(ann_params or {})})
        self.scorer = runners["scorer"](repository / "scorer" / "1", common)
        self.aggregator = runners["aggregator"](repository / "aggregator" / "1", common)

    def run(self, queries: Sequence[Tuple[int, str, int]],
            cpu_seconds: Optional[Dict[str, float]] = None) -> List[Dict[str, np.ndarray]]:
        """(user_id, filter, k) per query, run as one batch -> the model outputs of each query
        (item_ids, scores, task_scores without the batch row). Raises on a bad query.
        `cpu_seconds`, when given, accumulates this process's CPU time per step."""
        def step(name, runner, requests):
            start = time.process_time()
            results = runner.run(requests)
            if cpu_seconds is not None:
                cpu_seconds[name] = cpu_seconds.get(name, 0.0) + time.process_time() - start
            for r in results:
                if isinstance(r, Exception):
                    raise r
            return results

        bits = step("filter", self.filter, [{"filter": np.array([[f.encode()]], object)}
                                            for _, f, _ in queries])
        ks = [np.array([[k]], dtype=np.int32) for _, _, k in queries]
        found = step("ann", self.ann, [{"user_id": np.array([[u]], np.int64), "k": k, **b}
                                       for (u, _, _), k, b in zip(queries, ks, bits)])
        scored = step("scorer", self.scorer, found)
        out = step("aggregator", self.aggregator, [
            {"candidate_rows": f["candidate_rows"], "k": k, **s}
            for f, k, s in zip(found, ks, scored)])
        return [{name: value[0] for name, value in o.items()} for o in out]


def exact_reference(repository: Path) -> InProcessChain:
    """Exact filter, exact fp32 inner-product top-(oversample x k) of the matching items, then
    the repository's own scorer and aggregator: what every model's results are compared to."""
    return InProcessChain(repository, ann_params={"search": "exact"})
