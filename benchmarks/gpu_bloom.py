"""GPU check of the feature filter (issue 3): `iam::bloom_search`'s Triton kernel on CUDA against
the torch path, the whole filter layer on CUDA against the exact reference, and timings.

    .venv/bin/python benchmarks/gpu_bloom.py                      # on a CUDA machine
    .venv/bin/python benchmarks/gpu_bloom.py --interpret --small  # smoke test on a CPU

Correctness: for the synthetic catalog (--num-items) and --queries seeded random expressions
(filtering/random_filters.py, NOT included), the kernel's (definite, uncertain) bitmaps equal
the torch path's bit for bit, and the whole layer (resolve, kernel, exact check of the uncertain
items), eager and TorchScript, returns exactly what `ExactFeatureFilter` returns.
Timings: CUDA events, median of --repeats after a warm-up, at several batch sizes: the kernel
launch alone (with the bytes it must move and the bandwidth that makes), the op (argument
checks included), the whole TorchScript layer; then the kernel under other launch settings;
the torch CPU path on this machine, once, for reference. Exits 0 with a message where no GPU
is found.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--num-items", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=64, help="queries of the checked batch")
    ap.add_argument("--batches", default="1,64,256", help="batch sizes timed for the kernel")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="tiny sizes (for --interpret)")
    ap.add_argument("--interpret", action="store_true",
                    help="run the kernel with TRITON_INTERPRET=1 on CPU tensors (no GPU needed)")
    args = ap.parse_args()
    if args.small:
        args.num_items, args.queries, args.batches, args.repeats = 8400, 6, "2,6", 1
    return args


def main() -> None:
    args = parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import random
    import statistics
    import time

    import torch

    from filtering.bits import popcount
    from filtering.expression import OP_TERM, batch_plans, parse_plan, to_string
    from filtering.random_filters import random_expression
    from kernels._library import triton_available
    from kernels.bloom_search import (
        _check_bloom_search,
        _launch_bloom_search,
        bloom_search_torch,
        bloom_search_triton,
    )
    from stages.filter import (
        ExactFeatureFilter,
        FilterConfig,
        build_filter_stage,
        feature_matrix,
        set_bits,
    )
    from world.synthetic import WorldConfig, generate_world

    if not triton_available():
        print("gpu_bloom: the triton package is missing; nothing to check")
        return
    if not args.interpret and not torch.cuda.is_available():
        print("gpu_bloom: no CUDA device here; run it on a GPU host (or with --interpret "
              "--small on a CPU)")
        return
    device = torch.device("cpu" if args.interpret else "cuda")
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    catalog = generate_world(WorldConfig(seed=args.seed, num_items=args.num_items,
                                         num_users=100, impressions_per_user=1)).catalog
    layer = build_filter_stage(catalog, FilterConfig()).eval()
    rng = random.Random(args.seed)
    texts = [to_string(random_expression(rng, catalog.schema, catalog.features), catalog.schema)
             for _ in range(max(args.queries, max(int(b) for b in args.batches.split(","))))]
    all_plans = batch_plans([parse_plan(t, catalog.schema) for t in texts])
    where = torch.cuda.get_device_name() if device.type == "cuda" else "Triton interpreter"
    print(f"{args.num_items:,} items, {len(texts)} expressions, index built in "
          f"{time.perf_counter() - started:.1f} s; kernel on {where}")

    # ---- correctness -------------------------------------------------------------------------
    plans = all_plans[: args.queries]
    with torch.inference_mode():
        resolved = layer.resolve(plans)
        expected = bloom_search_torch(resolved, layer.words, layer.num_items)
        words_dev = layer.words.to(device)
        got = bloom_search_triton(resolved.to(device), words_dev, layer.num_items)
        for name, a, b in zip(("definite", "uncertain"), expected, got):
            same = torch.equal(a, b.cpu())
            print(f"kernel == torch path ({name}): {same}")
            if not same:
                raise SystemExit(f"gpu_bloom: kernel {name} bitmaps differ from the torch path")
        reference = ExactFeatureFilter(*feature_matrix(catalog))(plans)
        sample = expected[1][expected[1] != 0][:100000]
        cpu_bits = [t.tolist() for t in set_bits(sample, layer.bit_table)]
        layer_dev = layer.to(device)
        # the layer's own steps on the device: hashing and term lookup, set-bit extraction
        same = torch.equal(layer_dev.resolve(plans.to(device)).cpu(), resolved)
        print(f"resolve on {device.type} == on cpu: {same}")
        dev_bits = [t.tolist() for t in set_bits(sample.to(device), layer_dev.bit_table)]
        print(f"set_bits on {device.type} == on cpu: {dev_bits == cpu_bits}")
        eager = layer_dev(plans.to(device)).cpu()
        scripted_layer = torch.jit.script(layer_dev)
        scripted = scripted_layer(plans.to(device)).cpu()
        for name, bits in (("eager", eager), ("TorchScript", scripted)):
            same = torch.equal(bits, reference)
            print(f"layer on {device.type} ({name}) == exact reference: {same}")
            if not same:
                missing = int(popcount(reference & ~bits).sum())
                extra = int(popcount(bits & ~reference).sum())
                raise SystemExit(f"gpu_bloom: the {name} layer on {device} is not exact: "
                                 f"{missing} items missing, {extra} extra")
        uncertain = int(popcount(expected[1]).sum())
        print(f"uncertain (query, item) pairs decided by the exact check: {uncertain:,}")

    if args.interpret:
        print("interpreter run: correctness only, no timings")
        return

    # ---- timings -----------------------------------------------------------------------------
    def cuda_ms(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    row_bytes = layer.words.shape[1] * 8
    print(f"\n{'batch':>6} {'kernel ms':>10} {'GB moved':>9} {'GB/s':>7} {'op ms':>7} "
          f"{'layer ms':>9} {'torch CPU op ms':>16}")
    with torch.inference_mode():
        for size in (int(b) for b in args.batches.split(",")):
            batch = all_plans[:size]
            res = layer_dev.resolve(batch.to(device))
            depth = _check_bloom_search(res, words_dev, layer.num_items)
            # bytes: every term's rows once per query, both outputs written
            term_rows = ((res[:, :, 2:] >= 0) & (res[:, :, :1] == OP_TERM)
                         & (res[:, :, 1:2] != 0)).sum().item()
            moved = (term_rows + 2 * size) * row_bytes / 1e9
            kernel = cuda_ms(lambda r=res, d=depth: _launch_bloom_search(r, words_dev,
                                                                         layer.num_items, d))
            op = cuda_ms(lambda r=res: bloom_search_triton(r, words_dev, layer.num_items))
            whole = cuda_ms(lambda b=batch.to(device): scripted_layer(b))
            res_cpu, cpu_words = res.cpu(), words_dev.cpu()
            t0 = time.perf_counter()
            bloom_search_torch(res_cpu, cpu_words, layer.num_items)
            cpu = (time.perf_counter() - t0) * 1e3
            print(f"{size:>6} {kernel:>10.3f} {moved:>9.3f} {moved / kernel * 1e3:>7.0f} "
                  f"{op:>7.3f} {whole:>9.3f} {cpu:>16.1f}")
        # launch settings, at the largest batch
        print(f"\nlaunch settings at batch {size}: kernel ms")
        for block_words, num_warps in ((32, 4), (64, 4), (128, 2), (128, 4), (128, 8),
                                       (256, 4), (256, 8)):
            ms = cuda_ms(lambda b=block_words, w=num_warps: _launch_bloom_search(
                res, words_dev, layer.num_items, depth, b, w))
            print(f"  BLOCK_W {block_words:>4}, {num_warps} warps: {ms:.3f}")


if __name__ == "__main__":
    main()
