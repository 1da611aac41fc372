"""IVF int8 index build: k-means lists, rows stored contiguous by list, int8 codes.

The index is part of the model: its tensors (centroids, list offsets, codes, scales) become
buffers of the `ann` stage, and `permutation` tells the builder how to reorder every other
per-item tensor (features, filter index, raw ids) into the same cluster-contiguous row order,
so that a filter bitmap's bit j is the item stored at row j.

Quantization is symmetric per item: code = round(x / scale), scale = max|x| / 127, so
x ~= scale * code with |error| <= scale / 2 per component. Queries are quantized the same way
per request (`quantize_int8`), which makes a score an exact int32 dot product times two scales.
"""

from dataclasses import dataclass
from typing import Tuple

import torch


@dataclass
class IVFConfig:
    # number of k-means lists; 0 = round(sqrt(N)) (1000 for the 1M-item benchmark), which
    # balances probe selection against list scans (see docs/performance.md)
    nlist: int = 0
    # k-means trains on a sample of this many points per list (faiss uses 39..256)
    train_points_per_list: int = 64
    kmeans_iters: int = 12
    # rows assigned (and quantized) per chunk (bounds the [chunk, nlist] score matrix to
    # ~64 MB)
    assign_chunk: int = 16384
    seed: int = 0


@dataclass
class IVFIndex:
    """An IVF int8 index in cluster-contiguous row order.

    Attributes:
        permutation: int64 [N]; row r of the index holds input item permutation[r].
        centroids: float32 [nlist, D].
        list_offsets: int64 [nlist + 1]; list c owns rows list_offsets[c]:list_offsets[c+1].
        codes: int8 [N, D], row order.
        scales: float32 [N], row order (x ~= scales[:, None] * codes).
    """

    permutation: torch.Tensor
    centroids: torch.Tensor
    list_offsets: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    def bytes_per_item(self) -> float:
        """Bytes a scan touches per item: int8 embedding + fp32 scale + 1 filter bit."""
        return self.codes.shape[1] * self.codes.element_size() + self.scales.element_size() \
            + 1.0 / 8.0

    def list_sizes(self) -> torch.Tensor:
        return self.list_offsets[1:] - self.list_offsets[:-1]


def quantize_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: float [M, D] -> (codes int8 [M, D], scales float32 [M]).

    An all-zero row gets scale 1 (codes 0), so dequantization never divides by zero.
    """
    x = x.float()
    amax = x.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(x / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_int8's inverse, to within half a step: int8 codes [..., D] and their scales
    [...] -> float32 [..., D]."""
    return codes.to(torch.float32) * scales.unsqueeze(-1)


def _nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, chunk: int) -> torch.Tensor:
    """argmin_c ||x - c||^2 = argmax_c (x . c - |c|^2 / 2), in row chunks."""
    half_norm = 0.5 * (centroids * centroids).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for start in range(0, x.shape[0], chunk):
        scores = x[start:start + chunk] @ centroids.T
        scores -= half_norm
        out[start:start + chunk] = scores.argmax(1)
    return out


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int, chunk: int) -> torch.Tensor:
    """Lloyd's k-means on float32 [M, D] -> centroids [k, D]; empty clusters are re-seeded
    from random points so that no list is wasted."""
    gen = torch.Generator().manual_seed(seed)
    m = x.shape[0]
    if m < k:
        raise ValueError(f"k-means needs at least k={k} points, got {m}")
    centroids = x[torch.randperm(m, generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = _nearest_centroid(x, centroids, chunk)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None].to(x.dtype)
        empty = int((~nonempty).sum())
        if empty:
            centroids[~nonempty] = x[torch.randint(0, m, (empty,), generator=gen)]
    return centroids


def build_ivf_index(embeddings: torch.Tensor, config: IVFConfig = IVFConfig()) -> IVFIndex:
    """fp32 item embeddings [N, D] (input order) -> IVFIndex in cluster-contiguous row order.

    k-means trains on min(N, nlist * train_points_per_list) sampled items; then every item is
    assigned to its nearest centroid and items are stably sorted by list.
    """
    if embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be float [N, D], got {embeddings.dtype} "
                         f"{tuple(embeddings.shape)}")
    x = embeddings.detach().float().cpu().contiguous()  # no copy of fp32 CPU rows
    n = x.shape[0]
    if n < 1:
        raise ValueError("cannot build an index over zero items")
    nlist = min(config.nlist if config.nlist > 0 else max(int(round(n ** 0.5)), 1), n)
    gen = torch.Generator().manual_seed(config.seed)
    sample_size = min(n, nlist * config.train_points_per_list)
    sample = x[torch.randperm(n, generator=gen)[:sample_size]]
    centroids = kmeans(sample, nlist, config.kmeans_iters, config.seed, config.assign_chunk)
    assign = _nearest_centroid(x, centroids, config.assign_chunk)
    permutation = torch.sort(assign, stable=True).indices
    counts = torch.bincount(assign, minlength=nlist)
    list_offsets = torch.zeros(nlist + 1, dtype=torch.int64)
    list_offsets[1:] = torch.cumsum(counts, 0)
    # quantized a chunk of rows at a time: x[permutation] and quantize_int8's float
    # temporaries over all N would be several fp32 copies of the catalog
    codes = torch.empty((n, x.shape[1]), dtype=torch.int8)
    scales = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, config.assign_chunk):
        end = min(start + config.assign_chunk, n)
        codes[start:end], scales[start:end] = quantize_int8(x[permutation[start:end]])
    return IVFIndex(permutation, centroids.contiguous(), list_offsets, codes, scales)
