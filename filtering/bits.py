"""Packed item bitmaps: int64 words, bit j (LSB = 0) of word w is item row w*64 + j.

The filter stage hands the ANN stage one bitmap per query (N/8 bytes, never a bool per item);
bits at rows >= N are always 0. All functions are TorchScript-compatible.
"""

from typing import Tuple

import torch


def num_words(num_items: int) -> int:
    return (num_items + 63) // 64


def _bit_weights(device: torch.device) -> torch.Tensor:
    # 1 << 63 is the int64 minimum; summing distinct powers of two never carries, so sum == OR
    return torch.ones(64, dtype=torch.int64, device=device) << torch.arange(
        64, dtype=torch.int64, device=device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., N] -> int64 [..., ceil(N/64)]."""
    n = mask.shape[-1]
    w = num_words(n)
    padded = torch.zeros(mask.shape[:-1] + (w * 64,), dtype=torch.int64, device=mask.device)
    padded[..., :n] = mask.to(torch.int64)
    words = padded.view(mask.shape[:-1] + (w, 64)) * _bit_weights(mask.device)
    return words.sum(-1)


def unpack_bits(words: torch.Tensor, num_items: int) -> torch.Tensor:
    """int64 [..., W] -> bool [..., num_items]."""
    bits = (words.unsqueeze(-1) >> torch.arange(64, dtype=torch.int64, device=words.device)) & 1
    return bits.flatten(-2)[..., :num_items].to(torch.bool)


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits per row: int64 [..., W] -> int64 [...]."""
    x = words
    # SWAR popcount on int64 with arithmetic shifts masked to behave as logical shifts
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = (x * 0x0101010101010101) >> 56
    return (x & 0xFF).sum(-1)


def rows_of(words: torch.Tensor, num_items: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(query index, item row) of every set bit of a [B, W] bitmap."""
    nz = unpack_bits(words, num_items).nonzero()
    return nz[:, 0], nz[:, 1]
