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

Unlike EASE, the sum is weighted towards the user's newest items: the j-th newest weighs
1 / (1 + j / recency) (stages/history.py `recency_weight`, the same function the served
pooling applies to a request's history). What a user rates next follows what they rated last
(ratings come in sessions); EASE's plain sum gives a rating from years ago the same say. On
ml-latest-small's validation cut this took recall@10 from 0.104 to 0.130 (table below).

It is fitted in closed form (one inverse and one truncated SVD; no epochs) over a dense
item x item matrix, so it keeps at most `LinearConfig.max_items` items, those with the most
training positives (a larger catalog's other items get h = v = 0: they score 0 for every
user, below the kept items a user is likely to get, and count for nothing in a history).
`covered_share` says how much of a log that keeps; training/train.py picks this model only
where it keeps nearly all.
Settings (rank, lambda, recency) were chosen on the validation cut of ml-latest-small
(`python -m training.evaluate --validation [--linear-rank R --linear-l2 L --linear-recency
C]`, docs/quality.md), never on its held-out part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from stages.history import MAX_HISTORY, recency_weight
from training.anchors import EASE_MAX_ITEMS
from training.over_arch import UserHistories, user_histories


@dataclass
class LinearConfig:
    """Chosen on ml-latest-small's validation cut (exact scoring of h . v with the training
    ratings excluded, recall@10 / recall@50 / NDCG@10; EASE with lambda 300 there: 0.1037 /
    0.2672 / 0.0858). A cell is rerun through the served stages, row (a), by `python -m
    training.evaluate --no-synthetic --validation --linear-l2 L --linear-rank R
    --linear-recency C` (the int8 index may move the fourth decimal; the chosen cell: equal).
    The plain sum (recency 0), by lambda and rank:

    | lambda | rank 256 | rank 512 |
    |---|---|---|
    | 100 | 0.0995 / 0.2568 / 0.0834 | 0.1044 / 0.2692 / 0.0864 |
    | 200 | 0.1002 / 0.2615 / 0.0857 | 0.1030 / 0.2688 / 0.0864 |
    | 300 | 0.1026 / 0.2674 / 0.0858 | 0.1038 / 0.2659 / 0.0864 |
    | 500 | 0.0975 / 0.2643 / 0.0822 | 0.1016 / 0.2646 / 0.0843 |

    (rank 64: 0.094, 128: 0.098 recall@10 at lambda 300; rank 768 and 1024 at lambda 100,
    served (a): 0.1035 / 0.2694 / 0.0869 and 0.1037 / 0.2675 / 0.0861.) Weighted towards
    the newest, 1 / (1 + j / recency) for the j-th newest:

    | lambda | rank | recency 3 | recency 5 | recency 7 |
    |---|---|---|---|---|
    | 100 | 512 | 0.1293 / 0.2759 / 0.1144 | 0.1299 / 0.2787 / 0.1125 | 0.1286 / 0.2809 / 0.1114 |
    | 200 | 512 |  | 0.1266 / 0.2894 / 0.1123 |  |
    | 300 | 512 | 0.1299 / 0.2918 / 0.1129 | 0.1284 / 0.2923 / 0.1115 | 0.1263 / 0.2881 / 0.1101 |
    | 300 | 256 | 0.1254 / 0.2966 / 0.1087 | 0.1234 / 0.2966 / 0.1070 | 0.1218 / 0.2951 / 0.1051 |
    | 300 | 768 | 0.1316 / 0.2951 / 0.1142 | 0.1303 / 0.2920 / 0.1129 | 0.1252 / 0.2906 / 0.1094 |
    | 500 | 512 | 0.1265 / 0.2997 / 0.1093 | 0.1257 / 0.2959 / 0.1096 | 0.1238 / 0.2929 / 0.1070 |
    | 1000 | 512 | 0.1217 / 0.2870 / 0.1051 | 0.1192 / 0.2861 / 0.1022 | 0.1167 / 0.2879 / 0.1008 |

    and at lambda 100 / 200 / 300, rank 512, recency 10: 0.1253 / 0.2831 / 0.1074,
    0.1220 / 0.2873 / 0.1073, 0.1208 / 0.2880 / 0.1059; recency 20: 0.1197 / 0.2826 /
    0.1016, 0.1184 / 0.2790 / 0.1017, 0.1151 / 0.2839 / 0.1004.
    (lambda 50, rank 512: recency 5: 0.1286 / 0.2607 / 0.1106. Also tried on the plain sum:
    exponential decay 0.5^(j / h), h 5 to 160: recall@10 up to 0.130 at h 10 but recall@50
    0.272 at most; powers of the hyperbolic weight.) The cells differ by less than their
    intervals (about ±0.015 / ±0.024 / ±0.012): lambda 300 (EASE's own), rank 512 (the index
    width of the plain sum's choice) and recency 3 are one good setting among several, not
    a sharp optimum. An item-dependent ridge, lambda + rho * diag(X^T X) (EDLAE's dropout
    emphasis), on the plain sum at lambda 100 by a one-off script (exact scoring, not kept):
    rho 0.1, rank 512: 0.1011 / 0.2691 / 0.0842; rho 0.25, rank 512: 0.1025 / 0.2703 /
    0.0846; at full rank 0.1034 / 0.2705 / 0.0856 and 0.1047 / 0.2685 / 0.0851: no better
    overall, not adopted.
    """

    rank: int = 512  # width of h and v: the ANN index dimension
    l2: float = 300.0  # lambda of the closed form
    # the user vector's weighting towards the newest items (stages/history.py recency_weight;
    # 0: EASE's plain sum)
    recency: float = 3.0
    # items kept in the dense matrix (three float64 copies of it: 9.6 GB at 20,000)
    max_items: int = EASE_MAX_ITEMS


class LinearFit(NamedTuple):
    """The fitted towers, catalog order for items and data-user order for users."""

    history_vectors: torch.Tensor  # float32 [N, k] h: what a history item contributes
    item_vectors: torch.Tensor  # float32 [N, k] v: what the index holds
    # float32 [U, k] each user's pooled history (`history_sums`) at unit length (0: none)
    user_vectors: torch.Tensor
    cold_start: torch.Tensor  # float32 [k] unit mean user vector of the users with positives
    kept: torch.Tensor  # int64 [M] the catalog rows the fit kept (the others: zero vectors)
    # each user's positives on kept items, newest first, at most MAX_HISTORY: what a request
    # sending the user's history would pool, and what `user_vectors` pooled
    histories: UserHistories
    recency: float  # the pooling's weighting towards the newest (LinearConfig.recency)


def fit_linear(user_index: torch.Tensor, item_index: torch.Tensor, timestamp: torch.Tensor,
               num_users: int, num_items: int, config: LinearConfig = LinearConfig(),
               seed: int = 0) -> LinearFit:
    """Fits the factorized EASE on positive (user, item, time) interactions (repeats count
    once) and pools each user's history (newest first, from the times) into their vector.

    Items without a positive, and beyond `config.max_items` those with the fewest, get
    h = v = 0 (nothing predicts them, as in EASE)."""
    if not config.recency >= 0:
        raise ValueError(f"recency must be >= 0, got {config.recency}")
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
    histories = positive_histories(user_index, item_index, timestamp, num_users, active)
    user_vectors = F.normalize(history_sums(history, histories, config.recency), dim=1)
    has = histories.offsets[1:] > histories.offsets[:-1]
    cold = F.normalize(user_vectors[has].mean(0), dim=0) if bool(has.any()) \
        else torch.zeros(rank)
    return LinearFit(history, target, user_vectors, cold, active, histories, config.recency)


def positive_histories(user_index: torch.Tensor, item_index: torch.Tensor,
                       timestamp: torch.Tensor, num_users: int, kept: torch.Tensor,
                       max_len: int = MAX_HISTORY) -> UserHistories:
    """Each user's distinct positives on the `kept` items, newest first, at most `max_len`
    (training/over_arch.py user_histories: a request's history sent in the same order)."""
    keep = torch.isin(item_index, kept)
    return user_histories(user_index[keep].numpy(), item_index[keep].numpy(),
                          np.asarray(timestamp[keep]), num_users, max_len)


def history_weights(histories: UserHistories, recency: float
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(owner int64 [M], weight float32 [M]) of every history entry: its user, and what it
    weighs at its position (stages/history.py recency_weight: the served pooling's)."""
    lengths = histories.offsets[1:] - histories.offsets[:-1]
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    position = torch.arange(len(histories.items)) - histories.offsets[owner]
    return owner, recency_weight(position, recency)


def history_sums(history_vectors: torch.Tensor, histories: UserHistories,
                 recency: float) -> torch.Tensor:
    """[U, k] each user's weighted sum of h over their history (zeros: none); at unit length,
    what the served pooling (stages/history.py HistoryPooling) gives the same history."""
    owner, weight = history_weights(histories, recency)
    return torch.zeros(len(histories.offsets) - 1, history_vectors.shape[1]).index_add_(
        0, owner, history_vectors[histories.items] * weight.unsqueeze(1))


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
    callable like training/towers.py `ExampleQueries`): the user's pooled history
    (`history_sums` at unit length), without the example's own item when it is in it
    (leave-one-out; the others keep their weights); `cold` examples get the cold-start vector.

    Args:
        fit: the fitted model; histories: the users' histories (`positive_histories`: the
            fit's own, or the part of the log the examples' users had before the examples).
        leave_one_out: subtract a clicked example's own item (False: the histories do not
            hold the examples).
    """

    def __init__(self, fit: LinearFit, histories: UserHistories, leave_one_out: bool = True):
        self.fit = fit
        self.leave_one_out = leave_one_out
        self.sums = history_sums(fit.history_vectors, histories, fit.recency)
        owner, weight = history_weights(histories, fit.recency)
        # one key per (user, item): a history holds an item once
        keys = owner * fit.history_vectors.shape[0] + histories.items
        order = torch.argsort(keys)
        self.keys, self.weights = keys[order], weight[order]

    def all_users(self) -> torch.Tensor:
        """[U, k] every user's query without leaving anything out (zeros: no positives)."""
        return F.normalize(self.sums, dim=1)

    def own_weight(self, user_index: torch.Tensor, item_rows: torch.Tensor) -> torch.Tensor:
        """float32 [B] what each (user, item) weighs in the user's history (0: not in it)."""
        if self.keys.numel() == 0:
            return torch.zeros(user_index.shape)
        keys = user_index * self.fit.history_vectors.shape[0] + item_rows
        at = torch.searchsorted(self.keys, keys).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[at] == keys, self.weights[at], 0.0)

    def __call__(self, user_index: torch.Tensor, item_rows: torch.Tensor,
                 clicked: torch.Tensor, cold: torch.Tensor) -> torch.Tensor:
        out = torch.where(clicked & self.leave_one_out, self.own_weight(user_index, item_rows),
                          0.0).unsqueeze(1)
        sums = self.sums[user_index] - out * self.fit.history_vectors[item_rows]
        return torch.where(cold.unsqueeze(1), self.fit.cold_start.expand_as(sums),
                           F.normalize(sums, dim=1))
