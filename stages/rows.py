"""The row space every stage shares: main index rows, then the fresh store's rows.

A candidate row is a bit position of the filter bitmap. Bits 0..N-1 are the main index rows;
fresh row r is bit `fresh_row_offset(N) + r`, the first bit after the main words
(stages/fresh.py). A stage reads an item's data with `gather_rows`: from its main table below
N, from the fresh table at and past the offset.
"""

from typing import Optional

import torch

from filtering.bits import num_words


def fresh_row_offset(num_items: int) -> int:
    """The row of fresh row 0 next to a main index of `num_items` rows: the first bit after
    the main words of the bitmap."""
    return num_words(num_items) * 64


def check_rows(num_items: int, fresh: Optional[torch.Tensor], rows: torch.Tensor) -> None:
    """Raises unless every row is padding (< 0), a main row or a fresh row: a direct caller's
    bad candidate list must fail, not read a neighbour's row."""
    offset = fresh_row_offset(num_items)
    fresh_rows = 0 if fresh is None else fresh.shape[0]
    if bool(((rows >= num_items) & ((rows < offset) | (rows >= offset + fresh_rows))).any()):
        raise RuntimeError(f"row out of range: the main index has {num_items} rows and the "
                           f"fresh store {fresh_rows} (from row {offset})")


def with_fresh(from_main: torch.Tensor, fresh: Optional[torch.Tensor], rows: torch.Tensor,
               num_items: int) -> torch.Tensor:
    """`from_main` (the main table read at the clamped rows) with the fresh rows' entries taken
    from the fresh table instead."""
    offset = fresh_row_offset(num_items)
    if fresh is None or fresh.shape[0] == 0 or not bool((rows >= offset).any()):
        return from_main
    is_fresh = rows >= offset
    from_fresh = fresh[(rows - offset).clamp(min=0, max=fresh.shape[0] - 1)]
    while is_fresh.dim() < from_main.dim():
        is_fresh = is_fresh.unsqueeze(-1)
    return torch.where(is_fresh, from_fresh.to(from_main.dtype), from_main)


def main_rows(rows: torch.Tensor, num_items: int) -> torch.Tensor:
    """Rows clamped into the main table (padding and fresh rows read row 0 / N-1; with_fresh
    replaces the fresh ones)."""
    return rows.clamp(min=0, max=num_items - 1)


def gather_rows(main: torch.Tensor, fresh: Optional[torch.Tensor], rows: torch.Tensor
                ) -> torch.Tensor:
    """`main[rows]` where rows address the main table [N, ...] and, at and past
    fresh_row_offset(N), the fresh table [C, ...]. Negative rows (padding) read main row 0;
    a row in neither table is an error."""
    n = main.shape[0]
    check_rows(n, fresh, rows)
    return with_fresh(main[main_rows(rows, n)], fresh, rows, n)
