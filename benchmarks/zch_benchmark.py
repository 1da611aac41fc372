"""Zero-collision id mapping (issue 6) against plain `hash(id) % rows`, on the CPU path.

For each load factor, fills an empty table of `--num-slots` rows with `load * num_slots` distinct
random 62-bit ids (inserted in batches, as training would), then reports:
- the fraction of ids that share their row with another id under `fmix64(id) % rows`, and under
  the zero-collision map (measured from the rows it returned; 0 by construction);
- the fraction of ids the map could not place (their window was full: the unknown row);
- the mean probe length of placed ids (1 = found at the home slot);
- ids per second: inserting (`iam::zch_insert`), read-only lookup (`iam::zch_lookup`) of the
  inserted ids in shuffled batches, and plain `fmix64 % rows` for reference.

    .venv/bin/python benchmarks/zch_benchmark.py            # the issue's setting, 1M rows
    .venv/bin/python benchmarks/zch_benchmark.py --quick    # 20k rows, seconds
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idmap.zero_collision import ZeroCollisionConfig, ZeroCollisionMap  # noqa: E402
from kernels._zch_common import home_slots  # noqa: E402


def share_rate(rows: torch.Tensor) -> float:
    """Fraction of entries of `rows` equal to at least one other entry."""
    if rows.numel() == 0:
        return 0.0
    _, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).float().mean())


def batches(ids: torch.Tensor, batch_size: int):
    return [ids[i : i + batch_size] for i in range(0, ids.numel(), batch_size)]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_load(args, load: float, generator: torch.Generator) -> dict:
    num_ids = int(load * args.num_slots)
    ids = torch.unique(torch.randint(0, 1 << 62, (num_ids,), generator=generator))
    ids = ids[torch.randperm(ids.numel(), generator=generator)]
    config = ZeroCollisionConfig(
        num_slots=args.num_slots, max_probe=args.max_probe, eviction_policy=args.policy
    )
    id_map = ZeroCollisionMap(config)

    start = time.perf_counter()
    rows = torch.cat([id_map.insert(batch, now=0).rows for batch in batches(ids, args.batch)])
    insert_seconds = time.perf_counter() - start

    placed = rows < config.unknown_row
    home = home_slots(ids, args.num_slots)
    probe_length = (rows[placed] - home[placed]) % args.num_slots + 1

    shuffled = ids[torch.randperm(ids.numel(), generator=generator)]
    lookup_batches = batches(shuffled, args.batch)
    lookup_seconds = best_time(lambda: [id_map.lookup(b) for b in lookup_batches], args.repeats)
    hash_seconds = best_time(
        lambda: [home_slots(b, args.num_slots) for b in lookup_batches], args.repeats
    )
    return {
        "load": load,
        "ids": ids.numel(),
        "hash_share": share_rate(home),
        "zch_share": share_rate(rows[placed]),
        "overflow": float((~placed).float().mean()),
        "probe": float(probe_length.float().mean()),
        "max_probe_used": int(probe_length.max()),
        "insert_per_s": ids.numel() / insert_seconds,
        "lookup_per_s": ids.numel() / lookup_seconds,
        "hash_per_s": ids.numel() / hash_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-slots", type=int, default=1_000_000)
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--max-probe", type=int, default=ZeroCollisionConfig.max_probe)
    parser.add_argument("--policy", default="none", choices=["none", "ttl", "lru"],
                        help="eviction policy (nothing expires while filling, so all behave alike)")
    parser.add_argument("--batch", type=int, default=65536, help="ids per insert/lookup call")
    parser.add_argument("--repeats", type=int, default=3, help="lookup timings: best of")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20k rows, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.num_slots, args.batch = 20_000, 4096
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)

    print(f"table {args.num_slots:,} rows, max_probe {args.max_probe}, batch {args.batch:,}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (CPU path)")
    header = ("| load | ids | hash%rows: ids sharing a row | zch: ids sharing a row | "
              "zch: unplaced (unknown row) | mean probe length (max) | insert ids/s | "
              "lookup ids/s | hash%rows ids/s |")
    print(header)
    print("|" + "---|" * header.count(" |"))
    for load in args.loads:
        r = run_load(args, load, generator)
        print(f"| {r['load']:.1f} | {r['ids']:,} | {r['hash_share']:.2%} | {r['zch_share']:.2%} "
              f"| {r['overflow']:.3%} | {r['probe']:.2f} ({r['max_probe_used']}) "
              f"| {r['insert_per_s'] / 1e6:.2f} M | {r['lookup_per_s'] / 1e6:.2f} M "
              f"| {r['hash_per_s'] / 1e6:.1f} M |")


if __name__ == "__main__":
    main()
