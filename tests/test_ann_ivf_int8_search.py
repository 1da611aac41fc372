"""`iam::ivf_int8_search` (torch path, Triton kernel under the interpreter) and the
`IVFInt8Search` module built on it: brute-force equality, recall, the selective-filter fallback."""

import os
import subprocess
import sys

import pytest
import torch

import kernels  # noqa: F401
from ann.evaluation import exact_filtered_topk, recall, sample_queries
from ann.ivf import IVFConfig, build_ivf_index, quantize_int8
from ann.search import IVFInt8Search, IVFSearchConfig
from filtering.bits import pack_bits, unpack_bits
from kernels import ivf_int8_search as op_module
from kernels._library import triton_available

# (batch, items, dim, lists, probes, k): N not a multiple of 64, D not a power of two, k larger
# than what some queries can find, a single list
SHAPES = [(3, 1_000, 24, 7, 3, 50), (5, 4_099, 64, 33, 8, 300), (2, 130, 16, 1, 1, 7)]


def _random_index(n: int, d: int, nlist: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, d), dtype=torch.int8, generator=gen)
    scales = torch.rand(n, generator=gen) + 0.01
    # random list boundaries, some lists empty
    cuts = torch.sort(torch.randint(0, n + 1, (nlist - 1,), generator=gen)).values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
    return codes, scales, offsets


def _inputs(b, n, d, nlist, p, seed, pass_rate=0.3):
    gen = torch.Generator().manual_seed(seed + 100)
    codes, scales, offsets = _random_index(n, d, nlist, seed)
    q_codes = torch.randint(-127, 128, (b, d), dtype=torch.int8, generator=gen)
    q_scales = torch.rand(b, generator=gen) + 0.01
    bits = pack_bits(torch.rand(b, n, generator=gen) < pass_rate)
    probes = torch.stack([torch.randperm(nlist, generator=gen)[:p] for _ in range(b)])
    if p > 1:
        probes[0, -1] = -1  # a query that probes fewer lists
    return q_codes, q_scales, bits, probes, offsets, codes, scales


def _brute_force(q_codes, q_scales, bits, probes, offsets, codes, scales, k):
    """Dense reference: every row scored, non-probed or filtered rows set to -inf."""
    n = codes.shape[0]
    scores = (q_codes.float() @ codes.float().T) * q_scales[:, None] * scales[None, :]
    list_of_row = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    probed = (list_of_row[None, None, :] == probes[:, :, None]).any(1)
    allowed = probed & unpack_bits(bits, n)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores, allowed.sum(1)


def _assert_topk_matches(scores, rows, dense, k):
    """Scores equal the reference top-k; every returned row has its reference score (rows of
    tied scores may differ)."""
    ref_top = torch.topk(dense, min(k, dense.shape[1]), dim=1).values
    kk = ref_top.shape[1]
    assert torch.equal(scores[:, :kk], ref_top)
    assert bool(torch.isinf(scores[:, kk:]).all())
    found = rows >= 0
    assert torch.equal(found, torch.isfinite(scores))
    got = dense.gather(1, rows.clamp(min=0))
    assert torch.equal(got[found], scores[found])
    # no row twice
    for r in rows.tolist():
        valid = [x for x in r if x >= 0]
        assert len(valid) == len(set(valid))


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_path_equals_brute_force_over_probed_lists(shape):
    b, n, d, nlist, p, k = shape
    args = _inputs(b, n, d, nlist, p, seed=n)
    scores, rows, num_passing = torch.ops.iam.ivf_int8_search(*args, k)
    dense, allowed = _brute_force(*args, k)
    assert scores.shape == (b, k) and rows.shape == (b, k)
    assert torch.equal(num_passing, allowed)
    _assert_topk_matches(scores, rows, dense, k)


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_mode_equals_brute_force(shape):
    b, n, d, nlist, _, k = shape
    q_codes, q_scales, bits, _, offsets, codes, scales = _inputs(b, n, d, nlist, 1, seed=n + 1)
    every_list = torch.arange(nlist).expand(b, nlist).contiguous()
    scores, rows, num_passing = torch.ops.iam.ivf_int8_search(
        q_codes, q_scales, bits, every_list, offsets, codes, scales, k)
    dense = (q_codes.float() @ codes.float().T) * q_scales[:, None] * scales[None, :]
    passing = unpack_bits(bits, n)
    dense = dense.masked_fill(~passing, float("-inf"))
    assert torch.equal(num_passing, passing.sum(1))
    _assert_topk_matches(scores, rows, dense, k)


