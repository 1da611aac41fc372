"""The zero-collision id-map ops (`iam::zch_lookup`, `iam::zch_insert`) on the CPU: the hash,
exact agreement with a one-id-at-a-time Python model, the no-shared-slot invariant (hypothesis),
read-only lookups, eviction policies and argument checks."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels  # noqa: F401
from idmap.invariants import insert_violations
from kernels._zch_common import EMPTY_ID, EVICT_LRU, EVICT_NONE, EVICT_TTL, home_slots

POLICIES = [EVICT_NONE, EVICT_TTL, EVICT_LRU]
_U64 = (1 << 64) - 1


def fmix64_python(x: int) -> int:
    """murmur3 fmix64 on Python ints, the definition `kernels/_zch_common.py` documents."""
    h = x & _U64
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _U64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _U64
    return h ^ (h >> 33)


def home_python(x: int, num_slots: int) -> int:
    return (fmix64_python(x) & ((1 << 63) - 1)) % num_slots


def insert_python(identities, metadata, ids, now, max_probe, policy, ttl):
    """One id at a time, on lists: the semantics documented in kernels/zch_insert.py."""
    n = len(identities)
    probes = min(max_probe, n)
    expire_before = now - ttl
    windows = [[(home_python(x, n) + p) % n for p in range(probes)] if x >= 0 else [] for x in ids]
    slots = [n] * len(ids)
    claimed = [False] * len(ids)
    evicted = [EMPTY_ID] * len(ids)
    for i, x in enumerate(ids):  # step 1: known ids
        present = [s for s in windows[i] if identities[s] == x]
        if x >= 0 and present:
            slots[i] = present[0]
    for s in {s for s in slots if s < n}:
        metadata[s] = max(metadata[s], now)
    for i, x in enumerate(ids):  # step 2: new ids in batch order
        if x < 0 or slots[i] < n:
            continue
        present = [s for s in windows[i] if identities[s] == x]
        if present:  # a repeat of an id claimed earlier in this batch
            slots[i] = present[0]
            continue
        empty = [s for s in windows[i] if identities[s] == EMPTY_ID]
        expired = [
            s
            for s in windows[i]
            if policy != EVICT_NONE and identities[s] >= 0 and metadata[s] < expire_before
        ]
        free = [s for s in windows[i] if s in empty or s in expired]
        if not free:
            continue
        if policy == EVICT_LRU:
            pick = empty[0] if empty else min(expired, key=lambda s: metadata[s])
        else:
            pick = free[0]
        evicted[i] = identities[pick]
        identities[pick], metadata[pick] = x, now
        slots[i], claimed[i] = pick, True
    return slots, claimed, evicted


def test_hash_matches_python_definition():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(-(1 << 63), (1 << 63) - 1, (2000,), generator=gen, dtype=torch.int64)
    edge = torch.tensor([0, 1, -1, (1 << 63) - 1, -(1 << 63), 123456789123456789])
    ids = torch.cat([ids, edge])
    for num_slots in (1, 7, 1000, 1_000_003, (1 << 40) + 15):
        expected = [home_python(x, num_slots) for x in ids.tolist()]
        assert home_slots(ids, num_slots).tolist() == expected


def _random_table(num_slots: int, fill: float, seed: int, now: int):
    rng = random.Random(seed)
    identities = torch.full((num_slots,), EMPTY_ID)
    metadata = torch.zeros(num_slots, dtype=torch.int64)
    taken = rng.sample(range(num_slots), int(fill * num_slots))
    for s in taken:  # ids at arbitrary slots are fine for lookups and eviction choices
        identities[s] = rng.randrange(0, 1 << 40)
        metadata[s] = now - rng.randrange(0, 40)
    return identities, metadata


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("num_slots,max_probe", [(97, 5), (64, 16), (13, 40), (1000, 8)])
def test_insert_equals_one_at_a_time_model(policy, num_slots, max_probe):
    rng = random.Random(num_slots * 10 + policy)
    identities = torch.full((num_slots,), EMPTY_ID)
    metadata = torch.zeros(num_slots, dtype=torch.int64)
    ref_identities, ref_metadata = identities.tolist(), metadata.tolist()
    pool = [rng.randrange(0, 1 << 62) for _ in range(num_slots * 2)]
    for step in range(12):
        now = 100 + 3 * step
        size = rng.randrange(0, 80)
        batch = [rng.choice(pool) if rng.random() > 0.05 else -1 for _ in range(size)]
        ids = torch.tensor(batch, dtype=torch.int64)
        before = identities.clone(), metadata.clone()
        slots, claimed, evicted = torch.ops.iam.zch_insert(
            identities, metadata, ids, now, max_probe, policy, 7
        )
        expected = insert_python(ref_identities, ref_metadata, batch, now, max_probe, policy, 7)
        assert slots.tolist() == expected[0]
        assert claimed.tolist() == expected[1]
        assert evicted.tolist() == expected[2]
        assert identities.tolist() == ref_identities and metadata.tolist() == ref_metadata
        assert not insert_violations(
            *before, ids, now, max_probe, policy, 7, identities, metadata, slots, claimed, evicted
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_slots=st.integers(1, 40),
    max_probe=st.integers(1, 12),
    policy=st.sampled_from(POLICIES),
    ttl=st.integers(0, 5),
    batches=st.lists(
        st.lists(st.integers(-2, 60), max_size=30), min_size=1, max_size=6
    ),
)
def test_no_two_live_ids_share_a_slot(num_slots, max_probe, policy, ttl, batches):
    identities = torch.full((num_slots,), EMPTY_ID)
    metadata = torch.zeros(num_slots, dtype=torch.int64)
    ref = (identities.tolist(), metadata.tolist())
    for step, batch in enumerate(batches):
        ids = torch.tensor(batch, dtype=torch.int64)
        before = identities.clone(), metadata.clone()
        out = torch.ops.iam.zch_insert(identities, metadata, ids, 2 * step, max_probe, policy, ttl)
        live = identities[identities >= 0]
        assert live.unique().numel() == live.numel()
        assert not insert_violations(
            *before, ids, 2 * step, max_probe, policy, ttl, identities, metadata, *out
        )
        assert [t.tolist() for t in out] == list(
            insert_python(*ref, batch, 2 * step, max_probe, policy, ttl)
        )
        # what was just inserted reads back, and nothing else does
        rows = torch.ops.iam.zch_lookup(identities, ids, max_probe)
        assert torch.equal(rows, out[0])


def test_lookup_is_read_only_and_finds_inserted_ids():
    identities, metadata = _random_table(500, 0.6, seed=1, now=50)
    known = identities[identities >= 0][:100]
    unknown = torch.randint(1 << 41, 1 << 42, (100,))
    ids = torch.cat([known, unknown, torch.tensor([-1, -7])])[torch.randperm(202)]
    before = identities.clone(), metadata.clone()
    slots = torch.ops.iam.zch_lookup(identities, ids, 500)
    assert torch.equal(identities, before[0]) and torch.equal(metadata, before[1])
    found = slots < 500
    assert torch.equal(identities[slots[found]], ids[found])
    assert torch.equal(found, torch.isin(ids, known))
    # a window too short to reach an id placed far from its home misses it
    short = torch.ops.iam.zch_lookup(identities, ids, 1)
    assert torch.equal(short[short < 500], slots[short < 500])
    assert torch.ops.iam.zch_lookup(identities, ids[:0], 4).numel() == 0


def _ids_sharing_a_home(num_slots: int, count: int) -> list[int]:
    by_home: dict[int, list[int]] = {}
    x = 1000
    while True:
        x += 1
        group = by_home.setdefault(home_python(x, num_slots), [])
        group.append(x)
        if len(group) == count:
            return group


def _window_with_times(times: list[int], num_slots: int = 64):
    """A table whose window of `ids[0]`'s home holds ids[1:] with the given last-seen times
    (None = empty). Returns (identities, metadata, new_id, window slots, resident ids)."""
    ids = _ids_sharing_a_home(num_slots, len(times) + 1)
    home = home_python(ids[0], num_slots)
    identities = torch.full((num_slots,), EMPTY_ID)
    metadata = torch.zeros(num_slots, dtype=torch.int64)
    window = [(home + p) % num_slots for p in range(len(times))]
    for s, x, t in zip(window, ids[1:], times, strict=True):
        if t is not None:
            identities[s], metadata[s] = x, t
    return identities, metadata, ids[0], window, ids[1:]


def _insert_one(identities, metadata, new_id, policy, now=100, ttl=10, max_probe=4):
    slots, claimed, evicted = torch.ops.iam.zch_insert(
        identities, metadata, torch.tensor([new_id]), now, max_probe, policy, ttl
    )
    return slots.item(), claimed.item(), evicted.item()


def test_ttl_takes_the_first_expired_slot_and_never_a_live_one():
    # window: live, expired (seen at 85), expired (seen at 50), live; now=100, ttl=10
    identities, metadata, new_id, window, residents = _window_with_times([95, 85, 50, 99])
    slot, claimed, evicted = _insert_one(identities, metadata, new_id, EVICT_TTL)
    assert (slot, claimed, evicted) == (window[1], True, residents[1])
    assert identities[window[1]] == new_id and metadata[window[1]] == 100
    # all live: the new id overflows to the unknown row, nothing changes
    identities, metadata, new_id, window, _ = _window_with_times([95, 91, 90, 99])
    before = identities.clone()
    assert _insert_one(identities, metadata, new_id, EVICT_TTL) == (64, False, EMPTY_ID)
    assert torch.equal(identities, before)


def test_lru_takes_the_oldest_expired_slot_in_the_window():
    identities, metadata, new_id, window, residents = _window_with_times([95, 85, 50, 70])
    slot, claimed, evicted = _insert_one(identities, metadata, new_id, EVICT_LRU)
    assert (slot, claimed, evicted) == (window[2], True, residents[2])
    # an empty slot beats any expired one, even later in the window
    identities, metadata, new_id, window, _ = _window_with_times([50, 40, None, 70])
    assert _insert_one(identities, metadata, new_id, EVICT_LRU) == (window[2], True, EMPTY_ID)
    # ttl=0: everything not seen at `now` is evictable, i.e. plain LRU within the window
    identities, metadata, new_id, window, residents = _window_with_times([99, 98, 97, 99])
    got = _insert_one(identities, metadata, new_id, EVICT_LRU, ttl=0)
    assert got == (window[2], True, residents[2])


def test_no_eviction_policy_never_evicts():
    identities, metadata, new_id, window, _ = _window_with_times([1, 2, 3, 4])
    assert _insert_one(identities, metadata, new_id, EVICT_NONE) == (64, False, EMPTY_ID)
    identities, metadata, new_id, window, _ = _window_with_times([1, 2, None, 4])
    assert _insert_one(identities, metadata, new_id, EVICT_NONE) == (window[2], True, EMPTY_ID)


def test_an_expired_id_in_the_batch_is_refreshed_not_evicted():
    identities, metadata, new_id, window, residents = _window_with_times([95, 50, 99, 98])
    # the new id comes first in the batch, but the expired resident is seen in the same batch
    ids = torch.tensor([new_id, residents[1]])
    slots, claimed, _ = torch.ops.iam.zch_insert(identities, metadata, ids, 100, 4, EVICT_TTL, 10)
    assert slots.tolist() == [64, window[1]] and claimed.tolist() == [False, False]
    assert metadata[window[1]] == 100


def test_repeats_of_a_new_id_share_one_claim():
    identities = torch.full((32,), EMPTY_ID)
    metadata = torch.zeros(32, dtype=torch.int64)
    ids = torch.tensor([7, 9, 7, 7, -1, 9, 11, 7])
    slots, claimed, _ = torch.ops.iam.zch_insert(identities, metadata, ids, 5, 4, EVICT_LRU, 1)
    assert slots[0] == slots[2] == slots[3] == slots[7] and slots[1] == slots[5]
    assert claimed.tolist() == [True, True, False, False, False, False, True, False]
    assert slots[4] == 32


def test_overflow_goes_to_the_unknown_row_not_to_a_shared_slot():
    identities = torch.full((8,), EMPTY_ID)
    metadata = torch.zeros(8, dtype=torch.int64)
    ids = torch.arange(100, 140)
    slots, claimed, _ = torch.ops.iam.zch_insert(identities, metadata, ids, 1, 3, EVICT_NONE, 0)
    mapped = slots[slots < 8]
    assert mapped.unique().numel() == mapped.numel() == int(claimed.sum())
    assert (identities >= 0).sum() == mapped.numel()


def test_argument_checks_name_the_problem():
    identities = torch.full((8,), EMPTY_ID)
    metadata = torch.zeros(8, dtype=torch.int64)
    ids = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="ids must be a 1-D int64"):
        torch.ops.iam.zch_lookup(identities, ids.int(), 4)
    with pytest.raises(ValueError, match="max_probe must be >= 1"):
        torch.ops.iam.zch_lookup(identities, ids, 0)
    with pytest.raises(ValueError, match="metadata must be int64"):
        torch.ops.iam.zch_insert(identities, metadata[:4], ids, 0, 4, EVICT_TTL, 1)
    with pytest.raises(ValueError, match="policy must be"):
        torch.ops.iam.zch_insert(identities, metadata, ids, 0, 4, 5, 1)
    with pytest.raises(ValueError, match="ttl must be >= 0"):
        torch.ops.iam.zch_insert(identities, metadata, ids, 0, 4, EVICT_TTL, -1)
