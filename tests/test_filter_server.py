"""The served filter through a real tritonserver: seeded random expressions (NOT included, both
syntaxes) sent concurrently so that they share dynamic batches, against items.csv: every
returned item satisfies its filter and a query gets min(k, matching items) results. Bad
expressions get errors naming the position and the problem; their batch-mates succeed."""

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from filter_reference import anchor_syntax, satisfies
from tritonclient.utils import InferenceServerException

from client import Retriever
from client.catalog import load_items
from filtering.expression import parse, to_string
from filtering.random_filters import random_expression

pytestmark = pytest.mark.server




@pytest.mark.parametrize("model, protocol", [("retrieval", "http"), ("unified", "grpc")])
def test_random_filters_are_served_exactly(server, small_build, model, protocol):
    items = load_items(small_build.config.items_csv)
    catalog = small_build.world.catalog
    schema = catalog.schema
    rng = random.Random(17 if model == "retrieval" else 18)
    nodes = [random_expression(rng, schema, catalog.features) for _ in range(40)]
    creators = np.bincount(catalog.features[2][:, 0])
    rare = int(np.argmin(np.where(creators > 0, creators, 10**9)))  # a Bloom term, and NOT
    nodes += [parse(f"creator:{rare}", schema), parse(f"NOT creator:{rare}", schema),
              parse(f"creator:{int(creators.argmax())} AND NOT language:en", schema)]
    texts = [anchor_syntax(n) if i % 3 == 2 else to_string(n, schema)
             for i, n in enumerate(nodes)]
    ks = [rng.choice([1, 7, 40, 300]) for _ in nodes]
    user = int(small_build.world.user_ids[3])
    url = server.config.http_url if protocol == "http" else server.config.grpc_url

    def ask(i):
        with Retriever(url, protocol, model=model) as r:
            return r.query(user, texts[i], ks[i]).item_ids.tolist()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(len(nodes))))
    for text, node, k, got in zip(texts, nodes, ks, results):
        matching = sum(satisfies(node, item, schema) for item in items.values())
        assert len(got) == min(k, matching), f"{text!r}: {len(got)} results, k={k}, " \
                                             f"{matching} items match"
        assert len(set(got)) == len(got), text
        for item_id in got:
            assert satisfies(node, items[item_id], schema), (text, item_id)


@pytest.mark.parametrize("bad, words", [
    ("category:comedy OR " * 220 + "category:drama", "position 4096: expression is"),
    ("(" * 65 + "category:comedy" + ")" * 65, "position 64: expression nested deeper than 64"),
    ("NOT " * 65 + "category:comedy", "nested deeper than 64 levels"),
    ("creator:abc", "position 8: feature 'creator' takes integer values, got abc"),
    ("category:comedy AND AND language:en", "position 20: expected a term"),
    ("genre:comedy", "position 0: unknown feature 'genre'"),
])
def test_bad_filters_get_errors_and_batch_mates_succeed(server, small_build, bad, words):
    user = int(small_build.world.user_ids[2])

    def good(_):
        with Retriever(server.config.grpc_url, "grpc", model="unified") as r:
            return len(r.query(user, "NOT language:en", 5).item_ids)

    def bad_request(_):
        with Retriever(server.config.http_url) as r:
            with pytest.raises(InferenceServerException) as e:
                r.query(user, bad, 5)
            return str(e.value)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(bad_request if i % 2 else good, i) for i in range(12)]
        results = [f.result() for f in futures]
    assert all(n == 5 for n in results[0::2])
    for message in results[1::2]:
        assert words in message and "[400]" in message, message
