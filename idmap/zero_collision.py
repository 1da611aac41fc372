"""Zero-collision mapping of raw 64-bit ids to embedding rows (MPZCH, project issue 6).

`hash(id) % rows` puts unrelated users in one embedding row. `ZeroCollisionMap` instead gives
every id its own row: an id owns the first free slot found by linear probing from
`fmix64(id) % num_slots` within `max_probe` slots, and keeps it until it expires and another id
takes it over. An id that finds no free slot in its window maps to the reserved *unknown* row
(`num_slots`, the last row of the embedding table) instead of sharing someone else's row.

Two operations, both `torch.ops.iam` ops (torch on CPU, Triton-language kernels on CUDA):
- `lookup(ids)` (also `forward`): read-only, for serving. Never writes a buffer.
- `insert(ids, now)`: for training and index updates. Claims slots for new ids, refreshes the
  last-seen time of known ones, evicts expired ids (TTL or LRU policy) to make room, and reports
  which rows were (re)assigned so that `reset_stale_rows` re-initialises their embeddings and
  optimizer state: a new id never inherits an old id's vector.

Usage (a user tower):

    config = ZeroCollisionConfig(num_slots=1_000_000)
    id_map = ZeroCollisionMap(config)
    table = nn.Embedding(config.num_rows, 64)          # num_slots + 1 rows: last is "unknown"
    # training step
    result = id_map.insert(raw_user_ids, now=hour)
    reset_stale_rows(table.weight, result.reset_rows, optimizer)
    user_vectors = table(result.rows)
    # serving (scripted): rows = id_map(raw_user_ids); table(rows)

The buffers are the whole state (`state_dict` saves and restores them); see
`kernels/zch_insert.py` for the exact claim order and eviction rules.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

import kernels  # noqa: F401  (registers torch.ops.iam.zch_lookup and iam.zch_insert)
from kernels._zch_common import EMPTY_ID, EVICT_LRU, EVICT_NONE, EVICT_TTL

EVICTION_POLICIES = {"none": EVICT_NONE, "ttl": EVICT_TTL, "lru": EVICT_LRU}


@dataclass
class ZeroCollisionConfig:
    # Ids the map can hold at once. The embedding table has `num_slots + 1` rows: row
    # `num_slots` is the unknown row for ids that are not (or could not be) mapped.
    num_slots: int = 1_000_000
    # Slots probed per id. Larger windows fill the table fuller before ids overflow to the
    # unknown row, and cost longer probes for ids that are absent; see docs/performance.md.
    max_probe: int = 16
    # "none": never evict (a full window sends new ids to the unknown row);
    # "ttl": a new id takes the first empty or expired slot of its window;
    # "lru": a new id takes an empty slot, else the expired slot seen longest ago.
    eviction_policy: str = "lru"
    # An id not seen for more than `ttl` units of `now` has expired (its slot may be taken).
    # The map does not know the unit; with `now` in hours this is 30 days. With "lru", ttl=0
    # makes every id not seen at the current `now` evictable (plain LRU within the window).
    ttl: int = 24 * 30

    @property
    def num_rows(self) -> int:
        """Rows the embedding table needs: one per slot plus the unknown row."""
        return self.num_slots + 1

    @property
    def unknown_row(self) -> int:
        return self.num_slots


class ZchInsertResult(NamedTuple):
    """What `ZeroCollisionMap.insert` returns.

    rows: int64, the shape of `ids`: the row of each id (`unknown_row` for negative ids and for
        ids whose window had no free slot).
    reset_rows: int64 [R]: rows claimed by a new id in this call, each once. Their embedding rows
        and optimizer state must be re-initialised (`reset_stale_rows`).
    evicted_rows: int64 [E]: the subset of `reset_rows` whose previous (expired) id was evicted.
    evicted_ids: int64 [E]: the evicted ids, aligned with `evicted_rows`.
    """

    rows: torch.Tensor
    reset_rows: torch.Tensor
    evicted_rows: torch.Tensor
    evicted_ids: torch.Tensor


class ZeroCollisionMap(nn.Module):
    """Maps raw int64 ids (>= 0; negative ids are padding) to rows of an embedding table with
    `config.num_rows` rows, never giving two live ids the same row.

    Buffers (the whole state, saved by `state_dict`):
        identities: int64 [num_slots], the id owning each slot, -1 when empty.
        metadata: int64 [num_slots], the `now` at which each slot's id was last inserted/seen.

    Args:
        config: sizes and eviction policy, see `ZeroCollisionConfig`.
    """

    def __init__(self, config: ZeroCollisionConfig) -> None:
        super().__init__()
        if config.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {config.num_slots}")
        if config.max_probe < 1:
            raise ValueError(f"max_probe must be >= 1, got {config.max_probe}")
        if config.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(
                f"eviction_policy must be one of {sorted(EVICTION_POLICIES)}, "
                f"got {config.eviction_policy!r}"
            )
        if config.ttl < 0:
            raise ValueError(f"ttl must be >= 0, got {config.ttl}")
        self.num_slots = config.num_slots
        self.unknown_row = config.num_slots
        self.max_probe = config.max_probe
        self.policy = EVICTION_POLICIES[config.eviction_policy]
        self.ttl = config.ttl
        self.register_buffer("identities", torch.full((config.num_slots,), EMPTY_ID))
        self.register_buffer("metadata", torch.zeros(config.num_slots, dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Read-only lookup, the serving path; same as `lookup`."""
        return self.lookup(ids)

    @torch.jit.export
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of `ids` (any shape, integer) without modifying the map.

        Returns:
            int64, the shape of `ids`: each id's row, or `unknown_row` for ids not in the map.
        """
        flat = ids.reshape(-1).to(torch.int64)
        rows = torch.ops.iam.zch_lookup(self.identities, flat, self.max_probe)
        return rows.view(ids.shape)

    @torch.jit.export
    def insert(self, ids: torch.Tensor, now: int) -> ZchInsertResult:
        """Rows of `ids` (any shape, integer), inserting the ids not yet in the map.

        Known ids keep their rows and their last-seen time becomes `now`. New ids claim a free
        slot of their window (evicting an expired id if the policy allows), in order of first
        occurrence; repeats of an id in `ids` share its row.

        Args:
            ids: raw ids, any shape; negative values are padding (unknown row, not inserted).
            now: the current time in the unit of `config.ttl` (e.g. hours since the epoch).

        Returns:
            `ZchInsertResult` (rows, reset_rows, evicted_rows, evicted_ids).
        """
        flat = ids.reshape(-1).to(torch.int64)
        slots, claimed, evicted_ids = torch.ops.iam.zch_insert(
            self.identities, self.metadata, flat, now, self.max_probe, self.policy, self.ttl
        )
        evicted = claimed & (evicted_ids >= 0)
        return ZchInsertResult(
            rows=slots.view(ids.shape),
            reset_rows=slots[claimed],
            evicted_rows=slots[evicted],
            evicted_ids=evicted_ids[evicted],
        )

    @torch.jit.export
    def num_live(self) -> int:
        """Slots currently owned by an id (expired ids count until they are evicted)."""
        return int((self.identities >= 0).sum().item())

    def extra_repr(self) -> str:
        policy = [name for name, code in EVICTION_POLICIES.items() if code == self.policy][0]
        return (
            f"num_slots={self.num_slots}, max_probe={self.max_probe}, "
            f"eviction_policy={policy!r}, ttl={self.ttl}"
        )


@torch.no_grad()
def reset_stale_rows(
    weight: torch.Tensor,
    rows: torch.Tensor,
    optimizer: Optional[torch.optim.Optimizer] = None,
    init_fn: Optional[Callable[[torch.Tensor], object]] = None,
) -> None:
    """Re-initialises the embedding rows `rows` (and their optimizer state) in place.

    Call it with `ZchInsertResult.reset_rows` right after `insert` and before the forward pass,
    so that a reassigned row starts from a fresh vector instead of the evicted id's.

    Args:
        weight: the embedding table [num_rows, dim] (a Parameter or a plain tensor).
        rows: int64 [R] row indices (the unknown row is never among `reset_rows`).
        optimizer: when given, per-row state of `weight` is reset as well
            (`reset_optimizer_rows`).
        init_fn: fills a fresh [R, dim] tensor in place; defaults to `nn.init.normal_`, the
            initialisation of `nn.Embedding`. Pass the table's own initialiser if it differs.
    """
    if rows.numel() == 0:
        return
    rows = rows.to(device=weight.device, dtype=torch.int64)
    if int(rows.min()) < 0 or int(rows.max()) >= weight.shape[0]:
        raise ValueError(f"rows must lie in [0, {weight.shape[0]}), got {rows.min()}..{rows.max()}")
    fresh = torch.empty((rows.numel(),) + tuple(weight.shape[1:]), dtype=weight.dtype,
                        device=weight.device)
    (init_fn or nn.init.normal_)(fresh)
    weight.index_copy_(0, rows, fresh)
    if optimizer is not None:
        reset_optimizer_rows(optimizer, weight, rows)


@torch.no_grad()
def reset_optimizer_rows(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, rows: torch.Tensor
) -> None:
    """Resets the optimizer state of `param` at `rows` to its initial value.

    Every state tensor whose first dimension has `param.shape[0]` entries is per-row state
    (Adam/AdamW `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`; SGD `momentum_buffer`; RMSprop
    `square_avg`; row-wise accumulators of shape [num_rows]). They restart at 0, except Adagrad's
    `sum`, which restarts at the group's `initial_accumulator_value`. Scalar state (Adam's `step`)
    is shared by all rows and left alone, so a reset row gets the current step's bias correction.
    """
    state = optimizer.state.get(param)
    if not state or rows.numel() == 0:
        return
    initial_sum = 0.0
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            initial_sum = float(group.get("initial_accumulator_value", 0.0))
    for key, value in state.items():
        if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != param.shape[0]:
            continue
        fill = initial_sum if (isinstance(optimizer, torch.optim.Adagrad) and key == "sum") else 0.0
        value.index_fill_(0, rows.to(value.device), fill)
