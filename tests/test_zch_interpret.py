"""The Triton-language zero-collision kernels under TRITON_INTERPRET=1 equal the torch path
exactly: buffers and all outputs, for every eviction policy, with repeated ("concurrent") inserts
of one id, padding and windows that are not powers of two or exceed the table.

`triton.jit` decides between compiling and interpreting when `kernels` is imported, so the checks
run in a child process that sets TRITON_INTERPRET=1 first (in-process when already set). The
interpreter runs programs one after another in program order, which is the claim order the torch
path reproduces; on a GPU the order may differ (see benchmarks/gpu_zch.py).
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels._library import triton_available

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(not triton_available(), reason="needs the triton package"),
]


def _table(num_slots: int, fill: float, rng: random.Random, now: int):
    identities = torch.full((num_slots,), -1, dtype=torch.int64)
    metadata = torch.zeros(num_slots, dtype=torch.int64)
    for s in rng.sample(range(num_slots), int(fill * num_slots)):
        identities[s] = rng.randrange(0, 1 << 20)
        metadata[s] = now - rng.randrange(0, 30)
    return identities, metadata


def _compare_insert(identities, metadata, ids, now, max_probe, policy, ttl, label):
    from kernels.zch_insert import zch_insert_torch, zch_insert_triton

    ref_buffers = identities.clone(), metadata.clone()
    kernel_buffers = identities.clone(), metadata.clone()
    expected = zch_insert_torch(*ref_buffers, ids, now, max_probe, policy, ttl)
    got = zch_insert_triton(*kernel_buffers, ids, now, max_probe, policy, ttl)
    for name, a, b in zip(
        ("slots", "claimed", "evicted_ids", "identities", "metadata"),
        (*expected, *ref_buffers),
        (*got, *kernel_buffers),
        strict=True,
    ):
        assert torch.equal(a, b), f"{label}: {name}\n torch  {a.tolist()}\n triton {b.tolist()}"
    return int(expected[1].sum()), int((expected[2] >= 0).sum())


def interpret_checks() -> None:
    """Every comparison; raises AssertionError on the first difference."""
    from kernels._zch_common import EVICT_LRU, EVICT_NONE, EVICT_TTL
    from kernels.zch_lookup import zch_lookup_torch, zch_lookup_triton

    rng = random.Random(6)
    claims = evictions = 0
    for policy in (EVICT_NONE, EVICT_TTL, EVICT_LRU):
        for num_slots, max_probe, fill in ((61, 5, 0.7), (128, 16, 0.9), (9, 40, 0.5)):
            identities, metadata = _table(num_slots, fill, rng, now=100)
            residents = identities[identities >= 0].tolist()
            batch = [rng.choice(residents) for _ in range(8)]  # known ids (some expired)
            batch += [rng.randrange(1 << 20, 1 << 21) for _ in range(14)]  # new ids
            batch += [batch[-1]] * 5 + [-1, -5]  # a repeated new id, padding
            rng.shuffle(batch)
            ids = torch.tensor(batch, dtype=torch.int64)
            label = f"policy={policy} slots={num_slots} probe={max_probe}"
            c, e = _compare_insert(identities, metadata, ids, 100, max_probe, policy, 10, label)
            claims, evictions = claims + c, evictions + e
            # lookups: every position of every window, plus misses and padding
            lookup_ids = torch.cat([ids, identities[:20]])
            for probe in (1, max_probe):
                expected = zch_lookup_torch(identities, lookup_ids, probe)
                assert torch.equal(zch_lookup_triton(identities, lookup_ids, probe), expected)

    # Concurrent inserts of one id: 40 copies of a new id and 10 copies of another, racing for
    # an empty table, then for a window of expired ids.
    for policy in (EVICT_TTL, EVICT_LRU):
        identities = torch.full((16,), -1, dtype=torch.int64)
        metadata = torch.zeros(16, dtype=torch.int64)
        ids = torch.tensor([424242] * 40 + [77] * 10, dtype=torch.int64)[torch.randperm(50)]
        _compare_insert(identities, metadata, ids, 5, 4, policy, 2, f"same id, policy={policy}")
        identities, metadata = _table(16, 1.0, rng, now=0)
        _compare_insert(identities, metadata, ids, 50, 4, policy, 2, f"same id evicts {policy}")

    # Empty batch.
    identities, metadata = _table(8, 0.5, rng, now=3)
    _compare_insert(identities, metadata, torch.empty(0, dtype=torch.int64), 3, 4, 1, 1, "empty")
    assert claims > 20 and evictions > 3, f"tame scenarios: {claims} claims, {evictions} evictions"


def test_triton_kernels_equal_torch_path_under_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        interpret_checks()
        return
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


if __name__ == "__main__":
    interpret_checks()
    print("zch kernels under TRITON_INTERPRET=1 equal the torch path")