def test_empty_filter_and_empty_probe_return_padding():
    q_codes, q_scales, bits, probes, offsets, codes, scales = _inputs(2, 500, 8, 5, 2, seed=3)
    bits[0] = 0
    probes[1] = -1
    scores, rows, num_passing = torch.ops.iam.ivf_int8_search(
        q_codes, q_scales, bits, probes, offsets, codes, scales, 10)
    assert num_passing.tolist() == [0, 0]
    assert bool((rows == -1).all()) and bool(torch.isinf(scores).all())


def test_wrapper_rejects_bad_inputs_with_messages():
    args = list(_inputs(2, 300, 8, 4, 2, seed=4))
    bad_dtype = list(args)
    bad_dtype[5] = args[5].float()
    with pytest.raises(ValueError, match="codes must be torch.int8"):
        op_module.ivf_int8_search_torch(*bad_dtype, 5)
    bad_words = list(args)
    bad_words[2] = args[2][:, :-1]
    with pytest.raises(ValueError, match="words"):
        op_module.ivf_int8_search_torch(*bad_words, 5)
    with pytest.raises(ValueError, match="k must be"):
        op_module.ivf_int8_search_torch(*args, 0)
    wide = list(_inputs(2, 300, op_module.MAX_DIM + 1, 4, 2, seed=5))
    with pytest.raises(ValueError, match="exact in fp32"):
        op_module.ivf_int8_search_torch(*wide, 5)


def _rerun_under_interpreter(test: str) -> None:
    """TRITON_INTERPRET must be set before triton is imported: runs `test` of this file in a
    child pytest that has it, and fails with the child's output unless it passed."""
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test}"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=300)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-4000:]
    assert "1 passed" in child.stdout


@pytest.mark.interpret
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_under_interpreter_equals_torch_path():
    """TRITON_INTERPRET must be set before triton is imported, so unless this process already
    runs under the interpreter the check re-runs itself in a child pytest that does."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        _rerun_under_interpreter("test_triton_kernel_under_interpreter_equals_torch_path")
        return
    for b, n, d, nlist, p, k in SHAPES:
        args = _inputs(b, n, d, nlist, p, seed=n + 2)
        t_scores, t_rows, t_num = op_module.ivf_int8_search_triton(*args, k)
        scores, rows, num = op_module.ivf_int8_search_torch(*args, k)
        assert torch.equal(t_num, num)
        assert torch.equal(t_scores, scores)
        dense, _ = _brute_force(*args, k)
        _assert_topk_matches(t_scores, t_rows, dense, k)


def _fused_cases():
    """(name, inputs, k, launch settings) for the fused scan + top-k kernel: per-query pass
    rates 0 / tiny / 0.5 / 1, a -1 probe, an empty list, lists longer than a tile and than K,
    k above some queries' passing rows, many tied scores, D = 20 and 64, the shared bound on
    and off."""
    cases = []
    # D = 20: lists of ~150 rows (~10 tiles of 16 rows, K = 16 for k = 10), one list empty
    q_codes, q_scales, _, probes, offsets, codes, scales = _inputs(4, 700, 20, 5, 3, seed=21)
    offsets[2] = offsets[1]  # list 1 is empty
    probes[1] = torch.tensor([1, 0, 2])
    gen = torch.Generator().manual_seed(22)
    rates = torch.tensor([0.0, 0.01, 0.5, 1.0])[:, None]
    bits = pack_bits(torch.rand(4, 700, generator=gen) < rates)
    args = (q_codes, q_scales, bits, probes, offsets, codes, scales)
    cases.append(("d20", args, 10, dict(block_rows=16, num_warps=4)))
    cases.append(("d20 split list-order dot", args, 10,
                  dict(block_rows=16, splits=3, list_order=True, use_dot=True,
                       share_bound=False)))
    # positive scores only: the shared per-query bound (published k-th best keys are positive)
    # lets later tiles skip their merges
    cases.append(("d20 positive shared bound", (args[0].abs(),) + args[1:5] + (
        args[5].abs(), args[6]), 10, dict(block_rows=16, share_bound=True)))
    # D = 64, 3 distinct code values and one scale: most scores tie; k = 40 (K = 64) exceeds
    # the passing rows of the tiny-rate query
    q_codes, q_scales, _, probes, offsets, codes, scales = _inputs(4, 600, 64, 3, 2, seed=23)
    codes = torch.randint(-1, 2, codes.shape, dtype=torch.int8, generator=gen)
    scales = torch.full_like(scales, 0.5)
    bits = pack_bits(torch.rand(4, 600, generator=gen) < rates)
    args = (q_codes, q_scales, bits, probes, offsets, codes, scales)
    cases.append(("d64 ties", args, 40, dict(block_rows=64, share_bound=True)))
    cases.append(("d64 ties split dot", args, 40,
                  dict(block_rows=128, splits=2, use_dot=True, share_bound=False)))
    return cases


@pytest.mark.interpret
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_fused_topk_kernel_under_interpreter_equals_torch_path():
    """The fused scan + top-k kernel over several launch settings (benchmarks/gpu_ann.py sweeps
    them on a GPU), then either selection of the k: scores and num_passing equal the torch
    path's, rows equal up to ties."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        _rerun_under_interpreter("test_fused_topk_kernel_under_interpreter_equals_torch_path")
        return
    for name, args, k, setting in _fused_cases():
        cand_scores, cand_rows, num = op_module._launch_ivf_int8_topk(*args, k, **setting)
        ref_scores, _, ref_num = op_module.ivf_int8_search_torch(*args, k)
        assert torch.equal(num, ref_num), name
        dense, _ = _brute_force(*args, k)
        for triton_merge in (True, False):  # the k of the candidates: merge kernel, torch.topk
            scores, rows = op_module._select_topk(cand_scores, cand_rows, k, triton_merge)
            assert torch.equal(scores, ref_scores), (name, triton_merge)
            _assert_topk_matches(scores, rows, dense, k)
            assert num.tolist()[0] == 0 and bool((rows[0] == -1).all()), name
            assert num.tolist()[1] < k and int((rows[1] >= 0).sum()) == num.tolist()[1], name


