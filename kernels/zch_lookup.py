"""`iam::zch_lookup`: read-only zero-collision id -> slot lookup (serving).

    zch_lookup(Tensor identities, Tensor ids, int max_probe) -> Tensor slots

Args:
    identities: int64 [num_slots], the raw id owning each slot, -1 (`EMPTY_ID`) where empty.
    ids: int64 [batch] raw ids; negative ids are padding.
    max_probe: window length; the lookup checks slots `home(id) + p (mod num_slots)` for
        `p < min(max_probe, num_slots)`, with `home` from `kernels/_zch_common.py`.

Returns:
    int64 [batch]: the slot holding each id, or `num_slots` (the "unknown" row, which the
    embedding table reserves as its last row) for an id not in its window or a negative id.

Nothing is written: buffers are never modified, so a served graph can share them with a
trainer's snapshot. Inserting (training, index updates) is `iam::zch_insert`.

CPU: `zch_lookup_torch`, which probes one window position at a time for the ids still unresolved
(faster than gathering whole windows when tried on the 2-core development machine: most ids sit
at or near their home slot, see docs/performance.md for mean probe lengths).
CUDA: `_zch_lookup_kernel`, a [BLOCK_IDS, BLOCK_PROBE] tile that loads each id's whole window
at once. Both return the first slot in the window holding the id; the insert
op never lets an id own two slots, so "first" only matters for corrupted buffers.
"""

import torch

from kernels._library import LIB, contiguous, require_triton_device, triton_available
from kernels._zch_common import home_slots

# ---- launch settings (the only place) --------------------------------------------------------
# Window entries per program: a tile of 2048 keeps one program's loads at 16 KiB for any
# max_probe (BLOCK_IDS = TILE_ENTRIES // BLOCK_PROBE ids per program). Not tuned on a GPU yet:
# the H200 run of benchmarks/gpu_zch.py --small (docs/performance.md) checked results only.
TILE_ENTRIES = 2048
# triton's default; not tuned either (same run).
NUM_WARPS = 4


# ---- argument checks (both paths) ------------------------------------------------------------
def _check_zch_lookup(identities: torch.Tensor, ids: torch.Tensor, max_probe: int) -> None:
    """Raise ValueError naming the problem."""
    if identities.dtype != torch.int64 or identities.dim() != 1:
        raise ValueError(
            f"zch_lookup: identities must be a 1-D int64 tensor, got {identities.dtype} "
            f"with shape {tuple(identities.shape)}"
        )
    if identities.numel() == 0:
        raise ValueError("zch_lookup: identities is empty (a map needs at least one slot)")
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(
            f"zch_lookup: ids must be a 1-D int64 tensor, got {ids.dtype} "
            f"with shape {tuple(ids.shape)}"
        )
    if ids.device != identities.device:
        raise ValueError(
            f"zch_lookup: ids are on {ids.device} but identities on {identities.device}"
        )
    if max_probe < 1:
        raise ValueError(f"zch_lookup: max_probe must be >= 1, got {max_probe}")


# ---- Triton kernel and its launch (CUDA; CPU tensors under TRITON_INTERPRET=1) ---------------
if triton_available():
    import triton
    import triton.language as tl

    from kernels._zch_common import TL_EMPTY_ID, _home_slot

    @triton.jit
    def _zch_lookup_kernel(
        identities_ptr,  # int64 [num_slots]
        ids_ptr,  # int64 [num_ids]
        slots_ptr,  # int64 [num_ids], output
        num_ids,
        num_slots,  # int64 scalar, also the "unknown" row
        probes,  # window length, <= BLOCK_PROBE and <= num_slots
        BLOCK_IDS: tl.constexpr,
        BLOCK_PROBE: tl.constexpr,
    ):
        # Program -> tile: BLOCK_IDS consecutive ids, each with its whole probe window.
        pid = tl.program_id(0)
        offs_id = pid * BLOCK_IDS + tl.arange(0, BLOCK_IDS)
        id_mask = offs_id < num_ids
        ids = tl.load(ids_ptr + offs_id, mask=id_mask, other=-1)
        home = _home_slot(ids, num_slots)

        # Window pointers: [BLOCK_IDS, BLOCK_PROBE] slots home + p (mod num_slots).
        offs_probe = tl.arange(0, BLOCK_PROBE)
        window = (home[:, None] + offs_probe[None, :]) % num_slots
        window_mask = id_mask[:, None] & (offs_probe[None, :] < probes)
        # Masked lanes read the empty marker, which no valid (non-negative) id matches.
        occupant = tl.load(identities_ptr + window, mask=window_mask, other=TL_EMPTY_ID)

        # First window position holding the id; BLOCK_PROBE when absent.
        match = (occupant == ids[:, None]) & (ids[:, None] >= 0) & window_mask
        first = tl.min(tl.where(match, offs_probe[None, :], BLOCK_PROBE), axis=1)
        slot = tl.where(first < BLOCK_PROBE, (home + first) % num_slots, num_slots)
        tl.store(slots_ptr + offs_id, slot, mask=id_mask)


