"""The baseline service chain (serving/baseline.py, builder/baseline.py): exact filter ->
FAISS ANN -> the same scorer and aggregator. Its pieces against brute force, then the
`baseline` ensemble on a real server: same contract, results satisfy the filter, never
padded, equal to the same runners in-process, and its recall against exact search."""

import numpy as np
import pytest
import torch
from test_server import FILTERS, satisfies
from tritonclient.utils import InferenceServerException

from client import Retriever
from client.catalog import load_items
from filtering.bits import pack_bits
from filtering.expression import batch_plans, parse, parse_plan, spell_value
from serving.baseline import exact_top, passing_rows
from serving.inprocess import InProcessChain, exact_reference
from stages.filter import ExactFeatureFilter, feature_matrix
from stages.posting_filter import PostingListFilter, build_postings


@pytest.mark.parametrize("num_items", [1, 63, 64, 65, 1000, 4099])
def test_passing_rows_reads_the_packed_bitmap(num_items):
    rng = np.random.default_rng(num_items)
    for density in (0.0, 0.01, 0.5, 1.0):
        mask = rng.random(num_items) < density
        bits = pack_bits(torch.from_numpy(mask)).numpy()
        np.testing.assert_array_equal(passing_rows(bits, num_items), np.flatnonzero(mask))


def test_exact_top_is_brute_force_order():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(997, 24)).astype(np.float32)
    query = rng.normal(size=24).astype(np.float32)
    rows = np.sort(rng.choice(997, size=301, replace=False))
    want = rows[np.argsort(-(vectors[rows] @ query), kind="stable")]
    for count in (1, 7, 300, 301, 500):
        np.testing.assert_array_equal(exact_top(vectors, rows, query, count), want[:count])
    assert len(exact_top(vectors, rows[:0], query, 5)) == 0


def _random_expression(rng, schema, catalog, depth=0):
    """A random expression over the catalog's features: present and absent values, NOT, AND,
    OR, nested."""
    if depth >= 3 or rng.random() < 0.35:
        f = int(rng.integers(len(schema.features)))
        spec = schema.features[f]
        present = catalog.features[f][catalog.features[f] >= 0]
        value = int(rng.choice(present)) if rng.random() < 0.85 else (
            10**9 if spec.kind == "int" else int(rng.integers(len(spec.vocabulary))))
        return f"{spec.name}:{spell_value(spec.spell(value))}"
    kind = rng.choice(["NOT", "AND", "OR"])
    if kind == "NOT":
        return f"NOT ({_random_expression(rng, schema, catalog, depth + 1)})"
    parts = [_random_expression(rng, schema, catalog, depth + 1)
             for _ in range(int(rng.integers(2, 4)))]
    return "(" + f" {kind} ".join(parts) + ")"


@pytest.mark.parametrize("num_items", [6000, 4097, 64, 1])
def test_posting_filter_equals_exact_feature_filter(small_build, num_items):
    """The baseline's inverted index gives exactly the reference scan's bitmaps, eager and
    scripted, including the tail word and NOT (bits past N stay 0)."""
    catalog = small_build.world.catalog.take(np.arange(num_items))
    schema = catalog.schema
    rng = np.random.default_rng(num_items)
    expressions = FILTERS + ["", "creator:123456789", "NOT creator:123456789"] + [
        _random_expression(rng, schema, catalog) for _ in range(60)]
    plans = batch_plans([parse_plan(e, schema) for e in expressions])
    matrix, column_start = feature_matrix(catalog)
    want = ExactFeatureFilter(matrix, column_start)(plans)
    postings = PostingListFilter(*build_postings(matrix.numpy(), column_start.numpy(),
                                                 num_items), num_items)
    np.testing.assert_array_equal(postings(plans).numpy(), want.numpy())
    np.testing.assert_array_equal(torch.jit.script(postings)(plans).numpy(), want.numpy())


def _ann_request(user, bits, k):
    return {"user_id": np.array([[user]]), "k": np.array([[k]], dtype=np.int32), **bits}


def test_faiss_candidates_pass_the_filter_and_match_exact_search(small_build):
    """In process: candidates are matching rows only, distinct, never -1, as many as the exact
    search finds (up to oversample x k), and mostly the same rows."""
    repo = small_build.repository
    chain, exact = InProcessChain(repo), exact_reference(repo)
    users = [int(u) for u in small_build.world.user_ids[:20]]
    overlap = []
    for f in FILTERS:
        bits = chain.filter.run([{"filter": np.array([[f.encode()]], object)}])[0]
        matching = set(passing_rows(bits["filter_bits"][0], chain.ann.num_items).tolist())
        for user in users:
            got = chain.ann.run([_ann_request(user, bits, 10)])[0]["candidate_rows"][0]
            want = exact.ann.run([_ann_request(user, bits, 10)])[0]["candidate_rows"][0]
            assert len(want) == min(chain.ann.oversample * 10, len(matching))
            assert len(got) == len(set(got.tolist())) == len(want), f
            assert set(got.tolist()) <= matching, f
            overlap.append(len(set(got.tolist()) & set(want.tolist())) / max(1, len(want)))
    assert np.mean(overlap) >= 0.9, f"candidate recall {np.mean(overlap):.3f}"


