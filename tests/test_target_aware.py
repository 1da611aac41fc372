"""The target-aware OverArch (stages/scorer.py, issue 17): each candidate attends over the
history items. Checked against a per-candidate loop written from the formulas (same weights),
for moving scores toward the history's cluster, for empty and unknown histories, scripted ==
eager, the built histories (stages/history.py BuiltHistory, training/over_arch.py
user_histories), and `unified` == the stage chain == a reference from the same weights. The
served `retrieval` and `unified` against the in-process runners are in test_server.py."""

import math

import numpy as np
import pytest
import torch

from builder.build import BuildConfig, build_modules
from filtering.bits import pack_bits
from filtering.expression import batch_plans, parse_plan
from stages.history import BuiltHistory, batch_history, history_rows
from stages.item_vectors import Fp32Vectors
from stages.scorer import OverArch, OverArchConfig, OverArchScorer
from training.over_arch import user_histories
from world.synthetic import WorldConfig, generate_world

# float32 module against a float64 loop: the tolerance of float32 arithmetic over ~100 terms
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5)}


def randomized(over_arch: OverArch, seed: int) -> OverArch:
    """Every parameter drawn afresh (the attention's outputs start at zero when trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in over_arch.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return over_arch.eval()


def scorer_of(num_items=37, dim=12, tasks=3, attention_dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(num_items, dim, generator=g)
    extra = torch.randn(num_items, 4, generator=g)
    arch = randomized(OverArch(dim, tasks, OverArchConfig(hidden_dim=16, trunk_dim=8,
                                                          head_dim=6,
                                                          attention_dim=attention_dim)), seed)
    return OverArchScorer(Fp32Vectors(vectors), extra, arch).eval(), vectors, extra


def reference_probabilities(scorer, vectors, extra, user, rows, history):
    """One (user, candidate) at a time, in float64, from the module's weights."""
    a = scorer.over_arch
    p = {n: t.detach().double() for n, t in a.named_parameters()}
    width = a.attention_dim
    out = torch.zeros(rows.shape + (p["dot_scale"].shape[0],), dtype=torch.float64)
    for b in range(rows.shape[0]):
        u = user[b].double()
        known = [vectors[r].double() for r in history[b].tolist() if r >= 0]
        for c in range(rows.shape[1]):
            v, e = vectors[max(int(rows[b, c]), 0)].double(), extra[max(int(rows[b, c]), 0)]
            h = p["user_layer.weight"] @ u + p["user_layer.bias"] \
                + p["item_layer.weight"] @ torch.cat([v, e.double()]) \
                + p["cross_layer.weight"] @ (u * v)
            features = torch.zeros(width + 2, dtype=torch.float64)
            if known:
                q = p["history_query.weight"] @ v
                kv = [p["history_key_value.weight"] @ x for x in known]
                sims = [float(q @ x[:width]) / math.sqrt(width) for x in kv]
                top = max(sims)
                weights = [math.exp(s - top) for s in sims]
                total = sum(weights)
                pooled = sum(w / total * x[width:] for w, x in zip(weights, kv))
                features = torch.cat([pooled, torch.tensor([top, sum(sims) / len(sims)],
                                                           dtype=torch.float64)])
            h = torch.relu(h + p["history_layer.weight"] @ features)
            h = torch.relu(p["trunk.weight"] @ h + p["trunk.bias"])
            for t in range(out.shape[2]):
                g = torch.relu(h @ p["head_hidden"][t] + p["head_hidden_bias"][t])
                logit = g @ p["head_out"][t] + p["head_out_bias"][t] \
                    + p["dot_scale"][t] * (u @ v) + p["history_scale"][t] @ features[-2:]
                out[b, c, t] = torch.sigmoid(logit)
    return out


def test_scorer_equals_a_per_candidate_reference_scripted_and_eager():
    scorer, vectors, extra = scorer_of()
    g = torch.Generator().manual_seed(1)
    user = torch.randn(4, 12, generator=g)
    rows = torch.tensor([[3, 0, 36, 7, 7, -1, -1], [1, 2, 3, 4, 5, 6, 8],
                         [9, -1, -1, -1, -1, -1, -1], [30, 31, 32, 33, 34, 35, 36]])
    # holes (an uncounted id), a duplicate, an empty history, one item
    history = torch.tensor([[5, -1, 9, 9, 20], [-1, -1, -1, -1, -1], [0, 1, 2, 3, 4],
                            [36, -1, -1, -1, -1]])
    want = reference_probabilities(scorer, vectors, extra, user, rows, history)
    got = scorer(user, rows, history)
    valid = rows >= 0
    torch.testing.assert_close(got[valid].double(), want[valid], **TOLERANCE[torch.float32])
    scripted = torch.jit.script(scorer)
    torch.testing.assert_close(scripted(user, rows, history), got, rtol=0, atol=0)
    torch.testing.assert_close(scripted(user, rows), scorer(user, rows), rtol=0, atol=0)


