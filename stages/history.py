"""Request-time history: the items a request says its user engaged with, pooled once per request.

A request of `retrieval` or `unified` may carry `history`, the user's most recent raw item ids
(newest first, at most MAX_HISTORY). The `ann` stage turns them into the mean of their item
vectors (the vectors the index holds: what the user tower's history vector is made of in
training, training/towers.py `ClickHistory`) and hands that to the user side in place of the
history built from the logs (request-only computation: nothing per user is precomputed for it).

- ids of items neither in the index nor live in the fresh store are skipped;
- a fresh item (fresh/store.py) counts with its fresh vector, also when it replaced an indexed
  item of the same id (unless the model pools histories from vectors of their own, the linear
  model of training/linear.py: fresh items have none there and are skipped); a retired item
  still counts (the user did engage with it);
- the mean is plain, or weighted towards the newest (`recency`, the linear history model's:
  the item counted j-th, newest first, weighs 1 / (1 + j / recency), `recency_weight`): one
  function for the request's history and the history built from the logs
  (training/linear.py), so both give a user the same vector;
- a request whose history has no known item gets the user side's "no history" answer: the
  user tower's zero history vector, not the history built from the logs (what the request
  says replaces what the logs said); a user table (the linear model, pretrained vectors,
  stages/user.py `UserTable`) has no history-free answer and keeps the user's row.

The scorer's target-aware OverArch (stages/scorer.py) reads the history items themselves, not
only their mean: `PooledHistory.rows` are the row-space rows (stages/rows.py) of the items the
pooling counted, and `BuiltHistory` holds each known user's history built from the logs (the
rows a request without `history` attends over). The `ann` stage hands whichever applies to the
scorer as `history_rows`.
"""

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from stages.rows import fresh_row_offset

# most item ids one request's history may hold; the user side pools them all. A user's whole
# history matters to a model that pools it (the linear model of training/linear.py is EASE,
# a sum over every positive): on ml-latest-small's validation cut, requests cut at 100 ids
# lost 0.0070 of recall@50 against the history built from every training rating (a third of
# its users have more than 100), at 1000 the two agree (docs/quality.md)
MAX_HISTORY = 1000
# the newest of a request's counted items the scorer attends over, and the length of a
# history built from the logs (what the OverArch is trained on, training/over_arch.py):
# attention costs candidates x history items per request, the pooling only history items
ATTENTION_HISTORY = 100


class RequestHistory(NamedTuple):
    """The `history` inputs of one batch.

    ids: int64 [B, L] raw item ids, newest first, -1 past each request's length.
    given: bool [B] the request carried `history` (possibly empty); rows without it are -1.
    """

    ids: torch.Tensor
    given: torch.Tensor


def batch_history(histories: Sequence[Optional[np.ndarray]]) -> Optional[RequestHistory]:
    """The `history` inputs of a batch's requests (None: not given) as one RequestHistory
    (-1 padded), or None when no request carried one."""
    if all(h is None for h in histories):
        return None
    width = max(1, max(len(h) for h in histories if h is not None))
    ids = np.full((len(histories), width), -1, dtype=np.int64)
    for i, h in enumerate(histories):
        if h is not None:
            ids[i, : len(h)] = h
    given = torch.tensor([h is not None for h in histories], dtype=torch.bool)
    return RequestHistory(torch.from_numpy(ids), given)


class PooledHistory(NamedTuple):
    """What the user side reads: the mean vector of each request's known history items and
    their number; `count` is -1 for a request without `history` (use the built history).
    `rows` are the counted items' rows in the row space (main rows, fresh rows from
    fresh_row_offset(N)), -1 where an id was not counted: what the scorer attends over."""

    vectors: torch.Tensor  # float32 [B, D] (zeros where count <= 0)
    count: torch.Tensor  # int64 [B]
    rows: torch.Tensor  # int64 [B, L]


def recency_weight(position: torch.Tensor, recency: float) -> torch.Tensor:
    """What the item counted at `position` (0: the newest) weighs in a pooled history:
    1 / (1 + position / recency), or 1 for every item when `recency` <= 0 (a plain mean)."""
    if recency <= 0:
        return torch.ones(position.shape, dtype=torch.float32, device=position.device)
    return 1.0 / (1.0 + position.to(torch.float32) / recency)


