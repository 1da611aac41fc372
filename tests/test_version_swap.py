"""Index rebuild and swap under load, against a real tritonserver in explicit model control:
the builder writes version 2 of the index next to version 1, `serving.swap` moves the server to
it while client threads query `retrieval` and `unified` without pause, and not one request
fails, and every answer is wholly version 1's or wholly version 2's: its items all belong to
one version's catalog and satisfy the request's filter there (a request that mixed stages of
two versions would get rows of one index filtered by the other's bitmap)."""

import shutil
import threading
import time

import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from builder.build import STAGES
from client import Retriever
from client.catalog import load_items
from filtering.expression import parse
from serving.swap import main as swap_main
from serving.swap import swap_index
from tests.conftest import SMALL_WORLD, start_server, two_versions
from tests.test_server import satisfies
from world.synthetic import make_schema

pytestmark = pytest.mark.server
KEY = "test-admin-key"
QUERIES = [(424242, "", 10), (424243, "language:en", 5), (424244, "NOT category:comedy", 20),
           (424245, "tags:live OR tags:funny", 3)]
MODELS = ("retrieval", "unified")


@pytest.fixture(scope="module")
def swap_setup(small_build, tmp_path_factory):
    """Version 1: the session's build, copied. Version 2: another catalog (another world
    seed), built with `version=2` in a staging copy and moved in once the server runs."""
    root = tmp_path_factory.mktemp("swap")
    versions = two_versions(small_build, root)
    repo = versions.repository
    server = start_server(repo, root / "tritonserver.log", model_control="explicit",
                          admin_key=KEY, load_models=list(MODELS))
    catalogs = (load_items(versions.items_csv_v1), load_items(versions.items_csv_v2))
    yield root, repo, catalogs, server
    server.stop()


def answer_version(ids, query, catalogs, schema):
    """1 or 2 when every item is in that version's catalog and satisfies the query's filter
    there and there are k of them; None otherwise."""
    _, text, k = query
    node = parse(text, schema)
    for version, items in enumerate(catalogs, 1):
        if len(ids) == k and all(i in items and satisfies(node, items[i], schema) for i in ids):
            return version
    return None


def answers(url):
    with Retriever(url, "http", "retrieval") as ens, Retriever(url, "http", "unified") as uni:
        return {(m, i): tuple(r.query(*q).item_ids.tolist())
                for m, r in (("retrieval", ens), ("unified", uni))
                for i, q in enumerate(QUERIES)}


def test_repository_api_needs_the_admin_key(swap_setup):
    _, _, _, server = swap_setup
    client = httpclient.InferenceServerClient(server.config.http_url)
    with pytest.raises(InferenceServerException):
        client.load_model("unified")
    with pytest.raises(InferenceServerException):
        client.load_model("unified", headers={"admin-key": "wrong"})
    assert client.get_model_repository_index(headers={"admin-key": KEY})


def test_version_swap_under_load_fails_no_request(swap_setup):
    root, repo, catalogs, server = swap_setup
    staging = root / "staging" / "model_repository"
    url = server.config.http_url
    before = answers(url)
    for name in STAGES:  # the rebuilt index lands next to the served one
        shutil.copytree(staging / name / "2", repo / name / "2")

    stop = threading.Event()
    seen, failures = [], []

    def loop(model, protocol):
        target = url if protocol == "http" else server.config.grpc_url
        with Retriever(target, protocol, model, timeout=60) as r:
            i = 0
            while not stop.is_set():
                q = i % len(QUERIES)
                try:
                    seen.append((model, protocol, q,
                                 tuple(r.query(*QUERIES[q]).item_ids.tolist()),
                                 time.monotonic()))
                except Exception as e:  # any failure at all fails the test
                    failures.append((model, q, repr(e)[:300]))
                i += 1

    threads = [threading.Thread(target=loop, args=(m, p)) for m in MODELS
               for p in ("http", "grpc")]
    for t in threads:
        t.start()
    time.sleep(2)
    t0 = time.monotonic()
    report = swap_index(server.config.grpc_url, 2, KEY, repo, log=lambda *_: None)
    t1 = time.monotonic()
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()

    after = answers(url)
    assert not failures, failures[:5]
    assert set(report.loaded) == set(STAGES) and report.pinned == {"retrieval": 2}
    for key, value in before.items():
        assert value != after[key], f"{key}: version 2 gives the same answer"
    during = [s for s in seen if t0 <= s[4] <= t1]
    assert len(during) >= 20, f"only {len(during)} requests during the swap"
    schema = make_schema(SMALL_WORLD)
    version_of = {}
    for model, _, q, ids, _ in seen:
        version_of[ids] = version_of.get(ids) or answer_version(ids, QUERIES[q], catalogs,
                                                                schema)
        assert version_of[ids], (model, QUERIES[q], ids, "mixes versions")
    for client in {(m, p) for m, p, *_ in seen}:  # each client thread: 1, 1, ..., 2, 2
        versions = [version_of[ids] == 2 for m, p, q, ids, _ in seen if (m, p) == client]
        assert not versions[0] and versions[-1], client
        assert all(versions[versions.index(True):]), f"{client} went back to version 1"
    # version 1 stays loaded next to 2 ("latest 2"), but versions only move forward
    cli = ["-u", server.config.grpc_url, "--admin-key", KEY, "--repository", str(repo)]
    assert swap_main(["--version", "1", *cli]) == 2
    assert swap_main(["--version", "3", *cli]) == 2
    assert answers(url) == after


def test_a_swap_to_a_broken_version_fails_and_serving_goes_on(swap_setup):
    """Version 3 with a corrupt scorer artifact: the swap stops with an error naming the
    failure, every ensemble file still names the served version, and every answer is the
    same as before (Triton keeps the versions it had when a load fails)."""
    root, repo, catalogs, server = swap_setup
    url = server.config.http_url
    before = answers(url)
    config = (repo / "retrieval" / "config.pbtxt").read_text()
    for name in STAGES:
        shutil.copytree(repo / name / "2", repo / name / "3")
    (repo / "scorer" / "3" / "model.pt").write_bytes(b"not a TorchScript archive")
    cli = ["-u", server.config.grpc_url, "--admin-key", KEY, "--repository", str(repo)]
    assert swap_main(["--version", "3", *cli]) == 2
    assert (repo / "retrieval" / "config.pbtxt").read_text() == config
    assert answers(url) == before
    with pytest.raises(Exception, match="scorer"):
        swap_index(server.config.grpc_url, 3, KEY, repo, log=lambda *_: None)
    assert answers(url) == before
