"""Fresh items inside the graph (stages/fresh.py): the main + fresh merge equals exact search
over (main rows still served) + (live fresh rows), scripted modules equal eager ones, and the
ensemble's stages chained in-process equal `unified` on the same fresh store."""

import numpy as np
import pytest
import torch

from builder.build import BuildConfig, build_modules, export_modules
from filtering.bits import unpack_bits
from filtering.expression import batch_plans, evaluate, join_values, parse, parse_plan
from fresh.store import FreshStore, create_store, header_for
from fresh.tables import FreshView
from stages.ann import AnnConfig
from stages.rows import fresh_row_offset, gather_rows
from world.synthetic import WorldConfig, generate_world

WORLD = generate_world(WorldConfig(seed=5, num_items=1000, num_users=200, num_creators=40,
                                   impressions_per_user=20))
SCHEMA = WORLD.catalog.schema
FILTERS = ["", "category:comedy OR tags:funny", "NOT language:en", "creator:777001",
           "creator:777001 OR creator:777002", "tags:live AND NOT creator:777002"]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # serving runs without autograd (trained towers hold Parameters)
        yield


@pytest.fixture(scope="module")
def built():
    return build_modules(WORLD, BuildConfig(world=WORLD.config, ann=AnnConfig(search="exact")))


@pytest.fixture(scope="module")
def exported(built):
    return export_modules(built)


def spell(catalog, row):
    """The features of main row `row` as an update spells them."""
    parts = []
    for spec, values in zip(SCHEMA.features, catalog.features):
        parts.append(f"{spec.name}=" + join_values([spec.spell(int(v)) for v in values[row]
                                                    if v >= 0]))
    return ",".join(parts)


@pytest.fixture(scope="module")
def store(built, tmp_path_factory):
    """Fresh items against the built index: new items (two creators no main item has),
    a replaced main item, a retired main item, a retired fresh item."""
    catalog = built.catalog
    directory = tmp_path_factory.mktemp("fresh")
    header = header_for(SCHEMA, catalog.embeddings.shape[1], 64,
                        [f.shape[1] for f in catalog.features])
    create_store(directory, header)
    writer = FreshStore(directory, writable=True)
    rng = np.random.default_rng(1)
    updates = []
    for i in range(12):
        emb = catalog.embeddings[rng.integers(catalog.num_items)] + 0.1 * rng.normal(size=64)
        creator = 777001 + i % 2
        tags = ["live"] if i % 3 == 0 else ["funny", "new"]
        updates.append(header.upsert(900_000_000_000 + i, emb,
                                     f"category=comedy,language=en,creator={creator},"
                                     f"tags={'|'.join(tags)}"))
    replaced, retired = int(catalog.item_ids[3]), int(catalog.item_ids[7])
    updates.append(header.upsert(replaced, catalog.embeddings[3],
                                 "category=drama,language=fr,creator=777002,tags=live"))
    updates.append(header.retire(retired))
    updates.append(header.retire(900_000_000_000 + 5))
    writer.write([[u] for u in updates])
    return directory


def reference_candidates(built, fresh_store, user_vec, text, wanted):
    """Exact top-`wanted` rows by inner product over main rows still served and live fresh
    rows that pass `text`, in the merged row space."""
    catalog = built.catalog
    node = parse(text, SCHEMA)
    hidden = set(fresh_store.hidden_ids().tolist())
    scores, rows = [], []
    for r in range(catalog.num_items):
        item = [[v for v in f[r] if v >= 0] for f in catalog.features]
        if int(catalog.item_ids[r]) not in hidden and evaluate(node, item):
            scores.append(float(catalog.embeddings[r] @ user_vec))
            rows.append(r)
    offset = fresh_row_offset(catalog.num_items)
    widths = np.cumsum([0] + fresh_store.header.widths)
    for r in np.flatnonzero(fresh_store.live):
        item = [[v for v in fresh_store.features[r, widths[f]:widths[f + 1]] if v >= 0]
                for f in range(len(widths) - 1)]
        if evaluate(node, item):
            scores.append(float(fresh_store.embeddings[r] @ user_vec))
            rows.append(offset + r)
    order = np.argsort(-np.array(scores), kind="stable")[:wanted]
    return np.array(rows)[order], np.array(scores)[order]


def test_gather_rows_addresses_main_and_fresh_tables():
    main = torch.arange(130) * 10
    fresh = torch.arange(5) + 1000
    offset = fresh_row_offset(130)
    assert offset == 192
    rows = torch.tensor([[0, 129, offset, offset + 4, -1]])
    assert gather_rows(main, fresh, rows).tolist() == [[0, 1290, 1000, 1004, 0]]
    assert gather_rows(main, None, rows[:, :2]).tolist() == [[0, 1290]]
    table = torch.randn(130, 3)
    fresh_table = torch.randn(5, 3)
    out = gather_rows(table, fresh_table, rows)
    assert torch.equal(out[0, 1], table[129]) and torch.equal(out[0, 3], fresh_table[4])


