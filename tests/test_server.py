"""End to end against a real tritonserver: the `retrieval` ensemble equals the same stages run
in-process, every result satisfies its filter according to items.csv, bad requests get clear
errors without hurting their batch-mates."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from filter_reference import satisfies
from tritonclient.utils import InferenceServerException

from client import Retriever
from client.catalog import load_items
from filtering.expression import parse
from serving.runners import RUNNERS

FILTERS = ["", "category:comedy AND NOT language:en", "(tags:funny OR tags:live) AND language:es",
           "NOT (category:drama OR category:music OR language:en)", "creator:5 OR creator:17",
           "tags:viral AND NOT tags:short AND NOT tags:long"]

pytestmark = pytest.mark.server


def in_process(repo, user_id, filter, k, weights=None, history=None):
    """The four stages run by their runners, in this process, on the same artifacts."""
    runners = {s: RUNNERS[s](repo / s / "1") for s in RUNNERS}
    kk = np.array([[k]], dtype=np.int32)
    bits = runners["filter"].run([{"filter": np.array([[filter.encode()]], object)}])[0]
    extra = {} if history is None else {"history": np.array(history, np.int64).reshape(1, -1)}
    ann = runners["ann"].run([{"user_id": np.array([[user_id]]), "k": kk, **bits, **extra}])[0]
    scored = runners["scorer"].run([ann])[0]
    req = {"candidate_rows": ann["candidate_rows"], "k": kk, **scored}
    if weights is not None:
        req["task_weights"] = np.array([weights], dtype=np.float32)
    out = runners["aggregator"].run([req])[0]
    return out["item_ids"][0], out["scores"][0], out["task_scores"][0]



@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ensemble_equals_in_process_stages(server, small_build, protocol):
    url = server.config.http_url if protocol == "http" else server.config.grpc_url
    users = [int(u) for u in small_build.world.user_ids[:3]] + [424242]  # + an unknown user
    with Retriever(url, protocol) as r:
        for i, f in enumerate(FILTERS):
            user, k = users[i % len(users)], [1, 10, 25][i % 3]
            weights = [0.0, 1.0, 3.0] if i % 2 else None
            got = r.query(user, f, k, weights)
            want = in_process(small_build.repository, user, f, k, weights)
            np.testing.assert_array_equal(got.item_ids, want[0])
            np.testing.assert_allclose(got.scores, want[1], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(got.task_scores, want[2], rtol=1e-6, atol=1e-7)
            assert len(got.item_ids) == k, f"{f!r}: {len(got.item_ids)} results for k={k}"
            assert np.all(np.diff(got.scores) <= 0), "scores not descending"


def test_results_satisfy_filter_per_items_csv(server, small_build):
    items = load_items(small_build.config.items_csv)
    schema = small_build.world.catalog.schema
    user = int(small_build.world.user_ids[5])
    with Retriever(server.config.http_url) as r:
        for f in FILTERS:
            node = parse(f, schema)
            matching = sum(satisfies(node, it, schema) for it in items.values())
            res = r.query(user, f, 50)
            assert len(res.item_ids) == min(50, matching), f
            assert len(set(res.item_ids.tolist())) == len(res.item_ids)
            for item_id in res.item_ids.tolist():
                assert satisfies(node, items[item_id], schema), (f, item_id)


def test_fewer_matches_than_k_gives_fewer_results_never_padding(server, small_build):
    creators = small_build.world.catalog.features[2][:, 0]
    rare = int(np.argmin(np.where(np.bincount(creators) > 0, np.bincount(creators), 10**9)))
    count = int((creators == rare).sum())
    with Retriever(server.config.grpc_url, "grpc") as r:
        res = r.query(int(small_build.world.user_ids[0]), f"creator:{rare}", 100)
        assert len(res.item_ids) == count < 100
        assert set(res.item_ids.tolist()) == set(
            small_build.world.catalog.item_ids[creators == rare].tolist())
        none = r.query(1, f"creator:{rare} AND NOT creator:{rare}", 10)
        assert len(none.item_ids) == 0 and none.task_scores.shape == (0, 3)


@pytest.mark.parametrize("filter, k, weights, words", [
    ("category:comedy AND (language:en", 10, None, "filter: filter error at position"),
    ("colour:red", 10, None, "unknown feature 'colour'"),
    ("", 0, None, "k: must be between 1 and 1000, got 0"),
    ("", 5000, None, "k: must be between 1 and 1000, got 5000"),
    ("", 10, [1.0, float("nan"), 1.0], "task_weights: must be finite"),
    ("", 10, [1.0, -2.0, 1.0], "task_weights: must be non-negative"),
])
def test_bad_requests_get_clear_errors_and_batch_mates_succeed(server, small_build, filter, k,
                                                               weights, words):
    user = int(small_build.world.user_ids[1])

    def good(_):
        with Retriever(server.config.http_url) as r:
            return len(r.query(user, "language:en", 10).item_ids)

    def bad(_):
        with Retriever(server.config.http_url) as r:
            with pytest.raises(InferenceServerException) as e:
                r.query(user, filter, k, weights)
            return str(e.value)

    with ThreadPoolExecutor(8) as pool:  # interleave so that bad and good share batches
        futures = [pool.submit(bad if i % 2 else good, i) for i in range(16)]
        results = [f.result() for f in futures]
    assert all(n == 10 for n in results[0::2])
    for message in results[1::2]:
        assert words in message and "[400]" in message, message


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unified_equals_ensemble(server, small_build, protocol):
    url = server.config.http_url if protocol == "http" else server.config.grpc_url
    users = [int(u) for u in small_build.world.user_ids[10:13]] + [31337]
    with Retriever(url, protocol, "retrieval") as ens, Retriever(url, protocol, "unified") as uni:
        for i, f in enumerate(FILTERS):
            weights = [2.0, 0.5, 1.0] if i % 2 else None
            args = (users[i % len(users)], f, [3, 20, 50][i % 3], weights)
            a, b = ens.query(*args), uni.query(*args)
            np.testing.assert_array_equal(a.item_ids, b.item_ids)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a.task_scores, b.task_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_request_history_served_equals_in_process_on_both_models(server, small_build, protocol):
    """`history` through Triton (ragged lengths in one batch, empty, unknown ids, none) gives
    what the stages give in-process, on `retrieval` and `unified` alike; and it changes the
    answer: a user's results with a history differ from theirs without it."""
    url = server.config.http_url if protocol == "http" else server.config.grpc_url
    ids = [int(i) for i in small_build.world.catalog.item_ids]
    user = int(small_build.world.user_ids[7])
    histories = [ids[:1], ids[100:150], [], [ids[9], 123_456_789_012, ids[19]], None]
    def ask(model, h):  # a client per call: tritonclient's HTTP client is not thread-safe
        with Retriever(url, protocol, model) as r:
            return r.query(user, FILTERS[1], 20, history=h)

    with ThreadPoolExecutor(8) as pool:  # concurrent: requests of different lengths meet
        got = {(m, i): pool.submit(ask, m, h) for m in ("retrieval", "unified")
               for i, h in enumerate(histories)}
        got = {key: f.result(timeout=120) for key, f in got.items()}
    for i, h in enumerate(histories):
        want = in_process(small_build.repository, user, FILTERS[1], 20, history=h)
        for model in ("retrieval", "unified"):
            np.testing.assert_array_equal(got[(model, i)].item_ids, want[0], err_msg=str(i))
            np.testing.assert_allclose(got[(model, i)].scores, want[1], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(got[("unified", 1)].item_ids, got[("unified", 4)].item_ids)
    for model in ("retrieval", "unified", "baseline"):  # what a client can ask before sending
        with Retriever(url, protocol, model) as r:
            assert ("history" in r.input_names()) == (model != "baseline"), model
            assert {"user_id", "filter", "k", "task_weights"} <= set(r.input_names())


def test_every_model_process_maps_the_one_file_of_the_index_vectors(server, small_build):
    """The index's int8 vectors are one file (hard links in each model's folder, one inode),
    and the `ann`, `scorer` and `unified` stub processes all map that inode: one copy in
    memory, not one per process (stages/archive.py)."""
    repo = small_build.repository
    links = [repo / "ann" / "1" / "ann.search.codes.npy",
             repo / "ann" / "1" / "ann.pooling.item_vectors.codes.npy",
             repo / "scorer" / "1" / "item_vectors.codes.npy",
             repo / "unified" / "1" / "ann.ann.search.codes.npy",
             repo / "unified" / "1" / "scorer.item_vectors.codes.npy"]
    (inode,) = {p.stat().st_ino for p in links}
    mapping = set()
    for stub in (s for group in server.stubs().values() for s in group):
        with open(f"/proc/{stub.pid}/maps") as fh:
            if any(len(f := line.split()) >= 6 and int(f[4]) == inode for line in fh):
                mapping.add(stub.model)
    assert {"ann", "scorer", "unified"} <= mapping, mapping
