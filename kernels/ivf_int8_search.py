"""`iam::ivf_int8_search`: filtered int8 scan of probed IVF lists, then per-query top-k.

    ivf_int8_search(query_codes int8 [B, D], query_scales f32 [B], filter_bits int64 [B, W],
                    probes int64 [B, P], list_offsets int64 [nlist + 1], codes int8 [N, D],
                    scales f32 [N], k) -> (scores f32 [B, k], rows int64 [B, k],
                                           num_passing int64 [B])

Query b scores every row of the lists `probes[b]` (-1 = no list) whose filter bit is set:
score = (query_codes[b] . codes[row]) * query_scales[b] * scales[row], the dot product being
an exact integer (|dot| <= D * 127 * 127 < 2^24 for D <= 1040, so fp32 holds it exactly and
the CPU and CUDA paths give the same scores). It returns the k best (scores sorted
descending; slots past the query's number of passing rows hold score -inf and row -1) and
`num_passing`, how many rows passed the filter in the probed lists, so that the caller can
probe more lists or fall back to an exact scan (`ann.search`). Probing every list is exact
filtered search. Rows are index rows (cluster-contiguous order, see `ann.ivf`).

CUDA path (k <= TOPK_K_MAX): one fused kernel scans each (query, probed list) in row tiles and
keeps only the list's K best rows (K = next power of two >= k), then a small merge kernel (or
torch.topk, TOPK_TRITON_MERGE) picks the k of the P * K candidates per query; larger k use the
older kernel that writes every probed row's score to a [B, P, max_list_len] buffer
(`ivf_int8_search_buffered`).

Filtered-out rows cost no embedding traffic on the CUDA path: the kernel masks the embedding
load with the filter bit. The CPU implementation is compiled C++ (kernels/csrc/
ivf_int8_search.cpp, built by `make setup` / `python kernels/build_ext.py`, one thread): the
batch's probes are grouped by list so each probed list is read once for all its queries, zero
filter bytes are skipped, the other rows are scored 8 at a time (int8 dots in AVX2 / AVX-VNNI)
and kept above a per-query top-k threshold. `ivf_int8_search_torch` (plain torch ops: filter
words -> passing rows, gather, GEMV, top-k) is the reference it is tested against.
"""

import sys
from typing import List, Optional, Tuple

import torch

from kernels import build_ext
from kernels._library import LIB, contiguous, require_triton_device, triton_available

if sys.byteorder != "little":  # the CPU path reads int64 filter words as bytes
    raise ImportError("kernels.ivf_int8_search assumes a little-endian host")

# ---- launch settings (the only place) --------------------------------------------------------
# Rows scored per program: 64 rows share one filter word when the list is word-aligned, and int8
# rows of 64 dims make a 4 KiB tile per program.
BLOCK_ROWS = 64
# 4 warps (128 threads) per 64-row tile: triton's default. Not swept yet: the H200 run of
# benchmarks/gpu_ann.py (docs/performance.md) timed this setting only, and found the kernel
# bound by per-row work (filter-bit tests, list walking), not by bandwidth.
NUM_WARPS = 4
# Fused scan + top-k kernel (`_ivf_int8_topk_kernel`), used when k <= TOPK_K_MAX. Settings:
# rows per tile (raised to K = next power of two >= k when smaller: a tile's best K are merged
# into the running best K), warps, the tensor-core dot, programs per (query, list) (the longest
# list is 2.6x the mean at 1M / nlist 1000: splitting it evens out the tail), list order
# (longest lists first, and queries probing the same list side by side, sharing its codes in
# L2) instead of query order, the shared bound, and the selection of the k.
# Chosen by benchmarks/gpu_ann.py's sweep on an H200 (2026-11-30, docs/performance.md; 1M x 64,
# batch 64, nprobe 48, k 100): the fastest op summed over pass rates 1 / 0.5 / 0.1 / 0.005 was
# 128 rows, 1 warp, no tensor-core dot, 2 splits, query order, shared bound, merge kernel
# (0.226 / 0.234 / 0.252 / 0.208 ms; the old score-buffer path 0.965 / 0.898 / 0.919 / 0.955).
# One warp beat 2 and 4 at every rate (the merges are bitonic networks over int64 keys in
# registers and shuffles); list order was slower at every setting (0.4-0.75 ms). Timings of one
# setting varied by up to 30 % between repeats in that run.
TOPK_BLOCK_ROWS = 128
TOPK_NUM_WARPS = 1
TOPK_NUM_STAGES = 2  # the loop's loads are masked gathers: triton does not pipeline them
TOPK_SPLITS = 2
TOPK_LIST_ORDER = False
TOPK_USE_DOT = False
# The programs of one query share the best k-th key any of them holds, so that tiles of far
# lists skip their merges (see the kernel).
TOPK_SHARE_BOUND = True
# The k of the P * K candidates per query: one small program per query merging the sorted
# chunks (True), or torch.topk + gather (False).
TOPK_TRITON_MERGE = True
TOPK_MERGE_NUM_WARPS = 1
# Largest K the fused kernel keeps per program: a bigger k takes the score-buffer path.
TOPK_K_MAX = 256
# CPU (kernels/csrc/ivf_int8_search.cpp): 8 consecutive rows (one filter byte) with at least this
# many passing rows are scored as one block of 8 dot products (rows filtered out are computed and
# dropped), a sparser byte row by row. 1 (every nonzero byte a block) was fastest at every pass
# rate on the 2-core AVX-VNNI machine, 64 queries x 1M items, random filters (ms per batch for
# 1 / 2 / 3 / 4): 48 lists at 50 % 8.1 / 8.5 / 9.0 / 10.7, at 25 % 10.9 / 12.4 / 14.4 / 16.7,
# at 10 % 10.9 / 11.1 / 11.1 / 11.2; all lists at 1 % 29.3 / 35.2 / 35.6 / 35.7, at 0.5 %
# 26.2 / 27.3 / 27.5 / 27.6: a block's 8 dots in one vector cost less than one dot's horizontal
# sum and branches. The row path stays for the index's last byte (no 8 rows to read there).
BLOCK_MIN_BITS = 1
# Two queries probing the same list are scored together, 4 rows at a time (each row loaded and
# offset once for both): 64 random queries x 40 random lists of 1M items, ms per batch without /
# with: 7.2 / 6.6 unfiltered, 8.4 / 7.1 at 40 %, 9.4 / 9.1 at 10 %; with 8 lists (fewer shared)
# 3.1 / 3.0, 3.3 / 3.1, 2.8 / 2.8.
PAIR_QUERIES = True
# Largest D whose int8 dot products stay exact integers in fp32 (D * 127^2 < 2^24), so that the
# CPU and CUDA paths give the same scores.
MAX_DIM = 1040