# ---- the search module ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def catalog():
    """The default synthetic world's catalog (200k items, 64 dims) indexed at the defaults."""
    from world.synthetic import WorldConfig, generate_world

    world = generate_world(WorldConfig(num_users=200))
    embeddings = torch.from_numpy(world.catalog.embeddings)
    index = build_ivf_index(embeddings)
    rows = index.permutation
    language = torch.from_numpy(world.catalog.features[1][:, 0])[rows]
    category = torch.from_numpy(world.catalog.features[0][:, 0])[rows]
    return index, embeddings[rows].contiguous(), language, category


def _filters(language, category, b, kind, seed):
    """bool [b, N]: no filter, one language (~10 %: pt or hi), or language AND category."""
    gen = torch.Generator().manual_seed(seed)
    n = language.shape[0]
    if kind == "all":
        return torch.ones(b, n, dtype=torch.bool)
    lang = torch.tensor([2, 3])[torch.randint(0, 2, (b,), generator=gen)]
    mask = language[None, :] == lang[:, None]
    if kind == "language_and_category":
        cat = torch.randint(0, 50, (b,), generator=gen)
        mask &= category[None, :] == cat[:, None]
    return mask


@pytest.mark.parametrize("kind", ["all", "language", "language_and_category"])
def test_recall_at_100_against_exact_filtered_search(catalog, kind):
    index, embeddings, language, category = catalog
    b, k = 48, 100
    queries = sample_queries(embeddings, b, seed=7)
    mask = _filters(language, category, b, kind, seed=8)
    bits = pack_bits(mask)
    search = IVFInt8Search(index)
    scores, rows = search(queries, bits, k)
    truth = exact_filtered_topk(queries, embeddings, bits, k)
    got = recall(rows, truth)
    print(f"{kind}: pass rate {mask.float().mean():.4f} recall@100 {got:.4f}")
    assert got >= 0.95
    # every returned row passes its filter, and k come back whenever k pass
    expected = torch.clamp(mask.sum(1), max=k)
    assert torch.equal((rows >= 0).sum(1), expected)
    found = rows >= 0
    assert bool(mask.gather(1, rows.clamp(min=0))[found].all())
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


