"""The CUDA claim protocol of `_zch_insert_kernel` (kernels/zch_insert.py) under concurrency.

The interpreter runs Triton programs one after another, so the kernel's concurrent paths (a
window slot seen mid-claim, a lost compare-and-swap, the roll-back of a claim that read a stale
time) never run on a CPU. This test runs a step-by-step model of the protocol, one Python
generator per program that yields before every memory access, under many random interleavings
(sequentially consistent memory), and checks every outcome with `insert_violations`: no id in
two slots, no slot with two ids, only expired ids evicted, claims that follow the policy.
Keep `_program` in step with the kernel when changing either.
"""

import random

import pytest
import torch

from idmap.invariants import insert_violations
from kernels._zch_common import (
    CLAIMING_ID,
    EMPTY_ID,
    EVICT_LRU,
    EVICT_NONE,
    EVICT_TTL,
    home_slots,
)
from kernels.zch_insert import zch_insert_torch
from kernels.zch_lookup import probe_for_ids

INT64_MAX = (1 << 63) - 1
TRIALS = 60


def _program(mem, out, stats, pid, raw_id, home, probes, now, expire_before, policy):
    """One program of `_zch_insert_kernel`; `mem` = [identities, metadata] lists, `out` = the
    [slots, claimed, evicted] lists (slots holds the phase-1 result on entry); `stats` counts
    the concurrent paths taken."""
    identities, metadata = mem
    num_slots = len(identities)
    if raw_id < 0 or out[0][pid] != num_slots:
        return
    window = [(home + p) % num_slots for p in range(probes)]
    while True:
        occupant, last_seen = [], []
        for s in window:  # vector loads: each element may see a different moment
            yield
            last_seen.append(metadata[s])
        for s in window:  # identities after times, as in the kernel
            yield
            occupant.append(identities[s])
        if raw_id in occupant:
            out[0][pid] = window[occupant.index(raw_id)]
            return
        if CLAIMING_ID in occupant:
            stats["waits"] += 1
            continue
        empty = [o == EMPTY_ID for o in occupant]
        if policy == EVICT_NONE:
            choice = empty
        else:
            free = [e or (o >= 0 and t < expire_before)
                    for e, o, t in zip(empty, occupant, last_seen, strict=True)]
            choice = free
            if policy == EVICT_LRU:
                oldest = min([t if f else INT64_MAX for f, t in zip(free, last_seen, strict=True)])
                choice = empty if any(empty) else [f and t == oldest for f, t in
                                                    zip(free, last_seen, strict=True)]
        if not any(choice):
            return  # overflow: the unknown row
        pick = choice.index(True)
        candidate, expected = window[pick], occupant[pick]
        yield
        if identities[candidate] != expected:  # atomic_cas failed
            stats["lost_cas"] += 1
            continue
        identities[candidate] = CLAIMING_ID
        yield
        previous_time, metadata[candidate] = metadata[candidate], now  # atomic_xchg
        if expected >= 0 and previous_time >= expire_before:
            stats["roll_backs"] += 1
            yield
            metadata[candidate] = previous_time
            yield
            identities[candidate] = expected
            continue
        yield
        identities[candidate] = raw_id
        out[0][pid], out[1][pid], out[2][pid] = candidate, True, expected
        return


def _run_interleaved(identities, metadata, ids, now, probes, policy, ttl, rng, stats):
    num_slots = identities.numel()
    slots = probe_for_ids(identities, ids, probes)  # phase 1, as the wrapper does
    found = slots < num_slots
    metadata[slots[found]] = torch.maximum(metadata[slots[found]], torch.tensor(now))
    mem = [identities.tolist(), metadata.tolist()]
    out = [slots.tolist(), [False] * ids.numel(), [EMPTY_ID] * ids.numel()]
    homes = home_slots(ids, num_slots).tolist()
    running = [
        _program(mem, out, stats, pid, x, homes[pid], probes, now, now - ttl, policy)
        for pid, x in enumerate(ids.tolist())
    ]
    steps = 0
    while running:
        program = rng.choice(running)
        try:
            next(program)
        except StopIteration:
            running.remove(program)
        steps += 1
        assert steps < 2_000_000, "livelock"
    identities.copy_(torch.tensor(mem[0]))
    metadata.copy_(torch.tensor(mem[1]))
    return torch.tensor(out[0]), torch.tensor(out[1]), torch.tensor(out[2])


@pytest.mark.parametrize("policy", [EVICT_NONE, EVICT_TTL, EVICT_LRU])
def test_random_interleavings_keep_every_invariant(policy):
    rng = random.Random(policy)
    reorders = 0
    stats = {"waits": 0, "lost_cas": 0, "roll_backs": 0}
    for trial in range(TRIALS):
        num_slots, probes, ttl = rng.choice([(12, 4), (16, 16), (23, 5)]) + (rng.randrange(4),)
        identities = torch.full((num_slots,), EMPTY_ID)
        metadata = torch.zeros(num_slots, dtype=torch.int64)
        for seen_at in range(10):  # residents last seen at times 0..9
            earlier = torch.tensor([rng.randrange(1000, 1100) for _ in range(rng.randrange(3))],
                                   dtype=torch.int64)
            zch_insert_torch(identities, metadata, earlier, seen_at, probes, policy, 100)
        residents = identities[identities >= 0].tolist()
        batch = [rng.randrange(30) for _ in range(rng.randrange(1, 14))]
        batch += rng.sample(residents, min(len(residents), 2)) + [batch[0]] * 3 + [-1]
        rng.shuffle(batch)
        ids = torch.tensor(batch, dtype=torch.int64)
        before = identities.clone(), metadata.clone()
        now = 10
        out = _run_interleaved(identities, metadata, ids, now, probes, policy, ttl, rng, stats)
        problems = insert_violations(
            *before, ids, now, probes, policy, ttl, identities, metadata, *out
        )
        assert not problems, f"trial {trial}: {problems}"
        reference = zch_insert_torch(before[0].clone(), before[1].clone(), ids, now, probes,
                                     policy, ttl)
        reorders += not torch.equal(reference[0], out[0])
    # the concurrent paths did run (roll-backs need evictions, which NONE never does)
    assert reorders > 0 and stats["waits"] > 0 and stats["lost_cas"] > 0, stats
    assert policy == EVICT_NONE or stats["roll_backs"] > 0, stats
