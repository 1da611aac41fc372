"""`iam::zch_insert`: zero-collision id -> slot mapping that claims slots (training, index updates).

    zch_insert(Tensor(a!) identities, Tensor(b!) metadata, Tensor ids, int now, int max_probe,
               int policy, int ttl) -> (Tensor slots, Tensor claimed, Tensor evicted_ids)

Args:
    identities: int64 [num_slots], raw id per slot, -1 (`EMPTY_ID`) where empty. Updated in place.
    metadata: int64 [num_slots], the `now` at which each slot's id was last seen. Updated in place.
    ids: int64 [batch] raw ids; negative ids are padding (slot `num_slots`, never inserted).
    now: current time, in whatever unit the caller uses for `ttl` (e.g. hours).
    max_probe: window length (slots `home(id) + p (mod num_slots)`, `p < max_probe`).
    policy: `EVICT_NONE`, `EVICT_TTL` or `EVICT_LRU` from `kernels/_zch_common.py`.
    ttl: an id whose last-seen time is `< now - ttl` has expired (its slot may be taken).

Returns:
    slots: int64 [batch], the slot of each id, or `num_slots` (the reserved "unknown" row) when
        its window had no free slot (or the id is negative).
    claimed: bool [batch], True at the one position per newly inserted id that claimed its slot
        in this call: the slot's embedding row (and optimizer state) must be re-initialised.
    evicted_ids: int64 [batch], at claimed positions the expired id that the claim evicted, -1
        elsewhere (and where the claimed slot was empty).

Semantics (what the torch path computes, and the Triton kernel under TRITON_INTERPRET=1):
1. Every id already in its window keeps its slot and its last-seen time becomes
   `max(metadata, now)`. This happens for the whole batch first, so an id of the batch is never
   evicted by the same batch.
2. The remaining ids claim slots one id at a time in order of first occurrence in the batch;
   repeats of an id get the same slot. A slot is free when empty or, unless the policy is NONE,
   when its id expired. TTL takes the first free slot in probe order; LRU takes the first empty
   slot, else the expired slot seen longest ago (ties: probe order); NONE the first empty slot.
   A claim writes `identities[slot] = id, metadata[slot] = now`.
No slot ever holds two ids and no id ever holds two slots; an id that finds no free slot gets the
unknown row instead of sharing one (zero collisions, at the price of an overflow miss).

CUDA: phase 1 is `iam::zch_lookup`'s kernel plus a scatter-amax of `now`; phase 2 is
`_zch_insert_kernel`, one program per id, which claims with an atomic compare-and-swap. Programs
run concurrently, so a GPU batch follows *some* claim order rather than batch order: the result
equals the torch path's when the windows of new ids do not overlap, and is otherwise an equally
valid mapping (each claim takes the policy's best free slot at the moment of its CAS).
`tests/test_zch_claim_protocol.py` runs a step-by-step model of the kernel's protocol under
random interleavings; keep the two in step.

The torch path does step 2 in vectorised rounds that reproduce the one-at-a-time order exactly:
each round every pending id picks its best free slot, and an id commits its pick only if no
earlier pending id has that slot in its window (an earlier id could otherwise take it first).
The earliest pending id always commits, so rounds end; typical batches need a handful.
"""

import torch

from kernels._library import LIB, require_triton_device, triton_available
from kernels._zch_common import (
    EMPTY_ID,
    EVICT_LRU,
    EVICT_NONE,
    EVICT_TTL,
    home_slots,
)
from kernels.zch_lookup import _launch_zch_lookup, probe_for_ids

# ---- launch settings (the only place) --------------------------------------------------------
# One program (one warp) per id: its window is one vector, and a warp retrying its CAS never
# waits on a lane of its own. Not tuned on a GPU yet: the H200 run of benchmarks/gpu_zch.py
# --small (docs/performance.md) checked results only.
NUM_WARPS = 1

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


