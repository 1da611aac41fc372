"""The `ann` stage: the user's query embedding, then filtered nearest-neighbour search.

Every returned row passes the request's filter, and a query gets min(num_candidates, matches)
rows: padding (-1 rows) exists only inside the padded batch tensors and is cut off by `counts`
before anything leaves the server.

The search is the IVF int8 index of `ann/` (`ann.search.IVFInt8Search`, calling
`torch.ops.iam.ivf_int8_search`); `AnnConfig(search="exact")` keeps brute-force fp32 search.
The IVF index decides the row order of every stage: items are stored contiguous by list.
"""

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ann.ivf import IVFConfig, IVFIndex, build_ivf_index
from ann.search import IVFInt8Search, IVFSearchConfig
from filtering.bits import unpack_bits
from stages.history import BuiltHistory, PooledHistory, history_rows
from stages.item_vectors import Fp32Vectors, Int8ResidualVectors, Int8Vectors
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
    # what the scorer, the history pooling and the re-scoring read (stages/item_vectors.py):
    # "int8", the index's own codes (one copy of the vectors; no re-scoring), "int8x2", those
    # codes plus an int8 code of their residual (twice the codes' bytes, ~1/250 of their
    # error), "fp32", a float copy of their own (4x the bytes of the codes; exact search
    # always shares its fp32 table), or "auto": fp32 while that copy takes at most
    # FP32_COPY_MAX_BYTES, int8x2 beyond. int8 alone moved MovieLens (b) by -0.0014 / -0.0009
    # / -0.0006 (docs/quality.md), within noise, but at 10M items, where scores crowd near the
    # candidate cut, served recall@10 against exact search was 0.89-0.95 without re-scoring
    # (docs/performance.md, "Ten million items"); int8x2 saves 1.9 GB of fp32 there
    item_vectors: str = "auto"
    # Exact re-scoring (FAISS's IndexRefine idea): the int8 search returns refine times the
    # candidates, their fp32 inner products pick the oversample * k that go on. Candidates
    # near the cut otherwise swap on the int8 scores' rounding, and the scorer can promote any
    # of them into the final k. Served at 200k items (benchmarks/serving.py, docs/performance.md)
    # unfiltered recall@10 went from 0.924 to 1.000 with it; an in-process sweep (a one-off
    # script, not kept) saw 0.924 at every nprobe from 32 to 192 of 447 lists without it, and
    # 0.960 / 0.986 / 0.996 / 1.000 at nprobe 8 / 16 / 24 / 64 with it. Needs fp32 item vectors
    # (int8 ones would re-score with the same rounding): 1 = none, and always 1 with int8
    # vectors or exact search. "int8x2" vectors re-score too (their error is ~1/250 of the
    # codes').
    refine: int = 2

    def __post_init__(self) -> None:
        if self.search not in ("ivf_int8", "exact"):
            raise ValueError(f"AnnConfig.search must be 'ivf_int8' or 'exact', got "
                             f"{self.search!r}")
        if self.item_vectors not in ("auto", "int8", "int8x2", "fp32"):
            raise ValueError(f"AnnConfig.item_vectors must be 'auto', 'int8', 'int8x2' or "
                             f"'fp32', got {self.item_vectors!r}")
        if self.oversample < 1:
            raise ValueError(f"AnnConfig.oversample must be >= 1, got {self.oversample}")
        if self.refine < 1:
            raise ValueError(f"AnnConfig.refine must be >= 1, got {self.refine}")


class IndexLayout(NamedTuple):
    """Where every item goes in the index: `order[r]` is the catalog row stored at index row r
    (every per-item tensor of every stage is stored in this order), and the IVF index built
    for it (None for exact search)."""

    order: np.ndarray
    ivf: Optional[IVFIndex]


def index_layout(catalog: Catalog, config: AnnConfig) -> IndexLayout:
    """Clusters the catalog's vectors (IVF: items stored contiguous by list) and returns the
    row order with the index; `build_search` takes both."""
    if config.search == "exact":
        return IndexLayout(np.arange(catalog.num_items), None)
    index = build_ivf_index(torch.from_numpy(catalog.embeddings), config.ivf)
    return IndexLayout(index.permutation.numpy(), index)


def build_search(indexed: Catalog, layout: IndexLayout, config: AnnConfig) -> nn.Module:
    """The search layer over `indexed` (the catalog already reordered by `layout.order`)."""
    if layout.ivf is None:
        return ExactSearch(torch.from_numpy(indexed.embeddings))
    if layout.ivf.num_items != indexed.num_items:
        raise ValueError(f"the index holds {layout.ivf.num_items} items, the catalog "
                         f"{indexed.num_items}")
    return IVFInt8Search(layout.ivf, config.ivf_search)


FP32_COPY_MAX_BYTES = 256 * 2 ** 20  # "auto": ~1M items of 64 fp32 components


