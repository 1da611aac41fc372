"""The served filter layer (Bloom index + iam::bloom_search + exact check) is exact: over random
catalogs, index settings and expressions (NOT included) it returns exactly the items that a
plain Python evaluation of the expression over items.csv returns."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from filter_reference import anchor_syntax, satisfies
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.build import write_items_csv
from client.catalog import load_items
from filtering.bits import popcount, unpack_bits
from filtering.bloom_index import (
    MODE_BLOOM,
    MODE_EXACT,
    BloomIndexConfig,
    bloom_positions,
    build_bloom_index,
)
from filtering.expression import (
    All,
    And,
    Not,
    Or,
    Term,
    batch_plans,
    evaluate,
    parse,
    parse_plan,
    spell_value,
    to_string,
)
from filtering.random_filters import random_expression
from kernels.bloom_search import bloom_search_torch
from stages.filter import (
    BloomFilterLayer,
    ExactFeatureFilter,
    FilterConfig,
    build_filter_stage,
    feature_matrix,
    lowest_bit_table,
    set_bits,
)
from world.schema import FeatureSpec, Schema
from world.synthetic import Catalog, WorldConfig, generate_world


def random_catalog(seed: int, num_items: int) -> Catalog:
    """1-3 features: string or integer values, single- or multi-valued (multi-valued items
    may have no value at all), small domains so that terms match often."""
    rng = np.random.default_rng(seed)
    specs, features = [], []
    for f in range(rng.integers(1, 4)):
        multi = bool(rng.random() < 0.5)
        width = int(rng.integers(2, 4)) if multi else 1
        if rng.random() < 0.5:
            domain = int(rng.integers(1, 9))
            specs.append(FeatureSpec(f"s{f}", "str", multi, [f"v{i}" for i in range(domain)]))
        else:
            domain = int(rng.integers(1, 40))
            specs.append(FeatureSpec(f"n{f}", "int", multi))
        values = rng.integers(0, domain, size=(num_items, width))
        if multi:  # distinct values per item, some slots empty
            values = np.sort(values, axis=1)
            values[:, 1:][values[:, 1:] == values[:, :-1]] = -1
            values[rng.random((num_items, width)) < 0.3] = -1
        features.append(values.astype(np.int64))
    return Catalog(np.arange(num_items, dtype=np.int64) * 7 + 3,
                   np.zeros((num_items, 1), np.float32), Schema(specs), features)


@st.composite
def expressions(draw, schema: Schema, depth: int = 3):
    """A syntax tree over `schema`; integer values range past the catalog's (absent values)."""
    if depth == 0 or draw(st.integers(0, 9)) < 4:
        f = draw(st.integers(0, len(schema.features) - 1))
        spec = schema.features[f]
        top = len(spec.vocabulary) - 1 if spec.kind == "str" else 45
        return Term(f, draw(st.integers(0, top)))
    kind = draw(st.sampled_from(["not", "and", "or"]))
    if kind == "not":
        return Not(draw(expressions(schema, depth - 1)))
    children = tuple(draw(st.lists(expressions(schema, depth - 1), min_size=2, max_size=3)))
    return And(children) if kind == "and" else Or(children)


CONFIGS = st.builds(
    BloomIndexConfig,
    exact_max_values=st.sampled_from([0, 3, 64]),
    exact_min_share=st.sampled_from([0.02, 0.3, 2.0]),
    num_hashes=st.integers(1, 4),
    width_multiplier=st.sampled_from([0.2, 1.0, 4.0]),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.data_too_large])
@given(seed=st.integers(0, 2**32 - 1), num_items=st.integers(1, 300), config=CONFIGS,
       data=st.data())
def test_served_filter_equals_python_evaluation_over_items_csv(tmp_path_factory, seed,
                                                               num_items, config, data):
    catalog = random_catalog(seed, num_items)
    schema = catalog.schema
    items_csv = Path(tmp_path_factory.mktemp("catalog")) / "items.csv"
    write_items_csv(catalog, items_csv)
    items = load_items(items_csv)
    nodes = data.draw(st.lists(expressions(schema), min_size=1, max_size=6))
    nodes.append(All())
    texts = [anchor_syntax(n) if i % 2 else to_string(n, schema) for i, n in enumerate(nodes)]
    layer = BloomFilterLayer(build_bloom_index(schema, catalog.features, config))
    bits = layer(batch_plans([parse_plan(t, schema) for t in texts]))
    assert bits.shape == (len(texts), (num_items + 63) // 64)
    served = unpack_bits(bits, num_items)
    for text, node, row in zip(texts, nodes, served):
        want = [satisfies(node, items[i], schema) for i in catalog.item_ids.tolist()]
        assert row.tolist() == want, text
    # nothing set past the last item
    assert int(popcount(bits).sum()) == int(served.sum())


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(seed=11, num_items=20_000, num_users=50,
                                      impressions_per_user=1))


