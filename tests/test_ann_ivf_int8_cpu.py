"""The compiled CPU path of `iam::ivf_int8_search` (kernels/csrc/ivf_int8_search.cpp) against a
per-(query, list) reference written for clarity and against `ivf_int8_search_torch`: scores bit
for bit, rows as sets within tied scores, -inf / -1 padding, num_passing exact; both builds
(AVX2 and portable), both ways of scoring rows (8-row blocks, single rows) and the switch."""

from pathlib import Path

import pytest
import torch

import kernels  # noqa: F401
from filtering.bits import pack_bits
from kernels import build_ext
from kernels import ivf_int8_search as op_module
from kernels.ivf_int8_search import ivf_int8_search_cpu, ivf_int8_search_torch

# the builds this CPU runs, slowest first
_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() \
    else set()
VARIANTS = ["portable"] + [v for v, needs in [("avx2", {"avx2"}), ("avxvnni", {"avx2", "avx_vnni"})]
                           if v in build_ext.VARIANTS and needs <= _FLAGS]


def _index(n, d, nlist, seed, list_size=None):
    """Random codes (-128 included) and scales; lists of random sizes, some empty, or of
    `list_size` rows (then most lists share filter words with a neighbour)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, d), dtype=torch.int8, generator=gen)
    scales = torch.rand(n, generator=gen) + 0.01
    if list_size is None:
        cuts = torch.sort(torch.randint(0, n + 1, (nlist - 1,), generator=gen)).values
        offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
    else:
        offsets = torch.clamp(torch.arange(nlist + 1) * list_size, max=n)
        offsets[-1] = n
    return codes, scales, offsets


def _case(b, n, d, nlist, p, pass_rate, seed, list_size=None):
    codes, scales, offsets = _index(n, d, nlist, seed, list_size)
    gen = torch.Generator().manual_seed(seed + 1)
    q_codes = torch.randint(-128, 128, (b, d), dtype=torch.int8, generator=gen)
    q_scales = torch.rand(b, generator=gen) + 0.01
    bits = pack_bits(torch.rand(b, n, generator=gen) < pass_rate)
    # few lists, many queries: most lists are probed by several queries
    probes = torch.stack([torch.randperm(nlist, generator=gen)[:p] for _ in range(b)])
    probes[0, p // 2:] = -1  # a query probing fewer lists
    if b > 2:
        probes[2, :] = -1  # and one probing none
    return q_codes, q_scales, bits, probes, offsets, codes, scales


def _reference(q_codes, q_scales, bits, probes, offsets, codes, scales):
    """Per query, per probed list, per row: the filter bit, the exact integer dot (int64), then
    the score in float32 as float(dot) * query scale * item scale. -> per query [(score, row)]
    and num_passing."""
    out, num_passing = [], []
    for b in range(q_codes.shape[0]):
        pairs = []
        for cluster in probes[b].tolist():
            if cluster < 0:
                continue
            for row in range(int(offsets[cluster]), int(offsets[cluster + 1])):
                if (int(bits[b, row // 64]) >> (row % 64)) & 1:
                    pairs.append(row)
        rows = torch.tensor(pairs, dtype=torch.int64)
        dots = codes[rows].long() @ q_codes[b].long()
        score = (dots.float() * q_scales[b]) * scales[rows]
        out.append(list(zip(score.tolist(), rows.tolist())))
        num_passing.append(len(pairs))
    return out, torch.tensor(num_passing)


def _assert_same_topk(scores, rows, num_passing, reference, ref_passing, k):
    assert torch.equal(num_passing, ref_passing)
    for b, pairs in enumerate(reference):
        pairs = sorted(pairs, key=lambda sr: -sr[0])
        kk = min(k, len(pairs))
        assert scores[b, :kk].tolist() == [s for s, _ in pairs[:kk]], f"query {b}"
        assert bool((scores[b, kk:] == float("-inf")).all()) and bool((rows[b, kk:] == -1).all())
        if kk == 0:
            continue
        # rows: the same set above the k-th score; at the k-th score, rows that have it
        kth = pairs[kk - 1][0]
        got = rows[b, :kk].tolist()
        assert len(set(got)) == kk
        assert {r for s, r in pairs if s > kth} == {r for s, r in zip(scores[b].tolist(), got)
                                                    if s > kth}
        tied = {r for s, r in pairs if s == kth}
        assert {r for s, r in zip(scores[b, :kk].tolist(), got) if s == kth} <= tied


def _check_all(args, k, **kw):
    reference, ref_passing = _reference(*args)
    scores, rows, num_passing = ivf_int8_search_cpu(*args, k, **kw)
    _assert_same_topk(scores, rows, num_passing, reference, ref_passing, k)
    return scores, rows, num_passing


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pass_rate", [0.0, 0.003, 0.5, 1.0])
@pytest.mark.parametrize("d", [20, 64, 100])
@pytest.mark.parametrize("pair_queries", [False, True])
def test_compiled_equals_reference(variant, pass_rate, d, pair_queries):
    """9 lists, 7 queries probing 4 each: most lists are probed by 2 or more queries (scored in
    pairs when pair_queries), some by one."""
    # N = 1499: the last rows are no whole group of 4 or 8 (scored row by row)
    args = _case(b=7, n=1_499, d=d, nlist=9, p=4, pass_rate=pass_rate, seed=d)
    for k in [1, 10, 400]:  # 400: more than most queries find
        _check_all(args, k, variant=variant, pair_queries=pair_queries)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lists_sharing_filter_words_and_empty_lists(variant):
    # 40-row lists: most words hold rows of two lists; the last lists are empty (n = 30 * 40)
    args = _case(b=6, n=1_200, d=24, nlist=40, p=12, pass_rate=0.6, seed=3, list_size=40)
    _check_all(args, 25, variant=variant)
    offsets = args[4]
    assert bool((offsets[-5:] == 1_200).all())  # empty lists exist


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("block_min_bits", [0, 1, 4, 5, 9])
def test_block_and_row_scoring_switch(variant, block_min_bits):
    """Every filter byte (8 rows) passes exactly 4 rows, so 4 is the boundary: block_min_bits 4
    scores every byte as a block of 8 rows, 5 row by row; 0 / 9: always / never blocks. The last
    byte of the index (rows N-8..N-1) and lists not aligned to bytes are included."""
    n, d, nlist = 64 * 12, 40, 12
    codes, scales, offsets = _index(n, d, nlist, seed=5, list_size=61)
    gen = torch.Generator().manual_seed(6)
    b = 9
    q_codes = torch.randint(-128, 128, (b, d), dtype=torch.int8, generator=gen)
    q_scales = torch.rand(b, generator=gen) + 0.01
    half = torch.zeros(b, n, dtype=torch.bool)
    for q in range(b):
        for byte in range(n // 8):
            half[q, byte * 8 + torch.randperm(8, generator=gen)[:4]] = True
    # every query probes the list holding the last rows, and 4 others
    probes = torch.stack([torch.cat([torch.tensor([nlist - 1]),
                                     torch.randperm(nlist - 1, generator=gen)[:4]])
                          for _ in range(b)])
    args = (q_codes, q_scales, pack_bits(half), probes, offsets, codes, scales)
    scores, _, _ = _check_all(args, 50, block_min_bits=block_min_bits, variant=variant,
                              pair_queries=False)
    assert torch.equal(scores, ivf_int8_search_torch(*args, 50)[0])


def test_compiled_equals_torch_path_with_ties():
    """Duplicated item rows make tied scores: scores equal, rows agree up to ties."""
    args = list(_case(b=5, n=2_000, d=64, nlist=20, p=8, pass_rate=0.4, seed=11))
    args[5][1::2] = args[5][0::2]  # every odd row is a copy of the even row before it
    args[6][1::2] = args[6][0::2]
    args = tuple(args)
    reference, ref_passing = _reference(*args)
    for impl in [ivf_int8_search_torch, ivf_int8_search_cpu]:
        _assert_same_topk(*impl(*args, 60), reference, ref_passing, 60)
    torch_scores, _, torch_passing = ivf_int8_search_torch(*args, 60)
    cpu_scores, _, cpu_passing = ivf_int8_search_cpu(*args, 60)
    assert torch.equal(torch_scores, cpu_scores) and torch.equal(torch_passing, cpu_passing)


def test_exact_mode_equals_torch_path():
    """Every list probed by every query (the planner's exact scan), 1 % and 100 % filters."""
    for pass_rate in [0.01, 1.0]:
        args = list(_case(b=4, n=3_000, d=48, nlist=16, p=16, pass_rate=pass_rate, seed=21))
        args[3] = torch.arange(16).repeat(4, 1)
        ref = ivf_int8_search_torch(*args, 100)
        got = ivf_int8_search_cpu(*args, 100)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[2], got[2])


