"""GPU check of `iam::ivf_int8_search`: the fused scan + top-k Triton kernel and the older
score-buffer kernel on CUDA against the torch path, their bandwidth against the card's
device-to-device copy bandwidth, and a sweep of the fused kernel's launch settings.

    python3 benchmarks/gpu_ann.py                                                 # CUDA
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/gpu_ann.py --interpret --small  # CPU smoke

Correctness, per pass rate and per launch setting (and for the old path): scores equal the torch
path's bit for bit (both compute an exact integer dot product times the two scales in the same
order), num_passing equal, and the rows are the reference's up to ties: as many found, none
twice, each passing its filter, lying in a probed list and carrying its reference score. A
mismatch prints MISMATCH and the run goes on; the exit status is 1 at the end.

Timing: CUDA events, median of --repeats runs after warm-up, "warm" back to back (the probed
codes partly stay in the 60 MB L2 between runs, as in a serving loop) and "cold" (a 256 MiB
write between runs evicts L2; the event pair brackets the op only). Bytes = int8 codes + fp32
scales of the passing rows + the filter bits of the probed rows; GB/s and % of the copy's read
bandwidth use the kernel's time. "top-k share" = (op - kernel) / kernel: for the old path the
torch.topk over [B, P, max_list_len]; for the fused one the torch.topk over its P * K
candidates per query.

The sweep runs in two stages, every setting at every pass rate: rows per tile x warps x
(tensor-core dot or not) in query order with one program per (query, list) and no shared
bound; then, from the best of those at pass rate 1.0, shared bound x programs per list x
query / list order. It ends with the
fastest setting (sum of warm op times over the pass rates) written as the constants to set in
kernels/ivf_int8_search.py.
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# on a GPU, stops sweeping (the setting under way finishes) after this long: the run must end
# within 4 minutes on an H200 (index build ~20-50 s, each setting's compile ~1-3 s)
TIME_BUDGET_S = 195.0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--nlist", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--nprobe", type=int, default=48)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--pass-rates", type=str, default="1.0,0.5,0.1,0.005")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the copy measured")
    ap.add_argument("--no-sweep", action="store_true", help="time the default setting only")
    ap.add_argument("--small", action="store_true", help="2k items, 3 queries (for --interpret)")
    ap.add_argument("--interpret", action="store_true",
                    help="run the kernels with TRITON_INTERPRET=1 on CPU tensors (no GPU needed)")
    args = ap.parse_args()
    if args.small:
        args.items, args.dim, args.nlist, args.batch, args.nprobe, args.k = 2_000, 20, 24, 3, 3, 20
        args.repeats, args.copy_mib = 1, 16
    return args


def main() -> None:
    args = parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # every line out even if the run is cut short
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    from ann.evaluation import sample_queries
    from ann.ivf import IVFConfig, build_ivf_index, quantize_int8
    from filtering.bits import pack_bits, unpack_bits
    from kernels import ivf_int8_search as op

    began = time.perf_counter()
    if args.interpret:
        device = torch.device("cpu")
        print("TRITON_INTERPRET=1 on the CPU: checks the code paths; timings mean nothing")
    elif not torch.cuda.is_available():
        sys.exit("gpu_ann.py needs a CUDA device (none found); for a CPU smoke test run "
                 "benchmarks/gpu_ann.py --interpret --small")
    else:
        device = torch.device("cuda")
        import triton
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, "
              f"triton {triton.__version__}")
    cuda = device.type == "cuda"
    flush = torch.empty(256 * 2**20 if cuda else 1, dtype=torch.uint8, device=device)

    def timed(fn, repeats: int, cold: bool = False) -> float:
        """Median seconds of fn() (CUDA events on a GPU); cold: L2 evicted before each run."""
        for _ in range(3 if cuda else 0):
            fn()  # warm-up: compiles the kernel
        times = []
        for _ in range(repeats):
            if cold:
                flush.fill_(1)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    # ---- index, queries, filters ----------------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(200, args.dim, generator=gen)
    items = centres[torch.randint(0, 200, (args.items,), generator=gen)] * 0.7 + torch.randn(
        args.items, args.dim, generator=gen) * 0.5
    t = time.perf_counter()
    index = build_ivf_index(items, IVFConfig(nlist=args.nlist))
    sizes = index.list_sizes()
    print(f"index: {args.items} x {args.dim}, nlist {index.nlist}, built in "
          f"{time.perf_counter() - t:.1f}s on the CPU; {index.bytes_per_item():.3f} bytes/item; "
          f"list length mean {sizes.float().mean():.0f}, max {int(sizes.max())}")
    queries = sample_queries(items[index.permutation], args.batch, seed=1)
    q_codes, q_scales = quantize_int8(queries)
    probes = torch.topk(queries @ index.centroids.T, min(args.nprobe, index.nlist), dim=1).indices
    probes[0, -1] = -1  # one query probes a list fewer: exercises the -1 slot
    cpu = (q_codes, q_scales, probes, index.list_offsets, index.codes, index.scales)
    qc, qs, pr, off, codes, scales = (x.to(device) for x in cpu)
    list_of_row = torch.repeat_interleave(torch.arange(index.nlist), sizes)
    longest = int(sizes.max())
    kb = op.topk_block_k(args.k)
    print(f"batch {args.batch}, nprobe {args.nprobe}, k {args.k} (fused kernel keeps K = {kb} "
          "per program)")

    copy_bytes = args.copy_mib * 2**20
    buffers = [torch.empty(copy_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
    copy_read_bw = copy_bytes / timed(lambda: buffers[1].copy_(buffers[0]), args.repeats)
    print(f"device-to-device copy: {copy_read_bw / 1e9:.1f} GB/s read "
          f"({2 * copy_read_bw / 1e9:.1f} GB/s read + write)")
    buffers.clear()

    rates = [float(r) for r in args.pass_rates.split(",")]
    cases = []  # per pass rate: bits (CPU, device), reference, bytes read
    for rate in rates:
        bits = pack_bits(torch.rand(args.batch, args.items, generator=gen) < rate)
        ref = op.ivf_int8_search_torch(cpu[0], cpu[1], bits, *cpu[2:], args.k)
        passing = int(ref[2].sum())
        probed_rows = int(torch.where(probes >= 0, sizes[probes.clamp(min=0)], 0).sum())
        read_bytes = passing * (args.dim + 4) + probed_rows / 8
        cases.append((rate, bits, bits.to(device), ref, read_bytes, passing, probed_rows,
                      unpack_bits(bits, args.items)))
        print(f"pass rate {rate:>6.3f}: probed rows {probed_rows}, passing {passing}, "
              f"bytes read {read_bytes / 1e6:.1f} MB")

    # ---- correctness against the torch path ---------------------------------------------
    mismatches = []

    def check(name: str, got, case) -> bool:
        """Scores bit for bit, num_passing exactly, rows equal up to ties."""
        rate, _, _, (ref_scores, _, ref_num), *_, passes_filter = case
        scores, rows, num = (x.cpu() for x in got)
        problems = []
        if not torch.equal(num, ref_num):
            problems.append(f"num_passing differs at {int((num != ref_num).sum())} queries")
        if not torch.equal(scores, ref_scores):
            problems.append(f"scores differ at {int((scores != ref_scores).sum())} slots")
        found = rows >= 0
        if not torch.equal(found, torch.isfinite(ref_scores)):
            problems.append("found rows differ from the reference's")
        r = rows.clamp(min=0)
        own = (cpu[0].float()[:, None, :] * index.codes[r].float()).sum(-1) \
            * cpu[1][:, None] * index.scales[r]
        if not torch.equal(own[found], scores[found]):
            problems.append("some rows do not carry their scores")
        passes = passes_filter.gather(1, r)
        probed = (list_of_row[r][:, :, None] == probes[:, None, :]).any(-1)
        if not bool((passes & probed)[found].all()):
            problems.append("some rows fail their filter or lie in no probed list")
        if any(len(set(x)) != len(x) for x in (row[row >= 0].tolist() for row in rows)):
            problems.append("a row comes back twice")
        if problems:
            mismatches.append(f"{name} at pass rate {rate}: " + "; ".join(problems))
            print(f"  !!! MISMATCH {mismatches[-1]}")
        return not problems

    def search_fn(case, triton_merge=None, **setting):
        def run():
            s, r, n = op._launch_ivf_int8_topk(qc, qs, case[2], pr, off, codes, scales, args.k,
                                               **setting)
            top, top_rows = op._select_topk(s, r, args.k, triton_merge)
            return top, top_rows, n
        return run

    def kernel_fn(case, **setting):
        return lambda: op._launch_ivf_int8_topk(qc, qs, case[2], pr, off, codes, scales, args.k,
                                                **setting)

    # the registered op (default settings, dispatcher on CUDA) and the old path
    search = torch.ops.iam.ivf_int8_search if cuda else op.ivf_int8_search_triton
    # (setting name, rate) -> (kernel warm, kernel cold, {selection: (op warm, op cold)})
    results = {}

    def measure(label: str, key: str, kernel, fulls: dict, case) -> None:
        """Times the kernel alone and the op with each way of selecting the k (fulls)."""
        rate, _, _, _, read_bytes, *_ = case
        # (interpreted: one run each; cold = warm)
        kw = timed(kernel, args.repeats)
        kc = timed(kernel, args.repeats, cold=True) if cuda else kw
        ops = {}
        for name, full in fulls.items():
            ow = timed(full, args.repeats)
            ops[name] = (ow, timed(full, args.repeats, cold=True) if cuda else ow)
        results[key, rate] = (kw, kc, ops)
        print(f"  {label:<24} kernel {kw * 1e3:7.3f} ms (cold {kc * 1e3:7.3f}) "
              f"{read_bytes / kw / 1e9:7.1f} GB/s = {read_bytes / kw / copy_read_bw:5.0%} of "
              f"copy (cold {read_bytes / kc / 1e9:6.1f} GB/s = "
              f"{read_bytes / kc / copy_read_bw:4.0%})"
              + "".join(f"; op, {name}: {ow * 1e3:7.3f} ms (cold {oc * 1e3:7.3f}), top-k share "
                        f"{(ow - kw) / kw:5.2f}" for name, (ow, oc) in ops.items()))

    print("\n== old path (score buffer + torch.topk) and the registered op (default setting)")
    for case in cases:
        rate, _, bits_dev = case[:3]
        a = (qc, qs, bits_dev, pr, off, codes, scales)
        print(f"pass rate {rate}:")
        paths = [("old path", "old path", lambda a=a: op.ivf_int8_search_buffered(*a, args.k),
                  lambda a=a: op._launch_ivf_int8_search(*a, longest), "torch.topk"),
                 ("registered op (default)", "registered op (default setting)",
                  lambda a=a: search(*a, args.k), kernel_fn(case),
                  "merge kernel" if op.TOPK_TRITON_MERGE else "torch.topk")]
        for label, key, full, kernel, selection in paths:
            try:
                if check(label, full(), case):
                    measure(label, key, kernel, {selection: full}, case)
            except Exception as e:  # report, and go on
                mismatches.append(f"{label} at pass rate {rate}: raised {e!r}"[:2000])
                print(f"  !!! MISMATCH {mismatches[-1]}")

    # ---- sweep ----------------------------------------------------------------------------
    def name_of(s: dict) -> str:
        return (f"rows {s['block_rows']} warps {s['num_warps']} dot {int(s['use_dot'])} "
                f"splits {s['splits']} {'list' if s['list_order'] else 'query'} "
                f"bound {int(s['share_bound'])}")

    def run_setting(setting: dict) -> bool:
        if cuda and time.perf_counter() - began > TIME_BUDGET_S:
            print(f"  (time budget of {TIME_BUDGET_S:.0f}s spent: skipping {name_of(setting)})")
            return False
        name = name_of(setting)
        print(f"setting {name}:")
        for case in cases:
            t = time.perf_counter()
            fulls = {"torch.topk": search_fn(case, False, **setting),
                     "merge kernel": search_fn(case, True, **setting)}
            try:
                ok = all([check(f"{name}, {sel}", full(), case) for sel, full in fulls.items()])
            except Exception as e:  # a compile or launch error: report it, try the next one
                mismatches.append(f"{name} at pass rate {case[0]}: raised {e!r}"[:2000])
                print(f"  !!! MISMATCH {mismatches[-1]}")
                return False
            if cuda and time.perf_counter() - t > 1.0:
                print(f"  (checked, compiling if new, in {time.perf_counter() - t:.1f}s)")
            if ok:
                measure(f"pass rate {case[0]}", name, kernel_fn(case, **setting), fulls, case)
        return True

    default = dict(block_rows=op.TOPK_BLOCK_ROWS, num_warps=op.TOPK_NUM_WARPS,
                   num_stages=op.TOPK_NUM_STAGES, splits=op.TOPK_SPLITS,
                   list_order=op.TOPK_LIST_ORDER, use_dot=op.TOPK_USE_DOT,
                   share_bound=op.TOPK_SHARE_BOUND)
    if args.no_sweep:
        stage1 = [default]
    elif cuda:
        stage1 = [dict(default, block_rows=r, num_warps=w, use_dot=d, splits=1, list_order=False,
                       share_bound=False)
                  for d in (True, False)
                  for r, w in ((128, 1), (128, 2), (128, 4), (256, 1), (256, 2))]
    else:  # the interpreter is slow: three settings exercise every branch
        stage1 = [dict(default, block_rows=64, num_warps=4, use_dot=d, splits=1,
                       list_order=False, share_bound=False) for d in (False, True)]
    print("\n== fused kernel, stage 1: rows per tile x warps x dot (one program per "
          "(query, list), query order)")
    done = [s for s in stage1 if run_setting(s)]

    def op_time(s: dict, rate: float) -> float:
        """The setting's best warm op time (either selection of the k) at a pass rate."""
        if (name_of(s), rate) not in results:
            return float("inf")
        return min(ow for ow, _ in results[name_of(s), rate][2].values())

    if not done:
        done = [default]  # nothing ran: stage 2 from the default, the summary says so
    best1 = min(done, key=lambda s: op_time(s, rates[0]))
    # the shared bound first: if the time budget runs out, the settings without it go
    stage2 = [] if args.no_sweep else [dict(best1, splits=n, list_order=o, share_bound=sb)
                                       for sb in (True, False) for n in (1, 2, 4)
                                       for o in (False, True)]
    if not cuda and not args.no_sweep:
        stage2 = [dict(best1, splits=2, list_order=True, share_bound=True)]
    stage2 = [s for s in stage2 if name_of(s) != name_of(best1)]
    print(f"\n== fused kernel, stage 2: shared bound x programs per list x order, from "
          f"{name_of(best1)}")
    done += [s for s in stage2 if run_setting(s)]

    # ---- summary ----------------------------------------------------------------------------
    print("\n== summary: warm op ms with torch.topk / with the merge kernel (kernel ms) per pass "
          "rate; the goal: kernel >= 70% of copy at pass rate 1.0, top-k share <= 0.5")
    print(f"{'':<46}" + "".join(f"{'rate ' + str(r):>31}" for r in rates) + f"{'sum best op':>12}")

    def summary_row(key: str, selections=("torch.topk", "merge kernel")) -> dict:
        """Prints key's row; returns {selection: sum of its warm op times} (inf where a pass
        rate is missing)."""
        cells, totals = [], {sel: 0.0 for sel in selections}
        for r in rates:
            kw, _, ops = results.get((key, r), (float("nan"), 0, {}))
            cell = " / ".join(f"{ops[sel][0] * 1e3:.3f}" if sel in ops else "-"
                              for sel in selections)
            cells.append(f"{cell} ({kw * 1e3:.3f})")
            for sel in selections:
                totals[sel] += ops[sel][0] if sel in ops else float("inf")
        print(f"{key:<46}" + "".join(f"{c:>31}" for c in cells)
              + f"{min(totals.values()) * 1e3:12.3f}")
        return totals

    summary_row("old path", ("torch.topk",))
    summary_row("registered op (default setting)",
                ("merge kernel" if op.TOPK_TRITON_MERGE else "torch.topk",))
    totals = {(name_of(s), sel): total for s in done
              for sel, total in summary_row(name_of(s)).items()}
    by_name = {name_of(s): s for s in done}
    (fastest_name, selection), best_total = min(totals.items(), key=lambda kv: kv[1])
    if best_total < float("inf"):
        fastest = by_name[fastest_name]
        kw, _, ops = results[fastest_name, rates[0]]
        ow = ops[selection][0]
        read_bytes = cases[0][4]
        print(f"\nfastest setting (sum of warm op times, all checks passed): {fastest_name}, "
              f"selecting the k with {selection}\n"
              f"  at pass rate {rates[0]}: kernel {kw * 1e3:.3f} ms = "
              f"{read_bytes / kw / copy_read_bw:.0%} of copy, op {ow * 1e3:.3f} ms, top-k share "
              f"{(ow - kw) / kw:.2f}\n"
              f"  set in kernels/ivf_int8_search.py: TOPK_BLOCK_ROWS = {fastest['block_rows']}, "
              f"TOPK_NUM_WARPS = {fastest['num_warps']}, TOPK_SPLITS = {fastest['splits']}, "
              f"TOPK_LIST_ORDER = {fastest['list_order']}, TOPK_USE_DOT = {fastest['use_dot']}, "
              f"TOPK_SHARE_BOUND = {fastest['share_bound']}, "
              f"TOPK_TRITON_MERGE = {selection == 'merge kernel'}")
        by_kernel = min((s for s in done if (name_of(s), rates[0]) in results),
                        key=lambda s: results[name_of(s), rates[0]][0])
        kw, kc, ops = results[name_of(by_kernel), rates[0]]
        print(f"fastest kernel at pass rate {rates[0]}: {name_of(by_kernel)}: {kw * 1e3:.3f} ms = "
              f"{read_bytes / kw / copy_read_bw:.0%} of copy (cold {kc * 1e3:.3f} ms = "
              f"{read_bytes / kc / copy_read_bw:.0%}); top-k share "
              + ", ".join(f"{(ow - kw) / kw:.2f} with {sel}" for sel, (ow, _) in ops.items()))
    else:
        print("\nno setting passed every check at every pass rate")
    if mismatches:
        print(f"\n!!! {len(mismatches)} MISMATCH(ES) against the torch path:")
        for m in mismatches:
            print(f"!!!   {m}")
    print(f"\ntotal time {time.perf_counter() - began:.0f}s")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