def _launch_zch_lookup(identities: torch.Tensor, ids: torch.Tensor, max_probe: int
                       ) -> torch.Tensor:
    """Run `_zch_lookup_kernel` on checked arguments (shared with `zch_insert_triton`)."""
    identities, ids = contiguous(identities, ids)
    slots = torch.empty_like(ids)
    if ids.numel() == 0:
        return slots
    num_slots = identities.numel()
    probes = min(max_probe, num_slots)
    block_probe = triton.next_power_of_2(probes)
    block_ids = max(1, TILE_ENTRIES // block_probe)
    grid = (triton.cdiv(ids.numel(), block_ids),)
    _zch_lookup_kernel[grid](
        identities,
        ids,
        slots,
        ids.numel(),
        num_slots,
        probes,
        BLOCK_IDS=block_ids,
        BLOCK_PROBE=block_probe,
        num_warps=NUM_WARPS,
    )
    return slots


def zch_lookup_triton(identities: torch.Tensor, ids: torch.Tensor, max_probe: int) -> torch.Tensor:
    """CUDA implementation of `iam::zch_lookup` (CPU tensors too under TRITON_INTERPRET=1)."""
    _check_zch_lookup(identities, ids, max_probe)
    require_triton_device("zch_lookup", identities.device)
    return _launch_zch_lookup(identities, ids, max_probe)


# ---- torch path (CPU implementation and reference) -------------------------------------------
def probe_for_ids(identities: torch.Tensor, ids: torch.Tensor, max_probe: int) -> torch.Tensor:
    """The torch lookup without argument checks (shared with `zch_insert_torch`)."""
    num_slots = identities.numel()
    probes = min(max_probe, num_slots)
    slots = torch.full_like(ids, num_slots)
    # Positions still unresolved, their ids and the slot probed next; shrinks every step.
    pending = torch.nonzero(ids >= 0).squeeze(1)
    pending_ids = ids.index_select(0, pending)
    probe = home_slots(pending_ids, num_slots)
    for _ in range(probes):
        if pending.numel() == 0:
            break
        found = identities.index_select(0, probe) == pending_ids
        slots.index_copy_(0, pending[found], probe[found])
        keep = ~found
        pending, pending_ids, probe = pending[keep], pending_ids[keep], probe[keep] + 1
        probe = torch.where(probe == num_slots, torch.zeros_like(probe), probe)
    return slots


def zch_lookup_torch(identities: torch.Tensor, ids: torch.Tensor, max_probe: int) -> torch.Tensor:
    """Reference and CPU implementation of `iam::zch_lookup` (see the module docstring)."""
    _check_zch_lookup(identities, ids, max_probe)
    return probe_for_ids(identities, ids, max_probe)


def _zch_lookup_fake(identities: torch.Tensor, ids: torch.Tensor, max_probe: int) -> torch.Tensor:
    return torch.empty_like(ids)


# ---- registration ----------------------------------------------------------------------------
LIB.define("zch_lookup(Tensor identities, Tensor ids, int max_probe) -> Tensor")
LIB.impl("zch_lookup", zch_lookup_torch, "CPU")
LIB.impl("zch_lookup", zch_lookup_triton, "CUDA")
torch.library.register_fake("iam::zch_lookup", _zch_lookup_fake, lib=LIB)