@pytest.mark.parametrize("text", FILTERS)
def test_filter_with_fresh_rows_is_exact(built, exported, store, text):
    view = FreshView(store, exported["filter"], SCHEMA)
    fresh = view.current()
    bits = exported["filter"](batch_plans([parse_plan(text, SCHEMA)]), fresh)
    n, offset = built.catalog.num_items, fresh_row_offset(built.catalog.num_items)
    passing = unpack_bits(bits, offset + 64)[0]
    hidden = set(view.store.hidden_ids().tolist())
    node = parse(text, SCHEMA)
    for r in range(n):
        item = [[v for v in f[r] if v >= 0] for f in built.catalog.features]
        want = evaluate(node, item) and int(built.catalog.item_ids[r]) not in hidden
        assert bool(passing[r]) == want, (text, r)
    assert not passing[n:offset].any()
    fresh_rows, _ = reference_candidates(built, view.store, np.zeros(64), text, 10**6)
    got = set((torch.nonzero(passing[offset:])[:, 0] + offset).tolist())
    assert got == {int(r) for r in fresh_rows if r >= offset}


@pytest.mark.parametrize("text", FILTERS)
def test_main_plus_fresh_merge_equals_exact_search(built, exported, store, text):
    view = FreshView(store, exported["filter"], SCHEMA)
    fresh = view.current()
    users = torch.from_numpy(WORLD.user_ids[:3].copy())
    k = torch.tensor([5, 10, 3])
    bits = exported["filter"](batch_plans([parse_plan(text, SCHEMA)] * 3), fresh)
    rows, scores, counts, q, _ = exported["ann"](users, bits, k, fresh=fresh)
    oversample = exported["ann"].oversample
    for b in range(3):
        want_rows, want_scores = reference_candidates(
            built, view.store, q[b].numpy(), text, int(k[b]) * oversample)
        assert int(counts[b]) == len(want_rows), text
        np.testing.assert_allclose(scores[b, : counts[b]].numpy(), want_scores, rtol=1e-5,
                                   atol=1e-5)
        # the same rows, except that rows tied with the last kept score may be swapped
        cut = want_scores[-1] if len(want_scores) else 0.0
        sure = {int(r) for r, sc in zip(want_rows, want_scores) if sc > cut + 1e-5}
        assert sure <= set(rows[b, : counts[b]].tolist()), text
        assert (rows[b, counts[b]:] == -1).all()


def test_no_fresh_argument_means_the_main_index_alone(built, exported):
    plans = batch_plans([parse_plan("NOT language:en", SCHEMA)])
    main_bits = built.modules["filter"](plans)
    assert torch.equal(exported["filter"](plans), main_bits)
    users, k = torch.from_numpy(WORLD.user_ids[:1].copy()), torch.tensor([7])
    for a, b in zip(exported["ann"](users, main_bits, k), built.modules["ann"](users, main_bits,
                                                                             k)):
        assert torch.equal(a, b)


def test_scripted_equals_eager_with_fresh(exported, store):
    fresh = FreshView(store, exported["unified"], SCHEMA).current()
    plans = batch_plans([parse_plan(t, SCHEMA) for t in FILTERS[:4]])
    users = torch.from_numpy(WORLD.user_ids[:4].copy())
    k = torch.tensor([4, 10, 1, 6])
    weights = torch.tensor([[1.0, 2.0, 4.0]]).expand(4, 3).contiguous()
    module = exported["unified"]
    eager = module(plans, users, k, weights, fresh=fresh)
    scripted = torch.jit.script(module)(plans, users, k, weights, fresh=fresh)
    for e, s in zip(eager, scripted):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6)
    assert bool((eager[0] >= 900_000_000_000).any()), "no fresh item in any result"


def test_ensemble_stages_equal_unified_with_fresh_and_retired_items_never_appear(
        built, exported, store):
    """The four stages, each with its own view of the store (as in four processes)."""
    views = {n: FreshView(store, exported[n], SCHEMA) for n in exported}
    fresh = {n: v.current() for n, v in views.items()}
    retired = {int(built.catalog.item_ids[7]), 900_000_000_000 + 5}
    replaced = int(built.catalog.item_ids[3])
    for text in FILTERS:
        plans = batch_plans([parse_plan(text, SCHEMA)] * 2)
        users = torch.from_numpy(WORLD.user_ids[10:12].copy())
        k = torch.tensor([10, 25])
        weights = torch.tensor([[1.0, 2.0, 4.0], [0.0, 1.0, 0.0]])
        bits = exported["filter"](plans, fresh["filter"])
        rows, _, counts, q, history = exported["ann"](users, bits, k, fresh=fresh["ann"])
        tasks = exported["scorer"](q, rows, history, fresh["scorer"])
        ens = exported["aggregator"](rows, tasks, counts, k, weights, fresh["aggregator"])
        uni = exported["unified"](plans, users, k, weights, fresh=fresh["unified"])
        for a, b in zip(ens, uni):
            assert torch.equal(a, b), text
        ids, _, _, n = uni
        for b in range(2):
            got = ids[b, : n[b]].tolist()
            assert not retired & set(got), text
            assert got.count(replaced) <= 1
    # the replaced item is found by its new features, from its fresh row only
    plans = batch_plans([parse_plan("language:fr AND creator:777002", SCHEMA)])
    ids, _, _, n = exported["unified"](plans, users[:1], torch.tensor([10]),
                                       torch.tensor([[1.0, 2.0, 4.0]]), fresh=fresh["unified"])
    assert ids[0, : n[0]].tolist() == [replaced]
