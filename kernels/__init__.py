"""Custom ops of the project, one op per file, each with a torch CPU path beside its
Triton-language kernel. Importing this package registers them all as `torch.ops.iam.*`."""

from kernels import (
    _library,  # noqa: F401  (creates the `iam` namespace first)
    bloom_search,  # noqa: F401
    ivf_int8_search,  # noqa: F401
    zch_insert,  # noqa: F401
    zch_lookup,  # noqa: F401
)
