"""Fresh items end to end, against a real tritonserver: an item added through `item_updates`
is returned by the very next query of `retrieval` and `unified`, a replaced item is found by
its new features only, a retired one disappears, `retrieval` still equals `unified`, updates
survive a server restart, and bad updates get clear errors.

The server here serves the session's build with its own fresh store (ServerConfig.fresh_dir),
so the shared session server never sees these updates."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from client import Retriever, format_features
from client.catalog import load_items
from fresh.store import FRESH_DIR_ENV, FreshStore, create_store, fresh_dir_for
from tests.conftest import start_server
from tests.test_server import in_process

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]
NEW_ID = 990_000_000_001
UNIQUE_CREATOR, MOVED_CREATOR = 880_001, 880_002
FILTERS = ["", "category:comedy AND NOT language:en", f"creator:{UNIQUE_CREATOR}",
           f"creator:{UNIQUE_CREATOR} OR creator:{MOVED_CREATOR}", "NOT language:en"]


@pytest.fixture(scope="module")
def fresh_server(small_build, tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh_server")
    shared = FreshStore(fresh_dir_for(small_build.repository)).header
    create_store(root / "fresh", shared)
    state = {"root": root, "server": start_server(small_build.repository,
                                                  root / "tritonserver.log",
                                                  fresh_dir=root / "fresh")}
    yield state
    state["server"].stop()


@pytest.fixture(scope="module")
def catalog(small_build):
    items = load_items(small_build.config.items_csv)
    ids = list(items)
    vectors = np.load(small_build.config.items_csv.with_name("item_embeddings.npy"))
    return items, ids, vectors


def spelled(features: dict, **override) -> str:
    merged = dict(features, **{k: [str(v)] for k, v in override.items()})
    return format_features(merged)


def assert_same_results(a_ids, a_scores, b_ids, b_scores):
    """Equal scores, and equal ids up to the order of items whose scores tie (a fresh item
    with the vector of another ties with it). fp32 tolerance: the two models sum the same
    terms in batches of different composition (BLAS blocking differs), a few ulps apart."""
    np.testing.assert_allclose(a_scores, b_scores, rtol=1e-4, atol=1e-5)
    assert len(a_ids) == len(b_ids)
    start = 0
    for end in range(1, len(a_ids) + 1):
        if end == len(a_ids) or not np.isclose(a_scores[end], a_scores[start], rtol=1e-4,
                                               atol=1e-5):
            assert sorted(a_ids[start:end]) == sorted(b_ids[start:end])
            start = end


def both(server, user, text, k, protocol="http"):
    """The query on `retrieval` and on `unified`: the same answer."""
    url = server.config.http_url if protocol == "http" else server.config.grpc_url
    with Retriever(url, protocol, "retrieval") as ens, Retriever(url, protocol, "unified") as uni:
        a, b = ens.query(user, text, k), uni.query(user, text, k)
    assert_same_results(a.item_ids.tolist(), a.scores, b.item_ids.tolist(), b.scores)
    np.testing.assert_allclose(np.sort(a.task_scores, 0), np.sort(b.task_scores, 0),
                               rtol=1e-4, atol=1e-5)
    return a


def test_added_replaced_and_retired_items_show_at_once(fresh_server, small_build, catalog,
                                                       monkeypatch):
    server = fresh_server["server"]
    items, ids, vectors = catalog
    user = int(small_build.world.user_ids[3])
    top = both(server, user, "", 5)
    moved = int(top.item_ids[0])  # a main item that the user's queries find
    old_creator = items[moved]["creator"][0]
    gone = next(i for i in ids if i != moved and items[i]["creator"] != [old_creator])
    gone_creator = items[gone]["creator"][0]
    assert moved in both(server, user, f"creator:{old_creator}", 1000).item_ids
    assert gone in both(server, user, f"creator:{gone_creator}", 1000).item_ids
    assert len(both(server, user, f"creator:{UNIQUE_CREATOR}", 10).item_ids) == 0

    with Retriever(server.config.http_url) as r:
        rows = r.upsert_items(
            [NEW_ID, moved], vectors[[ids.index(moved)] * 2],
            [spelled(items[moved], creator=UNIQUE_CREATOR),
             spelled(items[moved], creator=MOVED_CREATOR)])
        assert rows.shape == (2,) and (rows >= 0).all() and rows[0] != rows[1]
        assert r.retire_items([gone]).tolist() == [-1]  # a main item has no fresh row

    for protocol in ("http", "grpc"):  # the very next queries see all three updates
        assert both(server, user, f"creator:{UNIQUE_CREATOR}", 10,
                    protocol).item_ids.tolist() == [NEW_ID]
        assert both(server, user, f"creator:{MOVED_CREATOR}", 10,
                    protocol).item_ids.tolist() == [moved]
        assert moved not in both(server, user, f"creator:{old_creator}", 1000,
                                 protocol).item_ids
        assert gone not in both(server, user, f"creator:{gone_creator}", 1000,
                                protocol).item_ids
    # every query, filtered or not, equals the four stages run in this process on the same
    # artifacts and the same fresh store (the main + fresh merge, scored and ranked)
    monkeypatch.setenv(FRESH_DIR_ENV, str(fresh_server["root"] / "fresh"))
    for text in FILTERS:
        got = both(server, user, text, 50)
        want = in_process(small_build.repository, user, text, 50)
        assert_same_results(got.item_ids.tolist(), got.scores, want[0].tolist(), want[1])
        assert gone not in got.item_ids and len(set(got.item_ids)) == len(got.item_ids)

    with Retriever(server.config.grpc_url, "grpc") as r:
        assert r.retire_items([NEW_ID]).tolist() == [rows[0]]
    assert len(both(server, user, f"creator:{UNIQUE_CREATOR}", 10).item_ids) == 0
    assert NEW_ID not in both(server, user, "", 10).item_ids


def test_updates_under_concurrent_queries_and_group_commit(fresh_server, small_build, catalog):
    server = fresh_server["server"]
    items, ids, vectors = catalog
    user = int(small_build.world.user_ids[4])
    new_ids = [NEW_ID + 100 + i for i in range(24)]

    def update(i):
        with Retriever(server.config.http_url) as r:
            return int(r.upsert_items([new_ids[i]], vectors[i: i + 1],
                                      [spelled(items[ids[i]], creator=UNIQUE_CREATOR + 7)])[0])

    def query(i):  # answers change while updates land: only require success
        with Retriever(server.config.grpc_url, "grpc", ("retrieval", "unified")[i % 2]) as r:
            return len(r.query(user, FILTERS[i % len(FILTERS)], 20).item_ids)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(update if i % 2 else query, i // 2) for i in range(48)]
        results = [f.result() for f in futures]
    rows = results[1::2]
    assert len(set(rows)) == len(rows) and min(rows) >= 0
    got = both(server, user, f"creator:{UNIQUE_CREATOR + 7}", 100).item_ids
    assert sorted(got.tolist()) == sorted(new_ids)


def test_bad_updates_get_clear_errors(fresh_server, small_build, catalog):
    server = fresh_server["server"]
    items, ids, vectors = catalog
    good = spelled(items[ids[0]], creator=1)
    cases = [([5], np.ones((1, 7)), [good], "expected 64 values"),
             ([5], np.full((1, 64), np.nan), [good], "finite"),
             ([5], vectors[:1], ["category=nope,language=en,creator=1"], "has no value nope"),
             ([5], vectors[:1], ["language=en,creator=1"], "'category' takes exactly one"),
             ([0], vectors[:1], [good], "positive"),
             ([5, 6], vectors[:2], [good, "colour=red"], "row 1: features: unknown feature")]
    with Retriever(server.config.http_url) as r:
        for item_ids, emb, features, words in cases:
            with pytest.raises(InferenceServerException) as e:
                r.upsert_items(item_ids, emb, features)
            assert words in str(e.value) and "[400]" in str(e.value), str(e.value)
    assert 5 not in FreshStore(fresh_server["root"] / "fresh").item_ids  # nothing written


def test_cli_update_and_retire(fresh_server, small_build, catalog):
    server = fresh_server["server"]
    items, ids, _ = catalog
    source = ids[10]
    cli = [sys.executable, "-m", "client", "update", "-u", server.config.http_url,
           "--items-csv", str(small_build.config.items_csv)]
    out = subprocess.run(cli + ["--item-id", str(NEW_ID + 500), "--embedding-from-item",
                                str(source), "--features",
                                spelled(items[source], creator=UNIQUE_CREATOR + 9)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "is in the fresh index" in out.stdout, out.stderr
    user = int(small_build.world.user_ids[5])
    assert both(server, user, f"creator:{UNIQUE_CREATOR + 9}", 5).item_ids.tolist() == [
        NEW_ID + 500]
    out = subprocess.run(cli + ["--item-id", str(NEW_ID + 500), "--retire"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "retired" in out.stdout, out.stderr
    assert len(both(server, user, f"creator:{UNIQUE_CREATOR + 9}", 5).item_ids) == 0
    out = subprocess.run(cli + ["--item-id", "7", "--embedding", "1,2,3", "--features",
                                "category=comedy,language=en,creator=1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "expected 64 values" in out.stderr


def test_updates_survive_a_server_restart(fresh_server, small_build, catalog):
    """Updates of its own (an upsert, a retire of a main item) plus whatever the store holds:
    after a restart every query answers exactly as before it."""
    server = fresh_server["server"]
    items, ids, vectors = catalog
    user = int(small_build.world.user_ids[6])
    kept, retired = NEW_ID + 900, ids[20]
    retired_creator = items[retired]["creator"][0]
    with Retriever(server.config.http_url) as r:
        r.upsert_items([kept], vectors[21:22],
                       [spelled(items[ids[21]], creator=UNIQUE_CREATOR + 11)])
        r.retire_items([retired])
    texts = FILTERS + [f"creator:{UNIQUE_CREATOR + 11}", f"creator:{retired_creator}"]
    before = {text: both(server, user, text, 50) for text in texts}
    assert before[texts[-2]].item_ids.tolist() == [kept]
    assert retired not in before[texts[-1]].item_ids
    fresh_server["server"].stop()
    server = start_server(small_build.repository, fresh_server["root"] / "restarted.log",
                          fresh_dir=fresh_server["root"] / "fresh")
    fresh_server["server"] = server
    for text in texts:
        after = both(server, user, text, 50)
        assert_same_results(after.item_ids.tolist(), after.scores,
                            before[text].item_ids.tolist(), before[text].scores)
