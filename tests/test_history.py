"""Request-time history (stages/history.py): pooled exactly, unknown ids skipped, fresh items
counted, the user tower reading it instead of the built history, and results moving toward
what the history holds. The wire contract (bad input, served == in-process) is in
test_bad_input.py, test_fuzz.py and test_server.py."""

import numpy as np
import pytest
import torch

from builder.build import BuildConfig, build_modules
from filtering.expression import batch_plans, parse_plan
from stages.history import (
    ATTENTION_HISTORY,
    MAX_HISTORY,
    HistoryPooling,
    PooledHistory,
    RequestHistory,
    batch_history,
    history_rows,
    newest_counted,
)
from stages.item_vectors import Fp32Vectors
from world.synthetic import WorldConfig, generate_world

# the world of tests/test_stages.py: its trained weights are cached and shared
WORLD = generate_world(WorldConfig(seed=3, num_items=1500, num_users=300, num_creators=50,
                                   impressions_per_user=20))


@pytest.fixture(scope="module")
def built():
    return build_modules(WORLD, BuildConfig(world=WORLD.config))


def reference_mean(ids, item_ids, vectors, fresh=None, recency=0.0):
    """Mean vector of the known ids, by a dict (fresh: {id: vector} that wins), and count;
    with `recency` > 0 the j-th known id (newest first) weighs 1 / (1 + j / recency)."""
    table = {int(i): v for i, v in zip(item_ids, vectors)}
    table.update(fresh or {})
    known = [table[int(i)] for i in ids if int(i) in table]
    if not known:
        return np.zeros(vectors.shape[1], np.float32), 0
    weights = [1.0 if recency == 0 else 1.0 / (1.0 + j / recency) for j in range(len(known))]
    return np.average(known, axis=0, weights=weights), len(known)


@pytest.mark.parametrize("recency", [0.0, 2.5])
def test_pooling_equals_a_dictionary_reference_with_unknown_ids_and_fresh_items(recency):
    """A plain mean, and one weighted towards the newest (the linear model's): unknown ids
    take no position, fresh ones do."""
    rng = np.random.default_rng(0)
    item_ids = rng.choice(10**12, size=300, replace=False).astype(np.int64)
    vectors = rng.normal(size=(300, 8)).astype(np.float32)
    pooling = HistoryPooling(torch.from_numpy(item_ids), Fp32Vectors(torch.from_numpy(vectors)),
                             recency=recency)
    # fresh rows: one replaces item_ids[5], one is new, one is not live, one never used
    fresh_ids = np.array([item_ids[5], 77, 88, -1], dtype=np.int64)
    fresh_vectors = rng.normal(size=(4, 8)).astype(np.float32)
    live = np.array([True, True, False, False])
    histories = [list(item_ids[[1, 2, 3]]), [], [123456789, 987654321],
                 [int(item_ids[5]), 77, 88, int(item_ids[9]), int(item_ids[9])], None,
                 [123, int(item_ids[4]), 456, int(item_ids[7]), int(item_ids[8])]]
    history = batch_history([None if h is None else np.array(h, np.int64) for h in histories])
    for fresh in (False, True):
        args = (torch.from_numpy(fresh_ids), torch.from_numpy(fresh_vectors),
                torch.from_numpy(live)) if fresh else ()
        pooled = pooling(history, *args)
        scripted = torch.jit.script(pooling)(history, *args)
        for a, b in zip(pooled, scripted):
            assert torch.equal(a, b)
        extra = {int(i): v for i, v, ok in zip(fresh_ids, fresh_vectors, live) if ok} \
            if fresh else None
        for b, h in enumerate(histories):
            if h is None:
                assert int(pooled.count[b]) == -1
                continue
            want, n = reference_mean(h, item_ids, vectors, extra, recency)
            assert int(pooled.count[b]) == n, (b, fresh)
            np.testing.assert_allclose(pooled.vectors[b].numpy(), want, rtol=1e-5, atol=1e-6)


def _query(built, users, history):
    plans = batch_plans([parse_plan("", WORLD.catalog.schema)] * len(users))
    bits = built.modules["filter"](plans)
    ann = built.modules["ann"]
    pooled = None if history is None else ann.pooling(history)
    return ann(users, bits, torch.full((len(users),), 25), pooled)