# ---- argument checks (both paths) ------------------------------------------------------------
def _check_zch_insert(
    identities: torch.Tensor,
    metadata: torch.Tensor,
    ids: torch.Tensor,
    max_probe: int,
    policy: int,
    ttl: int,
) -> None:
    """Raise ValueError naming the problem."""
    if identities.dtype != torch.int64 or identities.dim() != 1 or identities.numel() == 0:
        raise ValueError(
            f"zch_insert: identities must be a non-empty 1-D int64 tensor, got {identities.dtype} "
            f"with shape {tuple(identities.shape)}"
        )
    if metadata.dtype != torch.int64 or metadata.shape != identities.shape:
        raise ValueError(
            f"zch_insert: metadata must be int64 with the shape of identities "
            f"{tuple(identities.shape)}, got {metadata.dtype} with shape {tuple(metadata.shape)}"
        )
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(
            f"zch_insert: ids must be a 1-D int64 tensor, got {ids.dtype} "
            f"with shape {tuple(ids.shape)}"
        )
    if not (ids.device == identities.device == metadata.device):
        raise ValueError(
            f"zch_insert: identities ({identities.device}), metadata ({metadata.device}) and ids "
            f"({ids.device}) must be on one device"
        )
    if max_probe < 1:
        raise ValueError(f"zch_insert: max_probe must be >= 1, got {max_probe}")
    if policy not in (EVICT_NONE, EVICT_TTL, EVICT_LRU):
        raise ValueError(f"zch_insert: policy must be 0 (none), 1 (ttl) or 2 (lru), got {policy}")
    if ttl < 0:
        raise ValueError(f"zch_insert: ttl must be >= 0, got {ttl}")


# Phase 1's time update, shared by both paths.
def _refresh_last_seen(metadata: torch.Tensor, slots: torch.Tensor, now: int) -> None:
    """metadata[s] = max(metadata[s], now) for every found slot (`slots < num_slots`), without a
    host sync: misses scatter INT64_MIN into slot 0, which changes nothing."""
    found = slots < metadata.numel()
    times = torch.full_like(slots, now).masked_fill_(~found, _INT64_MIN)
    metadata.scatter_reduce_(0, torch.where(found, slots, torch.zeros_like(slots)), times, "amax")