def test_empty_and_absent_history_score_alike_and_attention_off_ignores_history():
    scorer, _, _ = scorer_of()
    user, rows = torch.randn(2, 12), torch.tensor([[1, 2, 3], [4, 5, -1]])
    empty = torch.full((2, 3), -1)
    torch.testing.assert_close(scorer(user, rows, empty), scorer(user, rows), rtol=0, atol=0)
    off, _, _ = scorer_of(attention_dim=0)
    history = torch.tensor([[7, 8, 9], [10, -1, -1]])
    torch.testing.assert_close(off(user, rows, history), off(user, rows), rtol=0, atol=0)
    # a freshly made OverArch's attention outputs are zero: the history changes nothing yet
    fresh_arch = OverArch(12, 3, OverArchConfig(attention_dim=5)).eval()
    untrained = OverArchScorer(Fp32Vectors(torch.randn(37, 12)), torch.zeros(37, 4), fresh_arch)
    torch.testing.assert_close(untrained(user, rows, history), untrained(user, rows))


def test_a_history_of_one_cluster_moves_scores_toward_it():
    """Two clusters of items; an OverArch whose attention reads the candidate-history
    similarity (its largest value raises every task's logit): a history from cluster A ranks
    A's candidates above B's, a history from B the other way round."""
    dim, width = 8, 8
    g = torch.Generator().manual_seed(2)
    centres = torch.zeros(2, dim)
    centres[0, 0], centres[1, 1] = 3.0, 3.0
    vectors = torch.cat([centres[0] + 0.3 * torch.randn(20, dim, generator=g),
                         centres[1] + 0.3 * torch.randn(20, dim, generator=g)])
    arch = OverArch(dim, 2, OverArchConfig(attention_dim=width)).eval()
    with torch.no_grad():
        arch.history_query.weight.copy_(torch.eye(width, dim))
        arch.history_key_value.weight.copy_(torch.cat([torch.eye(width, dim),
                                                       torch.zeros(width, dim)]))
        arch.history_scale.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        arch.dot_scale.zero_()  # the user vector alone would not tell the clusters apart
    scorer = OverArchScorer(Fp32Vectors(vectors), torch.zeros(40, 4), arch)
    user = torch.randn(2, dim, generator=g)
    candidates = torch.arange(0, 40, 3).repeat(2, 1)  # both clusters, history items left out
    history = torch.tensor([[1, 4, 7, 10, 13], [21, 24, 27, 30, 33]])
    scores = scorer(user, candidates, history)[..., 0]
    in_a = candidates[0] < 20
    for b, near in ((0, in_a), (1, ~in_a)):
        assert scores[b][near].min() > scores[b][~near].max(), (b, scores[b])
    without = scorer(user, candidates)[..., 0]
    assert bool((scores[0][in_a] > without[0][in_a]).all())


def test_built_history_rows_and_request_history_precedence():
    built = BuiltHistory(torch.tensor([50, 7, 900]), torch.tensor([0, 3, 3, 5]),
                         torch.tensor([4, 1, 2, 8, 9]))
    rows = built(torch.tensor([7, 50, 12345, 900]))
    assert rows.tolist() == [[-1, -1, -1], [4, 1, 2], [-1, -1, -1], [8, 9, -1]]
    assert torch.equal(torch.jit.script(built)(torch.tensor([900, 50])), built(
        torch.tensor([900, 50])))
    empty = BuiltHistory.empty()
    assert empty(torch.tensor([1, 2])).tolist() == [[-1], [-1]]
    assert torch.jit.script(empty)(torch.tensor([3])).tolist() == [[-1]]


def test_user_histories_newest_first_distinct_and_capped():
    users = np.array([0, 0, 0, 0, 2, 2, 0], dtype=np.int64)
    items = np.array([5, 6, 5, 7, 1, 3, 8], dtype=np.int64)
    times = np.array([10, 30, 40, 20, 5, 6, 1], dtype=np.int64)
    h = user_histories(users, items, times, num_users=3, max_len=3)
    assert h.offsets.tolist() == [0, 3, 3, 5]
    assert h.items.tolist() == [5, 6, 7, 3, 1]  # user 0: 5 at 40, 6 at 30, 7 at 20 (8 cut)
    assert h.padded(torch.tensor([2, 1, 0])).tolist() == [[3, 1, -1], [-1, -1, -1], [5, 6, 7]]