class HistoryPooling(nn.Module):
    """Raw item ids -> mean item vector, over the index's items and the fresh store's.

    Args:
        item_ids: int64 [N] raw id of every index row.
        item_vectors: what each item adds to a history, index row order (stages/item_vectors.py:
            the index's own int8 vectors, shared with the scorer, or a model's own history
            side in fp32).
        fresh_counts: whether fresh items count (their vectors are in the index's space,
            which must then be the history's).
        recency: the mean's weighting towards the newest items (`recency_weight`; 0: plain).
    """

    def __init__(self, item_ids: torch.Tensor, item_vectors: nn.Module,
                 fresh_counts: bool = True, recency: float = 0.0):
        super().__init__()
        if item_ids.shape[0] != item_vectors.num_items():
            raise ValueError(f"{item_ids.shape[0]} item ids for {item_vectors.num_items()} "
                             "vectors")
        if not recency >= 0:
            raise ValueError(f"recency must be >= 0, got {recency}")
        self.recency = float(recency)
        order = torch.argsort(item_ids)
        self.register_buffer("sorted_ids", item_ids[order].to(torch.int64).contiguous())
        self.register_buffer("sorted_rows", order.to(torch.int64).contiguous())
        self.item_vectors = item_vectors
        self.fresh_counts = fresh_counts
        self.fresh_offset = fresh_row_offset(int(item_ids.shape[0]))

    def forward(self, history: RequestHistory, fresh_ids: Optional[torch.Tensor] = None,
                fresh_vectors: Optional[torch.Tensor] = None,
                fresh_live: Optional[torch.Tensor] = None) -> PooledHistory:
        """history [B, L] -> PooledHistory; fresh_ids int64 [C], fresh_vectors [C, D] and
        fresh_live bool [C]: the fresh store's rows (stages/fresh.py FreshItems)."""
        ids = history.ids
        valid = ids >= 0
        found, rows = self._lookup(ids, self.sorted_ids, self.sorted_rows)
        found = found & valid
        vectors = self.item_vectors(rows)
        space_rows = rows
        if self.fresh_counts and fresh_ids is not None and fresh_vectors is not None \
                and fresh_live is not None and fresh_ids.shape[0] > 0:
            live = torch.nonzero(fresh_live & (fresh_ids >= 0)).squeeze(1)
            if live.shape[0] > 0:
                order = torch.argsort(fresh_ids[live])
                in_fresh, fresh_rows = self._lookup(ids, fresh_ids[live][order], live[order])
                in_fresh = in_fresh & valid
                vectors = torch.where(in_fresh.unsqueeze(-1),
                                      fresh_vectors[fresh_rows].to(vectors.dtype), vectors)
                space_rows = torch.where(in_fresh, fresh_rows + self.fresh_offset, rows)
                found = found | in_fresh
        if self.recency > 0:
            # the counted items' positions, newest first: unknown ids do not take one
            position = torch.cumsum(found.to(torch.int64), 1) - 1
            weight = torch.where(found, recency_weight(position, self.recency),
                                 torch.zeros(found.shape, dtype=torch.float32,
                                             device=ids.device))
        else:  # a plain mean (the two towers): no positions to count
            weight = found.to(torch.float32)
        count = found.sum(1)
        total = weight.sum(1).clamp(min=1e-12).unsqueeze(1)
        weighted = vectors * weight.to(vectors.dtype).unsqueeze(-1)
        mean = weighted.sum(1) / total.to(vectors.dtype)
        count = torch.where(history.given, count, torch.full_like(count, -1))
        return PooledHistory(mean, count, torch.where(found, space_rows, -1))

    @staticmethod
    def _lookup(ids: torch.Tensor, sorted_ids: torch.Tensor, rows: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(found bool [B, L], table rows int64 [B, L]) of raw `ids` in a table whose raw ids
        are `sorted_ids` (ascending) at `rows`; rows of ids not found are valid but
        meaningless (found masks them)."""
        n = sorted_ids.shape[0]
        if n == 0:
            return (torch.zeros(ids.shape, dtype=torch.bool, device=ids.device),
                    torch.zeros(ids.shape, dtype=torch.int64, device=ids.device))
        pos = torch.searchsorted(sorted_ids, ids).clamp(max=n - 1)
        return sorted_ids[pos] == ids, rows[pos]


class BuiltHistory(nn.Module):
    """Each known user's history built from the logs, as index rows (newest first, at most
    ATTENTION_HISTORY): what the scorer attends over for a request without `history`. Unknown users
    (and a model without built histories) get an empty history.

    Args:
        user_ids: int64 [U] raw ids of the users with a history (distinct, any order).
        offsets: int64 [U + 1] user u's rows are rows[offsets[u]:offsets[u + 1]].
        rows: int64 [M] index rows.
    """

    def __init__(self, user_ids: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        if offsets.shape[0] != user_ids.shape[0] + 1 or int(offsets[-1]) != rows.shape[0]:
            raise ValueError(f"{user_ids.shape[0]} users, {offsets.shape[0]} offsets ending at "
                             f"{int(offsets[-1])} for {rows.shape[0]} rows")
        order = torch.argsort(user_ids)
        starts, lengths = offsets[:-1][order], (offsets[1:] - offsets[:-1])[order]
        self.register_buffer("sorted_ids", user_ids[order].to(torch.int64).contiguous())
        self.register_buffer("starts", starts.to(torch.int64).contiguous())
        self.register_buffer("lengths", lengths.to(torch.int64).contiguous())
        # one -1 past the end: a gather never reads out of range, also with no rows at all
        self.register_buffer("rows", torch.cat([rows.to(torch.int64),
                                                torch.full((1,), -1, dtype=torch.int64)]))

    @staticmethod
    def empty() -> "BuiltHistory":
        none = torch.zeros(0, dtype=torch.int64)
        return BuiltHistory(none, torch.zeros(1, dtype=torch.int64), none)

    def forward(self, user_ids: torch.Tensor) -> torch.Tensor:
        """user_ids int64 [B] -> history rows int64 [B, L] (-1 past each user's length; L >= 1
        is the batch's longest)."""
        n = self.sorted_ids.shape[0]
        if n == 0:
            return torch.full((user_ids.shape[0], 1), -1, dtype=torch.int64,
                              device=user_ids.device)
        pos = torch.searchsorted(self.sorted_ids, user_ids).clamp(max=n - 1)
        found = self.sorted_ids[pos] == user_ids
        lengths = torch.where(found, self.lengths[pos], torch.zeros_like(pos))
        width = max(1, int(lengths.max()))
        steps = torch.arange(width, device=user_ids.device).unsqueeze(0)
        valid = steps < lengths.unsqueeze(1)
        at = torch.where(valid, self.starts[pos].unsqueeze(1) + steps,
                         torch.full_like(steps, self.rows.shape[0] - 1))
        return self.rows[at]


def history_rows(built: torch.Tensor, pooled: Optional[PooledHistory],
                 most: int = ATTENTION_HISTORY) -> torch.Tensor:
    """The rows the scorer attends over: a request's own history (the newest `most` of its
    counted items) where it carried one, else its built history; int64 [B, L] (-1 padded)."""
    if pooled is None:
        return built
    given = pooled.rows
    if given.shape[1] > most:  # shorter ones hold at most `most` counted items already
        given = newest_counted(given, most)
    width = max(built.shape[1], given.shape[1])
    built = torch.nn.functional.pad(built, [0, width - built.shape[1]], value=-1.0)
    given = torch.nn.functional.pad(given, [0, width - given.shape[1]], value=-1.0)
    return torch.where((pooled.count >= 0).unsqueeze(1), given, built)


def newest_counted(rows: torch.Tensor, most: int) -> torch.Tensor:
    """The first `most` non-negative entries of each row of `rows` int64 [B, L] (newest
    first), in their order, -1 padded: [B, min(L, most)]."""
    # a stable sort on "not counted" moves the counted entries to the front, keeping order
    _, order = torch.sort((rows < 0).to(torch.int32), dim=1, stable=True)
    return rows.gather(1, order)[:, :most]
