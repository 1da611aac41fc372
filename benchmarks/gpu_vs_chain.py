"""`unified` on a GPU against the FAISS service chain on the CPU, in process (issue 13).

The served comparison is `python -m benchmarks.serving [--gpu]`, through Triton. This one runs
the same runners without Triton, for GPU hosts that have no `tritonserver` (a lent machine
that cannot install packages): `unified` with its module on CUDA, and the `baseline` chain
(posting-list filter -> FAISS IVF ANN -> scorer -> aggregator, serving/inprocess.py) on one
CPU thread, as one Triton model instance of it runs. Same catalog (the default 200,000-item
synthetic world), same mixed workload; the FAISS nprobe is the smallest whose recall@10 against
the exact reference reaches unified's (benchmarks/serving.py match_baseline_recall).

    python3 benchmarks/gpu_vs_chain.py                   # on a CUDA machine
    python3 benchmarks/gpu_vs_chain.py --device cpu --num-items 20000 --requests 64   # a check

Prints requests per second per batch size, the recall@10 of each, and the ratios: unified on
the GPU against one chain (one CPU thread) and against as many chains as the host has cores
(the ceiling of a CPU chain on that host, assuming perfect scaling).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    from world.synthetic import WorldConfig

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="unified's device (default: %(default)s)")
    ap.add_argument("--num-items", type=int, default=WorldConfig.num_items,
                    help="catalog size (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=2048,
                    help="mixed requests timed per setting (default: %(default)s)")
    ap.add_argument("--batches", default="1,16,64,256",
                    help="unified batch sizes, comma-separated (default: %(default)s)")
    ap.add_argument("--chain-batch", type=int, default=16,
                    help="requests per call of the chain (default: %(default)s)")
    ap.add_argument("--recall-queries", type=int, default=25,
                    help="recall queries per kind of the mix (default: %(default)s)")
    ap.add_argument("--profile", type=int, default=64, metavar="BATCH",
                    help="print torch.profiler's table of one unified batch of this size on "
                         "the device, by self CPU time (0: none; default: %(default)s)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import faiss
    import torch

    from benchmarks.recall import chain_results, match_baseline_recall, mean_recall
    from builder.build import BuildConfig, build
    from loadtest.workload import Workload
    from serving.inprocess import InProcessChain, exact_reference
    from serving.runners import RUNNERS, RequestError
    from world.synthetic import WorldConfig

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu_vs_chain_"))
    cfg = BuildConfig(world=WorldConfig(num_items=args.num_items),
                      repository=work / "model_repository", items_csv=work / "items.csv")
    t0 = time.perf_counter()
    print(f"building {args.num_items:,} items into {work} ...", flush=True)
    build(cfg, progress=False)
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    repo = cfg.repository
    torch.set_num_threads(1)  # after the build: one thread per model instance, as served
    faiss.omp_set_num_threads(1)

    workload = Workload.from_catalog(cfg.items_csv, "mixed", 10)
    rng = random.Random(7)
    stream = [workload.sample(rng) for _ in range(args.requests)]
    evaluation = workload.evaluation_set(args.recall_queries, seed=1)

    def requests_of(queries) -> List[Dict[str, np.ndarray]]:
        return [{"user_id": np.array([[q.user_id]], np.int64),
                 "filter": np.array([[q.filter.encode()]], object),
                 "k": np.array([[q.k]], np.int32)} for q in queries]

    exact = chain_results(exact_reference(repo), evaluation)
    matched = match_baseline_recall(repo, evaluation, exact)
    nprobe = matched["chosen nprobe"]
    chain = InProcessChain(repo, ann_params={"nprobe": str(nprobe)})
    rows = []

    def timed(label: str, device: str, batch: int, fn) -> None:
        for _ in range(3):  # warm-up: CUDA kernels compile on first use, and TorchScript's
            fn(stream[:batch])  # profiling executor optimizes a graph on its second run
        times = []
        t_all = time.perf_counter()
        for i in range(0, len(stream), batch):
            t = time.perf_counter()
            fn(stream[i:i + batch])
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - t_all
        rows.append((label, device, batch, len(stream) / total, 1000 * float(np.median(times))))
        print(f"  {label:<8} {device:<5} batch {batch:>4}: {rows[-1][3]:9.1f} req/s, "
              f"median {rows[-1][4]:.2f} ms per batch", flush=True)

    def unified_fn(device: str):
        model = RUNNERS["unified"](repo / "unified" / "1", {"device": device})

        def run(queries):
            for r in model.run(requests_of(queries)):
                if isinstance(r, RequestError):
                    raise RuntimeError(f"a request failed: {r}")
        return model, run

    recall = {"baseline": mean_recall(chain_results(chain, evaluation), exact)}
    gpu_model, gpu_run = unified_fn(args.device)
    got = [gpu_model.run(requests_of([q]))[0]["item_ids"][0] for q in evaluation]
    recall["unified"] = mean_recall(got, exact)
    print(f"recall@10 against exact search ({len(evaluation)} queries): unified on "
          f"{args.device} {recall['unified']:.3f}, FAISS chain (nprobe {nprobe}) "
          f"{recall['baseline']:.3f}", flush=True)

    print(f"timing {len(stream)} mixed requests per setting ...", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        timed("unified", args.device, batch, gpu_run)
    _, cpu_run = unified_fn("cpu")
    timed("unified", "cpu", args.chain_batch, cpu_run)
    timed("baseline", "cpu", args.chain_batch, lambda qs: chain.run(
        [(q.user_id, q.filter, q.k) for q in qs]))

    if args.profile:
        profile(gpu_run, stream[:args.profile], cuda)

    best = max((r for r in rows if r[0] == "unified" and r[1] == args.device),
               key=lambda r: r[3])
    chain_rate = rows[-1][3]
    cores = os.cpu_count() or 1
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print("\n| model | device | batch | req/s | median ms per batch |\n|---|---|---|---|---|")
    for label, device, batch, rate, ms in rows:
        print(f"| {label} | {device} | {batch} | {rate:,.0f} | {ms:.2f} |")
    print(f"\n{name}, torch {torch.__version__}, faiss {faiss.__version__}, {cores} CPU cores; "
          f"{args.num_items:,} items")
    print(f"unified on {args.device} (batch {best[2]}): {best[3] / chain_rate:.1f}x one FAISS "
          f"chain on one CPU thread, {best[3] / (chain_rate * cores):.2f}x {cores} such chains "
          f"(perfect scaling); recall@10 {recall['unified']:.3f} vs {recall['baseline']:.3f}")
    return 0


def profile(run, queries, cuda: bool) -> None:
    """Where one batch's time goes: the operators by self CPU time (host work, launches and
    device-to-host synchronisations, which wait in the op that reads a device value)."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    run(queries)
    with torch.profiler.profile(activities=activities) as prof:
        run(queries)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"\nprofile of one unified batch of {len(queries)}:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize",
                                                       "cudaDeviceSynchronize",
                                                       "aten::_local_scalar_dense"))
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                          "cudaLaunchKernelExC"))
    print(f"host syncs (aten::_local_scalar_dense and stream/device synchronize): {syncs}; "
          f"kernel launches: {launches}")


if __name__ == "__main__":
    sys.exit(main())