WORLD = generate_world(WorldConfig(seed=3, num_items=1500, num_users=300, num_creators=50,
                                   impressions_per_user=20))


@pytest.fixture(scope="module")
def built():
    """The test world's stages with the scorer's weights randomized (its trained attention may
    be the untrained one where early stopping kept the dot-product fit)."""
    b = build_modules(WORLD, BuildConfig(world=WORLD.config))
    randomized(b.modules["scorer"].over_arch, seed=5)
    return b


def test_unified_equals_the_stage_chain_and_a_reference_from_the_same_weights(built):
    m = built.modules
    users = torch.from_numpy(WORLD.user_ids[:4].copy())
    users[3] = 4242  # unknown: no built history
    ids = built.catalog.item_ids
    requests = [None, np.array([], np.int64), ids[[3, 70, 500]].copy(),
                np.array([ids[9], 123456789], np.int64)]
    history = batch_history(requests)
    k = torch.full((4,), 10)
    weights = torch.tensor([[1.0, 2.0, 4.0]]).expand(4, -1)
    plans = batch_plans([parse_plan("", WORLD.catalog.schema)] * 4)
    got = m["unified"](plans, users, k, weights, history)
    bits = pack_bits(torch.ones((4, built.catalog.num_items), dtype=torch.bool))
    found = m["ann"](users, bits, k, m["ann"].pooling(history))
    # the attended rows: the built history for request 0, none for 1 and 3's unknown id
    assert int((found.history_rows[0] >= 0).sum()) > 0
    assert int((found.history_rows[1] >= 0).sum()) == 0
    assert int((found.history_rows[3] >= 0).sum()) == 1
    scorer = m["scorer"]
    vectors = scorer.item_vectors.vectors
    want_tasks = reference_probabilities(scorer, vectors, scorer.item_extra,
                                         found.user_embedding, found.rows, found.history_rows)
    for b in range(4):
        n = int(found.counts[b])
        value = (want_tasks[b, :n] * weights[b].double()).sum(1)
        order = torch.argsort(-value, stable=True)[:10]
        want_ids = torch.from_numpy(ids)[found.rows[b, :n][order]]
        top = got.item_ids[b, : int(got.counts[b])]
        # ids equal up to ties of the value within float32 rounding
        close = torch.isclose(value[order], got.scores[b, : len(top)].double(), rtol=1e-4)
        assert bool(close.all())
        assert torch.equal(top[close], want_ids[close]) or \
            set(top.tolist()) == set(want_ids.tolist()), b
    scripted = torch.jit.script(m["unified"])
    again = scripted(plans, users, k, weights, history)
    assert torch.equal(again.item_ids, got.item_ids)
    chain = m["scorer"](found.user_embedding, found.rows, found.history_rows)
    ranked = m["aggregator"](found.rows, chain, found.counts, k, weights)
    assert torch.equal(ranked.item_ids, got.item_ids)
    # the request history differs from the built one: request 2's answer moves
    alone = m["unified"](plans[2:3], users[2:3], k[2:3], weights[2:3])
    assert not torch.equal(alone.item_ids[0], got.item_ids[2])
    assert history_rows(found.history_rows, None) is found.history_rows


def test_chunked_logits_equal_one_batch():
    """The validation AUC and held-out metrics score their examples in chunks (all of
    MovieLens' at once held 9 GB): the same logits as one batch, chunk boundaries anywhere."""
    from stages.scorer import OverArchConfig
    from training.over_arch import OverArchModel, chunked_logits

    g = torch.Generator().manual_seed(5)
    model = OverArchModel(12, 40, 3, OverArchConfig()).eval()
    with torch.no_grad():  # attention layers start at zero: make them count
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    table = torch.randn(40, 12, generator=g)
    users = torch.randint(0, 6, (23,), generator=g)
    histories = user_histories(np.array([0, 0, 1, 2, 2, 2, 3, 5]), np.array([1, 2, 3, 4, 5, 6,
                               7, 8]), np.arange(8), num_users=6)
    user, rows = torch.randn(23, 12, generator=g), torch.randint(0, 40, (23,), generator=g)
    with torch.no_grad():
        want = model(user, table[rows], rows, histories.padded(users), table)
    for chunk in (1, 5, 23, 100):
        torch.testing.assert_close(chunked_logits(model, user, rows, users, histories, table,
                                                  chunk), want, rtol=1e-5, atol=1e-6)
