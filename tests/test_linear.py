"""The linear history model (training/linear.py): at full rank it is EASE (the anchor of
training/anchors.py, an independent closed form); its leave-one-out queries; and, built from a
MovieLens-style catalog, the served user side pools request histories from the history side."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from catalogs import movielens_dir

from builder.build import BuildConfig, build_modules
from builder.inputs import BuildInput
from catalog.read import read_catalog
from stages.history import batch_history
from stages.user import UserTable
from training.anchors import EASE, interaction_matrix
from training.linear import LinearConfig, LinearQueries, covered_share, fit_linear, kept_items
from training.train import TrainConfig, retrieval_kind


def random_positives(num_users=60, num_items=25, per_user=6, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(num_users), per_user)
    items = rng.integers(0, num_items - 3, len(users))  # the last 3 items: no positives
    return torch.from_numpy(users), torch.from_numpy(items)


def test_at_full_rank_the_scores_are_eases():
    users, items = random_positives()
    fit = fit_linear(users, items, 60, 25, LinearConfig(rank=22, l2=7.0))
    ease = EASE(interaction_matrix(users.numpy(), items.numpy(), 60, 25), l2=7.0)
    all_users = np.arange(60)
    x = interaction_matrix(users.numpy(), items.numpy(), 60, 25).to_dense()
    got = (x @ fit.history_vectors) @ fit.item_vectors.T  # x_u H V^T
    want = ease.scores(all_users)
    # the served user vector is x_u H at unit length: the same ranking
    torch.testing.assert_close(fit.user_vectors, F.normalize(x @ fit.history_vectors, dim=1))
    active = torch.isfinite(want[0])
    assert int(active.sum()) == 22
    torch.testing.assert_close(got[:, active], want[:, active], rtol=1e-4, atol=1e-4)
    assert torch.all(fit.item_vectors[~active] == 0) and torch.all(fit.history_vectors[~active]
                                                                   == 0)


def test_a_lower_rank_keeps_the_top_of_the_spectrum():
    users, items = random_positives()
    full = fit_linear(users, items, 60, 25, LinearConfig(rank=22, l2=7.0))
    low = fit_linear(users, items, 60, 25, LinearConfig(rank=8, l2=7.0))
    b_full = full.history_vectors @ full.item_vectors.T
    b_low = low.history_vectors @ low.item_vectors.T
    # the best rank-8 approximation (Eckart-Young) by the SVD of the full-rank product
    u, s, v = torch.linalg.svd(b_full)
    best = (u[:, :8] * s[:8]) @ v[:8]
    torch.testing.assert_close(b_low, best, rtol=1e-3, atol=1e-3)


def test_a_catalog_beyond_max_items_keeps_its_most_frequent_items():
    """With max_items = 10 the fit keeps the 10 items with the most users and equals a fit on
    their positives alone; the others get zero vectors; covered_share counts what it keeps."""
    users, items = random_positives()
    pairs = torch.unique(users * 25 + items)
    counts = torch.bincount(pairs % 25, minlength=25)
    want = sorted(sorted(range(25), key=lambda i: (-int(counts[i]), i))[:10])
    assert kept_items(pairs % 25, 25, 10).tolist() == want
    assert covered_share(users, items, 25, 10) == pytest.approx(
        float(counts[want].sum()) / len(pairs))
    assert covered_share(users, items, 25, 25) == 1.0
    capped = fit_linear(users, items, 60, 25, LinearConfig(rank=10, l2=7.0, max_items=10))
    keep = torch.isin(items, torch.tensor(want))
    alone = fit_linear(users[keep], items[keep], 60, 25, LinearConfig(rank=10, l2=7.0))
    torch.testing.assert_close(capped.history_vectors @ capped.item_vectors.T,
                               alone.history_vectors @ alone.item_vectors.T)
    dropped = [i for i in range(25) if i not in want]
    assert torch.all(capped.item_vectors[dropped] == 0)


def test_leave_one_out_queries():
    users, items = random_positives()
    fit = fit_linear(users, items, 60, 25, LinearConfig(rank=10, l2=7.0))
    pairs = torch.unique(users * 25 + items)
    queries = LinearQueries(fit, pairs // 25, pairs % 25)
    u, i = int(pairs[3] // 25), int(pairs[3] % 25)
    others = sorted(set(items[users == u].tolist()) - {i})
    got = queries(torch.tensor([u, u, 5]), torch.tensor([i, i, 0]),
                  torch.tensor([True, False, False]), torch.tensor([False, False, True]))
    torch.testing.assert_close(got[0], F.normalize(fit.history_vectors[others].sum(0), dim=0))
    torch.testing.assert_close(got[1], fit.user_vectors[u])
    torch.testing.assert_close(got[2], fit.cold_start)


@pytest.fixture(scope="module")
def movielens_build(tmp_path_factory):
    source = BuildInput.from_catalog(read_catalog(movielens_dir(tmp_path_factory.mktemp("ml"))))
    return source, build_modules(source, BuildConfig())


def test_a_catalog_without_impressions_serves_the_linear_model(movielens_build):
    source, built = movielens_build
    assert retrieval_kind(source.data, TrainConfig()) == "linear"
    # a catalog larger than the dense matrix: linear only when the kept items hold nearly all
    # positives (here 2 of its 5 movies cannot), and never for logged impressions
    small = TrainConfig(linear=LinearConfig(max_items=2))
    assert retrieval_kind(source.data, small) == "two_tower"
    assert retrieval_kind(dataclasses.replace(source.data, logged_impressions=True),
                          TrainConfig()) == "two_tower"
    ann = built.modules["ann"]
    assert isinstance(ann.users, UserTable)
    # histories are pooled from the history side, not from the indexed item vectors
    every = torch.arange(built.catalog.num_items)
    pooling = ann.pooling.item_vectors(every)
    indexed = built.modules["scorer"].item_vectors(every)
    assert pooling.shape == indexed.shape and not torch.allclose(pooling, indexed)
    ids = built.catalog.item_ids
    history = np.array([ids[1], ids[3], 10**15])  # and an unknown id
    user = torch.tensor([int(source.user_ids[0])] * 2)
    pooled = ann.pooling(batch_history([history, None]))
    query = ann.users(user, pooled)
    torch.testing.assert_close(query[0], F.normalize(pooling[[1, 3]].mean(0), dim=0))
    torch.testing.assert_close(query[1], ann.users(user[:1])[0])
