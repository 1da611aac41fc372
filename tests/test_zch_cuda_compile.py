"""The zero-collision kernels compile for a CUDA target (sm_90) on a machine without a GPU.

The interpreter (tests/test_zch_interpret.py) checks what the kernels compute but accepts code
the compiler rejects (non-constexpr globals, mismatched loop-carried types, ...). Compiling down
to a cubin with the ptxas that ships with triton catches those here. Scalars are compiled both as
i32 and i64, as triton picks by value at launch (a table or a `now` above 2**31 is i64).
"""

import pytest

from kernels._library import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs the triton package")


def _compile(fn, signature: dict, constexprs: dict) -> bytes:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]


@pytest.mark.parametrize("scalar", ["i32", "i64"])
def test_lookup_kernel_compiles(scalar):
    from kernels.zch_lookup import _zch_lookup_kernel

    signature = {"identities_ptr": "*i64", "ids_ptr": "*i64", "slots_ptr": "*i64",
                 "num_ids": "i32", "num_slots": scalar, "probes": "i32"}
    for block_probe in (1, 16, 128):
        constexprs = {"BLOCK_IDS": max(1, 2048 // block_probe), "BLOCK_PROBE": block_probe}
        assert len(_compile(_zch_lookup_kernel, signature, constexprs)) > 0


@pytest.mark.parametrize("scalar", ["i32", "i64"])
@pytest.mark.parametrize("policy", [0, 1, 2])
def test_claim_kernel_compiles(scalar, policy):
    from kernels.zch_insert import _zch_insert_kernel

    signature = {"identities_ptr": "*i64", "metadata_ptr": "*i64", "ids_ptr": "*i64",
                 "slots_ptr": "*i64", "claimed_ptr": "*i8", "evicted_ptr": "*i64",
                 "num_slots": scalar, "probes": "i32", "now": scalar, "expire_before": scalar}
    constexprs = {"POLICY": policy, "BLOCK_PROBE": 16}
    assert len(_compile(_zch_insert_kernel, signature, constexprs)) > 0
