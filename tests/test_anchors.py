"""The quality table's anchors (training/anchors.py) against tiny cases computed by hand."""

import math

import numpy as np
import torch

from training.anchors import EASE, ItemKNN, Popularity, interaction_matrix, top_k

# users 0: {0, 1}, 1: {1}, 2: {1, 2} (user 2's repeated item 1 counts once); item 3: no one
USERS = np.array([0, 0, 1, 2, 2, 2])
ITEMS = np.array([0, 1, 1, 1, 2, 1])


def close(got, want, atol=1e-6):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=0, atol=atol)


def matrix(num_items=4):
    return interaction_matrix(USERS, ITEMS, 3, num_items)


def test_interaction_matrix_is_binary():
    x = matrix().to_dense()
    assert x.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]]


def test_popularity_counts_users():
    assert Popularity(matrix()).scores(np.array([1, 2])).tolist() == [[1, 3, 1, 0]] * 2


def test_item_knn_cosine_by_hand():
    # |U_0| = 1, |U_1| = 3, |U_2| = 1; items 0 and 1 share user 0, items 1 and 2 user 2
    knn = ItemKNN(matrix())
    s = 1 / math.sqrt(3)
    close(knn.similarity.to_dense(), [[0, s, 0, 0], [s, 0, s, 0], [0, s, 0, 0], [0, 0, 0, 0]])
    # user 1 = {1}: s = S[1]; user 0 = {0, 1}: S[0] + S[1]
    close(knn.scores(np.array([1, 0])), [[s, 0, s, 0], [s, s, s, 0]])


def test_ease_closed_form_by_hand():
    # two items, users {0, 1}, {0}, {1}: G = [[2, 1], [1, 2]]; lambda 1: P = [[3, -1], [-1, 3]]/8
    # B_01 = -P_01 / P_11 = 1/3 = B_10, B_ii = 0
    x = interaction_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 0, 1]), 3, 2)
    ease = EASE(x, l2=1.0)
    close(ease.b, [[0, 1 / 3], [1 / 3, 0]])
    close(ease.scores(np.array([1, 2])), [[0, 1 / 3], [1 / 3, 0]])


def test_ease_matches_the_dense_formula_and_never_ranks_unseen_items():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 200), rng.integers(0, 17, 200)  # item 17: no data
    x = interaction_matrix(users, items, 30, 18)
    dense = x.to_dense().double()
    p = torch.linalg.inv(dense.T @ dense + 5.0 * torch.eye(18))
    b = torch.eye(18) - p / p.diagonal()
    got = EASE(x, l2=5.0).scores(np.arange(30))
    close(got[:, :17], (dense @ b)[:, :17], atol=1e-5)  # float32 B against float64
    assert torch.isinf(got[:, 17]).all()


def test_top_k_drops_excluded_and_minus_infinity():
    scores = torch.tensor([[0.5, 0.9, 0.1, float("-inf")], [3.0, 2.0, 1.0, 0.0]])
    got = top_k(scores, [np.array([1]), np.zeros(0, np.int64)], 3)
    assert got[0].tolist() == [0, 2] and got[1].tolist() == [0, 1, 2]


def test_map_user_latents_recovers_users_from_many_impressions_and_solves_the_map_problem():
    """The synthetic bound's user estimate: with many impressions a user's vector is found
    (cosine near 1), with few it is not, without any it is the prior mean; and the estimate
    is the maximum a posteriori point: the gradient of the log posterior, computed here
    independently in numpy, is zero there."""
    from training.anchors import map_user_latents
    from training.data import from_world
    from world.synthetic import WorldConfig, generate_world

    def estimate(impressions):
        world = generate_world(WorldConfig(num_items=3000, num_users=60,
                                           impressions_per_user=impressions, seed=3))
        data = from_world(world)
        it = data.interactions
        keep = it.user_index != 0  # user 0: no impressions
        clicks = it.labels[keep, 0] > 0
        est = map_user_latents(world, it.user_index[keep], it.item_index[keep], clicks)
        true = world.user_latent
        cos = (est * true).sum(1) / np.linalg.norm(est, axis=1) / np.linalg.norm(true, axis=1)
        return world, it, keep, clicks, est, float(cos[1:].mean())

    world, it, keep, clicks, est, cos_many = estimate(1500)
    *_, cos_few = estimate(10)
    assert cos_many > 0.9 and cos_few < cos_many - 0.1, (cos_many, cos_few)
    close(est[0], world.user_latent.mean(0), atol=1e-5)
    # the log posterior's gradient at user 5's estimate
    r = world.config.latent_dim
    mine = keep & (it.user_index == 5)
    x = world.item_latent[it.item_index[mine]].astype(np.float64) * 1.6 / math.sqrt(r)
    same = world.user_language[5] == world.catalog.features[1][it.item_index[mine], 0]
    z = x @ est[5] + 0.8 * same + world.item_quality[it.item_index[mine]] - 3.0
    y = it.labels[mine, 0] > 0
    prior = np.linalg.inv(np.cov(world.user_latent.astype(np.float64), rowvar=False))
    grad = x.T @ (1 / (1 + np.exp(-z)) - y) + prior @ (est[5] - world.user_latent.mean(0))
    assert np.abs(grad).max() < 1e-3 * (1 + np.abs(x.T @ y).max())
