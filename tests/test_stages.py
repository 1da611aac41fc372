"""Stage modules: scriptable, scripted == eager, exact against references."""

import numpy as np
import pytest
import torch

from builder.build import BuildConfig, build_modules
from filtering.bits import pack_bits, popcount, unpack_bits
from filtering.expression import batch_plans, evaluate, parse, parse_plan
from stages.aggregator import ValueModel
from stages.filter import feature_matrix
from stages.user import UserTable
from world.synthetic import WorldConfig, generate_world

WORLD = generate_world(WorldConfig(seed=3, num_items=1500, num_users=300, num_creators=50,
                                   impressions_per_user=20))


@pytest.fixture(scope="module")
def built():
    return build_modules(WORLD, BuildConfig(world=WORLD.config))


@pytest.fixture(scope="module")
def modules(built):
    return built.modules


def test_bits_round_trip_with_ragged_tail():
    g = torch.Generator().manual_seed(0)
    for n in (1, 63, 64, 65, 1000):
        mask = torch.rand((3, n), generator=g) < 0.4
        words = pack_bits(mask)
        assert words.shape == (3, (n + 63) // 64)
        assert torch.equal(unpack_bits(words, n), mask)
        assert torch.equal(popcount(words), mask.sum(1))


def test_every_stage_scripts_and_matches_eager(modules):
    users = torch.from_numpy(WORLD.user_ids[:4].copy())
    users[3] = 987654321  # unknown user
    plans = batch_plans([parse_plan(t, WORLD.catalog.schema) for t in (
        "", "category:comedy OR tags:funny", "NOT language:en", "creator:3 AND NOT tags:live")])
    k = torch.tensor([5, 10, 1, 7])
    outs = {}
    for name, args in [("filter", lambda: (plans,)),
                       ("ann", lambda: (users, outs["filter"], k)),
                       ("scorer", lambda: (outs["ann"][3], outs["ann"][0])),
                       ("aggregator", lambda: (outs["ann"][0], outs["scorer"], outs["ann"][2], k,
                                               torch.tensor([[1.0, 2.0, 4.0]]).expand(4, 3)))]:
        eager = modules[name](*args())
        scripted = torch.jit.script(modules[name])(*args())
        for e, s in zip(eager if isinstance(eager, tuple) else (eager,),
                        scripted if isinstance(scripted, tuple) else (scripted,)):
            torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6)
        outs[name] = eager


def test_filter_stage_equals_python_evaluation(built):
    modules, catalog = built.modules, built.catalog  # rows in index order
    schema = catalog.schema
    items = [[[v for v in f[r] if v >= 0] for f in catalog.features]
             for r in range(catalog.num_items)]
    for text in ["category:comedy AND NOT language:en", "tags:funny OR creator:3",
                 "NOT (tags:funny OR tags:live)", ""]:
        node = parse(text, schema)
        bits = modules["filter"](batch_plans([parse_plan(text, schema)]))
        got = unpack_bits(bits, catalog.num_items)[0].numpy()
        want = np.array([evaluate(node, it) for it in items])
        assert np.array_equal(got, want), text


def test_ann_exact_filtered_search_and_fewer_than_k(built):
    modules, catalog = built.modules, built.catalog  # rows in index order
    schema = catalog.schema
    creator = int(np.bincount(catalog.features[2][:, 0]).argmin())  # rarest creator
    text = f"creator:{creator}"
    bits = modules["filter"](batch_plans([parse_plan(text, schema)]))
    users = torch.from_numpy(WORLD.user_ids[:1].copy())
    rows, scores, counts, q, _ = modules["ann"](users, bits, torch.tensor([50]))
    matches = np.flatnonzero(catalog.features[2][:, 0] == creator)
    assert int(counts[0]) == min(len(matches), 200)
    got = set(rows[0, : counts[0]].tolist())
    assert got == set(matches.tolist()) and -1 not in got
    # top-k against brute force over the passing rows; the int8 index scores within its
    # tolerance of fp32 (tests/test_ann_ivf_index.py: max error 0.008 |q| |x|, unit items)
    full = q[0] @ torch.from_numpy(catalog.embeddings).T
    want = torch.topk(full[torch.from_numpy(matches)], int(counts[0])).values
    torch.testing.assert_close(scores[0, : counts[0]], want, rtol=0,
                               atol=0.008 * float(q[0].norm()))


