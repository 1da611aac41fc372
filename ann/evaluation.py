"""Shared by the ANN tests and benchmarks: query sampling, exact filtered search, recall."""

from typing import List

import torch

from kernels.ivf_int8_search import byte_bit_table


def unpack_filter(filter_bits: torch.Tensor, num_items: int) -> torch.Tensor:
    """int64 [B, W] bitmap -> bool [B, num_items], by byte table (8x less temporary memory
    than shifting every word 64 times)."""
    b = filter_bits.shape[0]
    as_bytes = filter_bits.contiguous().view(torch.uint8).reshape(-1).long()
    return byte_bit_table().index_select(0, as_bytes).view(b, -1)[:, :num_items]


def sample_queries(embeddings: torch.Tensor, num: int, seed: int, noise: float = 0.1
                   ) -> torch.Tensor:
    """Unit-norm queries between two random items plus Gaussian noise (a user interested in
    two things), so that queries follow the catalog's distribution without being items."""
    gen = torch.Generator().manual_seed(seed)
    n, d = embeddings.shape
    pair = torch.randint(0, n, (2, num), generator=gen)
    q = embeddings[pair[0]] + embeddings[pair[1]] + noise * torch.randn(num, d, generator=gen)
    return torch.nn.functional.normalize(q.float(), dim=1)


def exact_filtered_topk(queries: torch.Tensor, embeddings: torch.Tensor,
                        filter_bits: torch.Tensor, k: int, chunk: int = 16) -> torch.Tensor:
    """fp32 brute force: rows int64 [B, k] of the best passing items, -1 past the matches."""
    n = embeddings.shape[0]
    out = torch.full((queries.shape[0], min(k, n)), -1, dtype=torch.int64)
    for lo in range(0, queries.shape[0], chunk):
        scores = queries[lo:lo + chunk] @ embeddings.T
        scores.masked_fill_(~unpack_filter(filter_bits[lo:lo + chunk], n), float("-inf"))
        top, rows = torch.topk(scores, min(k, n), dim=1)
        out[lo:lo + chunk] = torch.where(torch.isinf(top), -1, rows)
    return out


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over queries of |found & exact| / |exact| (ignoring -1 padding; a query with no
    exact match counts as recall 1)."""
    values: List[float] = []
    for f, e in zip(found.tolist(), exact.tolist()):
        truth = {r for r in e if r >= 0}
        got = {r for r in f if r >= 0}
        values.append(len(truth & got) / len(truth) if truth else 1.0)
    return sum(values) / max(len(values), 1)