def test_the_user_tower_reads_the_pooled_history_in_place_of_the_built_one(built):
    """The query vector with a request history equals the tower's encode of the user's row
    with the numpy mean of the history's item vectors (the scorer's, index order); without
    one, the built history; given but unknown, no history (zeros)."""
    tower = built.modules["ann"].users
    catalog, scorer = built.catalog, built.modules["scorer"]
    users = torch.from_numpy(WORLD.user_ids[:3].copy())
    hist = [np.array(catalog.item_ids[[3, 30, 300]]), None, np.array([5_000_000_000])]
    found = _query(built, users, batch_history(hist))
    rows = tower.id_map(users)
    mean = scorer.item_vectors(torch.tensor([3, 30, 300])).mean(0)
    want = [tower.encode(rows[:1], mean[None]), tower.encode(rows[1:2], tower.history[rows[1:2]]),
            tower.encode(rows[2:3], torch.zeros(1, mean.shape[0]))]
    for b in range(3):
        torch.testing.assert_close(found.user_embedding[b], want[b][0], rtol=1e-5, atol=1e-6)
    alone = _query(built, users[1:2], None)
    assert torch.equal(alone.rows[0], found.rows[1])


def test_unknown_ids_are_ignored(built):
    ids = built.catalog.item_ids
    users = torch.from_numpy(WORLD.user_ids[4:6].copy())
    known = np.array(ids[[11, 12, 13]])
    mixed = np.array([ids[11], 999_999_999_999, ids[12], 424242, ids[13]])
    a = _query(built, users, batch_history([known, known]))
    b = _query(built, users, batch_history([mixed, mixed]))
    torch.testing.assert_close(a.user_embedding, b.user_embedding)
    assert torch.equal(a.rows, b.rows)


def test_a_history_of_one_category_moves_results_toward_it(built):
    """Synthetic items sit around their category's centre: 20 items of one category as the
    history bring at least half of that category's items into the ANN's 100 candidates, for
    every user tried (far more than without the history)."""
    catalog = built.catalog
    category = catalog.features[0][:, 0]
    values, sizes = np.unique(category, return_counts=True)
    # the rarest with 20 items: the least likely by chance
    target = int(values[sizes >= 20][sizes[sizes >= 20].argmin()])
    members = np.flatnonzero(category == target)
    history = np.array(catalog.item_ids[members[:20]])
    users = torch.from_numpy(WORLD.user_ids[:8].copy())
    before = _query(built, users, None)
    after = _query(built, users, batch_history([history] * len(users)))
    for b in range(len(users)):
        hits = [int(np.sum(category[r.rows[b, : r.counts[b]].numpy()] == target))
                for r in (before, after)]
        # of the 100 candidates, at most len(members) can be of the category
        assert hits[1] > hits[0] and hits[1] >= 0.5 * len(members), (b, hits, len(members))


def test_pooling_refuses_a_negative_recency():
    with pytest.raises(ValueError, match="recency must be >= 0"):
        HistoryPooling(torch.arange(3), Fp32Vectors(torch.ones(3, 2)), recency=-1.0)


def test_the_scorer_attends_over_the_newest_counted_items():
    """A request may send MAX_HISTORY ids, all pooled; the scorer attends over the newest
    ATTENTION_HISTORY of those counted (unknown ids skipped), in their order; a request
    without `history` keeps its built history."""
    assert MAX_HISTORY > ATTENTION_HISTORY
    rows = torch.tensor([[-1, 4, -1, 7, 9, 2], [5, 6, -1, -1, -1, -1]])
    assert newest_counted(rows, 3).tolist() == [[4, 7, 9], [5, 6, -1]]
    assert newest_counted(rows, 10).tolist() == [[4, 7, 9, 2, -1, -1], [5, 6, -1, -1, -1, -1]]
    n = MAX_HISTORY
    ids = np.arange(n, dtype=np.int64)
    item_ids = torch.arange(0, n, 2)  # every other id is known
    vectors = torch.randn(len(item_ids), 4)
    pooled = HistoryPooling(item_ids, Fp32Vectors(vectors))(batch_history([ids, None]))
    assert int(pooled.count[0]) == n // 2 and int(pooled.count[1]) == -1
    torch.testing.assert_close(pooled.vectors[0], vectors.mean(0))  # all of them pooled
    built = torch.tensor([[11, 12, -1], [13, 14, 15]])
    got = history_rows(built, pooled)
    assert got.shape[1] == ATTENTION_HISTORY
    assert got[0].tolist() == list(range(ATTENTION_HISTORY))  # rows of ids 0, 2, 4, ...
    assert got[1, :3].tolist() == [13, 14, 15] and bool((got[1, 3:] == -1).all())
    assert history_rows(built, None) is built
    scripted = torch.jit.script(newest_counted)
    assert torch.equal(scripted(rows, 3), newest_counted(rows, 3))
    assert isinstance(pooled, PooledHistory)


def test_request_history_type_is_what_the_runner_builds():
    h = batch_history([None, np.array([3, 4], np.int64), np.array([], np.int64)])
    assert isinstance(h, RequestHistory)
    assert h.ids.tolist() == [[-1, -1], [3, 4], [-1, -1]]
    assert h.given.tolist() == [False, True, True]
    assert batch_history([None, None]) is None