# ---- Triton kernel and its launch (CUDA; CPU tensors under TRITON_INTERPRET=1) ---------------
if triton_available():
    import triton
    import triton.language as tl

    from kernels._zch_common import (
        TL_CLAIMING_ID,
        TL_EMPTY_ID,
        TL_EVICT_LRU,
        TL_EVICT_NONE,
        _home_slot,
    )

    @triton.jit(do_not_specialize=["num_slots", "probes", "now", "expire_before"])
    def _zch_insert_kernel(
        identities_ptr,  # int64 [num_slots], in place
        metadata_ptr,  # int64 [num_slots], in place
        ids_ptr,  # int64 [num_ids]
        slots_ptr,  # int64 [num_ids]: phase-1 slots in, final slots out
        claimed_ptr,  # int8 [num_ids], output
        evicted_ptr,  # int64 [num_ids], output
        num_slots,
        probes,  # window length, <= BLOCK_PROBE and <= num_slots
        now,
        expire_before,  # now - ttl: an id last seen before this has expired
        POLICY: tl.constexpr,  # EVICT_NONE, EVICT_TTL or EVICT_LRU
        BLOCK_PROBE: tl.constexpr,
    ):
        # Program -> one batch position. Ids found in phase 1 and padding have nothing to do.
        pid = tl.program_id(0)
        raw_id = tl.load(ids_ptr + pid)
        slot = tl.load(slots_ptr + pid)
        now = now.to(tl.int64)
        expire_before = expire_before.to(tl.int64)
        pending = (raw_id >= 0) & (slot == num_slots)
        claimed = tl.full([], 0, tl.int8)
        evicted = tl.full([], -1, tl.int64)
        claiming = tl.full([], TL_CLAIMING_ID, tl.int64)

        # The id's window: BLOCK_PROBE lanes, lanes >= probes masked off.
        home = _home_slot(raw_id, num_slots)
        offs = tl.arange(0, BLOCK_PROBE)
        probe_mask = offs < probes
        window = (home + offs) % num_slots

        # Each pass re-reads the window and ends the program, waits, or tries one
        # compare-and-swap on the best free slot. Times are read first, with acquire semantics,
        # then identities: a claimer writes the time before it publishes the id, so a window
        # never pairs an old id with its successor's fresh time (which would hide a slot that
        # already holds this id, and let a repeat of the id claim a second slot). The opposite
        # pairing, a new id with an old time, is caught after the CAS (the roll-back below).
        # (Atomic loads are written as atomic_add of 0: `tl.atomic_load` only exists in recent
        # Triton releases; the GPU host's triton 3.6 had none.)
        while pending:
            last_seen = tl.atomic_add(metadata_ptr + window, 0, mask=probe_mask, sem="acquire")
            last_seen = tl.where(probe_mask, last_seen, 0)
            occupant = tl.atomic_add(identities_ptr + window, 0, mask=probe_mask, sem="relaxed")
            occupant = tl.where(probe_mask, occupant, TL_EMPTY_ID)
            match = (occupant == raw_id) & probe_mask
            busy = (occupant == TL_CLAIMING_ID) & probe_mask
            if tl.max(match.to(tl.int32), axis=0) > 0:
                # Another program inserted the same id (a repeat in the batch): share its slot.
                first = tl.min(tl.where(match, offs, BLOCK_PROBE), axis=0)
                slot = (home + first) % num_slots
                pending = False
            elif tl.max(busy.to(tl.int32), axis=0) > 0:
                # A slot of the window is being claimed, maybe by this very id: look again
                # once its owner has published (a few instructions later).
                pending = True
            else:
                empty = (occupant == TL_EMPTY_ID) & probe_mask
                if POLICY == TL_EVICT_NONE:
                    free = empty
                    choice = free
                else:
                    free = empty | ((occupant >= 0) & (last_seen < expire_before) & probe_mask)
                    choice = free
                    if POLICY == TL_EVICT_LRU:
                        # LRU: an empty slot if any, else the expired slot seen longest ago.
                        has_empty = tl.max(empty.to(tl.int32), axis=0) > 0
                        oldest = tl.min(tl.where(free, last_seen, 0x7FFFFFFFFFFFFFFF), axis=0)
                        choice = tl.where(has_empty, empty, free & (last_seen == oldest))
                pick = tl.min(tl.where(choice, offs, BLOCK_PROBE), axis=0)
                if pick == BLOCK_PROBE:
                    pending = False  # window full of live ids: overflow, the unknown row
                else:
                    candidate = (home + pick) % num_slots
                    expected = tl.sum(tl.where(offs == pick, occupant, 0), axis=0)
                    # Lock the slot: only one program turns `expected` into CLAIMING_ID.
                    seen = tl.atomic_cas(identities_ptr + candidate, expected, claiming)
                    if seen == expected:
                        previous_time = tl.atomic_xchg(metadata_ptr + candidate, now)
                        if (expected >= 0) & (previous_time >= expire_before):
                            # `expected` was claimed in this launch after we read the slot's
                            # time: it is fresh, not expired. Undo and look again.
                            tl.atomic_xchg(metadata_ptr + candidate, previous_time)
                            tl.atomic_xchg(identities_ptr + candidate, expected)
                        else:
                            # Publish the id (its time is already written) and report.
                            tl.atomic_xchg(identities_ptr + candidate, raw_id)
                            slot = candidate
                            claimed = tl.full([], 1, tl.int8)
                            evicted = expected
                            pending = False

        tl.store(slots_ptr + pid, slot)
        tl.store(claimed_ptr + pid, claimed)
        tl.store(evicted_ptr + pid, evicted)


