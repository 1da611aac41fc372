"""Recall in process, without Triton: the exact reference's answers, a chain's answers,
recall@k, and the FAISS baseline's nprobe matched to `unified`'s recall. Used by
benchmarks/serving.py (served) and benchmarks/gpu_vs_chain.py (in process, no Locust)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from loadtest.workload import Request
from serving.inprocess import InProcessChain, exact_reference


def exact_results(repository: Path, queries: List[Request], chunk: int = 16
                  ) -> List[np.ndarray]:
    return chain_results(exact_reference(repository), queries, chunk)


def chain_results(chain: InProcessChain, queries: List[Request], chunk: int = 16
                  ) -> List[np.ndarray]:
    out = []
    for i in range(0, len(queries), chunk):
        out += [r["item_ids"] for r in chain.run([(q.user_id, q.filter, q.k)
                                                  for q in queries[i: i + chunk]])]
    return out


def query_recall(got: np.ndarray, want: np.ndarray) -> float:
    """|got & want| / |want| (want not empty)."""
    return len(set(got.tolist()) & set(want.tolist())) / len(want)


def mean_recall(got: List[np.ndarray], exact: List[np.ndarray]) -> float:
    return float(np.mean([query_recall(g, e) for g, e in zip(got, exact) if len(e)]))


NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def match_baseline_recall(repository: Path, queries: List[Request], exact: List[np.ndarray]
                          ) -> Dict[str, float]:
    """The baseline at the recall of `unified`: the smallest FAISS nprobe whose recall@k (in
    process, the same evaluation queries) is at least unified's, written into the served
    baseline_ann config. Returns the recalls seen."""
    from serving.runners import RUNNERS

    unified = RUNNERS["unified"](repository / "unified" / "1")
    got = []
    for q in queries:
        out = unified.run([{"user_id": np.array([[q.user_id]], np.int64),
                            "filter": np.array([[q.filter.encode()]], object),
                            "k": np.array([[q.k]], np.int32)}])[0]
        got.append(out["item_ids"][0])
    target = mean_recall(got, exact)
    seen = {"unified": target}
    chosen = NPROBES[-1]
    for nprobe in NPROBES:
        chain = InProcessChain(repository, ann_params={"nprobe": str(nprobe)})
        seen[f"baseline nprobe {nprobe}"] = mean_recall(chain_results(chain, queries), exact)
        if seen[f"baseline nprobe {nprobe}"] >= target:
            chosen = nprobe
            break
    config = repository / "baseline_ann" / "config.pbtxt"
    text = config.read_text()
    text = text.rstrip("\n") + (
        "\n# benchmarks/serving.py --match-recall: the smallest nprobe with recall@k at least "
        f"unified's ({target:.3f})\nparameters {{ key: \"nprobe\" value: {{ string_value: "
        f"\"{chosen}\" }} }}\n")
    config.write_text(text)
    seen["chosen nprobe"] = chosen
    return seen