def test_cpu_dispatch_serves_the_compiled_library(monkeypatch):
    """`make setup` builds the library; torch.ops.iam.ivf_int8_search on CPU tensors must run it
    (the fastest build this CPU runs), never the torch reference."""
    lib = build_ext.load()
    assert lib is not None, f"compiled CPU library missing: run `{build_ext.BUILD_COMMAND}`"
    assert lib.variant == VARIANTS[-1]

    def torch_path(*args):
        raise AssertionError("the CPU dispatch ran the torch path")

    monkeypatch.setattr(op_module, "ivf_int8_search_torch", torch_path)
    args = _case(b=3, n=500, d=16, nlist=4, p=2, pass_rate=0.5, seed=1)
    scores, rows, num_passing = torch.ops.iam.ivf_int8_search(*args, 5)
    assert scores.shape == (3, 5) and bool((num_passing > 0).any())


def test_bad_probes_and_offsets_raise():
    args = list(_case(b=2, n=300, d=8, nlist=3, p=2, pass_rate=0.5, seed=2))
    bad = list(args)
    bad[3] = torch.tensor([[0, 3], [1, -1]])
    with pytest.raises(ValueError, match="probe is outside"):
        torch.ops.iam.ivf_int8_search(*bad, 5)
    bad = list(args)
    bad[4] = torch.tensor([0, 200, 100, 300])
    with pytest.raises(ValueError, match="non-decreasing"):
        torch.ops.iam.ivf_int8_search(*bad, 5)
    bad = list(args)
    bad[0] = args[0].float()
    with pytest.raises(ValueError, match="query_codes must be"):
        torch.ops.iam.ivf_int8_search(*bad, 5)
    with pytest.raises(ValueError, match="k must be"):
        torch.ops.iam.ivf_int8_search(*args, 0)
