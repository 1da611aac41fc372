"""Checks that an `iam::zch_insert` call left a valid zero-collision map.

Used by the tests (every policy, random batches), by `benchmarks/gpu_zch.py` on a GPU, where
concurrent claims may legitimately pick another order than the torch path, and by the
benchmark. The rules follow from the op's semantics (`kernels/zch_insert.py`); the key fact is
that within one call free slots only ever become occupied, so anything free at the end was free
throughout the call.
"""

import torch

from kernels._zch_common import EMPTY_ID, EVICT_LRU, EVICT_NONE, home_slots


def insert_violations(
    identities_before: torch.Tensor,
    metadata_before: torch.Tensor,
    ids: torch.Tensor,
    now: int,
    max_probe: int,
    policy: int,
    ttl: int,
    identities_after: torch.Tensor,
    metadata_after: torch.Tensor,
    slots: torch.Tensor,
    claimed: torch.Tensor,
    evicted_ids: torch.Tensor,
) -> list[str]:
    """Returns a description of every broken rule (empty when the call was valid).

    Args: the buffers before and after one `zch_insert(identities, metadata, ids, now,
    max_probe, policy, ttl)` call and its three outputs; any device (checked on the CPU).
    """
    ident0, meta0 = identities_before.cpu().tolist(), metadata_before.cpu().tolist()
    ident1, meta1 = identities_after.cpu().tolist(), metadata_after.cpu().tolist()
    id_list, slot_list = ids.cpu().tolist(), slots.cpu().tolist()
    claimed_list, evicted_list = claimed.cpu().tolist(), evicted_ids.cpu().tolist()
    homes = home_slots(ids.cpu(), len(ident0)).tolist()
    num_slots = len(ident0)
    probes = min(max_probe, num_slots)
    expire_before = now - ttl
    problems: list[str] = []

    def window(i: int) -> list[int]:
        return [(homes[i] + p) % num_slots for p in range(probes)]

    def free_at_end(slot: int) -> bool:
        if ident1[slot] == EMPTY_ID:
            return True
        return policy != EVICT_NONE and meta1[slot] < expire_before

    live = [x for x in ident1 if x >= 0]
    if len(live) != len(set(live)):
        problems.append(f"{len(live) - len(set(live))} ids own more than one slot")
    slot_before = {x: s for s, x in enumerate(ident0) if x >= 0}
    live_after = set(live)
    if any(x < EMPTY_ID for x in ident1):
        problems.append("a slot holds a negative marker other than empty")

    slot_of_id: dict[int, int] = {}
    batch_ids = {x for x in id_list if x >= 0}
    claimers: dict[int, int] = {}
    new_ids: set[int] = set()
    for i, (x, s) in enumerate(zip(id_list, slot_list, strict=True)):
        if x < 0:
            if s != num_slots or claimed_list[i]:
                problems.append(f"padding id {x} at {i} got slot {s}")
            continue
        if slot_of_id.setdefault(x, s) != s:
            problems.append(f"id {x} got slots {slot_of_id[x]} and {s} in one batch")
        if claimed_list[i]:
            if s == num_slots:
                problems.append(f"id {x} at {i} is marked claimed but got the unknown row")
            if x in claimers:
                problems.append(f"id {x} claimed twice (positions {claimers[x]} and {i})")
            claimers[x] = i
        if s == num_slots:
            if x in live_after:
                problems.append(f"id {x} is in the map but got the unknown row")
            if any(free_at_end(w) for w in window(i)):
                problems.append(f"id {x} got the unknown row although its window has a free slot")
            continue
        if s not in window(i):
            problems.append(f"id {x} got slot {s} outside its window")
            continue
        if ident1[s] != x:
            problems.append(f"slot {s} of id {x} holds {ident1[s]}")
        was_present = ident0[s] == x
        if was_present and (claimed_list[i] or meta1[s] != max(meta0[s], now)):
            problems.append(f"known id {x} was re-claimed or its time not refreshed")
        if not was_present:
            if x in slot_before:
                problems.append(f"id {x} moved from slot {slot_before[x]} to {s}")
            new_ids.add(x)
            if meta1[s] != now:
                problems.append(f"claimed slot {s} has time {meta1[s]}, expected {now}")

    for x in new_ids - set(claimers):
        problems.append(f"new id {x} has no claiming position")
    for i in claimers.values():
        s, old = slot_list[i], evicted_list[i]
        if s == num_slots:
            continue
        if old != ident0[s]:
            problems.append(f"claim of slot {s} reports evicting {old} but it held {ident0[s]}")
        if old >= 0 and (old in batch_ids or policy == EVICT_NONE or meta0[s] >= expire_before):
            problems.append(f"id {old} was evicted from slot {s} although it was not expired")
        earlier = window(i)[: window(i).index(s)]
        if policy == EVICT_LRU:
            if old == EMPTY_ID and any(ident1[w] == EMPTY_ID for w in earlier):
                problems.append(f"LRU claim of slot {s} skipped an earlier empty slot")
            if old >= 0 and any(ident1[w] == EMPTY_ID for w in window(i)):
                problems.append(f"LRU claim of slot {s} evicted {old} while a slot was empty")
            if old >= 0 and any(free_at_end(w) and meta1[w] < meta0[s] for w in window(i)):
                problems.append(f"LRU claim of slot {s} evicted {old}, not the oldest expired")
        elif any(free_at_end(w) for w in earlier):
            problems.append(f"claim of slot {s} skipped a free slot earlier in the window")

    changed = (identities_before.cpu() != identities_after.cpu()) | (
        metadata_before.cpu() != metadata_after.cpu()
    )
    touched = {s for s in slot_list if s < num_slots}
    for s in torch.nonzero(changed).squeeze(1).tolist():
        if s not in touched:
            problems.append(f"slot {s} changed although no id of the batch maps to it")
    return problems
