"""In-process cost of the target-aware OverArch (stages/scorer.py): one request's scorer call
with and without its history, scripted, one intra-op thread (as the `scorer` model serves).

    .venv/bin/python benchmarks/scorer_history.py --candidates 400 --history 100

Prints the median and p90 milliseconds per call of each, and their ratio, for item vectors of
width 64 (the two towers) and 512 (the linear history model on MovieLens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.item_vectors import Fp32Vectors  # noqa: E402
from stages.scorer import OverArch, OverArchConfig, OverArchScorer  # noqa: E402


def time_calls(scorer, args, repeats: int) -> np.ndarray:
    """Milliseconds of each of `repeats` calls scorer(*args), after 5 warm-up calls."""
    for _ in range(5):
        scorer(*args)
    out = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        scorer(*args)
        out[i] = (time.perf_counter() - start) * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=int, default=400)
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 512])
    p.add_argument("--batch", type=int, default=1, help="requests per call")
    p.add_argument("--repeats", type=int, default=200)
    a = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"B={a.batch}, C={a.candidates}, L={a.history}, N={a.items}, 1 thread: ms per call")
    for dim in a.dims:
        arch = OverArch(dim, 3, OverArchConfig()).eval()
        scorer = torch.jit.script(OverArchScorer(
            Fp32Vectors(torch.randn(a.items, dim, generator=g)),
            torch.randn(a.items, 4, generator=g), arch).eval())
        user = torch.randn(a.batch, dim, generator=g)
        rows = torch.randint(0, a.items, (a.batch, a.candidates), generator=g)
        history = torch.randint(0, a.items, (a.batch, a.history), generator=g)
        with torch.inference_mode():
            without = time_calls(scorer, (user, rows), a.repeats)
            with_history = time_calls(scorer, (user, rows, history), a.repeats)
        p50, p50h = np.median(without), np.median(with_history)
        print(f"D={dim}: without history p50 {p50:.3f} p90 {np.percentile(without, 90):.3f}; "
              f"with history p50 {p50h:.3f} p90 {np.percentile(with_history, 90):.3f}; "
              f"ratio p50 {p50h / p50:.2f}")


if __name__ == "__main__":
    main()
