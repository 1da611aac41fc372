"""The linear history model: EASE's item-item weights factorized into two towers.

EASE (Steck, 2019; the anchor of training/anchors.py) scores s_uj = sum_{i in H_u} B_ij, with
P = (X^T X + lambda I)^-1 over the training positives X and B = -P / diag(P) (zero diagonal).
B is a dense item x item matrix: no index can serve it. Its rank-k SVD B ~ U_k S_k W_k^T
splits it into a history-side vector h_i = (U_k S_k^1/2)_i and a target-side vector
v_j = (W_k S_k^1/2)_j per item, and then

    s_uj ~ < sum_{i in H_u} h_i , v_j >

is a two-tower score: the user side pools the h vectors of the user's history (once per
request, from the request's `history` input or from the history built from the logs,
stages/history.py), the ANN index holds the v vectors, and the OverArch and the Value Model
reorder the candidates as for the trained towers. The user vector is the sum of the h vectors
scaled to unit length: one user's ranking does not depend on the scale, and without it a
three-item history (a long vector) and a 300-item one (a short one, its items pointing many
ways) would put the dot products, which the OverArch calibrates into probabilities, on scales
far apart (a short request history saturated every probability at 1).

It is fitted in closed form (one inverse and one truncated SVD; no epochs) over a dense
item x item matrix, so it keeps at most `LinearConfig.max_items` items, those with the most
training positives (a larger catalog's other items get h = v = 0: they score 0 for every
user, below the kept items a user is likely to get, and count for nothing in a history).
`covered_share` says how much of a log that keeps; training/train.py picks this model only
where it keeps nearly all.
Settings (rank, lambda) were chosen on the validation cut of ml-latest-small
(`python -m training.evaluate --validation`, docs/quality.md), never on its held-out part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from training.anchors import EASE_MAX_ITEMS


@dataclass
class LinearConfig:
    """Chosen on ml-latest-small's validation cut (exact scoring of h . v, recall@10 /
    recall@50 / NDCG@10; EASE with lambda 300 there: 0.1037 / 0.2672 / 0.0858):

    | lambda | rank 256 | rank 512 |
    |---|---|---|
    | 100 | 0.0995 / 0.2568 / 0.0834 | **0.1044 / 0.2692 / 0.0864** |
    | 200 | 0.1002 / 0.2615 / 0.0857 | 0.1030 / 0.2688 / 0.0864 |
    | 300 | 0.1026 / 0.2674 / 0.0858 | 0.1038 / 0.2659 / 0.0864 |
    | 500 | 0.0975 / 0.2643 / 0.0822 | 0.1016 / 0.2646 / 0.0843 |

    (rank 64: 0.094, 128: 0.098 recall@10 at lambda 300.) An item-dependent ridge, lambda +
    rho * diag(X^T X) (EDLAE's dropout emphasis), at lambda 100 on the same cut by a one-off
    script (exact scoring, not kept): rho 0.1, rank 512: 0.1011 / 0.2691 / 0.0842; rho 0.25,
    rank 512: 0.1025 / 0.2703 / 0.0846; at full rank 0.1034 / 0.2705 / 0.0856 and 0.1047 /
    0.2685 / 0.0851: no better overall, not adopted.
    """

    rank: int = 512  # width of h and v: the ANN index dimension
    l2: float = 100.0  # lambda of the closed form
    # items kept in the dense matrix (three float64 copies of it: 9.6 GB at 20,000)
    max_items: int = EASE_MAX_ITEMS


class LinearFit(NamedTuple):
    """The fitted towers, catalog order for items and data-user order for users."""

    history_vectors: torch.Tensor  # float32 [N, k] h: what a history item contributes
    item_vectors: torch.Tensor  # float32 [N, k] v: what the index holds
    user_vectors: torch.Tensor  # float32 [U, k] unit sum of h over a user's positives (0: none)
    cold_start: torch.Tensor  # float32 [k] unit mean user vector of the users with positives
    kept: torch.Tensor  # int64 [M] the catalog rows the fit kept (the others: zero vectors)


def fit_linear(user_index: torch.Tensor, item_index: torch.Tensor, num_users: int,
               num_items: int, config: LinearConfig = LinearConfig(), seed: int = 0
               ) -> LinearFit:
    """Fits the factorized EASE on positive (user, item) pairs (repeats count once).

    Items without a positive, and beyond `config.max_items` those with the fewest, get
    h = v = 0 (nothing predicts them, as in EASE)."""
    keys = torch.unique(user_index.to(torch.int64) * num_items + item_index.to(torch.int64))
    users, items = keys // num_items, keys % num_items
    active = kept_items(items, num_items, config.max_items)
    keep = torch.isin(items, active)
    users, items = users[keep], items[keep]
    column = torch.full((num_items,), -1, dtype=torch.int64)
    column[active] = torch.arange(active.numel())
    x = torch.sparse_coo_tensor(torch.stack([users, column[items]]),
                                torch.ones(users.numel(), dtype=torch.float64),
                                (num_users, active.numel()), check_invariants=True).coalesce()
    gram = torch.sparse.mm(x.t().coalesce(), x).to_dense()
    gram.diagonal().add_(config.l2)
    p = torch.linalg.inv(gram)
    del gram
    # float64 throughout: a float32 SVD with fewer iterations is twice as fast, but lost
    # 0.0014 of recall@10 on the validation cut (0.1030 against 0.1044)
    b = -p / p.diagonal().unsqueeze(0)
    del p
    b.diagonal().zero_()
    rank = min(config.rank, active.numel())
    torch.manual_seed(seed)  # svd_lowrank draws its random projection from the global RNG
    u, s, w = torch.svd_lowrank(b, q=min(rank + 16, active.numel()), niter=6)
    root = s[:rank].sqrt()
    history = torch.zeros(num_items, rank)
    target = torch.zeros(num_items, rank)
    history[active] = (u[:, :rank] * root).float()
    target[active] = (w[:, :rank] * root).float()
    counts = torch.bincount(users, minlength=num_users).float()
    sums = torch.zeros(num_users, rank).index_add_(0, users, history[items])
    user_vectors = F.normalize(sums, dim=1)  # zeros stay zeros
    cold = F.normalize(user_vectors[counts > 0].mean(0), dim=0) if bool((counts > 0).any()) \
        else torch.zeros(rank)
    return LinearFit(history, target, user_vectors, cold, active)


def kept_items(items: torch.Tensor, num_items: int, max_items: int) -> torch.Tensor:
    """The catalog rows the fit keeps, ascending: those with positives in `items` (one entry
    per distinct user and item), at most `max_items` of the most frequent (ties: lower row)."""
    counts = torch.bincount(items, minlength=num_items)
    active = torch.nonzero(counts > 0).squeeze(1)
    if active.numel() > max_items:
        order = torch.argsort(-counts[active], stable=True)[:max_items]
        active = torch.sort(active[order]).values
    return active


def covered_share(user_index: torch.Tensor, item_index: torch.Tensor, num_items: int,
                  max_items: int = EASE_MAX_ITEMS) -> float:
    """The share of distinct positive (user, item) pairs on the items a fit would keep."""
    keys = torch.unique(user_index.to(torch.int64) * num_items + item_index.to(torch.int64))
    items = keys % num_items
    if items.numel() == 0:
        return 0.0
    return float(torch.isin(items, kept_items(items, num_items, max_items)).float().mean())


class LinearQueries:
    """Query vectors of training examples for the OverArch (training/over_arch.py takes any
    callable like training/towers.py `ExampleQueries`): the unit sum of h over the user's
    positives, without the example's own item when it is one of them (leave-one-out); `cold`
    examples get the cold-start vector.

    Args:
        fit: the fitted model; user_index, item_index: int64 [P] the positives it was fitted
            on (or the part of them the examples' users had before the examples).
        leave_one_out: subtract a clicked example's own item (False: the positives above do
            not hold the examples).
    """

    def __init__(self, fit: LinearFit, user_index: torch.Tensor, item_index: torch.Tensor,
                 leave_one_out: bool = True):
        self.fit = fit
        self.leave_one_out = leave_one_out
        num_users = fit.user_vectors.shape[0]
        self.counts = torch.bincount(user_index, minlength=num_users).float()
        self.sums = torch.zeros(num_users, fit.history_vectors.shape[1]).index_add_(
            0, user_index, fit.history_vectors[item_index])

    def all_users(self) -> torch.Tensor:
        """[U, k] every user's query without leaving anything out (zeros: no positives)."""
        return F.normalize(self.sums, dim=1)

    def __call__(self, user_index: torch.Tensor, item_rows: torch.Tensor,
                 clicked: torch.Tensor, cold: torch.Tensor) -> torch.Tensor:
        out = (clicked & self.leave_one_out).float().unsqueeze(1)
        sums = self.sums[user_index] - out * self.fit.history_vectors[item_rows]
        return torch.where(cold.unsqueeze(1), self.fit.cold_start.expand_as(sums),
                           F.normalize(sums, dim=1))
