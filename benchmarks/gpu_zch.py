"""GPU check of the zero-collision id-map ops (`iam::zch_lookup`, `iam::zch_insert`): the Triton
kernels on CUDA against the torch path, concurrent inserts of one id, and timings.

    .venv/bin/python benchmarks/gpu_zch.py                      # on a CUDA machine
    .venv/bin/python benchmarks/gpu_zch.py --interpret --small  # smoke test on a CPU

Correctness, per eviction policy, over a few insert batches that mix known ids, new ids, repeats
and padding while time advances (so ids expire and get evicted). Every batch starts the kernel
and the torch path from the same buffers, then checks:
- the kernel's result obeys every rule of `idmap.invariants.insert_violations` (no id in two
  slots, no slot with two ids, policy-conforming claims, nothing else touched);
- known ids and new ids whose probe windows overlap no other new id's window get exactly the
  torch path's slots (others may legitimately differ: on a GPU concurrent claims run in some
  order, not batch order). Under --interpret programs run in batch order, so everything must
  equal the torch path.
Then a race: one id repeated across half a batch plus 1000 ids repeated 30 times each, into an
empty table and into a table of expired ids: each id must be claimed exactly once. Lookups must
equal the torch path exactly. Timings: CUDA events, median of --repeats; the torch path on this
machine's CPU for reference.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--num-slots", type=int, default=1_000_000, help="rows of the timed table")
    ap.add_argument("--check-slots", type=int, default=100_000, help="rows of the checked tables")
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--max-probe", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="insert batches checked per policy")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="tiny sizes (for --interpret)")
    ap.add_argument("--interpret", action="store_true",
                    help="run the kernels with TRITON_INTERPRET=1 on CPU tensors (no GPU needed)")
    args = ap.parse_args()
    if args.small:
        args.num_slots, args.check_slots, args.batch = 4000, 300, 160
        args.steps, args.repeats = 3, 1
    return args


def main() -> None:
    args = parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import time

    import torch

    from idmap.invariants import insert_violations
    from kernels import zch_insert as insert_op
    from kernels import zch_lookup as lookup_op
    from kernels._zch_common import EVICT_LRU, EVICT_NONE, EVICT_TTL, home_slots

    if args.interpret:
        device = torch.device("cpu")
        print("TRITON_INTERPRET=1 on the CPU: checks the code path; timings mean nothing")
    elif not torch.cuda.is_available():
        sys.exit("gpu_zch.py needs a CUDA device (none found); for a CPU smoke test run "
                 "benchmarks/gpu_zch.py --interpret --small")
    else:
        device = torch.device("cuda")
        print(f"device: {torch.cuda.get_device_name()}")
    # On CUDA through the dispatcher (checks the registration); interpreted: the wrappers
    # themselves, since CPU tensors would dispatch to the torch path.
    insert = torch.ops.iam.zch_insert if device.type == "cuda" else insert_op.zch_insert_triton
    lookup = torch.ops.iam.zch_lookup if device.type == "cuda" else lookup_op.zch_lookup_triton
    probe = args.max_probe
    gen = torch.Generator().manual_seed(0)

    def new_ids(count: int) -> torch.Tensor:
        return torch.randint(0, 1 << 62, (count,), generator=gen)

    def isolated(ids: torch.Tensor, num_slots: int) -> torch.Tensor:
        """Mask of ids whose window [home, home + probe) overlaps no other distinct id's."""
        distinct, inverse = torch.unique(ids, return_inverse=True)
        home = home_slots(distinct, num_slots)
        order = torch.argsort(home)
        sorted_home = home[order]
        gap_next = (torch.roll(sorted_home, -1) - sorted_home) % num_slots
        gap_prev = (sorted_home - torch.roll(sorted_home, 1)) % num_slots
        alone = torch.ones_like(distinct, dtype=torch.bool)
        if distinct.numel() > 1:
            alone[order] = (gap_next >= probe) & (gap_prev >= probe)
        return alone[inverse]

    def check_batch(identities, metadata, ids, now, policy, ttl, label) -> bool:
        before = identities.cpu().clone(), metadata.cpu().clone()
        ref_buffers = before[0].clone(), before[1].clone()
        ref = insert_op.zch_insert_torch(*ref_buffers, ids, now, probe, policy, ttl)
        got = [t.cpu() for t in insert(identities, metadata, ids.to(device), now, probe, policy,
                                       ttl)]
        problems = insert_violations(*before, ids, now, probe, policy, ttl, identities.cpu(),
                                     metadata.cpu(), *got)
        known = torch.isin(ids, before[0][before[0] >= 0])
        new_mask = (ids >= 0) & ~known
        must_equal = known | (ids < 0)
        must_equal[new_mask] = isolated(ids[new_mask], before[0].numel())
        if args.interpret:
            must_equal[:] = True
        differ = int((got[0] != ref[0])[must_equal].sum())
        if differ:
            problems.append(f"{differ} ids that must match the torch path got other slots")
        if args.interpret and not all(torch.equal(a, b) for a, b in
                                      zip((*got, identities.cpu()), (*ref, ref_buffers[0]),
                                          strict=True)):
            problems.append("interpreted kernel differs from the torch path")
        print(f"{label}: {'OK  ' if not problems else 'FAIL'} {ids.numel()} ids, "
              f"{int(got[1].sum())} claims, {int((got[2] >= 0).sum())} evictions, "
              f"{int((got[0] == before[0].numel()).sum())} unknown; {int(must_equal.sum())} "
              f"compared exactly, {int((got[0] != ref[0]).sum())} differ from the torch path")
        for problem in problems[:10]:
            print("    " + problem)
        return not problems

    failures = 0
    for policy, name in ((EVICT_NONE, "none"), (EVICT_TTL, "ttl"), (EVICT_LRU, "lru")):
        n = args.check_slots
        identities = torch.full((n,), -1, dtype=torch.int64, device=device)
        metadata = torch.zeros(n, dtype=torch.int64, device=device)
        previous = new_ids(0)
        for step in range(args.steps):
            # 40% ids of the previous batch, new ids, 2% repeats, 1% padding; ttl 15 with time
            # stepping by 10: ids not seen in the last batch expire.
            fresh = new_ids(args.batch - int(0.4 * args.batch) - int(0.03 * args.batch))
            seen = previous[torch.randint(0, max(1, previous.numel()), (int(0.4 * args.batch),),
                                          generator=gen)] if previous.numel() else new_ids(0)
            repeats = fresh[: int(0.02 * args.batch)]
            padding = torch.full((args.batch - fresh.numel() - seen.numel() - repeats.numel(),), -1)
            ids = torch.cat([fresh, seen, repeats, padding])
            ids = ids[torch.randperm(ids.numel(), generator=gen)]
            failures += not check_batch(identities, metadata, ids, 10 * step, policy, 15,
                                        f"{name:>4} step {step}")
            previous = fresh

    # The race: many programs inserting the same few ids at once.
    for policy, name in ((EVICT_TTL, "ttl"), (EVICT_LRU, "lru")):
        hot = torch.full((args.batch // 2,), 4242, dtype=torch.int64)
        warm = new_ids(1000).repeat_interleave(30)[: args.batch - hot.numel()]
        ids = torch.cat([hot, warm])[torch.randperm(args.batch, generator=gen)]
        for table in ("empty", "expired"):
            n = 4 * 1000 if table == "empty" else 1000 + 64
            identities = torch.full((n,), -1, dtype=torch.int64)
            metadata = torch.zeros(n, dtype=torch.int64)
            if table == "expired":
                identities = torch.arange(10**9, 10**9 + n)  # every slot taken, all expired
            identities, metadata = identities.to(device), metadata.to(device)
            failures += not check_batch(identities, metadata, ids, 100, policy, 15,
                                        f"race {name} {table:>7}")

    # Lookups: known, unknown and padding ids against the last table.
    known = identities[identities >= 0].cpu()
    ids = torch.cat([known, new_ids(known.numel()), torch.full((7,), -1)])
    for p in (1, probe, 3 * probe + 1):
        got = lookup(identities, ids.to(device), p).cpu()
        ok = torch.equal(got, lookup_op.zch_lookup_torch(identities.cpu(), ids, p))
        failures += not ok
        print(f"lookup max_probe {p}: {'OK' if ok else 'FAIL'}")

    # Timings on a table of num_slots rows filled to 0.9 (torch path, then copied over).
    def timed(fn, repeats: int, cuda: bool) -> float:
        """Median seconds of fn() (CUDA events on a GPU)."""
        fn()  # warm-up (compiles on a GPU)
        times = []
        for _ in range(repeats):
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
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

    n = args.num_slots
    cpu_identities = torch.full((n,), -1, dtype=torch.int64)
    cpu_metadata = torch.zeros(n, dtype=torch.int64)
    resident = new_ids(int(0.9 * n))
    for i in range(0, resident.numel(), 1 << 16):
        insert_op.zch_insert_torch(cpu_identities, cpu_metadata, resident[i : i + (1 << 16)], 0,
                                   probe, EVICT_LRU, 15)
    known = resident[torch.randint(0, resident.numel(), (args.batch,), generator=gen)]
    fresh = new_ids(args.batch)
    dev_identities, dev_metadata = cpu_identities.to(device), cpu_metadata.to(device)
    cuda = device.type == "cuda"
    rows = []
    for label, ids in (("known ids", known), ("new ids", fresh)):
        dev_ids = ids.to(device)
        saved = dev_identities.clone(), dev_metadata.clone()

        def insert_fresh_state(dev_ids=dev_ids, saved=saved):
            dev_identities.copy_(saved[0])
            dev_metadata.copy_(saved[1])
            insert(dev_identities, dev_metadata, dev_ids, 20, probe, EVICT_LRU, 15)

        copy_s = timed(lambda saved=saved: (dev_identities.copy_(saved[0]),
                                            dev_metadata.copy_(saved[1])), args.repeats, cuda)
        insert_s = timed(insert_fresh_state, args.repeats, cuda) - copy_s
        lookup_s = timed(lambda dev_ids=dev_ids: lookup(dev_identities, dev_ids, probe),
                         args.repeats, cuda)
        cpu_lookup_s = timed(lambda ids=ids: lookup_op.zch_lookup_torch(cpu_identities, ids,
                                                                         probe), 3, False)
        rows.append((label, lookup_s, insert_s, cpu_lookup_s))
    print(f"timings: table {n} rows at load 0.9, batch {args.batch}, max_probe {probe}")
    for label, lookup_s, insert_s, cpu_lookup_s in rows:
        print(f"  {label:>9}: lookup {args.batch / lookup_s / 1e6:8.1f} M ids/s, insert "
              f"{args.batch / max(insert_s, 1e-9) / 1e6:8.1f} M ids/s (kernel path); torch CPU "
              f"lookup {args.batch / cpu_lookup_s / 1e6:.2f} M ids/s")
    if failures:
        sys.exit(f"{failures} check(s) failed")
    print("kernels agree with the torch path and keep every invariant")


if __name__ == "__main__":
    main()
