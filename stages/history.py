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
- a request whose history has no known item gets the user side's "no history" answer: the
  user tower's zero history vector, not the history built from the logs (what the request
  says replaces what the logs said); a user table (the linear model, pretrained vectors,
  stages/user.py `UserTable`) has no history-free answer and keeps the user's row.
"""

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

MAX_HISTORY = 100  # most item ids one request's history may hold


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
    their number; `count` is -1 for a request without `history` (use the built history)."""

    vectors: torch.Tensor  # float32 [B, D] (zeros where count <= 0)
    count: torch.Tensor  # int64 [B]


class HistoryPooling(nn.Module):
    """Raw item ids -> mean item vector, over the index's items and the fresh store's.

    Args:
        item_ids: int64 [N] raw id of every index row.
        item_vectors: what each item adds to a history, index row order (stages/item_vectors.py:
            the index's own int8 vectors, shared with the scorer, or a model's own history
            side in fp32).
        fresh_counts: whether fresh items count (their vectors are in the index's space,
            which must then be the history's).
    """

    def __init__(self, item_ids: torch.Tensor, item_vectors: nn.Module,
                 fresh_counts: bool = True):
        super().__init__()
        if item_ids.shape[0] != item_vectors.num_items():
            raise ValueError(f"{item_ids.shape[0]} item ids for {item_vectors.num_items()} "
                             "vectors")
        order = torch.argsort(item_ids)
        self.register_buffer("sorted_ids", item_ids[order].to(torch.int64).contiguous())
        self.register_buffer("sorted_rows", order.to(torch.int64).contiguous())
        self.item_vectors = item_vectors
        self.fresh_counts = fresh_counts

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
        if self.fresh_counts and fresh_ids is not None and fresh_vectors is not None \
                and fresh_live is not None and fresh_ids.shape[0] > 0:
            live = torch.nonzero(fresh_live & (fresh_ids >= 0)).squeeze(1)
            if live.shape[0] > 0:
                order = torch.argsort(fresh_ids[live])
                in_fresh, fresh_rows = self._lookup(ids, fresh_ids[live][order], live[order])
                in_fresh = in_fresh & valid
                vectors = torch.where(in_fresh.unsqueeze(-1),
                                      fresh_vectors[fresh_rows].to(vectors.dtype), vectors)
                found = found | in_fresh
        weight = found.to(vectors.dtype).unsqueeze(-1)
        count = found.sum(1)
        mean = (vectors * weight).sum(1) / count.clamp(min=1).unsqueeze(1).to(vectors.dtype)
        count = torch.where(history.given, count, torch.full_like(count, -1))
        return PooledHistory(mean, count)

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