def test_ann_refine_rescores_int8_candidates_with_exact_vectors(built):
    """AnnConfig.refine: the int8 search returns 2x the candidates, their fp32 inner products
    pick the oversample * k: scores are exact, descending, and the candidates are closer to
    the exact top than without it (an independent brute-force reference)."""
    ann, catalog = built.modules["ann"], built.catalog
    assert ann.refine == 2
    users = torch.from_numpy(WORLD.user_ids[:64].copy())
    bits = built.modules["filter"](batch_plans([parse_plan("", catalog.schema)] * 64))
    k = torch.full((64,), 10)
    vectors = torch.from_numpy(catalog.embeddings)
    overlap = {}
    for refine in (1, 2):
        ann.refine = refine
        rows, scores, counts, q = ann(users, bits, k)[:4]
        assert torch.equal(counts, torch.full((64,), 40))
        exact_top = torch.topk(q @ vectors.T, 40, dim=1).indices
        overlap[refine] = np.mean([len(set(rows[b].tolist()) & set(exact_top[b].tolist())) / 40
                                   for b in range(64)])
        if refine == 2:
            want = (vectors[rows] * q.unsqueeze(1)).sum(-1)
            torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-6)
            assert torch.all(scores[:, :-1] >= scores[:, 1:])
    ann.refine = 2
    assert overlap[2] > overlap[1] and overlap[2] >= 0.99, overlap


def test_value_model_weights_change_the_order():
    model = ValueModel(torch.arange(100, 104), torch.tensor([1.0, 0.0, 0.0]))
    rows = torch.tensor([[0, 1, 2, 3]])
    tasks = torch.tensor([[[0.9, 0.1, 0.0], [0.5, 0.8, 0.0], [0.1, 0.1, 0.9], [0.2, 0.2, 0.2]]])
    counts, k = torch.tensor([4]), torch.tensor([3])
    ids, values, _, n = model(rows, tasks, counts, k, model.default_weights.unsqueeze(0))
    assert ids[0].tolist() == [100, 101, 103] and int(n[0]) == 3
    ids, values, _, _ = model(rows, tasks, counts, k, torch.tensor([[0.0, 0.0, 1.0]]))
    assert ids[0, 0].item() == 102
    ids, values, _, _ = model(rows, tasks, counts, k, torch.tensor([[0.0, 1.0, 0.0]]))
    assert ids[0, 0].item() == 101
    assert torch.all(values[0, :-1] >= values[0, 1:])


def test_user_table_unknown_ids_get_cold_start():
    table = UserTable(torch.tensor([30, 10, 20]), torch.eye(3), torch.full((3,), 0.5))
    out = table(torch.tensor([10, 20, 30, 99, -5]))
    assert torch.equal(out[:3], torch.eye(3)[[1, 2, 0]])
    assert torch.equal(out[3:], torch.full((2, 3), 0.5))


def test_feature_matrix_columns():
    matrix, start = feature_matrix(WORLD.catalog)
    assert start.tolist() == [0, 1, 2, 3, 3 + WORLD.config.max_tags_per_item]
    assert matrix.shape == (WORLD.catalog.num_items, int(start[-1]))


def _unified_inputs():
    users = torch.from_numpy(WORLD.user_ids[:4].copy())
    users[3] = 987654321  # unknown user
    plans = batch_plans([parse_plan(t, WORLD.catalog.schema) for t in (
        "", "category:comedy OR tags:funny", "NOT language:en", "creator:3 AND NOT tags:live")])
    return plans, users, torch.tensor([5, 10, 1, 7]), torch.tensor([[1.0, 2.0, 4.0]]).expand(4, 3)


def test_archived_models_answer_exactly_as_the_built_ones(built, tmp_path):
    """Every exported model saved with its large tensors as shared files (stages/archive.py)
    and loaded back (mapped) gives the same outputs, bit for bit; one file per tensor."""
    from builder.build import export_modules
    from stages import archive

    exported = export_modules(built)
    files = archive.TensorFiles(min_bytes=1024)
    for name, module in exported.items():
        (tmp_path / name).mkdir()
        files.save(module, tmp_path / name)
    loaded = {name: archive.load(tmp_path / name) for name in exported}
    inputs = _unified_inputs()
    for a, b in zip(exported["unified"](*inputs), loaded["unified"](*inputs)):
        assert torch.equal(a, b)
    plans, users, k, _ = inputs
    bits = loaded["filter"](plans)
    assert torch.equal(bits, exported["filter"](plans))
    for a, b in zip(exported["ann"](users, bits, k), loaded["ann"](users, bits, k)):
        assert torch.equal(a, b)
    # one inode per tensor: the index codes (ann, unified) and the fp32 item vectors "auto"
    # picks for this small catalog (ann's history pooling and refine, scorer; the same three
    # in unified)
    for name, links in (("codes", 2), ("item_vectors.vectors", 6)):
        paths = list(tmp_path.glob(f"*/*{name}.npy"))
        assert len(paths) == links and len({p.stat().st_ino for p in paths}) == 1, paths


