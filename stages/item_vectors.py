"""The item vectors the scorer and the request-history pooling read: one copy, the index's.

The `ann` stage's IVF index holds every item as int8 codes with a per-item scale (ann/ivf.py:
68 B per item at D = 64). The scorer (its OverArch reads the candidates' vectors) and the
history pooling (the mean vector of a request's history items) read item vectors too. Stored
again in fp32 they cost 256 B per item, 73 % of what `unified` held per item
(docs/scaling.md); `Int8Vectors` reads the index's own tensors instead (the same tensor
objects: one copy in memory and in every archive, stages/archive.py), dequantized per gathered
row, v ~= scale * code with |error| <= scale / 2 per component. What that costs in quality is
measured in docs/quality.md ("item vectors in fp32" ablation).

`Fp32Vectors` keeps exact rows: for exact search (its fp32 table is then the one copy), for a
model's own history side (training/linear.py) and for `AnnConfig(item_vectors="fp32")`.

Both have `forward(rows)` for rows of the main table and, from `_ItemTable`, `gather(rows,
fresh)` for rows of the whole row space (stages/rows.py: padding, main and fresh rows).
"""

from typing import Optional

import torch
from torch import nn

from stages.rows import check_rows, main_rows, with_fresh


class _ItemTable(nn.Module):
    """What both tables share: `gather` over the whole row space, from the table's own
    `forward` (main rows) and `num_items()`, which every subclass defines (this base is never
    instantiated; TorchScript compiles `gather` per subclass)."""

    @torch.jit.export
    def gather(self, rows: torch.Tensor, fresh: Optional[torch.Tensor]) -> torch.Tensor:
        """Rows of the row space (padding reads row 0; fresh rows read `fresh` [C, D])."""
        n = self.num_items()
        check_rows(n, fresh, rows)
        return with_fresh(self.forward(main_rows(rows, n)), fresh, rows, n)


class Int8Vectors(_ItemTable):
    """Args: codes int8 [N, D] and scales float32 [N], index row order (the IVF index's
    tensors, IVFInt8Search's buffers: pass those, not copies)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2 or scales.shape != codes.shape[:1]:
            raise ValueError(f"Int8Vectors wants int8 codes [N, D] and scales [N], got "
                             f"{codes.dtype} {tuple(codes.shape)} and {tuple(scales.shape)}")
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def num_items(self) -> int:
        return int(self.codes.shape[0])

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Main rows (any shape, each in 0..N-1) -> float32 [..., D]."""
        return self.codes[rows].to(torch.float32) * self.scales[rows].unsqueeze(-1)


class Fp32Vectors(_ItemTable):
    """Args: vectors float32 [N, D], index row order."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.register_buffer("vectors", vectors.float().contiguous())

    def num_items(self) -> int:
        return int(self.vectors.shape[0])

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Main rows (any shape, each in 0..N-1) -> float32 [..., D]."""
        return self.vectors[rows]
