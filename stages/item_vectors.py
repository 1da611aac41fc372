"""The item vectors the scorer and the request-history pooling read: one copy, the index's.

The `ann` stage's IVF index holds every item as int8 codes with a per-item scale (ann/ivf.py:
68 B per item at D = 64). The scorer (its OverArch reads the candidates' vectors) and the
history pooling (the mean vector of a request's history items) read item vectors too. Stored
again in fp32 they cost 256 B per item, 73 % of what `unified` held per item
(docs/scaling.md); `Int8Vectors` reads the index's own tensors instead (the same tensor
objects: one copy in memory and in every archive, stages/archive.py), dequantized per gathered
row, v ~= scale * code with |error| <= scale / 2 per component. What that costs in quality is
measured in docs/quality.md ("item vectors in fp32" ablation).

`Int8ResidualVectors` adds a second int8 code per component: the first level's residual,
quantized with its own per-item scale (two-level quantization, 68 more bytes per item at
D = 64). Its error is at most half the residual's step, about 1/250 of the codes' alone: fine
enough to re-score the int8 search's candidates (AnnConfig.refine) on a catalog whose fp32
copy is too large to keep (past ~1M items: 2.56 GB at 10M against 0.68 GB).

`Fp32Vectors` keeps exact rows: for exact search (its fp32 table is then the one copy), for a
model's own history side (training/linear.py) and for `AnnConfig(item_vectors="fp32")`.

All have `forward(rows)` for rows of the main table and, from `_ItemTable`, `gather(rows,
fresh)` for rows of the whole row space (stages/rows.py: padding, main and fresh rows).
"""

from typing import Optional, Tuple

import torch
from torch import nn

from ann.ivf import dequantize_int8, quantize_int8
from stages.rows import check_rows, main_rows, with_fresh


class _ItemTable(nn.Module):
    """What the tables share: `gather` over the whole row space, from the table's own
    `forward` (main rows) and `num_items()`, which every subclass defines (this base is never
    instantiated; TorchScript compiles `gather` per subclass)."""

    @torch.jit.export
    def gather(self, rows: torch.Tensor, fresh: Optional[torch.Tensor]) -> torch.Tensor:
        """Rows of the row space (padding reads row 0; fresh rows read `fresh` [C, D])."""
        n = self.num_items()
        check_rows(n, fresh, rows)
        return with_fresh(self.forward(main_rows(rows, n)), fresh, rows, n)


def _check_int8(table: str, name: str, codes: torch.Tensor, scales: torch.Tensor,
                shape: Tuple[int, ...]) -> None:
    if codes.dtype != torch.int8 or codes.dim() != 2 or scales.shape != codes.shape[:1] or \
            tuple(codes.shape) != shape:
        raise ValueError(f"{table} wants int8 {name} [N, D] and scales [N] of one shape, got "
                         f"{codes.dtype} {tuple(codes.shape)} and {tuple(scales.shape)}")


class Int8Vectors(_ItemTable):
    """Args: codes int8 [N, D] and scales float32 [N], index row order (the IVF index's
    tensors, IVFInt8Search's buffers: pass those, not copies)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        _check_int8("Int8Vectors", "codes", codes, scales, tuple(codes.shape))
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def num_items(self) -> int:
        return int(self.codes.shape[0])

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Main rows (any shape, each in 0..N-1) -> float32 [..., D]."""
        return dequantize_int8(self.codes[rows], self.scales[rows])


class Int8ResidualVectors(_ItemTable):
    """Two-level int8: v ~= scale * code + residual_scale * residual_code.

    Args: codes int8 [N, D] and scales float32 [N] (the index's tensors, as Int8Vectors),
    residual_codes int8 [N, D] and residual_scales float32 [N] (`residuals` makes them)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, residual_codes: torch.Tensor,
                 residual_scales: torch.Tensor):
        super().__init__()
        _check_int8("Int8ResidualVectors", "codes", codes, scales, tuple(codes.shape))
        _check_int8("Int8ResidualVectors", "residual codes", residual_codes, residual_scales,
                    tuple(codes.shape))
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("residual_codes", residual_codes)
        self.register_buffer("residual_scales", residual_scales)

    @staticmethod
    def residuals(vectors: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                  chunk: int = 1 << 20) -> Tuple[torch.Tensor, torch.Tensor]:
        """The int8 code (and per-row scale) of vectors - scale * code, `chunk` rows at a time
        (no float copy of a large catalog beyond one chunk)."""
        out = torch.empty_like(codes)
        out_scales = torch.empty_like(scales)
        for s in range(0, codes.shape[0], chunk):
            e = s + chunk
            rest = vectors[s:e].float() - dequantize_int8(codes[s:e], scales[s:e])
            out[s:e], out_scales[s:e] = quantize_int8(rest)
        return out, out_scales

    def num_items(self) -> int:
        return int(self.codes.shape[0])

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Main rows (any shape, each in 0..N-1) -> float32 [..., D]."""
        return dequantize_int8(self.codes[rows], self.scales[rows]) + \
            dequantize_int8(self.residual_codes[rows], self.residual_scales[rows])


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