def test_int8x2_item_vectors_share_the_codes_and_rescore_as_fp32(built):
    """With item_vectors "int8x2" (what "auto" picks past ~1M items) the tables read the
    index's own codes plus a residual code, and the re-scoring (AnnConfig.refine) runs with
    them: the candidates equal the fp32 re-scoring's up to near-ties, where int8 alone (no
    re-scoring) loses some."""
    from stages.ann import AnnConfig
    from stages.item_vectors import Int8ResidualVectors

    two = build_modules(WORLD, BuildConfig(world=WORLD.config,
                                           ann=AnnConfig(item_vectors="int8x2")))
    ann, scorer = two.modules["ann"], two.modules["scorer"]
    assert isinstance(scorer.item_vectors, Int8ResidualVectors)
    assert scorer.item_vectors.codes.data_ptr() == ann.search.codes.data_ptr()
    assert ann.item_vectors is scorer.item_vectors and ann.refine == 2
    assert ann.pooling.item_vectors is scorer.item_vectors
    plans, users, k, weights = _unified_inputs()
    bits = built.modules["filter"](plans)
    dense = built.modules["ann"]  # "auto" on the small world: fp32 vectors, refine 2
    assert dense.refine == 2
    got, want = ann(users, bits, k), dense(users, bits, k)
    same = sum(len(set(a.tolist()) & set(b.tolist()) - {-1})
               for a, b in zip(got.rows, want.rows))
    total = int((want.rows >= 0).sum())
    assert same >= 0.99 * total, (same, total)
    # the re-scored inner products are the fp32 ones to within the residual's rounding
    exact = torch.einsum("bd,bcd->bc", got.user_embedding,
                         dense.item_vectors(got.rows.clamp(min=0)))
    valid = got.rows >= 0
    torch.testing.assert_close(got.scores[valid], exact[valid], rtol=0, atol=2e-3)


def test_int8_item_vectors_are_the_index_codes_and_score_as_fp32_within_a_step(built):
    """With item_vectors "int8" (what "auto" picks past ~1M items) the scorer and the history
    pooling read the ANN index's own int8 tensors (the same storage); with the fp32 copy
    instead the candidates are the same and the task probabilities move by less than 0.01."""
    from stages.ann import AnnConfig
    from stages.item_vectors import Fp32Vectors, Int8Vectors

    assert isinstance(built.modules["scorer"].item_vectors, Fp32Vectors)  # "auto", small
    built = build_modules(WORLD, BuildConfig(world=WORLD.config,
                                             ann=AnnConfig(item_vectors="int8")))
    ann, scorer = built.modules["ann"], built.modules["scorer"]
    assert isinstance(scorer.item_vectors, Int8Vectors)
    assert scorer.item_vectors.codes.data_ptr() == ann.search.codes.data_ptr()
    assert ann.pooling.item_vectors.codes.data_ptr() == ann.search.codes.data_ptr()
    dense = build_modules(WORLD, BuildConfig(world=WORLD.config,
                                             ann=AnnConfig(item_vectors="fp32")))
    assert isinstance(dense.modules["scorer"].item_vectors, Fp32Vectors)
    plans, users, k, weights = _unified_inputs()
    bits = built.modules["filter"](plans)
    found = ann(users, bits, k)
    # fp32 vectors also re-score the int8 candidates (AnnConfig.refine), which may swap a few
    # near the cut; the scorers are compared on the same rows
    dense_found = dense.modules["ann"](users, bits, k)
    for a, b in zip(found.rows, dense_found.rows):
        a, b = set(a.tolist()) - {-1}, set(b.tolist()) - {-1}
        assert len(a & b) >= 0.9 * len(a)
    p8 = scorer(found.user_embedding, found.rows)
    p32 = dense.modules["scorer"](found.user_embedding, found.rows)
    valid = found.rows >= 0
    assert float((p8 - p32).abs()[valid].max()) < 0.01
