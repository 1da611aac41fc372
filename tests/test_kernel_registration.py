"""Every op in `torch.ops.iam` is registered the same way: a CPU kernel, a CUDA kernel and a fake
(shape-only) implementation, so that FakeTensorMode / torch.compile can trace graphs that call
it. A new op without sample inputs here fails `test_every_op_has_sample_inputs`."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels  # noqa: F401  (registers the ops)
from filtering.bloom_index import TERM_BLOOM, TERM_EXACT
from filtering.expression import OP_AND, OP_NOT, OP_TERM
from kernels._library import NAMESPACE
from kernels._zch_common import EMPTY_ID, EVICT_TTL


def _bloom_search_args():
    gen = torch.Generator().manual_seed(0)
    plans = torch.tensor([[[OP_TERM, TERM_EXACT, 0, -1], [OP_TERM, TERM_BLOOM, 1, 2],
                           [OP_NOT, 0, -1, -1], [OP_AND, 0, -1, -1]]])
    words = torch.randint(-(2**63), 2**63 - 1, (3, 2), generator=gen)
    return plans, words, 100


def _ivf_int8_search_args():
    gen = torch.Generator().manual_seed(0)
    n, d = 100, 8
    return (torch.randint(-127, 128, (2, d), dtype=torch.int8, generator=gen),
            torch.rand(2, generator=gen),
            torch.randint(-(2**63), 2**63 - 1, (2, 2), generator=gen),
            torch.tensor([[0, 1], [2, -1]]),
            torch.tensor([0, 30, 60, 100]),
            torch.randint(-127, 128, (n, d), dtype=torch.int8, generator=gen),
            torch.rand(n, generator=gen),
            5)


def _zch_lookup_args():
    identities = torch.tensor([5, EMPTY_ID, 7, 3, EMPTY_ID, EMPTY_ID, 2, 9])
    return identities, torch.tensor([3, 4, -1, 9]), 4


def _zch_insert_args():
    identities, _, _ = _zch_lookup_args()
    return (identities, torch.zeros(8, dtype=torch.int64), torch.tensor([3, 4, -1, 11, 4]),
            10, 4, EVICT_TTL, 5)


# op name -> fresh small CPU inputs (a function: zch_insert updates its buffers in place)
SAMPLE_INPUTS = {
    "bloom_search": _bloom_search_args,
    "ivf_int8_search": _ivf_int8_search_args,
    "zch_lookup": _zch_lookup_args,
    "zch_insert": _zch_insert_args,
}


def registered_ops():
    return sorted(schema.name.split("::")[1] for schema in torch._C._jit_get_all_schemas()
                  if schema.name.startswith(f"{NAMESPACE}::"))


def test_every_op_has_sample_inputs():
    assert registered_ops() == sorted(SAMPLE_INPUTS)


@pytest.mark.parametrize("name", sorted(SAMPLE_INPUTS))
def test_op_has_cpu_cuda_and_fake_implementations(name):
    qualified = f"{NAMESPACE}::{name}"
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key), f"{key} kernel"
    assert torch._library.simple_registry.singleton.find(qualified).fake_impl.kernel is not None


@pytest.mark.parametrize("name", sorted(SAMPLE_INPUTS))
def test_fake_implementation_matches_the_cpu_path(name):
    """Under FakeTensorMode the op returns tensors of the real outputs' shapes and dtypes."""
    op = getattr(torch.ops.iam, name)
    real = op(*SAMPLE_INPUTS[name]())
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                for a in SAMPLE_INPUTS[name]()]
        fake = op(*args)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert [(t.shape, t.dtype, t.device) for t in fake] == [
        (t.shape, t.dtype, t.device) for t in real]


@pytest.mark.parametrize("name", sorted(SAMPLE_INPUTS))
def test_opcheck(name):
    """torch.library.opcheck: the schema's mutation annotations, autograd registration, the fake
    against the real kernel, and tracing with dynamic shapes."""
    torch.library.opcheck(getattr(torch.ops.iam, name), SAMPLE_INPUTS[name]())
