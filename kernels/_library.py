"""The one `torch.library` namespace that every op of this project is registered in.

TorchScript graphs exported by the builder call `torch.ops.iam.<op>`; importing `kernels`
registers every op (CPU: the torch path in the op's file; CUDA: its Triton-language kernel).
`torch.library.Library(ns, "DEF")` may be created only once per namespace, so every op file
imports `LIB` from here instead of making its own.
"""

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
