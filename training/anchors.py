"""Non-neural anchors for the quality table: what a served model should at least match.

All three read the same thing: the binary user x item matrix X of the training positives
(task 0: a click, a rating), and score every catalog item for a user from the user's row x_u:

- popularity: s_j = number of training users with a positive on j (the same list for all);
- item-kNN (cosine): s = x_u S with S_ij = |U_i & U_j| / sqrt(|U_i| |U_j|), S_ii = 0 (U_i: the
  users with a positive on i); S is kept sparse, so it scales with the co-occurrences, not with
  the catalog squared;
- EASE (Steck, 2019, closed form): s = x_u B with P = (X^T X + lambda I)^-1,
  B = I - P / diag(P) (column j divided by P_jj), i.e. B_ij = -P_ij / P_jj, B_jj = 0. B is a
  dense item x item matrix: catalogs beyond `EASE_MAX_ITEMS` (some tens of thousands) are
  skipped.

`top_k` ranks the scores after removing each user's excluded items, as the served pipelines
do through the filter bitmap.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

# EASE inverts a dense (items x items) matrix: 20k items = 1.6 GB in float32 and minutes on a
# few cores; larger catalogs (the synthetic world's 200k) are skipped
EASE_MAX_ITEMS = 20_000
EASE_LAMBDA = 300.0  # the L2 weight of the closed form (as the anchor)


def interaction_matrix(user_index: np.ndarray, item_index: np.ndarray, num_users: int,
                       num_items: int) -> torch.Tensor:
    """Binary sparse COO X [num_users, num_items] (repeated pairs count once)."""
    keys = np.unique(np.asarray(user_index, np.int64) * num_items
                     + np.asarray(item_index, np.int64))
    idx = torch.from_numpy(np.stack([keys // num_items, keys % num_items]))
    return torch.sparse_coo_tensor(idx, torch.ones(len(keys)), (num_users, num_items),
                                   check_invariants=True).coalesce()


def _rows(x: torch.Tensor, users: np.ndarray) -> torch.Tensor:
    """Sparse rows `users` of a sparse COO matrix, in that order (index_select keeps COO)."""
    return x.index_select(0, torch.from_numpy(np.asarray(users, np.int64))).coalesce()


class Popularity:
    """s_j = training users with a positive on j."""

    name = "popularity"

    def __init__(self, x: torch.Tensor):
        self.counts = torch.sparse.sum(x, 0).to_dense().float()

    def scores(self, users: np.ndarray) -> torch.Tensor:
        return self.counts.expand(len(users), -1)


class ItemKNN:
    """Cosine item-item neighbours over the users' positives, s = x_u S (S sparse)."""

    name = "item-kNN (cosine)"

    def __init__(self, x: torch.Tensor):
        self.x = x
        co = torch.sparse.mm(x.t().coalesce(), x).coalesce()  # |U_i & U_j|
        i, j = co.indices()
        counts = torch.sparse.sum(x, 0).to_dense().float()
        values = co.values() / torch.sqrt(counts[i] * counts[j])
        keep = i != j
        self.similarity = torch.sparse_coo_tensor(co.indices()[:, keep], values[keep],
                                                  co.shape).coalesce()

    def scores(self, users: np.ndarray) -> torch.Tensor:
        return torch.sparse.mm(_rows(self.x, users), self.similarity).to_dense()


class EASE:
    """Closed-form EASE, s = x_u B; only items with a training positive enter the inverse (the
    others' columns of B are 0: nothing predicts them)."""

    name = "EASE"

    def __init__(self, x: torch.Tensor, l2: float = EASE_LAMBDA):
        num_items = x.shape[1]
        if num_items > EASE_MAX_ITEMS:
            raise ValueError(f"EASE on {num_items:,} items: its dense item x item matrix is "
                             f"limited to {EASE_MAX_ITEMS:,}")
        self.x = x
        counts = torch.sparse.sum(x, 0).to_dense()
        self.active = torch.nonzero(counts > 0).squeeze(1)
        xa = x.index_select(1, self.active).to_dense().double()
        gram = xa.T @ xa
        gram.diagonal().add_(l2)
        p = torch.linalg.inv(gram)
        b = -p / p.diagonal().unsqueeze(0)
        b.diagonal().zero_()
        self.b = b.float()
        self.num_items = num_items

    def scores(self, users: np.ndarray) -> torch.Tensor:
        xu = _rows(self.x, users).index_select(1, self.active).to_dense()
        out = torch.full((len(users), self.num_items), float("-inf"))
        out[:, self.active] = xu @ self.b
        return out


def top_k(scores: torch.Tensor, excluded: Sequence[np.ndarray], k: int) -> List[np.ndarray]:
    """Per user, the catalog rows of the k best scores outside `excluded[i]`, best first."""
    scores = scores.clone()
    for i, rows in enumerate(excluded):
        scores[i, torch.from_numpy(np.asarray(rows, np.int64))] = float("-inf")
    k = min(k, scores.shape[1])
    values, rows = torch.topk(scores, k, dim=1)
    return [r[torch.isfinite(v)].numpy() for v, r in zip(values, rows)]
