"""The linear history model (training/linear.py): at full rank it is EASE (the anchor of
training/anchors.py, an independent closed form); its user vectors weigh the newest items as
written by hand here; its leave-one-out queries; and, built from a MovieLens-style catalog, the
served user side pools request histories from the history side, with the same weights: a
request sending the user's history gets the built user vector."""

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
from training.data import holdout_split, subset
from training.linear import LinearConfig, LinearQueries, covered_share, fit_linear, kept_items
from training.train import TrainConfig, retrieval_kind


def random_positives(num_users=60, num_items=25, per_user=6, seed=0):
    """(users, items, times): `per_user` positives each, at distinct times."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(num_users), per_user)
    items = rng.integers(0, num_items - 3, len(users))  # the last 3 items: no positives
    times = rng.permutation(len(users))
    return torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(times)


PLAIN = dict(rank=22, l2=7.0, recency=0.0)


def newest_first(users, items, times, user):
    """A user's distinct items, newest first (a repeat counts at its latest time), by hand."""
    latest = {}
    for u, i, t in zip(users.tolist(), items.tolist(), times.tolist()):
        if u == user:
            latest[i] = max(latest.get(i, -1), t)
    return sorted(latest, key=lambda i: -latest[i])


def test_at_full_rank_the_scores_are_eases():
    users, items, times = random_positives()
    fit = fit_linear(users, items, times, 60, 25, LinearConfig(**PLAIN))
    ease = EASE(interaction_matrix(users.numpy(), items.numpy(), 60, 25), l2=7.0)
    all_users = np.arange(60)
    x = interaction_matrix(users.numpy(), items.numpy(), 60, 25).to_dense()
    got = (x @ fit.history_vectors) @ fit.item_vectors.T  # x_u H V^T
    want = ease.scores(all_users)
    # without the weighting the user vector is x_u H at unit length: the same ranking
    torch.testing.assert_close(fit.user_vectors, F.normalize(x @ fit.history_vectors, dim=1))
    active = torch.isfinite(want[0])
    assert int(active.sum()) == 22
    torch.testing.assert_close(got[:, active], want[:, active], rtol=1e-4, atol=1e-4)
    assert torch.all(fit.item_vectors[~active] == 0) and torch.all(fit.history_vectors[~active]
                                                                   == 0)


def test_user_vectors_weigh_the_newest_items_most():
    """recency r: the j-th newest distinct positive weighs 1 / (1 + j / r); the fit (its B)
    does not depend on r."""
    users, items, times = random_positives()
    plain = fit_linear(users, items, times, 60, 25, LinearConfig(**PLAIN))
    fit = fit_linear(users, items, times, 60, 25, LinearConfig(**{**PLAIN, "recency": 2.0}))
    torch.testing.assert_close(fit.history_vectors, plain.history_vectors)
    for user in (0, 7, 59):
        order = newest_first(users, items, times, user)
        weights = torch.tensor([1.0 / (1.0 + j / 2.0) for j in range(len(order))])
        want = F.normalize((weights.unsqueeze(1) * fit.history_vectors[order]).sum(0), dim=0)
        torch.testing.assert_close(fit.user_vectors[user], want)
        assert fit.histories.items[fit.histories.offsets[user]:
                                   fit.histories.offsets[user + 1]].tolist() == order
        # the weighting changes the vector (the newest item weighs 1, the sixth 1/3.5)
        assert not torch.allclose(fit.user_vectors[user], plain.user_vectors[user])
    with pytest.raises(ValueError, match="recency"):
        fit_linear(users, items, times, 60, 25, LinearConfig(recency=-1.0))


def test_a_lower_rank_keeps_the_top_of_the_spectrum():
    users, items, times = random_positives()
    full = fit_linear(users, items, times, 60, 25, LinearConfig(rank=22, l2=7.0))
    low = fit_linear(users, items, times, 60, 25, LinearConfig(rank=8, l2=7.0))
    b_full = full.history_vectors @ full.item_vectors.T
    b_low = low.history_vectors @ low.item_vectors.T
    # the best rank-8 approximation (Eckart-Young) by the SVD of the full-rank product
    u, s, v = torch.linalg.svd(b_full)
    best = (u[:, :8] * s[:8]) @ v[:8]
    torch.testing.assert_close(b_low, best, rtol=1e-3, atol=1e-3)


