"""The `ann` stage: the user's query embedding, then filtered nearest-neighbour search.

Every returned row passes the request's filter, and a query gets min(num_candidates, matches)
rows: padding (-1 rows) exists only inside the padded batch tensors and is cut off by `counts`
before anything leaves the server.

The search is the IVF int8 index of `ann/` (`ann.search.IVFInt8Search`, calling
`torch.ops.iam.ivf_int8_search`); `AnnConfig(search="exact")` keeps brute-force fp32 search.
The IVF index decides the row order of every stage: items are stored contiguous by list.
"""

from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np
import torch
from torch import nn

from ann.ivf import IVFConfig, IVFIndex, build_ivf_index
from ann.search import IVFInt8Search, IVFSearchConfig
from stages.bits import unpack_bits
from world.synthetic import Catalog


@dataclass
class AnnConfig:
    # ANN candidates per requested result, handed to the scorer to reorder
    oversample: int = 4
    # "ivf_int8" (the fused int8 IVF index) or "exact" (brute-force fp32, for comparisons)
    search: str = "ivf_int8"
    # index build knobs (nlist, k-means) and search defaults (nprobe, min_candidates, ...)
    ivf: IVFConfig = field(default_factory=IVFConfig)
    ivf_search: IVFSearchConfig = field(default_factory=IVFSearchConfig)


# index_order() builds the IVF index (k-means decides the row order); build_ann_stage() receives
# the reordered catalog and reuses that index instead of clustering again. Keyed by the reordered
# item ids, which build_ann_stage checks, so a different catalog can never pick up a stale index.
_BUILT: Dict[str, Tuple[np.ndarray, IVFIndex]] = {}


def index_order(catalog: Catalog, config: AnnConfig) -> np.ndarray:
    """Row order of the index (a permutation of catalog rows); every per-item tensor of every
    stage is stored in this order."""
    if config.search == "exact":
        return np.arange(catalog.num_items)
    index = build_ivf_index(torch.from_numpy(catalog.embeddings), config.ivf)
    order = index.permutation.numpy()
    _BUILT["last"] = (catalog.item_ids[order], index)
    return order


def build_ann_stage(catalog: Catalog, users: nn.Module, config: AnnConfig) -> "AnnStage":
    """The ANN layer over `catalog` (already in index_order)."""
    embeddings = torch.from_numpy(catalog.embeddings)
    if config.search == "exact":
        return AnnStage(users, ExactSearch(embeddings), config.oversample)
    if config.search != "ivf_int8":
        raise ValueError(f"AnnConfig.search must be 'ivf_int8' or 'exact', got {config.search!r}")
    ids, index = _BUILT.get("last", (None, None))
    if ids is None or not np.array_equal(ids, catalog.item_ids):
        # not reordered by index_order() here: index it now, and insist it is already in order
        index = build_ivf_index(embeddings, config.ivf)
        if not torch.equal(index.permutation, torch.arange(catalog.num_items)):
            raise ValueError("build_ann_stage needs the catalog reordered by index_order()")
    return AnnStage(users, IVFInt8Search(index, config.ivf_search), config.oversample)


class ExactSearch(nn.Module):
    """Brute-force fp32 inner-product search over the items that pass the filter.

    Args:
        item_embeddings: float32 [N, D] in index row order.
    """

    def __init__(self, item_embeddings: torch.Tensor):
        super().__init__()
        self.register_buffer("item_embeddings", item_embeddings.float().contiguous())

    def forward(self, queries: torch.Tensor, filter_bits: torch.Tensor, num_candidates: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """queries [B, D], filter_bits int64 [B, W] -> (scores [B, C], rows [B, C]), C =
        min(num_candidates, N); slots past a query's number of matches hold row -1."""
        n = self.item_embeddings.shape[0]
        c = min(num_candidates, n)
        scores = queries @ self.item_embeddings.T
        passing = unpack_bits(filter_bits, n)
        scores = scores.masked_fill(~passing, float("-inf"))
        top_scores, top_rows = torch.topk(scores, c, dim=1)
        return top_scores, torch.where(torch.isinf(top_scores), -1, top_rows)


class AnnStage(nn.Module):
    """user id + filter bitmap + k -> oversampled candidate rows for the scorer.

    Args:
        users: maps raw user ids to query embeddings.
        search: filtered search over the item index.
        oversample: the stage returns `oversample * k` candidates so that the scorer can
            reorder more than the final k (a larger factor = better final quality, more work).
    """

    def __init__(self, users: nn.Module, search: nn.Module, oversample: int = 4):
        super().__init__()
        self.users = users
        self.search = search
        self.oversample = oversample

    def forward(self, user_ids: torch.Tensor, filter_bits: torch.Tensor, k: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            user_ids: int64 [B]; filter_bits: int64 [B, W]; k: int64 [B] (>= 1).
        Returns:
            rows int64 [B, C] (-1 past counts), scores float32 [B, C], counts int64 [B],
            user_embedding float32 [B, D].
        """
        user_embedding = self.users(user_ids)
        wanted = k * self.oversample
        scores, rows = self.search(user_embedding, filter_bits, int(wanted.max()))
        # a search returns min(C, matches) rows per query, so this is min(wanted, matches, C)
        # without a popcount of the whole bitmap
        counts = torch.minimum(wanted, (rows >= 0).sum(1))
        return rows, scores, counts, user_embedding