def _launch_zch_insert(
    identities: torch.Tensor,
    metadata: torch.Tensor,
    ids: torch.Tensor,
    now: int,
    max_probe: int,
    policy: int,
    ttl: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both phases on checked arguments: `_zch_lookup_kernel` and the time update, then
    `_zch_insert_kernel` for the ids not found. `identities` and `metadata` are updated in
    place, so they must be contiguous already."""
    ids = ids.contiguous()
    slots = _launch_zch_lookup(identities, ids, max_probe)  # phase 1: ids already present
    _refresh_last_seen(metadata, slots, now)
    claimed = torch.zeros(ids.shape, dtype=torch.int8, device=ids.device)
    evicted_ids = torch.full_like(ids, EMPTY_ID)
    if ids.numel() == 0:
        return slots, claimed.bool(), evicted_ids
    num_slots = identities.numel()
    probes = min(max_probe, num_slots)
    _zch_insert_kernel[(ids.numel(),)](
        identities,
        metadata,
        ids,
        slots,
        claimed,
        evicted_ids,
        num_slots,
        probes,
        now,
        now - ttl,
        POLICY=policy,
        BLOCK_PROBE=triton.next_power_of_2(probes),
        num_warps=NUM_WARPS,
    )
    return slots, claimed.bool(), evicted_ids


def zch_insert_triton(
    identities: torch.Tensor,
    metadata: torch.Tensor,
    ids: torch.Tensor,
    now: int,
    max_probe: int,
    policy: int,
    ttl: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA implementation of `iam::zch_insert` (CPU tensors too under TRITON_INTERPRET=1)."""
    _check_zch_insert(identities, metadata, ids, max_probe, policy, ttl)
    require_triton_device("zch_insert", identities.device)
    if not (identities.is_contiguous() and metadata.is_contiguous()):
        raise ValueError("zch_insert_triton: identities and metadata must be contiguous")
    return _launch_zch_insert(identities, metadata, ids, now, max_probe, policy, ttl)


# ---- torch path (CPU implementation and reference) -------------------------------------------
def _claim_in_order(
    identities: torch.Tensor,
    metadata: torch.Tensor,
    claim_ids: torch.Tensor,
    now: int,
    probes: int,
    policy: int,
    expire_before: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Claims a slot for each of the distinct `claim_ids` [U], as if one at a time in order.
    Returns (slot or num_slots per id, evicted id or -1 per id)."""
    num_slots = identities.numel()
    num_claims = claim_ids.numel()
    claim_slots = torch.full_like(claim_ids, num_slots)
    claim_evicted = torch.full_like(claim_ids, EMPTY_ID)
    offs = torch.arange(probes, device=claim_ids.device)
    home = home_slots(claim_ids, num_slots)
    # "Which earlier id could take this slot?" is answered in a scratch of `buckets` entries
    # indexed by slot % buckets. Two slots sharing a bucket only delays a commit to a later
    # round (never reorders claims), so a scratch ~4x the window entries is enough.
    buckets = min(num_slots, 1 << (4 * num_claims * probes - 1).bit_length())
    pending = torch.arange(num_claims, device=claim_ids.device)  # claim ranks, ascending
    while pending.numel() > 0:
        window = home.index_select(0, pending)[:, None] + offs
        window = torch.where(window >= num_slots, window - num_slots, window)
        flat = window.reshape(-1)
        occupant = identities.index_select(0, flat).view_as(window)
        empty = occupant == EMPTY_ID
        if policy == EVICT_NONE:
            free = empty
            choice = free
        else:
            last_seen = metadata.index_select(0, flat).view_as(window)
            free = empty | ((occupant >= 0) & (last_seen < expire_before))
            choice = free
            if policy == EVICT_LRU:  # empty first, then least recently seen
                age_key = torch.where(empty, _INT64_MIN, last_seen).masked_fill_(~free, _INT64_MAX)
                choice = free & (age_key == age_key.min(dim=1, keepdim=True).values)
        has_free = free.any(dim=1)
        pick = choice.to(torch.uint8).argmax(dim=1, keepdim=True)  # first best position
        candidate = window.gather(1, pick).squeeze(1)
        # Earliest pending id with a free slot whose window covers each bucket. Ids without a
        # free slot are final misses (free slots never reappear) and block nobody.
        cover = torch.full((buckets,), num_claims, dtype=torch.int64, device=claim_ids.device)
        blockers = (window[has_free] % buckets).reshape(-1)
        cover.scatter_reduce_(0, blockers, pending[has_free].repeat_interleave(probes), "amin")
        commit = has_free & (cover.index_select(0, candidate % buckets) == pending)
        won = candidate[commit]
        ranks = pending[commit]
        claim_slots[ranks] = won
        claim_evicted[ranks] = occupant.gather(1, pick).squeeze(1)[commit]
        identities[won] = claim_ids[ranks]
        metadata[won] = now
        pending = pending[has_free & ~commit]
    return claim_slots, claim_evicted


def zch_insert_torch(
    identities: torch.Tensor,
    metadata: torch.Tensor,
    ids: torch.Tensor,
    now: int,
    max_probe: int,
    policy: int,
    ttl: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference and CPU implementation of `iam::zch_insert` (see the module docstring)."""
    _check_zch_insert(identities, metadata, ids, max_probe, policy, ttl)
    num_slots = identities.numel()
    slots = probe_for_ids(identities, ids, max_probe)  # phase 1: ids already present
    _refresh_last_seen(metadata, slots, now)
    claimed = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    evicted_ids = torch.full_like(ids, EMPTY_ID)
    new_positions = torch.nonzero((ids >= 0) & (slots == num_slots)).squeeze(1)
    if new_positions.numel() == 0:
        return slots, claimed, evicted_ids

    # Phase 2: distinct new ids, in order of their first position in the batch.
    new_ids = ids.index_select(0, new_positions)
    unique_ids, inverse = torch.unique(new_ids, return_inverse=True)
    first = torch.full_like(unique_ids, new_ids.numel()).scatter_reduce_(
        0, inverse, torch.arange(new_ids.numel(), device=ids.device), "amin"
    )
    order = torch.argsort(first)
    rank_of_unique = torch.empty_like(order)
    rank_of_unique[order] = torch.arange(order.numel(), device=ids.device)
    claim_slots, claim_evicted = _claim_in_order(
        identities,
        metadata,
        unique_ids[order],
        now,
        min(max_probe, num_slots),
        policy,
        now - ttl,
    )
    slots.index_copy_(0, new_positions, claim_slots[rank_of_unique[inverse]])
    claimers = new_positions[first[order]]  # the batch position that claims, per claim rank
    inserted = claim_slots < num_slots
    claimed[claimers[inserted]] = True
    evicted_ids[claimers[inserted]] = claim_evicted[inserted]
    return slots, claimed, evicted_ids


def _zch_insert_fake(identities, metadata, ids, now, max_probe, policy, ttl):
    return (
        torch.empty_like(ids),
        torch.empty(ids.shape, dtype=torch.bool, device=ids.device),
        torch.empty_like(ids),
    )


# ---- registration ----------------------------------------------------------------------------
LIB.define(
    "zch_insert(Tensor(a!) identities, Tensor(b!) metadata, Tensor ids, int now, int max_probe, "
    "int policy, int ttl) -> (Tensor, Tensor, Tensor)"
)
LIB.impl("zch_insert", zch_insert_torch, "CPU")
LIB.impl("zch_insert", zch_insert_triton, "CUDA")
torch.library.register_fake("iam::zch_insert", _zch_insert_fake, lib=LIB)