# ---- argument checks (both paths) ------------------------------------------------------------
def _check_ivf_int8_search(query_codes: torch.Tensor, query_scales: torch.Tensor,
                           filter_bits: torch.Tensor, probes: torch.Tensor,
                           list_offsets: torch.Tensor, codes: torch.Tensor,
                           scales: torch.Tensor, k: int) -> None:
    """Raise ValueError naming the problem."""
    expected = [
        ("query_codes", query_codes, torch.int8, 2), ("query_scales", query_scales,
                                                      torch.float32, 1),
        ("filter_bits", filter_bits, torch.int64, 2), ("probes", probes, torch.int64, 2),
        ("list_offsets", list_offsets, torch.int64, 1), ("codes", codes, torch.int8, 2),
        ("scales", scales, torch.float32, 1),
    ]
    for name, t, dtype, dim in expected:
        if t.dtype != dtype or t.dim() != dim:
            raise ValueError(f"ivf_int8_search: {name} must be {dtype} with {dim} dims, got "
                             f"{t.dtype} {tuple(t.shape)}")
        if t.device != codes.device:
            raise ValueError(f"ivf_int8_search: {name} is on {t.device}, codes on {codes.device}")
    b, d = query_codes.shape
    n = codes.shape[0]
    if codes.shape[1] != d:
        raise ValueError(f"ivf_int8_search: query dim {d} != item dim {codes.shape[1]}")
    if d > MAX_DIM:
        raise ValueError(f"ivf_int8_search: dim {d} > {MAX_DIM}, int8 dot products would no "
                         "longer be exact in fp32")
    if query_scales.shape[0] != b or filter_bits.shape[0] != b or probes.shape[0] != b:
        raise ValueError("ivf_int8_search: query_codes, query_scales, filter_bits and probes "
                         f"must share the batch size, got {b}, {query_scales.shape[0]}, "
                         f"{filter_bits.shape[0]}, {probes.shape[0]}")
    if filter_bits.shape[1] != (n + 63) // 64:
        raise ValueError(f"ivf_int8_search: filter_bits has {filter_bits.shape[1]} words, "
                         f"{n} items need {(n + 63) // 64}")
    if scales.shape[0] != n:
        raise ValueError(f"ivf_int8_search: {scales.shape[0]} scales for {n} items")
    if k < 1:
        raise ValueError(f"ivf_int8_search: k must be >= 1, got {k}")


