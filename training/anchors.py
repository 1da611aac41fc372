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
import torch.nn.functional as F

from world.synthetic import AFFINITY_SCALE, CLICK_BIAS, LANGUAGE_BONUS

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


def map_user_latents(world, user_index: np.ndarray, item_index: np.ndarray,
                     clicks: np.ndarray, iterations: int = 25) -> np.ndarray:
    """Synthetic world only: each user's latent vector estimated from their logged impressions
    by someone who knows everything else, float32 [U, r].

    The world's click model is known (world/synthetic.py: p = sigmoid(AFFINITY_SCALE u.v /
    sqrt(r) + LANGUAGE_BONUS same_language + quality - CLICK_BIAS)), and so are every item's
    true latent vector, quality and language, and the population of user vectors (a Gaussian
    prior with the mean and covariance of `world.user_latent`). What is left is one logistic
    regression per user in u: its maximum a posteriori estimate from the user's impressions
    (clicks and non-clicks), by damped Newton steps on all users at once. This is what the
    logs allow a model that also knows the items, where the oracle (the true u) is not
    reachable from logs at all; it is not a strict upper bound (the generator draws users near
    pairs of category centres, a sharper prior than the Gaussian).
    Users without impressions get the prior mean."""
    r = world.config.latent_dim
    num_users = len(world.user_ids)
    mean = world.user_latent.mean(0).astype(np.float64)
    precision = np.linalg.inv(np.cov(world.user_latent.astype(np.float64), rowvar=False))
    order = np.argsort(user_index, kind="stable")
    users, starts, counts = np.unique(user_index[order], return_index=True, return_counts=True)
    width = int(counts.max()) if len(counts) else 1
    # impressions padded per user: [users with impressions, width]
    slot = np.arange(len(order)) - np.repeat(starts, counts)
    row = np.repeat(np.arange(len(users)), counts)
    items = np.zeros((len(users), width), np.int64)
    label = np.zeros((len(users), width))
    valid = np.zeros((len(users), width))
    items[row, slot] = item_index[order]
    label[row, slot] = clicks[order]
    valid[row, slot] = 1.0
    x = torch.from_numpy(world.item_latent[items].astype(np.float64)
                         * (AFFINITY_SCALE / np.sqrt(r)))
    same = world.user_language[users][:, None] == world.catalog.features[1][items, 0]
    offset = torch.from_numpy(LANGUAGE_BONUS * same + world.item_quality[items].astype(np.float64)
                              - CLICK_BIAS)
    y, m = torch.from_numpy(label), torch.from_numpy(valid)
    p_mat, mu = torch.from_numpy(precision), torch.from_numpy(mean)
    def objective(u):  # the negative log posterior per user (up to a constant)
        z = torch.einsum("bld,bd->bl", x, u) + offset
        d = u - mu
        return ((F.softplus(z) - y * z) * m).sum(1) + 0.5 * ((d @ p_mat) * d).sum(1), z

    u = mu.repeat(len(users), 1)
    value, z = objective(u)
    for _ in range(iterations):  # Newton steps, halved per user until the objective drops
        s = torch.sigmoid(z)
        grad = torch.einsum("bld,bl->bd", x, (s - y) * m) + (u - mu) @ p_mat
        hess = torch.bmm(x.transpose(1, 2) * (s * (1 - s) * m).unsqueeze(1), x) + p_mat
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        scale = torch.ones(len(users), 1, dtype=u.dtype)
        for _ in range(30):
            new_value, new_z = objective(u - scale * step)
            worse = new_value > value
            if not bool(worse.any()):
                break
            scale = torch.where(worse.unsqueeze(1), scale / 2, scale)
        better = ~worse
        u = torch.where(better.unsqueeze(1), u - scale * step, u)
        value = torch.where(better, new_value, value)
        z = torch.where(better.unsqueeze(1), new_z, z)
    out = np.tile(mean.astype(np.float32), (num_users, 1))
    out[users] = u.float().numpy()
    return out