def test_exact_reference_ranks_as_unified_where_both_see_every_match(small_build):
    """Filters of fewer matches than the candidates (oversample x k): both the exact reference
    and `unified` hand the scorer every matching item, so the same scorer, attending over the
    same built history (baseline_ann's history_rows), must give the same answer."""
    from serving.runners import RUNNERS

    repo = small_build.repository
    exact = exact_reference(repo)
    unified = RUNNERS["unified"](repo / "unified" / "1")
    creators = np.bincount(small_build.world.catalog.features[2][:, 0])
    few = [c for c in np.flatnonzero((creators >= 2) & (creators <= 30))[:6]]
    assert few, "no creator with 2..30 items in the test catalog"
    users = [int(u) for u in small_build.world.user_ids[:8]]
    for creator in few:
        f = f"creator:{creator}"
        want = exact.run([(u, f, 10) for u in users])
        got = unified.run([{"user_id": np.array([[u]], np.int64),
                            "filter": np.array([[f.encode()]], object),
                            "k": np.array([[10]], np.int32)} for u in users])
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g["item_ids"][0], w["item_ids"])
            np.testing.assert_allclose(g["scores"][0], w["scores"], rtol=1e-5, atol=1e-6)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_baseline_equals_its_runners_in_process(server, small_build, protocol):
    url = server.config.http_url if protocol == "http" else server.config.grpc_url
    users = [int(u) for u in small_build.world.user_ids[20:23]] + [777]  # + an unknown user
    queries = [(users[i % len(users)], f, [1, 10, 25][i % 3]) for i, f in enumerate(FILTERS)]
    want = InProcessChain(small_build.repository).run(queries)
    # fp32 tolerance of the ensemble tests: the server forms other batches than this one
    # in-process batch, and batched matmuls round differently (seen: 2e-6 relative)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    with Retriever(url, protocol, "baseline") as r:
        for (user, f, k), w in zip(queries, want):
            got = r.query(user, f, k)
            np.testing.assert_array_equal(got.item_ids, w["item_ids"])
            np.testing.assert_allclose(got.scores, w["scores"], **tol)
            np.testing.assert_allclose(got.task_scores, w["task_scores"], **tol)


@pytest.mark.server
def test_baseline_results_satisfy_the_filter_and_are_never_padded(server, small_build):
    items = load_items(small_build.config.items_csv)
    schema = small_build.world.catalog.schema
    creators = small_build.world.catalog.features[2][:, 0]
    counts = np.bincount(creators)
    rare = int(np.argmin(np.where(counts > 0, counts, 10**9)))
    user = int(small_build.world.user_ids[6])
    with Retriever(server.config.http_url, model="baseline") as r:
        for f in FILTERS + [f"creator:{rare}", f"creator:{rare} AND NOT creator:{rare}"]:
            node = parse(f, schema)
            matching = sum(satisfies(node, it, schema) for it in items.values())
            res = r.query(user, f, 50)
            assert len(res.item_ids) == min(50, matching), f
            assert len(set(res.item_ids.tolist())) == len(res.item_ids)
            assert np.all(np.diff(res.scores) <= 0), f
            for item_id in res.item_ids.tolist():
                assert satisfies(node, items[item_id], schema), (f, item_id)
        with pytest.raises(InferenceServerException) as e:
            r.query(user, "category:comedy AND (language:en", 5)
        assert "[400]" in str(e.value) and "filter error at position" in str(e.value)


@pytest.mark.server
def test_baseline_recall_against_exact_search(server, small_build):
    """recall@10 = |served ∩ exact| / |exact| per query, exact = exact_reference."""
    users = [int(u) for u in small_build.world.user_ids[30:60]]
    queries = [(u, f, 10) for u in users for f in FILTERS]
    want = exact_reference(small_build.repository).run(queries)
    recalls = []
    with Retriever(server.config.grpc_url, "grpc", "baseline") as r:
        for (user, f, k), w in zip(queries, want):
            got = set(r.query(user, f, k).item_ids.tolist())
            if len(w["item_ids"]):
                recalls.append(len(got & set(w["item_ids"].tolist())) / len(w["item_ids"]))
    assert np.mean(recalls) >= 0.9, f"recall@10 {np.mean(recalls):.3f}"


def test_presized_lists_are_faiss_add_to_the_byte():
    import faiss

    from builder.baseline import BaselineConfig, _trained_ivf, add_presized

    # more than one of add()'s 65,536-row batches, lists of awkward sizes
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(70_001, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    config = BaselineConfig(nlist=37)
    want, got = _trained_ivf(vectors, config), _trained_ivf(vectors, config)
    want.add(vectors)
    add_presized(got, vectors)
    assert got.ntotal == want.ntotal == len(vectors)
    assert np.array_equal(faiss.serialize_index(got), faiss.serialize_index(want))
    with pytest.raises(ValueError, match="empty"):
        add_presized(got, vectors)
