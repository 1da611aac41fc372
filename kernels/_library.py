"""The one `torch.library` namespace of this project's ops, and the helpers every op file shares.

TorchScript graphs exported by the builder call `torch.ops.iam.<op>`; importing `kernels`
registers every op (CPU: the torch path in the op's file; CUDA: its Triton-language kernel).
`torch.library.Library(ns, "DEF")` may be created only once per namespace, so every op file
imports `LIB` from here instead of making its own.

Every op file has the same shape, in this order:

    module docstring (the op's schema, arguments, results, how each path works)
    launch settings (BLOCK sizes, num_warps), each with the measurement or reason behind it
    _check_<op>(...)             shapes, dtypes, devices; ValueError with a message
    if triton_available():
        @triton.jit _<op>_kernel  the Triton-language kernel
    _launch_<op>(...)            allocate, grid, launch on checked arguments
    <op>_triton(...)             CUDA implementation: check, `require_triton_device`, launch
    <op>_torch(...)              CPU implementation and reference
    _<op>_fake(...)              shapes and dtypes only (torch.compile, FakeTensorMode)
    LIB.define / LIB.impl CPU / LIB.impl CUDA / torch.library.register_fake
"""

import os
from typing import List

import torch

NAMESPACE = "iam"
LIB = torch.library.Library(NAMESPACE, "DEF")


def triton_available() -> bool:
    """True when the `triton` package imports (needed for the CUDA kernels and for
    TRITON_INTERPRET=1 checks on the CPU); the CPU serving path never needs it."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where the kernels run on CPU tensors (tests, smoke runs).
    Must be set before `kernels` is imported: `triton.jit` reads it when decorating."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton_device(op: str, device: torch.device) -> None:
    """What every `<op>_triton` checks before a launch: triton imports, and the tensors are on
    CUDA (or on the CPU under TRITON_INTERPRET=1)."""
    if not triton_available():
        raise RuntimeError(f"{op}: the CUDA path needs the `triton` package")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{op}_triton: tensors must be on CUDA (or set TRITON_INTERPRET=1), "
                         f"got {device}")


def contiguous(*tensors: torch.Tensor) -> List[torch.Tensor]:
    """The tensors with dense row-major strides (copies only those that are not): the kernels
    address rows by one stride and assume unit stride within a row."""
    return [t.contiguous() for t in tensors]
