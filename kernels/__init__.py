"""Custom ops of the project, one op per file, each with a torch CPU path beside its
Triton-language kernel. Importing this package registers them all as `torch.ops.iam.*`."""

from kernels import _library  # noqa: F401  (creates the `iam` namespace first)
from kernels import ivf_int8_search  # noqa: F401
from kernels import zch_insert  # noqa: F401
from kernels import zch_lookup  # noqa: F401
from kernels import bloom_search  # noqa: F401