# ---- Triton kernel and its launch (CUDA; CPU tensors under TRITON_INTERPRET=1) ---------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _ivf_int8_search_kernel(
        q_codes_ptr, q_scales_ptr, bits_ptr, probes_ptr, offsets_ptr, codes_ptr, scales_ptr,
        out_ptr, max_list_len,
        stride_qb, stride_bitsb, stride_probesb, stride_codesn, stride_outb, stride_outp,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ):
        # program (b, p, t) scores rows t*BLOCK_ROWS .. +BLOCK_ROWS of list probes[b, p] for
        # query b and writes them to out[b, p, t*BLOCK_ROWS ...] (-inf = not passing / no row)
        pid_b = tl.program_id(0)
        pid_p = tl.program_id(1)
        pid_t = tl.program_id(2)
        offs_local = pid_t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        out_mask = offs_local < max_list_len

        # which rows: list -> [start, end) from the offsets; -1 probes own no rows
        cluster = tl.load(probes_ptr + pid_b * stride_probesb + pid_p)
        c = tl.maximum(cluster, 0)
        start = tl.load(offsets_ptr + c)
        end = tl.where(cluster >= 0, tl.load(offsets_ptr + c + 1), start)
        rows = start + offs_local
        row_mask = (rows < end) & out_mask

        # filter first: one int64 word holds the bits of 64 consecutive rows
        words = tl.load(bits_ptr + pid_b * stride_bitsb + (rows >> 6), mask=row_mask, other=0)
        passing = row_mask & (((words >> (rows & 63)) & 1) != 0)

        # embeddings only for passing rows: a masked-off lane issues no load
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(codes_ptr + rows[:, None] * stride_codesn + offs_d[None, :],
                    mask=passing[:, None] & d_mask[None, :], other=0)
        q = tl.load(q_codes_ptr + pid_b * stride_qb + offs_d, mask=d_mask, other=0)
        dot = tl.sum(x.to(tl.int32) * q.to(tl.int32)[None, :], axis=1)

        # rescale (same order as the torch path: dot * query scale * item scale), masked store
        q_scale = tl.load(q_scales_ptr + pid_b)
        item_scale = tl.load(scales_ptr + rows, mask=passing, other=0.0)
        score = dot.to(tl.float32) * q_scale * item_scale
        score = tl.where(passing, score, float("-inf"))
        tl.store(out_ptr + pid_b * stride_outb + pid_p * stride_outp + offs_local, score,
                 mask=out_mask)

    @triton.jit
    def _sort_bitonic(x, LOG_N: tl.constexpr):
        """Sort x [2**LOG_N], a bitonic sequence (ascending then descending), ascending: the
        LOG_N half-cleaner stages of a bitonic merge, where tl.sort would run all
        LOG_N * (LOG_N + 1) / 2 stages of a full sort. x is viewed as a [2, 2, ..., 2] cube:
        dim i pairs the elements 2**(LOG_N - 1 - i) apart."""
        h = tl.reshape(x, [2] * LOG_N)
        for i in tl.static_range(LOG_N):
            partner = h ^ tl.xor_sum(h, i, True)  # a ^ (a ^ b) = b: the element paired with a
            is_upper = tl.reshape(tl.arange(0, 2), [1] * i + [2] + [1] * (LOG_N - 1 - i))
            # the lower element of each pair keeps the min, the upper one the max
            h = tl.where((h > partner) != (is_upper == 1), partner, h)
        return tl.reshape(h, [2 ** LOG_N])

    @triton.jit
    def _ivf_int8_topk_kernel(
        q_codes_ptr, q_scales_ptr, bits_ptr, probes_ptr, offsets_ptr, codes_ptr, scales_ptr,
        order_ptr, out_scores_ptr, out_rows_ptr, num_passing_ptr, bound_ptr, P, k,
        stride_qb, stride_bitsb, stride_codesn, stride_outb,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, K: tl.constexpr,
        LOG_K: tl.constexpr, SPLITS: tl.constexpr, LIST_ORDER: tl.constexpr,
        USE_DOT: tl.constexpr, SHARE_BOUND: tl.constexpr,
    ):
        # program (i, s): probe slot pair = i (or order[i] in list order) = b * P + p; it scans
        # tiles s, s + SPLITS, ... of list probes[b, p], keeps the K best (score, row) of the
        # passing rows, and writes them (ascending; -inf / -1 where fewer) to
        # out[b, (p * SPLITS + s) * K ...]. A second top-k over those P * SPLITS * K picks k.
        # SHARE_BOUND: the programs of query b share bound[b], the largest k-th best key any of
        # them holds (0 = none yet): at least k rows of the query beat it, so a tile whose rows
        # are all below it cannot add to the query's top k and skips the merge. A program's own
        # K best beat 13 % of a 1,000-row list; the query's k-th best, ~0.2 % of its 48 lists.
        pid = tl.program_id(0)
        split = tl.program_id(1)
        if LIST_ORDER:
            pair = tl.load(order_ptr + pid)
        else:
            pair = pid.to(tl.int64)
        b = pair // P
        p = pair % P

        # the list's rows [start, end); -1 probes own none
        cluster = tl.load(probes_ptr + pair)
        c = tl.maximum(cluster, 0)
        start = tl.load(offsets_ptr + c)
        end = tl.where(cluster >= 0, tl.load(offsets_ptr + c + 1), start)
        num_tiles = tl.cdiv(end - start, BLOCK_ROWS).to(tl.int32)  # same type as `split`

        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if USE_DOT:
            # the query in all 16 columns of an int8 [BLOCK_D, 16] operand: tensor cores
            # compute every row's dot 16 times (exact int32), CUDA cores widen nothing
            q = tl.load(q_codes_ptr + b * stride_qb + offs_d[:, None]
                        + tl.zeros((1, 16), tl.int32), mask=d_mask[:, None], other=0)
        else:
            q = tl.load(q_codes_ptr + b * stride_qb + offs_d, mask=d_mask, other=0).to(tl.int32)
        q_scale = tl.load(q_scales_ptr + b)
        offs_tile = tl.arange(0, BLOCK_ROWS)

        # running best K as int64 keys = order-preserving score bits << 32 | row: one integer
        # sort orders by score, then row. EMPTY (-2^63 + 1) sorts below every real key (the
        # lowest, of score -inf, is about -2^62.99).
        EMPTY: tl.constexpr = -0x7FFFFFFFFFFFFFFF
        best = tl.full((K,), EMPTY, tl.int64)  # ascending
        threshold = tl.min(best)  # key a row must beat to enter the best K
        count = tl.zeros((BLOCK_ROWS,), tl.int32)
        offs_k = tl.arange(0, K)
        for t in tl.range(split, num_tiles, SPLITS):
            if SHARE_BOUND:
                # issued first so that its latency overlaps the tile's loads; a stale value is
                # only a weaker bound
                shared = tl.load(bound_ptr + b, volatile=True)
            rows = start + t * BLOCK_ROWS + offs_tile
            row_mask = rows < end
            # filter first (one int64 word holds the bits of 64 consecutive rows), then the
            # embeddings of passing rows only: a masked-off lane issues no load
            words = tl.load(bits_ptr + b * stride_bitsb + (rows >> 6), mask=row_mask, other=0)
            passing = row_mask & (((words >> (rows & 63)) & 1) != 0)
            count += passing.to(tl.int32)
            x = tl.load(codes_ptr + rows[:, None] * stride_codesn + offs_d[None, :],
                        mask=passing[:, None] & d_mask[None, :], other=0)
            if USE_DOT:
                dot = tl.max(tl.dot(x, q), axis=1)
            else:
                dot = tl.sum(x.to(tl.int32) * q[None, :], axis=1)
            # rescale in the torch path's order: dot * query scale * item scale
            item_scale = tl.load(scales_ptr + rows, mask=passing, other=0.0)
            score = dot.to(tl.float32) * q_scale * item_scale
            # float -> int32 with the same order (negative floats: flip the magnitude bits)
            bits32 = score.to(tl.int32, bitcast=True)
            ordered = bits32 ^ ((bits32 >> 31) & 0x7FFFFFFF)
            keys = (ordered.to(tl.int64) << 32) | rows
            keys = tl.where(passing, keys, EMPTY)
            # merge only when some row beats the current K-th best (and the query's bound)
            beat = threshold
            if SHARE_BOUND:
                beat = tl.maximum(threshold, tl.where(shared > 0, shared, EMPTY))
            if tl.max(keys) > beat:
                # the tile's best K, descending (row 0 of the sorted tile is the largest K)
                tile_best = tl.max(tl.reshape(tl.sort(keys, descending=True),
                                              (BLOCK_ROWS // K, K)), axis=0)
                # ascending vs descending: the elementwise max holds the best K of both, as a
                # bitonic sequence that a bitonic merge sorts
                best = _sort_bitonic(tl.maximum(best, tile_best), LOG_K)
                threshold = tl.min(best)
                if SHARE_BOUND:
                    # this program's k-th best (ascending: position K - k); only positive keys
                    # are published, as 0 stands for "none"
                    kth = tl.sum(tl.where(offs_k == K - k, best, 0))
                    if kth > shared:
                        tl.atomic_max(bound_ptr + b, kth, sem="relaxed")

        tl.atomic_add(num_passing_ptr + b, tl.sum(count).to(tl.int64))
        # decode the keys: score bits back from the order-preserving int32, row from the low half
        ordered = (best >> 32).to(tl.int32)
        score = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        found = best != EMPTY
        score = tl.where(found, score, float("-inf"))
        row = tl.where(found, best - ((best >> 32) << 32), -1)
        offs_out = b * stride_outb + (p * SPLITS + split) * K + offs_k
        tl.store(out_scores_ptr + offs_out, score)
        tl.store(out_rows_ptr + offs_out, row)

    @triton.jit
    def _merge_candidates_kernel(
        cand_scores_ptr, cand_rows_ptr, out_scores_ptr, out_rows_ptr, num_chunks, k,
        stride_candb, stride_outb, K: tl.constexpr, LOG_K: tl.constexpr,
    ):
        # program b merges query b's candidates: num_chunks chunks of K, each one program's
        # best K of `_ivf_int8_topk_kernel`, already ascending by key. Read backwards a chunk is
        # descending, so one bitonic merge (LOG_K stages, no sort) takes it into the running
        # best K; the next chunk's loads are issued before the merge so that they overlap it.
        b = tl.program_id(0)
        EMPTY: tl.constexpr = -0x7FFFFFFFFFFFFFFF
        offs_k = tl.arange(0, K)
        backwards = K - 1 - offs_k
        scores_base = cand_scores_ptr + b * stride_candb
        rows_base = cand_rows_ptr + b * stride_candb
        score = tl.load(scores_base + backwards)
        row = tl.load(rows_base + backwards)
        best = tl.full((K,), EMPTY, tl.int64)  # ascending
        for j in tl.range(0, num_chunks):
            has_next = (offs_k * 0 + j + 1) < num_chunks
            next_score = tl.load(scores_base + (j + 1) * K + backwards, mask=has_next,
                                 other=float("-inf"))
            next_row = tl.load(rows_base + (j + 1) * K + backwards, mask=has_next, other=-1)
            # the same keys as the scan kernel's: order-preserving score bits << 32 | row
            bits32 = score.to(tl.int32, bitcast=True)
            ordered = bits32 ^ ((bits32 >> 31) & 0x7FFFFFFF)
            keys = tl.where(row >= 0, (ordered.to(tl.int64) << 32) | row, EMPTY)
            best = _sort_bitonic(tl.maximum(best, keys), LOG_K)
            score = next_score
            row = next_row
        # the k best, descending: slot j holds best[K - 1 - j]
        ordered = (best >> 32).to(tl.int32)
        score = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        found = best != EMPTY
        slot = K - 1 - offs_k
        out_mask = slot < k
        tl.store(out_scores_ptr + b * stride_outb + slot, tl.where(found, score, float("-inf")),
                 mask=out_mask)
        tl.store(out_rows_ptr + b * stride_outb + slot,
                 tl.where(found, best - ((best >> 32) << 32), -1), mask=out_mask)


def _launch_ivf_int8_search(query_codes: torch.Tensor, query_scales: torch.Tensor,
                            filter_bits: torch.Tensor, probes: torch.Tensor,
                            list_offsets: torch.Tensor, codes: torch.Tensor,
                            scales: torch.Tensor, max_list_len: int = 0) -> torch.Tensor:
    """The kernel alone: float32 [B, P, max_list_len], the score of the i-th row of list
    probes[b, p] at [b, p, i], -inf where the row is filtered out or does not exist.
    max_list_len = 0 reads it from list_offsets (a device-to-host sync)."""
    query_codes, query_scales, filter_bits, probes, list_offsets, codes, scales = contiguous(
        query_codes, query_scales, filter_bits, probes, list_offsets, codes, scales)
    b, d = query_codes.shape
    p = probes.shape[1]
    if max_list_len <= 0:
        sizes = list_offsets[1:] - list_offsets[:-1]
        max_list_len = max(int(sizes.max()), 1) if sizes.numel() > 0 else 1
    out = torch.empty((b, p, max_list_len), dtype=torch.float32, device=codes.device)
    if b > 0 and p > 0:
        grid = (b, p, triton.cdiv(max_list_len, BLOCK_ROWS))
        _ivf_int8_search_kernel[grid](
            query_codes, query_scales, filter_bits, probes, list_offsets, codes, scales, out,
            max_list_len,
            query_codes.stride(0), filter_bits.stride(0), probes.stride(0), codes.stride(0),
            out.stride(0), out.stride(1),
            D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_ROWS=BLOCK_ROWS, num_warps=NUM_WARPS,
        )
    return out


def topk_block_k(k: int) -> int:
    """K, the number of candidates the fused kernel keeps per program: the next power of two
    >= k (tl.sort sorts powers of two), at least 16."""
    return max(16, 1 << max(k - 1, 0).bit_length())


def _launch_ivf_int8_topk(query_codes: torch.Tensor, query_scales: torch.Tensor,
                          filter_bits: torch.Tensor, probes: torch.Tensor,
                          list_offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                          k: int, block_rows: int = 0, num_warps: int = 0, num_stages: int = 0,
                          splits: int = 0, list_order: Optional[bool] = None,
                          use_dot: Optional[bool] = None, share_bound: Optional[bool] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernel alone: (scores f32 [B, P * splits * K], rows int64 [same], num_passing
    int64 [B]), each program's K best of its share of a probed list (-inf / -1 where fewer),
    K = topk_block_k(k) <= TOPK_K_MAX. Launch settings default to the TOPK_* constants (0 /
    None = default); benchmarks/gpu_ann.py sweeps them. No device-to-host sync."""
    query_codes, query_scales, filter_bits, probes, list_offsets, codes, scales = contiguous(
        query_codes, query_scales, filter_bits, probes, list_offsets, codes, scales)
    b, d = query_codes.shape
    p = probes.shape[1]
    kb = topk_block_k(k)
    if kb > TOPK_K_MAX:
        raise ValueError(f"ivf_int8_search: k {k} > TOPK_K_MAX {TOPK_K_MAX} for the fused kernel")
    block_rows = max(block_rows or TOPK_BLOCK_ROWS, kb)  # powers of two: a multiple of K
    splits = splits or TOPK_SPLITS
    list_order = TOPK_LIST_ORDER if list_order is None else list_order
    use_dot = TOPK_USE_DOT if use_dot is None else use_dot
    share_bound = TOPK_SHARE_BOUND if share_bound is None else share_bound
    # int8 tl.dot needs a reduction dim of at least 32
    block_d = max(triton.next_power_of_2(d), 32 if use_dot else 1)
    scores = torch.empty((b, p * splits * kb), dtype=torch.float32, device=codes.device)
    rows = torch.empty((b, p * splits * kb), dtype=torch.int64, device=codes.device)
    # num_passing and the shared bounds, zeroed by one launch
    state = torch.zeros((2, b), dtype=torch.int64, device=codes.device)
    if b > 0 and p > 0:
        # list order: program i takes the i-th (query, probe) pair sorted by list length, then
        # list, descending: the longest lists start first (a shorter tail), and the queries
        # that probe one list run together and read its codes from L2
        order = probes
        if list_order:
            nlist = list_offsets.shape[0] - 1
            cluster = probes.view(-1).clamp(min=0)
            length = (list_offsets[1:] - list_offsets[:-1]).index_select(0, cluster)
            key = torch.where(probes.view(-1) >= 0, length * (nlist + 1) + cluster, -1)
            order = torch.argsort(key, descending=True)
        _ivf_int8_topk_kernel[(b * p, splits)](
            query_codes, query_scales, filter_bits, probes, list_offsets, codes, scales, order,
            scores, rows, state[0], state[1], p, k,
            query_codes.stride(0), filter_bits.stride(0), codes.stride(0), scores.stride(0),
            D=d, BLOCK_D=block_d, BLOCK_ROWS=block_rows, K=kb, LOG_K=kb.bit_length() - 1,
            SPLITS=splits, LIST_ORDER=list_order, USE_DOT=use_dot, SHARE_BOUND=share_bound,
            num_warps=num_warps or TOPK_NUM_WARPS,
            num_stages=num_stages or TOPK_NUM_STAGES,
        )
    return scores, rows, state[0]


def _select_topk(scores: torch.Tensor, rows: torch.Tensor, k: int,
                 triton_merge: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best of the fused kernel's candidates (scores [B, C], rows [B, C], C = chunks of
    K = topk_block_k(k), each ascending), descending, padded with -inf / -1 to k: by
    `_merge_candidates_kernel` (triton_merge, default TOPK_TRITON_MERGE) or torch.topk."""
    b, c = scores.shape
    kb = topk_block_k(k)
    if (TOPK_TRITON_MERGE if triton_merge is None else triton_merge) and c >= kb and b > 0:
        top = torch.empty((b, k), dtype=torch.float32, device=scores.device)
        top_rows = torch.empty((b, k), dtype=torch.int64, device=scores.device)
        _merge_candidates_kernel[(b,)](
            scores, rows, top, top_rows, c // kb, k, scores.stride(0), top.stride(0),
            K=kb, LOG_K=kb.bit_length() - 1, num_warps=TOPK_MERGE_NUM_WARPS)
        return top, top_rows
    kk = min(k, c)
    top, idx = torch.topk(scores, kk, dim=1)
    top_rows = rows.gather(1, idx)
    if kk == k:
        return top, top_rows
    pad = k - kk
    return (torch.cat([top, top.new_full((b, pad), float("-inf"))], 1),
            torch.cat([top_rows, top_rows.new_full((b, pad), -1)], 1))


def ivf_int8_search_triton(query_codes: torch.Tensor, query_scales: torch.Tensor,
                           filter_bits: torch.Tensor, probes: torch.Tensor,
                           list_offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                           k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA implementation of `iam::ivf_int8_search` (CPU tensors too under TRITON_INTERPRET=1).
    k <= TOPK_K_MAX: the fused kernel keeps the K best rows per (query, probed list), then
    `_select_topk` picks k of those P * K per query; larger k: `ivf_int8_search_buffered`."""
    _check_ivf_int8_search(query_codes, query_scales, filter_bits, probes, list_offsets, codes,
                           scales, k)
    require_triton_device("ivf_int8_search", codes.device)
    # keys hold the row in 32 bits: larger indexes take the buffered path
    if topk_block_k(k) > TOPK_K_MAX or codes.shape[0] >= 2**31:
        return ivf_int8_search_buffered(query_codes, query_scales, filter_bits, probes,
                                        list_offsets, codes, scales, k)
    scores, rows, num_passing = _launch_ivf_int8_topk(
        query_codes, query_scales, filter_bits, probes, list_offsets, codes, scales, k)
    top, top_rows = _select_topk(scores, rows, k)
    return top, top_rows, num_passing


def ivf_int8_search_buffered(query_codes: torch.Tensor, query_scales: torch.Tensor,
                             filter_bits: torch.Tensor, probes: torch.Tensor,
                             list_offsets: torch.Tensor, codes: torch.Tensor,
                             scales: torch.Tensor, k: int
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The score-buffer path (k > TOPK_K_MAX, and the benchmark's baseline): the kernel scores
    every probed row into [B, P, max_list_len] (-inf where filtered out), then torch.topk picks
    the k best per query. Reads max_list_len from list_offsets (a device-to-host sync)."""
    _check_ivf_int8_search(query_codes, query_scales, filter_bits, probes, list_offsets, codes,
                           scales, k)
    require_triton_device("ivf_int8_search", codes.device)
    out = _launch_ivf_int8_search(query_codes, query_scales, filter_bits, probes, list_offsets,
                                  codes, scales)
    b, p, max_list_len = out.shape
    flat = out.view(b, p * max_list_len)
    num_passing = torch.isfinite(flat).sum(1)
    kk = min(k, flat.shape[1])
    scores = torch.full((b, k), float("-inf"), device=codes.device)
    rows = torch.full((b, k), -1, dtype=torch.int64, device=codes.device)
    if kk > 0 and b > 0:
        top, idx = torch.topk(flat, kk, dim=1)
        cluster = probes.gather(1, idx // max_list_len).clamp(min=0)
        found = torch.isfinite(top)
        scores[:, :kk] = top
        rows[:, :kk] = torch.where(found, list_offsets[cluster] + idx % max_list_len, -1)
    return scores, rows, num_passing


# ---- torch path (the reference the compiled CPU path is tested against) --------------------------
def _low_bits(n: torch.Tensor) -> torch.Tensor:
    """int64 mask with the low n bits set, n in [0, 64]."""
    ones = (torch.ones_like(n) << n.clamp(max=63)) - 1  # 1 << 63 - 1 wraps to 0x7FFF...
    return torch.where(n >= 64, torch.full_like(n, -1), ones)


_BYTE_BITS: List[torch.Tensor] = []


def byte_bit_table() -> torch.Tensor:
    """bool [256, 8] (CPU): bit j of byte value v; unpacks bitmaps with one gather per byte."""
    if not _BYTE_BITS:
        v = torch.arange(256, dtype=torch.int64)
        _BYTE_BITS.append(((v[:, None] >> torch.arange(8)) & 1).to(torch.bool))
    return _BYTE_BITS[0]


def _unpack_rows(bits: torch.Tensor, word: Optional[torch.Tensor], words_per_query: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Set bits of int64 words [T] -> (entry t, row) per set bit, in order. word[t] is the
    bitmap word index of entry t; None means entry t is word t % words_per_query (a whole
    bitmap). Reads nonzero bytes only (a 0.5 % filter leaves ~4 % of them), and does the
    per-bit work with one table lookup, one gather and one add."""
    as_bytes = bits.view(torch.uint8)  # little-endian: byte i of a word = bits 8i..8i+7
    byte_idx = as_bytes.nonzero().squeeze(1)
    entry_of_byte = byte_idx >> 3
    word_of_byte = entry_of_byte % words_per_query if word is None \
        else word.index_select(0, entry_of_byte)
    first_row = (word_of_byte << 6) + ((byte_idx & 7) << 3)
    byte_bits = byte_bit_table().index_select(0, as_bytes.index_select(0, byte_idx).long())
    set_bits = byte_bits.nonzero()  # [M, 2]: (nonzero byte, bit in byte)
    byte_of_bit = set_bits[:, 0]
    rows = first_row.index_select(0, byte_of_bit) + set_bits[:, 1]
    return entry_of_byte.index_select(0, byte_of_bit), rows


def passing_pairs(filter_bits: torch.Tensor, probes: torch.Tensor, list_offsets: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(query, row) of every row of a probed list whose filter bit is set, sorted by query.

    Only the filter words that cover probed lists are read; each word is masked to its list's
    row range, so a word shared by two probed neighbour lists yields each row once. When every
    query probes every list (exact mode) the bitmap is read as it is.
    (Gathers use index_select: on CPU it is ~10x faster than advanced indexing.)
    """
    b, p = probes.shape
    nlist = list_offsets.shape[0] - 1
    w = filter_bits.shape[1]
    if p == nlist and b > 0 and bool(
            (probes.sort(dim=1).values == torch.arange(nlist)[None, :]).all()):
        # skip zero words first: one int64 test instead of eight byte tests per empty word
        flat = filter_bits.reshape(-1)
        nonzero_words = flat.nonzero().squeeze(1)
        entry, rows = _unpack_rows(flat.index_select(0, nonzero_words), nonzero_words % w, w)
        return torch.div(nonzero_words.index_select(0, entry), w, rounding_mode="floor"), rows
    valid = (probes >= 0).flatten()
    cluster = probes.clamp(min=0).flatten()
    start = torch.where(valid, list_offsets.index_select(0, cluster), 0)
    end = torch.where(valid, list_offsets.index_select(0, cluster + 1), 0)
    first_word = start >> 6
    num_words = torch.where(end > start, ((end - 1) >> 6) - first_word + 1, 0)
    slot = torch.repeat_interleave(num_words)  # probe slot of every covered word
    slot_first = torch.cumsum(num_words, 0) - num_words
    word = first_word.index_select(0, slot) + torch.arange(slot.numel()) \
        - slot_first.index_select(0, slot)
    query = torch.div(slot, p, rounding_mode="floor")
    base = word << 6
    keep = _low_bits((end.index_select(0, slot) - base).clamp(0, 64)) & ~_low_bits(
        (start.index_select(0, slot) - base).clamp(0, 64))
    bits = filter_bits.reshape(-1).index_select(0, query * w + word) & keep
    entry, rows = _unpack_rows(bits, word, w)
    return query.index_select(0, entry), rows


def ivf_int8_search_torch(query_codes: torch.Tensor, query_scales: torch.Tensor,
                          filter_bits: torch.Tensor, probes: torch.Tensor,
                          list_offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                          k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain-torch path (CPU tensors): see the module docstring."""
    _check_ivf_int8_search(query_codes, query_scales, filter_bits, probes, list_offsets, codes,
                           scales, k)
    b = query_codes.shape[0]
    query, rows = passing_pairs(filter_bits, probes, list_offsets)
    num_passing = torch.bincount(query, minlength=b)
    scores = torch.full((b, k), float("-inf"))
    out_rows = torch.full((b, k), -1, dtype=torch.int64)
    # pairs are sorted by query: each query's passing rows are one segment. Per segment: gather
    # its int8 codes, widen to fp32 (exact integers), one GEMV, rescale, top-k. On the 2-core
    # machine this beat one batched GEMM over cache-sized chunks of all pairs (then a gather of
    # each pair's column) by ~1.5x, and padded bmm by ~2x, for 64 queries x 300k pairs.
    query_f = query_codes.float()
    ends = torch.cumsum(num_passing, 0).tolist()
    longest = int(num_passing.max()) if b > 0 else 0
    # buffers reused by every query: a fresh multi-MB tensor per query costs page faults.
    # (Widening in L2-sized blocks of 512..4096 rows was not faster than whole segments.)
    codes_i8 = torch.empty((longest, codes.shape[1]), dtype=torch.int8)
    codes_f32 = torch.empty((longest, codes.shape[1]), dtype=torch.float32)
    seg_scores = torch.empty(longest, dtype=torch.float32)
    seg_scales = torch.empty(longest, dtype=torch.float32)
    start = 0
    for i in range(b):
        seg = rows[start:ends[i]]
        start = ends[i]
        n = seg.numel()
        if n == 0:
            continue
        x = codes_f32[:n]
        x.copy_(torch.index_select(codes, 0, seg, out=codes_i8[:n]))
        s = torch.mv(x, query_f[i], out=seg_scores[:n])
        s.mul_(query_scales[i])  # same rounding order as the kernel: dot * q_scale * item_scale
        s.mul_(torch.index_select(scales, 0, seg, out=seg_scales[:n]))
        kk = min(k, n)
        top, idx = torch.topk(s, kk)
        scores[i, :kk] = top
        out_rows[i, :kk] = seg.index_select(0, idx)
    return scores, out_rows, num_passing


# ---- compiled CPU path (the CPU implementation; kernels/csrc/ivf_int8_search.cpp) ------------
_ERRORS = {1: "a probe is outside [-1, nlist)",
           2: "list_offsets must be non-decreasing within [0, N]",
           3: "out of memory"}


def ivf_int8_search_cpu(query_codes: torch.Tensor, query_scales: torch.Tensor,
                        filter_bits: torch.Tensor, probes: torch.Tensor,
                        list_offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                        k: int, block_min_bits: int = BLOCK_MIN_BITS,
                        pair_queries: bool = PAIR_QUERIES, variant: str = "best"
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU implementation of `iam::ivf_int8_search`: the compiled C++ library (one thread, the
    GIL released), same results as `ivf_int8_search_torch` (scores bit for bit; rows of tied
    scores may differ). `block_min_bits`, `pair_queries` and `variant` (build_ext.load: "best",
    "avxvnni", "avx2", "portable") are for tests of each way of scoring and of each build.

    A library that was not built is an error naming the build command, not a fallback to the
    torch path: that path is ~10x slower on unfiltered batches, and a served model silently
    running it would be a performance fault nobody sees (tests and stubs fail loudly instead)."""
    _check_ivf_int8_search(query_codes, query_scales, filter_bits, probes, list_offsets, codes,
                           scales, k)
    lib = build_ext.load(variant)
    if lib is None:
        raise RuntimeError(f"ivf_int8_search: the compiled CPU library ({variant}) under "
                           f"{build_ext.OUT_DIR} is missing or stale; build it with "
                           f"`{build_ext.BUILD_COMMAND}`")
    query_codes, query_scales, filter_bits, probes, list_offsets, codes, scales = contiguous(
        query_codes, query_scales, filter_bits, probes, list_offsets, codes, scales)
    b, d = query_codes.shape
    scores = torch.empty((b, k), dtype=torch.float32)
    rows = torch.empty((b, k), dtype=torch.int64)
    num_passing = torch.empty(b, dtype=torch.int64)
    rc = lib.ivf_int8_search(
        query_codes.data_ptr(), query_scales.data_ptr(), filter_bits.data_ptr(),
        filter_bits.shape[1], probes.data_ptr(), b, probes.shape[1], list_offsets.data_ptr(),
        list_offsets.shape[0] - 1, codes.data_ptr(), scales.data_ptr(), codes.shape[0], d, k,
        int(block_min_bits), int(pair_queries), scores.data_ptr(), rows.data_ptr(),
        num_passing.data_ptr())
    if rc != 0:
        raise ValueError(f"ivf_int8_search: {_ERRORS.get(rc, f'error {rc}')}")
    return scores, rows, num_passing


def _ivf_int8_search_fake(query_codes: torch.Tensor, query_scales: torch.Tensor,
                          filter_bits: torch.Tensor, probes: torch.Tensor,
                          list_offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                          k: int):
    b = query_codes.shape[0]
    return (codes.new_empty((b, k), dtype=torch.float32),
            codes.new_empty((b, k), dtype=torch.int64),
            codes.new_empty((b,), dtype=torch.int64))


# ---- registration ----------------------------------------------------------------------------
LIB.define(
    "ivf_int8_search(Tensor query_codes, Tensor query_scales, Tensor filter_bits, "
    "Tensor probes, Tensor list_offsets, Tensor codes, Tensor scales, int k) "
    "-> (Tensor scores, Tensor rows, Tensor num_passing)"
)
LIB.impl("ivf_int8_search", ivf_int8_search_cpu, "CPU")
LIB.impl("ivf_int8_search", ivf_int8_search_triton, "CUDA")
torch.library.register_fake("iam::ivf_int8_search", _ivf_int8_search_fake, lib=LIB)
