"""Filtered top-k retrieval on the CPU: our IVF int8 search against faiss and plain torch.

One run, one machine, the same queries and filters for every method:
  ours        ann.search.IVFInt8Search (torch.ops.iam.ivf_int8_search, CPU path)
  faiss-flat  IndexFlatIP + IDSelectorBitmap (exact)
  faiss-sq8   IndexIVFScalarQuantizer(QT_8bit, same nlist) + IDSelectorBitmap, nprobe sweep
  torch-fp32  fp32 matmul + masked topk (exact; also the ground truth for recall@k)
Every timed batch includes computing the batch's filter bitmaps from the per-value item bitmaps
(the filter index), for every method; settings take turns batch by batch, and the median batch
time counts, so that load from other processes hits every method alike. Each method's fastest
setting with recall@k >= --target is compared; the script prints the table, the ratios, and
writes a recall-vs-throughput plot.

    .venv/bin/python benchmarks/ann_benchmark.py            # 1M items, 64 dims, B=64, k=100
    .venv/bin/python benchmarks/ann_benchmark.py --quick    # 100k items, a minute
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ann.evaluation import exact_filtered_topk, recall, sample_queries  # noqa: E402
from ann.ivf import IVFConfig, build_ivf_index  # noqa: E402
from ann.search import IVFInt8Search  # noqa: E402
from filtering.bits import pack_bits  # noqa: E402
from world.synthetic import WorldConfig, generate_world  # noqa: E402


@dataclass
class Result:
    filter_name: str
    method: str
    setting: str
    recall: float
    batch_ms: float  # median wall time over timed batches, filter computation included
    qps: float  # batch / median wall time
    cpu_qps: float  # batch / median process CPU time (all threads): robust to other processes


class FilterIndex:
    """Per-value item bitmaps (int64 [values, W], index row order) for language and category;
    a query's filter is one language row, or a language row AND a category row."""

    def __init__(self, language: torch.Tensor, category: torch.Tensor):
        self.language = self._per_value(language)
        self.category = self._per_value(category)
        self.everything = pack_bits(torch.ones(1, language.shape[0], dtype=torch.bool))

    @staticmethod
    def _per_value(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([pack_bits((values == v)[None, :]) for v in range(int(values.max()) + 1)])

    def compute(self, spec: torch.Tensor) -> torch.Tensor:
        """spec int64 [B, 2] (language or -1 = no filter, category or -1) -> int64 [B, W]."""
        if bool((spec[:, 0] < 0).all()):
            return self.everything.expand(spec.shape[0], -1).contiguous()
        bits = self.language.index_select(0, spec[:, 0])
        if bool((spec[:, 1] >= 0).any()):
            cat = self.category.index_select(0, spec[:, 1].clamp(min=0))
            bits = torch.where((spec[:, 1] >= 0)[:, None], bits & cat, bits)
        return bits


def filter_specs(language: torch.Tensor, category: torch.Tensor, target: float, count: int,
                 seed: int) -> torch.Tensor:
    """Up to `count` distinct filters whose pass rate is within 0.7..1.4x `target`: single
    languages (about 10 %) or language AND category pairs (about 0.5 %); target 1 = no filter.
    int64 [count, 2]."""
    n = language.shape[0]
    if target >= 1.0:
        return torch.tensor([[-1, -1]])
    lang_rate = torch.bincount(language).float() / n
    candidates: List[Tuple[int, int, float]] = [(lg, -1, float(r))
                                                for lg, r in enumerate(lang_rate)]
    joint = torch.bincount(language * 1000 + category, minlength=(int(language.max()) + 1) * 1000)
    for key in joint.nonzero().squeeze(1).tolist():
        candidates.append((key // 1000, key % 1000, float(joint[key]) / n))
    ok = [c for c in candidates if 0.7 * target <= c[2] <= 1.4 * target]
    if not ok:
        raise SystemExit(f"no filter passes about {target:.2%} of the items")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(ok), generator=gen)[:count].tolist()
    return torch.tensor([[ok[i][0], ok[i][1]] for i in pick], dtype=torch.int64)


def time_round_robin(runs: Dict[Tuple[str, str], Callable[[torch.Tensor, torch.Tensor],
                                                           torch.Tensor]],
                     queries: torch.Tensor, specs: torch.Tensor, filters: FilterIndex, batch: int
                     ) -> Dict[Tuple[str, str], Tuple[torch.Tensor, float, float]]:
    """run(queries [B, D], filter_bits [B, W]) -> rows [B, k] for every setting, batch by batch
    in turn (so that a noisy neighbour on the machine slows all settings alike); the batch's
    filters are computed inside each timed call. Returns rows, median batch wall seconds and
    median batch CPU seconds of this process."""
    rows: Dict[Tuple[str, str], List[torch.Tensor]] = {name: [] for name in runs}
    wall: Dict[Tuple[str, str], List[float]] = {name: [] for name in runs}
    cpu: Dict[Tuple[str, str], List[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run(queries[:batch], filters.compute(specs[:batch]))
    for lo in range(0, queries.shape[0], batch):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            bits = filters.compute(specs[lo:lo + batch])
            rows[name].append(run(queries[lo:lo + batch], bits))
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (torch.cat(rows[name]), statistics.median(wall[name]),
                   statistics.median(cpu[name])) for name in runs}


def group_identical_rows(bits: np.ndarray) -> List[np.ndarray]:
    """Indices of the rows of a [B, W] bitmap, grouped by identical rows. Rows are keyed by a
    strided sample of their words, then checked whole (np.unique(axis=0) sorts 125 KB rows and
    cost ~2x a faiss search at 1M items)."""
    groups: Dict[bytes, List[int]] = {}
    for i, key in enumerate(bits[:, ::97]):
        groups.setdefault(key.tobytes(), []).append(i)
    out: List[np.ndarray] = []
    for members in groups.values():
        pending = members
        while pending:
            same = [i for i in pending if np.array_equal(bits[i], bits[pending[0]])]
            out.append(np.array(same))
            pending = [i for i in pending if i not in same]
    return out


def faiss_search(index, sel_params: Callable, k: int):
    """Groups a batch by distinct filter (one IDSelectorBitmap per group, faiss applies one
    selector to a whole search call) and searches each group with faiss's own threading."""
    import faiss

    def run(queries: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        out = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
        bits_np = bits.numpy()
        q_np = queries.numpy()
        for members in group_identical_rows(bits_np):
            bitmap = np.ascontiguousarray(bits_np[members[0]]).view(np.uint8)
            sel = faiss.IDSelectorBitmap(bitmap.shape[0] * 8, faiss.swig_ptr(bitmap))
            _, ids = index.search(q_np[members], k, params=sel_params(sel))
            out[torch.from_numpy(members)] = torch.from_numpy(ids)
        return out
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=5, help="timed batches per setting")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--nlist", type=int, default=0, help="0 = IVFConfig default (sqrt N)")
    ap.add_argument("--target", type=float, default=0.95, help="recall@k to compare at")
    ap.add_argument("--ours", type=str, default="8,16,24,32,40,48,64,96",
                    help="our sweep: nprobe = min_candidates = x")
    ap.add_argument("--sq8-nprobe", type=str, default="16,24,32,40,48,64,96,128,256,512,1000")
    ap.add_argument("--distinct-filters", type=int, default=8,
                    help="distinct filters per pass rate, assigned to queries at random")
    ap.add_argument("--pass-rates", type=str, default="1,0.5,0.1,0.005",
                    help="filters to measure (1 = no filter)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/img/ann_recall_vs_qps.png")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for torch and faiss (0 = all cores)")
    ap.add_argument("--clock", choices=["qps", "cpu_qps"], default="qps",
                    help="throughput the plot shows: wall clock, or per CPU-second")
    ap.add_argument("--quick", action="store_true", help="100k items, 2 batches")
    args = ap.parse_args()
    if args.quick:
        args.items, args.batches = 100_000, 2
    import faiss

    if args.threads > 0:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    print(f"load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")

    t0 = time.perf_counter()
    world = generate_world(WorldConfig(num_items=args.items, num_users=100, embedding_dim=args.dim,
                                       seed=args.seed))
    embeddings = torch.from_numpy(world.catalog.embeddings)
    t1 = time.perf_counter()
    index = build_ivf_index(embeddings, IVFConfig(nlist=args.nlist, seed=args.seed))
    t2 = time.perf_counter()
    rows = index.permutation
    emb = embeddings[rows].contiguous()  # index row order: filter bit j = row j for everyone
    language = torch.from_numpy(world.catalog.features[1][:, 0])[rows]
    category = torch.from_numpy(world.catalog.features[0][:, 0])[rows]
    filters = FilterIndex(language, category)
    n, d, nlist = emb.shape[0], emb.shape[1], index.nlist
    print(f"catalog {n} x {d} (world {t1 - t0:.1f}s), IVF int8 build {t2 - t1:.1f}s: nlist "
          f"{nlist}, list sizes {int(index.list_sizes().min())}..{int(index.list_sizes().max())}, "
          f"{index.bytes_per_item():.3f} bytes/item (int8 embedding + fp32 scale + filter bit)")

    flat = faiss.IndexFlatIP(d)
    flat.add(emb.numpy())
    t3 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(d)
    sq8 = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_INNER_PRODUCT)
    train = emb[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:nlist * 64]]
    sq8.train(train.numpy())
    sq8.add(emb.numpy())
    print(f"faiss IVF-SQ8 build {time.perf_counter() - t3:.1f}s; threads: torch "
          f"{torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}")

    ours = IVFInt8Search(index)
    num_q = args.batch * args.batches
    queries = sample_queries(emb, num_q, seed=args.seed + 1)
    results: List[Result] = []
    names = [f"~{float(r):.1%}".replace(".0%", "%") for r in args.pass_rates.split(",")]
    for filter_name, rate in zip(names, [float(r) for r in args.pass_rates.split(",")]):
        pool = filter_specs(language, category, rate, args.distinct_filters, args.seed + 2)
        gen = torch.Generator().manual_seed(args.seed + 3)
        specs = pool[torch.randint(0, pool.shape[0], (num_q,), generator=gen)]
        passing = sum(set_bits(filters.compute(specs[i:i + args.batch]))
                      for i in range(0, num_q, args.batch))
        pass_rate = passing / (num_q * n)
        print(f"\nfilter {filter_name}: {pool.shape[0]} distinct filters, mean pass rate "
              f"{pass_rate:.4%}")

        def torch_fp32(q: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
            return exact_filtered_topk(q, emb, bits, args.k)

        runs = {("torch-fp32", "exact"): torch_fp32,
                ("faiss-flat", "exact"): faiss_search(
                    flat, lambda sel: faiss.SearchParameters(sel=sel), args.k)}
        for x in [int(v) for v in args.ours.split(",")]:
            runs[("ours", f"nprobe=min_cand={x}")] = (
                lambda q, bits, x=x: ours(q, bits, args.k, x, float(x))[1])
        for npr in [int(v) for v in args.sq8_nprobe.split(",") if int(v) <= nlist]:
            runs[("faiss-sq8", f"nprobe={npr}")] = faiss_search(
                sq8, lambda sel, npr=npr: faiss.SearchParametersIVF(sel=sel, nprobe=npr), args.k)
        measured = time_round_robin(runs, queries, specs, filters, args.batch)
        truth = measured[("torch-fp32", "exact")][0]
        for (method, setting), (got, secs, cpu_secs) in measured.items():
            res = Result(filter_name, method, setting, recall(got, truth), secs * 1e3,
                         args.batch / secs, args.batch / max(cpu_secs, 1e-9))
            results.append(res)
            print(f"  {method:<11} {setting:<22} recall@{args.k} {res.recall:.4f}  "
                  f"{res.batch_ms:9.1f} ms/batch  {res.qps:9.0f} q/s  {res.cpu_qps:9.0f} q/cpu-s",
                  flush=True)

    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (machine has {os.cpu_count()} "
          f"cores); q/s is wall clock, q/cpu-s this process's CPU time")
    for clock in ["qps", "cpu_qps"]:
        unit = "q/s" if clock == "qps" else "q/cpu-s"
        print(f"\nat recall@{args.k} >= {args.target}, fastest qualifying setting per method "
              f"by {unit}:")
        for filter_name in names:
            best: Dict[str, Result] = {}
            for r in results:
                if r.filter_name == filter_name and r.recall >= args.target:
                    if r.method not in best or getattr(r, clock) > getattr(best[r.method], clock):
                        best[r.method] = r
            line = [f"{m} {getattr(b, clock):.0f} {unit} ({b.setting}, recall {b.recall:.3f})"
                    for m, b in best.items()]
            print(f"  {filter_name}: " + "; ".join(line))
            if "ours" in best:
                for other in ["faiss-sq8", "faiss-flat", "torch-fp32"]:
                    if other in best:
                        ratio = getattr(best["ours"], clock) / getattr(best[other], clock)
                        print(f"    ours / {other}: {ratio:.2f}x")
                    else:
                        print(f"    {other}: no setting reached recall {args.target}")
    write_plot(results, names, args.plot, args.k, args.clock)


def set_bits(bits: torch.Tensor) -> int:
    return int(np.unpackbits(bits.numpy().view(np.uint8)).sum())


def write_plot(results: List[Result], names: List[str], path: Path, k: int, clock: str
               ) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, filter_name in zip(axes[0], names):
        for method, style in [("ours", "o-"), ("faiss-sq8", "s-"), ("faiss-flat", "^"),
                              ("torch-fp32", "v")]:
            pts = sorted((r.recall, getattr(r, clock)) for r in results
                         if r.filter_name == filter_name and r.method == method)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method)
        ax.set_yscale("log")
        ax.set_xlabel(f"recall@{k} vs exact filtered search")
        ax.set_ylabel(("queries / s" if clock == "qps" else "queries / CPU-s")
                      + " (filter computation included)")
        ax.set_title(f"filter passing {filter_name} of the items")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