def test_selective_filter_falls_back_to_an_exact_scan(catalog):
    """The filter passes k + 3 items, all in the lists farthest from the query: the probed
    lists hold none of them, so the module must rescan and still return k passing rows."""
    index, embeddings, _, _ = catalog
    k = 20
    queries = sample_queries(embeddings, 4, seed=9)
    n = embeddings.shape[0]
    search = IVFInt8Search(index, IVFSearchConfig(nprobe=2, min_candidates=0.0,
                                                  exact_fraction=2.0))
    far_lists = torch.topk(search.list_affinity(queries), 30, dim=1, largest=False).indices
    mask = torch.zeros(4, n, dtype=torch.bool)
    gen = torch.Generator().manual_seed(10)
    for i in range(4):
        far_rows = torch.cat([torch.arange(int(index.list_offsets[c]),
                                           int(index.list_offsets[c + 1]))
                              for c in far_lists[i].tolist()])
        mask[i, far_rows[torch.randperm(far_rows.numel(), generator=gen)[:k + 3]]] = True
    mask[3] = False
    mask[3, :5] = True  # fewer than k pass: all of them, then padding
    bits = pack_bits(mask)
    # `search` plans only a few lists and never an exact scan up front: the rescan must kick in
    q_codes, q_scales = quantize_int8(queries)
    probes = torch.topk(search.list_affinity(queries), 2, dim=1).indices
    _, _, in_probed = torch.ops.iam.ivf_int8_search(
        q_codes, q_scales, bits, probes, index.list_offsets, index.codes, index.scales, k)
    assert bool((in_probed[:3] < k).all())  # the probed lists alone would come up short
    scores, rows = search(queries, bits, k)
    assert (rows >= 0).sum(1).tolist() == [k, k, k, 5]
    assert bool(mask.gather(1, rows.clamp(min=0))[rows >= 0].all())
    truth = exact_filtered_topk(queries, embeddings, bits, k)
    assert recall(rows, truth) >= 0.95


def test_scripted_module_equals_eager(catalog):
    index, embeddings, language, category = catalog
    search = IVFInt8Search(index)
    scripted = torch.jit.script(search)
    queries = sample_queries(embeddings, 6, seed=11)
    bits = pack_bits(_filters(language, category, 6, "language", seed=12))
    for args in [(), (4, 1.0)]:
        eager = search(queries, bits, 30, *args)
        script = scripted(queries, bits, 30, *args)
        assert torch.equal(eager[0], script[0]) and torch.equal(eager[1], script[1])


def test_index_build_knobs_reach_the_module():
    x = torch.randn(2_000, 16)
    index = build_ivf_index(x, IVFConfig(nlist=10, kmeans_iters=3))
    search = IVFInt8Search(index, IVFSearchConfig(nprobe=3))
    assert search.centroids.shape == (10, 16) and search.nprobe == 3


def test_list_ranking_does_not_depend_on_the_items_length():
    """Probes are ranked by L2 from the query's direction at the items' mean norm: a catalog
    of the same vectors 4x as long (the synthetic world's latent vectors have norm ~4, a
    user's own two-tower vectors need not be unit length) probes the same lists and keeps
    its recall. Ranking from the unit query itself (norm_scale 1) favours short centroids
    there and loses recall."""
    gen = torch.Generator().manual_seed(21)
    centres = torch.randn(40, 16, generator=gen) * 3
    x = centres[torch.randint(0, 40, (6000,), generator=gen)] + torch.randn(6000, 16,
                                                                          generator=gen)
    queries = torch.nn.functional.normalize(torch.randn(32, 16, generator=gen), dim=1)
    bits = pack_bits(torch.ones(32, 6000, dtype=torch.bool))
    config = IVFConfig(nlist=60)
    got = {}
    for scale in (1.0, 4.0):
        index = build_ivf_index(x * scale, config)
        search = IVFInt8Search(index, IVFSearchConfig(nprobe=15, min_candidates=0.0))
        assert abs(search.norm_scale - float((x * scale).norm(dim=1).mean())) < 0.05 * scale
        probes = torch.topk(search.list_affinity(queries), 15, dim=1).indices
        truth = exact_filtered_topk(queries, (x * scale)[index.permutation], bits, 20)
        _, rows = search(queries, bits, 20)
        got[scale] = (probes, recall(rows, truth))
        if scale == 4.0:
            search.norm_scale = 1.0  # the unit query's ranking
            _, rows = search(queries, bits, 20)
            unit_query = recall(rows, truth)
    assert torch.equal(got[1.0][0], got[4.0][0])
    assert got[4.0][1] >= 0.9 and abs(got[4.0][1] - got[1.0][1]) < 1e-6, got
    assert unit_query < got[4.0][1] - 0.1, (unit_query, got[4.0][1])
