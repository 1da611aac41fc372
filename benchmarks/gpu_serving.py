"""GPU check of the served models: every runner of `unified` and of the `retrieval` ensemble's
stages with its module on CUDA (the `device` config parameter / IAM_DEVICE, serving/runners.py)
against the same runner on the CPU, on a small built repository, with fresh items in the store.

    python3 benchmarks/gpu_serving.py            # on a CUDA machine (the Dockerfile image)
    python3 benchmarks/gpu_serving.py --device cpu   # the code path on a CPU (both sides CPU)

Pass criteria, per request of a mixed workload (no filter, broad, selective, one creator):
the same result count, the same ids up to the order of items whose values tie, values within
fp32 tolerance (the int8 ANN kernel and the torch path compute the same integer dot products;
fp32 sums in the scorer may differ in the last bits). Also: the CUDA chain of the four stages
gives the CUDA `unified` answer. Timings (median per batch) are printed, not judged.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda", help="the device side (cuda, cuda:N or cpu)")
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--per-kind", type=int, default=16, help="requests per filter kind")
    ap.add_argument("--batch", type=int, default=16, help="requests per runner call")
    args = ap.parse_args()

    import torch

    from benchmarks.fresh_items import fill
    from builder.build import BuildConfig, build
    from loadtest.workload import Workload
    from serving.inprocess import InProcessChain
    from serving.runners import RUNNERS, RequestError
    from world.synthetic import WorldConfig

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu_serving_"))
    world = WorldConfig(seed=3, num_items=args.items, num_users=2000, num_creators=500,
                        impressions_per_user=30)
    cfg = BuildConfig(world=world, repository=work / "model_repository",
                      items_csv=work / "items.csv")
    print(f"building {args.items:,} items into {work} ...", flush=True)
    build(cfg, progress=False)
    fill(cfg.repository, cfg.items_csv, 200)  # fresh, replaced and retired items

    workload = Workload.from_catalog(cfg.items_csv, "mixed", 10)
    queries = workload.evaluation_set(args.per_kind, seed=5)
    requests = [{"user_id": np.array([[q.user_id]], np.int64),
                 "filter": np.array([[q.filter.encode()]], object),
                 "k": np.array([[q.k]], np.int32)} for q in queries]
    repo = cfg.repository

    triples = [(q.user_id, q.filter, q.k) for q in queries]

    def batches(fn):
        """fn(start, end) on every batch of the queries -> each query's outputs (no batch
        row), and the median ms per batch."""
        out, times = [], []
        for i in range(0, len(queries), args.batch):
            t0 = time.perf_counter()
            got = fn(i, i + args.batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            out += got
        return out, 1000 * float(np.median(times))

    def unified_on(device):
        model = RUNNERS["unified"](repo / "unified" / "1", {"device": device})

        def run(i, j):
            results = model.run(requests[i:j])
            for r in results:
                if isinstance(r, RequestError):
                    raise RuntimeError(f"a request failed: {r}")
            return [{name: value[0] for name, value in r.items()} for r in results]
        return run

    cpu_unified, cpu_ms = batches(unified_on("cpu"))
    dev_unified_run = unified_on(args.device)
    batches(dev_unified_run)  # warm-up: kernels compile on first use
    dev_unified, dev_ms = batches(dev_unified_run)
    # the retrieval ensemble's four stages in process (InProcessChain.run raises on a failure)
    chain = InProcessChain(repo, filter="filter", ann="ann", device=args.device)

    def chain_run(i, j):
        return chain.run(triples[i:j])

    batches(chain_run)
    dev_chain, chain_ms = batches(chain_run)

    failures = 0
    failures += compare("unified cpu vs " + args.device, cpu_unified, dev_unified, queries)
    failures += compare(f"unified vs retrieval stages on {args.device}", dev_unified, dev_chain,
                        queries)
    print(f"median ms per batch of {args.batch}: unified cpu {cpu_ms:.2f}, unified "
          f"{args.device} {dev_ms:.2f}, retrieval stages {args.device} {chain_ms:.2f}")
    print("PASS" if failures == 0 else f"FAIL: {failures} mismatching requests")
    return 0 if failures == 0 else 1


def compare(label, want, got, queries, rtol=1e-4, atol=1e-5) -> int:
    bad = 0
    for q, w, g in zip(queries, want, got):
        wi, gi = w["item_ids"], g["item_ids"]
        ws, gs = w["scores"], g["scores"]
        ok = len(wi) == len(gi) and np.allclose(ws, gs, rtol=rtol, atol=atol)
        if ok:  # equal ids up to the order within runs of tied values
            start = 0
            for end in range(1, len(wi) + 1):
                if end == len(wi) or not np.isclose(ws[end], ws[start], rtol=rtol, atol=atol):
                    ok &= sorted(wi[start:end].tolist()) == sorted(gi[start:end].tolist())
                    start = end
        if not ok:
            bad += 1
            if bad <= 3:
                print(f"  {label}: {q.kind} {q.filter!r} user {q.user_id}: {wi[:5]} vs {gi[:5]}")
    print(f"{label}: {len(queries) - bad}/{len(queries)} requests equal")
    return bad


if __name__ == "__main__":
    sys.exit(main())