def test_a_catalog_beyond_max_items_keeps_its_most_frequent_items():
    """With max_items = 10 the fit keeps the 10 items with the most users and equals a fit on
    their positives alone; the others get zero vectors; covered_share counts what it keeps."""
    users, items, times = random_positives()
    pairs = torch.unique(users * 25 + items)
    counts = torch.bincount(pairs % 25, minlength=25)
    want = sorted(sorted(range(25), key=lambda i: (-int(counts[i]), i))[:10])
    assert kept_items(pairs % 25, 25, 10).tolist() == want
    assert covered_share(users, items, 25, 10) == pytest.approx(
        float(counts[want].sum()) / len(pairs))
    assert covered_share(users, items, 25, 25) == 1.0
    capped = fit_linear(users, items, times, 60, 25,
                        LinearConfig(rank=10, l2=7.0, max_items=10))
    keep = torch.isin(items, torch.tensor(want))
    alone = fit_linear(users[keep], items[keep], times[keep], 60, 25,
                       LinearConfig(rank=10, l2=7.0))
    torch.testing.assert_close(capped.history_vectors @ capped.item_vectors.T,
                               alone.history_vectors @ alone.item_vectors.T)
    # and the user vectors pool the kept items only
    torch.testing.assert_close(capped.user_vectors, alone.user_vectors)
    dropped = [i for i in range(25) if i not in want]
    assert torch.all(capped.item_vectors[dropped] == 0)


def test_leave_one_out_queries():
    """An example's own item leaves its user's pooled history with the weight it had there;
    the other items keep theirs."""
    users, items, times = random_positives()
    for recency in (0.0, 2.0):
        fit = fit_linear(users, items, times, 60, 25,
                         LinearConfig(rank=10, l2=7.0, recency=recency))
        queries = LinearQueries(fit, fit.histories)
        u = 3
        order = newest_first(users, items, times, u)
        i = order[1]  # the second newest: weight 1 / (1 + 1 / r)
        weights = torch.tensor([1.0 if recency == 0 else 1.0 / (1.0 + j / recency)
                                for j in range(len(order))])
        rest = [j for j, item in enumerate(order) if item != i]
        got = queries(torch.tensor([u, u, 5]), torch.tensor([i, i, 0]),
                      torch.tensor([True, False, False]), torch.tensor([False, False, True]))
        want = (weights[rest].unsqueeze(1) * fit.history_vectors[[order[j] for j in rest]])
        torch.testing.assert_close(got[0], F.normalize(want.sum(0), dim=0))
        torch.testing.assert_close(got[1], fit.user_vectors[u])
        torch.testing.assert_close(got[2], fit.cold_start)
        # an item not in the history takes nothing out
        absent = next(j for j in range(22) if j not in order)
        torch.testing.assert_close(
            queries(torch.tensor([u]), torch.tensor([absent]), torch.tensor([True]),
                    torch.tensor([False]))[0], fit.user_vectors[u])


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
    history = np.array([ids[1], 10**15, ids[3]])  # and an unknown id: it takes no position
    user = torch.tensor([int(source.user_ids[0])] * 2)
    pooled = ann.pooling(batch_history([history, None]))
    query = ann.users(user, pooled)
    recency = LinearConfig().recency
    weights = torch.tensor([1.0, 1.0 / (1.0 + 1.0 / recency)])  # newest first
    torch.testing.assert_close(
        query[0], F.normalize((weights.unsqueeze(1) * pooling[[1, 3]]).sum(0), dim=0))
    torch.testing.assert_close(query[1], ann.users(user[:1])[0])


def test_a_request_sending_the_users_history_gets_the_built_user_vector(movielens_build):
    """What the request path pools (stages/history.py, the served weights) equals what the
    builder pooled into the user table (training/linear.py), for every user: one weighting."""
    source, built = movielens_build
    data = source.data
    train = subset(data.interactions, holdout_split(data, BuildConfig().holdout_fraction)[0])
    positive = train.labels[:, 0] > 0
    ann = built.modules["ann"]
    row_of = {int(i): r for r, i in enumerate(data.catalog.item_ids)}
    checked = 0
    for u in np.unique(train.user_index[positive]):
        mine = positive & (train.user_index == u)
        # newest first; these ratings are at distinct times
        order = np.argsort(-train.timestamp[mine], kind="stable")
        ids = data.catalog.item_ids[train.item_index[mine][order]]
        assert len({row_of[int(i)] for i in ids}) == len(ids)
        raw = torch.tensor([int(data.user_ids[u])])
        sent = ann.users(raw, ann.pooling(batch_history([ids])))
        torch.testing.assert_close(sent, ann.users(raw), rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked >= 30