def test_scripted_equals_eager_and_the_reference(world):
    catalog = world.catalog
    layer = build_filter_stage(catalog, FilterConfig())
    assert layer.modes == [MODE_EXACT, MODE_EXACT, MODE_BLOOM, MODE_EXACT]  # creator: Bloom
    rng = random.Random(5)
    texts = [to_string(random_expression(rng, catalog.schema, catalog.features), catalog.schema)
             for _ in range(24)] + ["", "NOT creator:3", "creator:123456789"]
    plans = batch_plans([parse_plan(t, catalog.schema) for t in texts])
    eager = layer(plans)
    scripted = torch.jit.script(layer)(plans)
    assert torch.equal(scripted, eager)
    assert torch.equal(eager, ExactFeatureFilter(*feature_matrix(catalog))(plans))


def test_exact_where_the_anchor_configuration_is_not(world):
    """The anchor's setting (every feature in one Bloom filter, K=3, width multiplier 5): the
    Bloom filter alone lets false positives through a rare term and would drop true matches
    of a term under NOT; the layer's answer has neither."""
    catalog = world.catalog
    config = BloomIndexConfig(exact_max_values=0, exact_min_share=2.0, num_hashes=3,
                              width_multiplier=5.0)
    layer = BloomFilterLayer(build_bloom_index(catalog.schema, catalog.features, config))
    creators = catalog.features[2][:, 0]
    rare = int(np.flatnonzero(np.bincount(creators) == 2)[0])
    texts = [f"creator:{rare}", f"NOT creator:{rare}", f"NOT (creator:{rare} OR language:en)"]
    plans = batch_plans([parse_plan(t, catalog.schema) for t in texts])
    definite, uncertain = bloom_search_torch(layer.resolve(plans), layer.words,
                                             layer.num_items)
    truth = ExactFeatureFilter(*feature_matrix(catalog))(plans)
    false_positives = popcount((definite | uncertain) & ~truth)
    assert int(false_positives[0]) > 0, "the Bloom filter alone should be inexact here"
    # a negated Bloom term never loses a true match: they are all definite or uncertain
    assert torch.equal((definite | uncertain) & truth, truth)
    assert torch.equal(definite & ~truth, torch.zeros_like(truth))
    assert torch.equal(layer(plans), truth)
    assert int(popcount(truth)[0]) == 2


