"""GPU check of `iam::ivf_int8_search`: the Triton kernel on CUDA against the torch path, and the
kernel's effective bandwidth against the card's device-to-device copy bandwidth.

    .venv/bin/python benchmarks/gpu_ann.py                      # on a CUDA machine
    .venv/bin/python benchmarks/gpu_ann.py --interpret --small  # smoke test on a CPU

Correctness: the kernel's top-k scores must equal the torch path's (run on the CPU copies of the
same tensors; both compute an exact integer dot product times the two scales in the same order),
num_passing must match, and every returned row must carry its reference score (ties may differ).
Bandwidth: bytes of scored embeddings (passing rows x D int8) per second of kernel time, and the
bytes the kernel actually reads (those + their fp32 scales + the probed filter words), against
the read bandwidth of a large device-to-device copy (copy bytes read / copy time).
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--nlist", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--nprobe", type=int, default=48)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--pass-rates", type=str, default="1.0,0.1,0.005")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the copy measured")
    ap.add_argument("--small", action="store_true", help="5k items, 8 queries (for --interpret)")
    ap.add_argument("--interpret", action="store_true",
                    help="run the kernel with TRITON_INTERPRET=1 on CPU tensors (no GPU needed)")
    args = ap.parse_args()
    if args.small:
        args.items, args.dim, args.nlist, args.batch, args.nprobe, args.k = 3_000, 32, 24, 4, 3, 20
        args.repeats, args.copy_mib = 1, 16
    return args


def main() -> None:
    args = parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import time

    import torch

    from ann.evaluation import sample_queries
    from ann.ivf import IVFConfig, build_ivf_index, quantize_int8
    from filtering.bits import pack_bits
    from kernels import ivf_int8_search as op

    if args.interpret:
        device = torch.device("cpu")
        print("TRITON_INTERPRET=1 on the CPU: checks the code path; timings mean nothing")
    elif not torch.cuda.is_available():
        sys.exit("gpu_ann.py needs a CUDA device (none found); for a CPU smoke test run "
                 "benchmarks/gpu_ann.py --interpret --small")
    else:
        device = torch.device("cuda")
        print(f"device: {torch.cuda.get_device_name()}")

    def timed(fn, repeats: int) -> float:
        """Median seconds of fn() (CUDA events on a GPU)."""
        if device.type == "cuda":
            fn()  # warm-up: compiles the kernel
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
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

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(200, args.dim, generator=gen)
    items = centres[torch.randint(0, 200, (args.items,), generator=gen)] * 0.7 + torch.randn(
        args.items, args.dim, generator=gen) * 0.5
    t = time.perf_counter()
    index = build_ivf_index(items, IVFConfig(nlist=args.nlist))
    print(f"index: {args.items} x {args.dim}, nlist {index.nlist}, built in "
          f"{time.perf_counter() - t:.1f}s on the CPU; {index.bytes_per_item():.3f} bytes/item")
    queries = sample_queries(items[index.permutation], args.batch, seed=1)
    q_codes, q_scales = quantize_int8(queries)
    probes = torch.topk(queries @ index.centroids.T, min(args.nprobe, index.nlist), dim=1).indices
    cpu = (q_codes, q_scales, probes, index.list_offsets, index.codes, index.scales)
    dev = tuple(t.to(device) for t in cpu)

    copy_bytes = args.copy_mib * 2**20
    buffers = [torch.empty(copy_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
    copy_read_bw = copy_bytes / timed(lambda: buffers[1].copy_(buffers[0]), args.repeats)
    print(f"device-to-device copy: {copy_read_bw / 1e9:.1f} GB/s read "
          f"({2 * copy_read_bw / 1e9:.1f} GB/s read + write)")
    buffers.clear()

    longest = int(index.list_sizes().max())
    failures = 0
    for rate in [float(r) for r in args.pass_rates.split(",")]:
        bits = pack_bits(torch.rand(args.batch, args.items, generator=gen) < rate)
        qc, qs, pr, off, codes, scales = dev
        bits_dev = bits.to(device)
        # on CUDA through the dispatcher (checks the registration); interpreted: the wrapper
        # itself, since CPU tensors would dispatch to the torch path
        search = torch.ops.iam.ivf_int8_search if device.type == "cuda" \
            else op.ivf_int8_search_triton
        scores, rows, num = search(qc, qs, bits_dev, pr, off, codes, scales, args.k)
        ref_scores, _, ref_num = op.ivf_int8_search_torch(cpu[0], cpu[1], bits, *cpu[2:], args.k)
        ok = torch.equal(num.cpu(), ref_num) and torch.allclose(
            scores.cpu(), ref_scores, rtol=1e-6, atol=0.0, equal_nan=False) and torch.equal(
            torch.isinf(scores.cpu()), torch.isinf(ref_scores))
        # every returned row carries its reference score
        found = rows.cpu() >= 0
        r = rows.cpu().clamp(min=0)
        own = (cpu[0].float()[:, None, :] * index.codes[r].float()).sum(-1) \
            * cpu[1][:, None] * index.scales[r]
        ok = ok and torch.allclose(own[found], scores.cpu()[found], rtol=1e-6, atol=0.0)
        failures += not ok

        # max list length passed in: no device-to-host sync inside the timed kernel
        op_args = (qc, qs, bits_dev, pr, off, codes, scales)
        kernel_s = timed(lambda a=op_args: op._launch_ivf_int8_search(*a, longest),
                         args.repeats)
        op_s = timed(lambda a=op_args, f=search: f(*a, args.k), args.repeats)
        passing = int(ref_num.sum())
        sizes = (index.list_offsets[1:] - index.list_offsets[:-1])[probes]
        probed_rows = int(sizes.sum())
        embedding_bytes = passing * args.dim
        read_bytes = embedding_bytes + passing * 4 + probed_rows / 8
        print(f"pass rate {rate:>6.3f}: {'OK  ' if ok else 'FAIL'} probed rows {probed_rows}, "
              f"passing {passing}; kernel {kernel_s * 1e3:.3f} ms, op with top-k "
              f"{op_s * 1e3:.3f} ms; scored embeddings {embedding_bytes / kernel_s / 1e9:.1f} "
              f"GB/s, all kernel reads {read_bytes / kernel_s / 1e9:.1f} GB/s = "
              f"{read_bytes / kernel_s / copy_read_bw:.0%} of copy read bandwidth")
    if failures:
        sys.exit(f"{failures} pass rate(s) disagree with the torch path")
    print("kernel equals the torch path")


if __name__ == "__main__":
    main()
