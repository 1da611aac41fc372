"""The IVF int8 scan kernel compiles for a CUDA target (sm_90) on a machine without a GPU.

The interpreter test (tests/test_ann_ivf_int8_search.py) checks what the kernel computes but
accepts code the compiler rejects; compiling to a cubin with the ptxas that ships with triton
catches that here. Scalars are compiled as i32 and i64 (triton picks by value at launch: a
stride or list length above 2**31 is i64), for a few dims (D padded to a power of two).
"""

import os

import pytest

from kernels._library import triton_available

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="needs the triton package"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="compiles the real kernel; the interpreter replaces it"),
]


@pytest.mark.parametrize("scalar", ["i32", "i64"])
@pytest.mark.parametrize("dim", [64, 24])
def test_scan_kernel_compiles_for_sm90(scalar, dim):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import ivf_int8_search as op

    kernel = op._ivf_int8_search_kernel
    signature = {
        "q_codes_ptr": "*i8", "q_scales_ptr": "*fp32", "bits_ptr": "*i64", "probes_ptr": "*i64",
        "offsets_ptr": "*i64", "codes_ptr": "*i8", "scales_ptr": "*fp32", "out_ptr": "*fp32",
        "max_list_len": scalar, "stride_qb": scalar, "stride_bitsb": scalar,
        "stride_probesb": scalar, "stride_codesn": scalar, "stride_outb": scalar,
        "stride_outp": scalar,
        "D": "constexpr", "BLOCK_D": "constexpr", "BLOCK_ROWS": "constexpr",
    }
    constexprs = {"D": dim, "BLOCK_D": triton.next_power_of_2(dim), "BLOCK_ROWS": op.BLOCK_ROWS}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert len(compiled.asm["cubin"]) > 0


@pytest.mark.parametrize(
    "scalar, dim, k, block_rows, warps, splits, list_order, use_dot, share_bound", [
        ("i32", 64, 100, 128, 1, 1, False, True, True),
        ("i64", 64, 100, 256, 4, 2, True, True, False),
        ("i32", 20, 10, 64, 2, 3, False, True, True),
        ("i32", 64, 256, 256, 8, 1, True, False, False)])
def test_fused_topk_kernel_compiles_for_sm90(scalar, dim, k, block_rows, warps, splits,
                                             list_order, use_dot, share_bound):
    """The fused scan + top-k kernel, over the launch settings benchmarks/gpu_ann.py sweeps."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import ivf_int8_search as op

    kernel = op._ivf_int8_topk_kernel
    signature = {
        "q_codes_ptr": "*i8", "q_scales_ptr": "*fp32", "bits_ptr": "*i64", "probes_ptr": "*i64",
        "offsets_ptr": "*i64", "codes_ptr": "*i8", "scales_ptr": "*fp32", "order_ptr": "*i64",
        "out_scores_ptr": "*fp32", "out_rows_ptr": "*i64", "num_passing_ptr": "*i64",
        "bound_ptr": "*i64", "P": scalar, "k": scalar, "stride_qb": scalar,
        "stride_bitsb": scalar, "stride_codesn": scalar, "stride_outb": scalar,
        "D": "constexpr", "BLOCK_D": "constexpr", "BLOCK_ROWS": "constexpr", "K": "constexpr",
        "LOG_K": "constexpr", "SPLITS": "constexpr", "LIST_ORDER": "constexpr",
        "USE_DOT": "constexpr", "SHARE_BOUND": "constexpr",
    }
    kb = op.topk_block_k(k)
    constexprs = {"D": dim, "BLOCK_D": max(triton.next_power_of_2(dim), 32 if use_dot else 1),
                  "BLOCK_ROWS": block_rows, "K": kb, "LOG_K": kb.bit_length() - 1,
                  "SPLITS": splits, "LIST_ORDER": list_order, "USE_DOT": use_dot,
                  "SHARE_BOUND": share_bound}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": 2})
    assert len(compiled.asm["cubin"]) > 0


@pytest.mark.parametrize("scalar, k", [("i32", 100), ("i64", 10)])
def test_candidate_merge_kernel_compiles_for_sm90(scalar, k):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import ivf_int8_search as op

    signature = {
        "cand_scores_ptr": "*fp32", "cand_rows_ptr": "*i64", "out_scores_ptr": "*fp32",
        "out_rows_ptr": "*i64", "num_chunks": scalar, "k": scalar, "stride_candb": scalar,
        "stride_outb": scalar, "K": "constexpr", "LOG_K": "constexpr",
    }
    kb = op.topk_block_k(k)
    source = ASTSource(fn=op._merge_candidates_kernel, signature=signature,
                       constexprs={"K": kb, "LOG_K": kb.bit_length() - 1})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": op.TOPK_MERGE_NUM_WARPS})
    assert len(compiled.asm["cubin"]) > 0