def test_index_bytes_and_positions(world):
    catalog = world.catalog
    index = build_bloom_index(catalog.schema, catalog.features, BloomIndexConfig())
    sizes = index.bytes_per_item()
    words_per_item = index.words.shape[1] * 8 / catalog.num_items
    # 50 categories + 10 languages + 40 tags get bitmaps, plus the biggest creators
    assert index.num_exact_rows >= 100
    assert sizes["exact_bitmaps"] == pytest.approx(index.num_exact_rows * words_per_item)
    # creator: one value per item -> width = 1 * K * multiplier bits
    assert index.width == 30 and sizes["bloom"] == pytest.approx(30 * words_per_item)
    assert sizes["total"] == pytest.approx(sum(v for k, v in sizes.items() if k != "total"))
    positions = bloom_positions(torch.tensor([2, 2, 3]), torch.tensor([42, 43, 42]), 5, 30)
    assert positions.shape == (3, 5) and int(positions.min()) >= 0 and int(positions.max()) < 30
    assert not torch.equal(positions[0], positions[1]) and not torch.equal(positions[0],
                                                                           positions[2])
    scripted = torch.jit.script(bloom_positions)
    assert torch.equal(scripted(torch.tensor([2]), torch.tensor([42]), 5, 30), positions[:1])
    # every item of a Bloom-mode creator (one without its own bitmap) sets all the creator's
    # positions: checked for the first 200 such items
    exact = set(index.exact_values.tolist())
    creators = catalog.features[2][:, 0]
    bloom_items = [r for r in range(len(creators)) if int(creators[r]) not in exact][:200]
    assert len(bloom_items) == 200, "the test catalog should have Bloom-mode creators"
    for r in bloom_items:
        rows = bloom_positions(torch.tensor([2]), torch.tensor([int(creators[r])]), 5, 30)[0]
        word = index.words[index.num_exact_rows + rows, r // 64]
        assert bool(((word >> (r % 64)) & 1).all()), r


@pytest.mark.parametrize("plans, words, num_items, message", [
    (torch.zeros((1, 1, 3), dtype=torch.int32), torch.zeros((1, 1), dtype=torch.int64), 10,
     "plans must be int64"),
    (torch.tensor([[[1, 1, 0]]]), torch.zeros((1, 2), dtype=torch.int64), 10,
     "words has 2 columns, 10 items need 1"),
    (torch.tensor([[[2, 0, -1]]]), torch.zeros((1, 1), dtype=torch.int64), 10,
     "not a well-formed postfix"),
    (torch.tensor([[[1, 1, 0], [1, 1, 0]]]), torch.zeros((1, 1), dtype=torch.int64), 10,
     "not a well-formed postfix"),
    (torch.tensor([[[1, 1, 5]]]), torch.zeros((1, 1), dtype=torch.int64), 10,
     "term rows must be -1 or in 0..0"),
    (torch.tensor([[[1, 2, -1]]]), torch.zeros((1, 1), dtype=torch.int64), 10,
     "lists no rows"),
    (torch.tensor([[[9, 0, 0]]]), torch.zeros((1, 1), dtype=torch.int64), 10,
     "opcodes must be"),
])
def test_op_rejects_bad_arguments_with_clear_messages(plans, words, num_items, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        torch.ops.iam.bloom_search(plans, words, num_items)


def test_parse_once_evaluate_plans_with_padding_and_empty_batch():
    catalog = random_catalog(3, 130)
    layer = BloomFilterLayer(build_bloom_index(catalog.schema, catalog.features,
                                               BloomIndexConfig(exact_max_values=0)))
    schema = catalog.schema
    name = schema.features[0].name
    short, long = f"NOT {name}:{spell_value(schema.features[0].spell(0))}", ""
    node = parse(short, schema)
    plans = batch_plans([parse_plan(short, schema), parse_plan(long, schema)], length=9)
    bits = unpack_bits(layer(plans), catalog.num_items)
    items = [[[v for v in f[r] if v >= 0] for f in catalog.features]
             for r in range(catalog.num_items)]
    assert bits[0].tolist() == [evaluate(node, it) for it in items]
    assert bool(bits[1].all())
    assert layer(plans[:0]).shape == (0, 3)


def test_set_bits_finds_every_bit_including_bit_63():
    gen = torch.Generator().manual_seed(9)
    sparse = torch.randint(-(2**63), 2**63 - 1, (300,), generator=gen)
    sparse &= torch.randint(-(2**63), 2**63 - 1, (300,), generator=gen)
    for words in (torch.tensor([1, -(2**63), 2**62 + 5, 0, -1]), sparse,
                  torch.zeros(4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)):
        index, bit = set_bits(words, lowest_bit_table())
        got = sorted(zip(index.tolist(), bit.tolist()))
        want = sorted((i, j) for i, w in enumerate(words.tolist()) for j in range(64)
                      if ((w % 2**64) >> j) & 1)
        assert got == want


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_build_is_the_one_pass_index(seed):
    # 64-item steps (bits of one word never span two) against one step over every item, on a
    # world whose creators go to bitmaps and to the Bloom filter, and on random catalogs
    world = generate_world(WorldConfig(seed=seed, num_items=3_001, num_users=20,
                                       num_creators=700))
    config = BloomIndexConfig(exact_min_share=1 / 256)
    for catalog in (world.catalog, random_catalog(seed, 1_000)):
        whole = build_bloom_index(catalog.schema, catalog.features, config, chunk=1 << 20)
        steps = build_bloom_index(catalog.schema, catalog.features, config, chunk=64)
        assert steps.modes == whole.modes and steps.width == whole.width
        for name in ("words", "exact_values", "exact_start", "verify_values", "verify_start"):
            assert torch.equal(getattr(steps, name), getattr(whole, name)), name
    assert MODE_BLOOM in whole.modes or MODE_BLOOM in build_bloom_index(
        world.catalog.schema, world.catalog.features, config).modes
    with pytest.raises(ValueError, match="multiple of 64"):
        build_bloom_index(world.catalog.schema, world.catalog.features, config, chunk=100)
