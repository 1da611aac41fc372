"""The hash, slot markers and eviction codes shared by the zero-collision id-map ops.

`kernels/zch_lookup.py` (read-only) and `kernels/zch_insert.py` (claims slots) both start probing
at `home_slots(ids, num_slots)`; the torch function and the Triton-language `_home_slot` below
compute the same value bit for bit, which `tests/test_zch_ops.py` checks against plain Python.

The hash is murmur3's 64-bit finaliser `fmix64` (also the last step of splitmix64):

    h = id as uint64
    h ^= h >> 33;  h *= 0xFF51AFD7ED558CCD
    h ^= h >> 33;  h *= 0xC4CEB9FE1A85EC53
    h ^= h >> 33
    home = (h & 0x7FFF_FFFF_FFFF_FFFF) % num_slots

Multiplications wrap modulo 2**64. torch has no uint64 arithmetic, so the torch path works in
int64 (same bits, same wrapping multiply) and turns the arithmetic `>>` into a logical one by
masking off the sign-extended bits. Dropping the top bit before `%` keeps the remainder in
non-negative int64 on both paths.
"""

import torch

from kernels._library import triton_available

# Identity of a slot that no id has claimed. Raw ids must be >= 0; negative ids (padding) map to
# the unknown row and are never inserted.
EMPTY_ID = -1
# Identity a CUDA insert writes while it owns a slot (between its compare-and-swap and the store
# of the new id). Never visible outside a running kernel.
CLAIMING_ID = -2

# Eviction policy codes passed to `iam::zch_insert` (ints so that TorchScript can pass them).
EVICT_NONE = 0  # a slot is free only while empty
EVICT_TTL = 1  # free when empty or expired; take the first free slot in probe order
EVICT_LRU = 2  # free when empty or expired; take an empty slot, else the least recently seen

_MASK_63 = 0x7FFF_FFFF_FFFF_FFFF


def _as_int64(value: int) -> int:
    """The int64 with the same 64 bits as an unsigned constant."""
    return value - (1 << 64) if value >= (1 << 63) else value


_FMIX_C1 = _as_int64(0xFF51AFD7ED558CCD)
_FMIX_C2 = _as_int64(0xC4CEB9FE1A85EC53)
_LOW_31_BITS = (1 << 31) - 1  # what survives a logical shift right by 33


def fmix64(ids: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix64 of int64 `ids` (any shape), returned as int64 with the uint64's bits."""
    h = ids.to(torch.int64)
    h = h ^ ((h >> 33) & _LOW_31_BITS)
    h = h * _FMIX_C1
    h = h ^ ((h >> 33) & _LOW_31_BITS)
    h = h * _FMIX_C2
    return h ^ ((h >> 33) & _LOW_31_BITS)


def home_slots(ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """First slot probed for each id: `(fmix64(id) & (2**63 - 1)) % num_slots`, int64."""
    return (fmix64(ids) & _MASK_63) % num_slots


if triton_available():
    import triton
    import triton.language as tl

    # The markers and policy codes as compile-time constants (kernels may only read constexpr
    # globals).
    TL_EMPTY_ID = tl.constexpr(EMPTY_ID)
    TL_CLAIMING_ID = tl.constexpr(CLAIMING_ID)
    TL_EVICT_NONE = tl.constexpr(EVICT_NONE)
    TL_EVICT_LRU = tl.constexpr(EVICT_LRU)

    @triton.jit
    def _fmix64(ids):
        h = ids.to(tl.uint64, bitcast=True)
        h ^= h >> 33
        h *= 0xFF51AFD7ED558CCD
        h ^= h >> 33
        h *= 0xC4CEB9FE1A85EC53
        h ^= h >> 33
        return h.to(tl.int64, bitcast=True)

    @triton.jit
    def _home_slot(ids, num_slots):
        """Same value as `home_slots` (the hash is int64, so `%` is done in int64)."""
        return (_fmix64(ids) & 0x7FFFFFFFFFFFFFFF) % num_slots