def item_vectors_of(search: nn.Module, indexed: Catalog, config: AnnConfig) -> nn.Module:
    """The item vectors the scorer and the history pooling read (stages/item_vectors.py): the
    search's own tensors (int8 codes, or exact search's fp32 table), with a residual code
    ("int8x2", or "auto" on a large catalog), or a float copy of the indexed vectors ("fp32",
    or "auto" on a catalog whose copy is small)."""
    if isinstance(search, ExactSearch):
        return Fp32Vectors(search.item_embeddings)
    kind = config.item_vectors
    if kind == "auto":
        kind = "fp32" if indexed.embeddings.nbytes <= FP32_COPY_MAX_BYTES else "int8x2"
    if kind == "fp32":
        return Fp32Vectors(torch.from_numpy(indexed.embeddings))
    if kind == "int8x2":
        residual = Int8ResidualVectors.residuals(torch.from_numpy(indexed.embeddings),
                                                 search.codes, search.scales)
        return Int8ResidualVectors(search.codes, search.scales, *residual)
    return Int8Vectors(search.codes, search.scales)


def refinable(search: nn.Module, vectors: nn.Module) -> bool:
    """Whether re-scoring the search's candidates with `vectors` can change their order:
    int8 search with fp32 or two-level int8 item vectors (AnnConfig.refine)."""
    return isinstance(search, IVFInt8Search) and isinstance(vectors, (Fp32Vectors,
                                                                      Int8ResidualVectors))


class AnnResult(NamedTuple):
    """What the ANN stage hands the scorer, per query of the batch."""

    rows: torch.Tensor  # int64 [B, C] candidate index rows, -1 past counts
    scores: torch.Tensor  # float32 [B, C] inner products, descending
    counts: torch.Tensor  # int64 [B] valid candidates: min(oversample * k, matches)
    user_embedding: torch.Tensor  # float32 [B, D] the query vectors
    # int64 [B, L] the rows of the history the query was made of (the request's counted
    # `history` items, else the built history; -1 padded): what the scorer attends over
    history_rows: torch.Tensor


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
    """user id (+ request history) + filter bitmap + k -> oversampled candidate rows for the
    scorer.

    Args:
        users: maps raw user ids (and pooled request histories) to query embeddings.
        search: filtered search over the item index.
        pooling: request histories -> their mean item vector (stages/history.py); callers
            with raw history ids run it first (FreshAnn does, with the fresh items).
        oversample: the stage returns `oversample * k` candidates so that the scorer can
            reorder more than the final k (a larger factor = better final quality, more work).
        refine: the search returns `refine` times the candidates, re-scored with
            `item_vectors` (AnnConfig.refine; 1 = none).
        item_vectors: the indexed items' exact vectors (stages/item_vectors.py), index row
            order; needed when refine > 1.
        built_history: each user's history rows built from the logs (stages/history.py
            BuiltHistory; None: none, every request without `history` attends over nothing).
    """

    def __init__(self, users: nn.Module, search: nn.Module, pooling: nn.Module,
                 oversample: int = 4, refine: int = 1,
                 item_vectors: Optional[nn.Module] = None,
                 built_history: Optional[BuiltHistory] = None):
        super().__init__()
        if refine > 1 and item_vectors is None:
            raise ValueError("AnnStage: refine > 1 re-scores with item_vectors; none given")
        self.users = users
        self.search = search
        self.pooling = pooling
        self.oversample = oversample
        self.refine = refine
        # never called when refine is 1 (TorchScript wants a module here either way)
        self.item_vectors = item_vectors if item_vectors is not None else nn.Identity()
        self.built_history = BuiltHistory.empty() if built_history is None else built_history

    def forward(self, user_ids: torch.Tensor, filter_bits: torch.Tensor, k: torch.Tensor,
                history: Optional[PooledHistory] = None) -> AnnResult:
        """
        Args:
            user_ids: int64 [B]; filter_bits: int64 [B, W]; k: int64 [B] (>= 1);
            history: the requests' pooled histories (None: every user's built history).
        Returns:
            rows int64 [B, C] (-1 past counts), scores float32 [B, C], counts int64 [B],
            user_embedding float32 [B, D], history_rows int64 [B, L].
        """
        user_embedding = self.users(user_ids, history)
        wanted = k * self.oversample
        c = int(wanted.max())
        scores, rows = self.search(user_embedding, filter_bits, c * self.refine)
        if self.refine > 1:
            scores, rows = self.rescore(user_embedding, rows, c)
        # a search returns min(C, matches) rows per query, so this is min(wanted, matches, C)
        # without a popcount of the whole bitmap
        counts = torch.minimum(wanted, (rows >= 0).sum(1))
        return AnnResult(rows, scores, counts, user_embedding,
                         history_rows(self.built_history(user_ids), history))

    def rescore(self, user_embedding: torch.Tensor, rows: torch.Tensor, c: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The best c of the search's candidates `rows` [B, R] (-1 = none) by their exact
        inner product with the item vectors -> (scores [B, min(c, R)] descending, rows)."""
        vectors = self.item_vectors(rows.clamp(min=0))  # [B, R, D]
        exact = torch.bmm(vectors, user_embedding.unsqueeze(2)).squeeze(2)
        exact = exact.masked_fill(rows < 0, float("-inf"))
        top, order = torch.topk(exact, min(c, exact.shape[1]), dim=1)
        return top, torch.where(torch.isinf(top), -1, rows.gather(1, order))
