"""Fresh items inside the retrieval graph: the anchor's "main + fresh" merge.

The main index is built offline; items added, replaced or retired since then live in the small
fresh store (fresh/store.py). The runner that owns a model reads the store and passes its
tables to the model as one `FreshItems` argument per batch, so the scripted modules stay pure
functions of their inputs. With `fresh=None` every module behaves exactly as without this file.

Row space: a candidate row is a bit position of the filter bitmap. The filter layer hands on
`[main words | fresh words]`: bits 0..N-1 are the main index rows, and fresh row r is bit
`fresh_row_offset(N) + r` (the first bit of the fresh words). Every stage maps a row back to
its table with `gather_rows` (stages/rows.py).

    filter:     main bits (minus retired/replaced main rows) ++ exact filter over fresh rows
    ann:        main search ++ brute-force search over passing fresh rows, merged by score
    scorer:     item tensors of main rows from the index, of fresh rows from the fresh tables
    aggregator: raw item ids likewise
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from filtering.bits import num_words, pack_bits, unpack_bits
from stages.ann import AnnResult
from stages.history import PooledHistory, RequestHistory
from stages.plan import PostfixPlan
from stages.rows import fresh_row_offset


class FreshItems(NamedTuple):
    """The fresh store's tables for one batch (C = the store's capacity, fresh/store.py).

    embeddings: float32 [C, D] in the main index's embedding space.
    features: int64 [C, S] value ids, feature f in columns column_start[f]:column_start[f + 1].
    column_start: int64 [F + 1].
    item_ids: int64 [C] raw item id of each row (-1: never used).
    live: bool [C] rows currently served.
    main_live: int64 [W] packed bitmap of the main rows still served (neither retired nor
        replaced by a fresh row); used by the filter only (`FreshFilter.live_main_words`).
    """

    embeddings: torch.Tensor
    features: torch.Tensor
    column_start: torch.Tensor
    item_ids: torch.Tensor
    live: torch.Tensor
    main_live: torch.Tensor


class FreshFilter(nn.Module):
    """Any filter layer (plans -> packed bits over the main rows), plus the fresh rows.

    Args:
        main: the filter layer of the main index.
        item_ids: int64 [N] raw item id of every main row (to hide retired/replaced items).
    """

    def __init__(self, main: nn.Module, item_ids: torch.Tensor):
        super().__init__()
        self.main = main
        self.register_buffer("item_ids", item_ids.to(torch.int64).contiguous())
        self.plan = PostfixPlan()

    @torch.jit.export
    def live_main_words(self, hidden_ids: torch.Tensor) -> torch.Tensor:
        """int64 [W]: bit r set unless main row r's raw id is in `hidden_ids` (the store's
        retired and replaced ids). Runners compute it when the store changes, not per batch."""
        keep = ~torch.isin(self.item_ids, hidden_ids)
        return pack_bits(keep.unsqueeze(0))[0]

    def evaluate_fresh(self, plan: torch.Tensor, features: torch.Tensor,
                       column_start: torch.Tensor) -> torch.Tensor:
        """Exact evaluation of one postfix plan [L, 3] over the fresh rows -> bool [C]."""
        steps: List[List[int]] = plan.tolist()
        truths: List[torch.Tensor] = []
        for row in self.plan.terms(steps):
            lo = int(column_start[row[1]])
            hi = int(column_start[row[1] + 1])
            truths.append((features[:, lo:hi] == row[2]).any(dim=1))
        everything = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
        return self.plan(steps, truths, everything)

    def forward(self, plans: torch.Tensor, fresh: Optional[FreshItems] = None) -> torch.Tensor:
        """plans int64 [B, L, 3] -> int64 [B, W] (no fresh) or [B, W + num_words(C)]."""
        bits = self.main(plans)
        if fresh is None:
            return bits
        bits = bits & fresh.main_live.unsqueeze(0)
        passing = torch.stack([self.evaluate_fresh(plans[b], fresh.features, fresh.column_start)
                               for b in range(plans.shape[0])])
        return torch.cat([bits, pack_bits(passing & fresh.live.unsqueeze(0))], 1)


def merge_fresh(user_embedding: torch.Tensor, fresh_bits: torch.Tensor, fresh: FreshItems,
                rows: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor,
                wanted: torch.Tensor, offset: int
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The main + fresh top-k merge of one batch of ANN results.

    Fresh rows that pass the filter are scored exactly (fp32 inner product: the fresh index is
    small) and merged with the main candidates by score; each query keeps its best
    min(wanted, main matches + fresh matches) candidates.

    Args:
        user_embedding [B, D]; fresh_bits int64 [B, num_words(C)]; rows/scores [B, M] and
        counts [B] as the main search returned them (valid below counts); wanted int64 [B];
        offset: fresh_row_offset(N).
    Returns:
        rows int64 [B, M'] (-1 past counts), scores [B, M'], counts [B].
    """
    c = fresh.embeddings.shape[0]
    passing = unpack_bits(fresh_bits, c)
    fresh_counts = torch.minimum(passing.sum(1), wanted)
    if int(fresh_counts.max()) == 0:
        return rows, scores, counts
    fresh_scores = (user_embedding @ fresh.embeddings.T).masked_fill(~passing, float("-inf"))
    top_fresh, top_fresh_rows = torch.topk(fresh_scores, int(fresh_counts.max()), dim=1)
    device = rows.device
    main_valid = torch.arange(rows.shape[1], device=device).unsqueeze(0) < counts.unsqueeze(1)
    fresh_valid = torch.arange(top_fresh.shape[1], device=device).unsqueeze(0) \
        < fresh_counts.unsqueeze(1)
    all_scores = torch.cat([scores.masked_fill(~main_valid, float("-inf")),
                            top_fresh.masked_fill(~fresh_valid, float("-inf"))], 1)
    all_rows = torch.cat([rows, top_fresh_rows + offset], 1)
    total = torch.minimum(counts + fresh_counts, wanted)
    merged_scores, order = torch.topk(all_scores, int(total.max()), dim=1)
    merged_rows = torch.gather(all_rows, 1, order)
    valid = torch.arange(merged_rows.shape[1], device=device).unsqueeze(0) < total.unsqueeze(1)
    return torch.where(valid, merged_rows, -1), merged_scores, total


class FreshAnn(nn.Module):
    """The ANN stage of the ensemble with the fresh merge: `ann` searches the main words of the
    bitmap, `merge_fresh` adds the fresh rows.

    Args:
        ann: an ANN stage (stages/ann.py AnnStage): forward(user_ids, filter_bits, k,
            pooled history) -> AnnResult, with `oversample` and `pooling` attributes.
        num_items: N, the main index's rows.
    """

    def __init__(self, ann: nn.Module, num_items: int):
        super().__init__()
        self.ann = ann
        self.oversample = int(ann.oversample)
        self.main_words = num_words(num_items)
        self.offset = fresh_row_offset(num_items)

    def forward(self, user_ids: torch.Tensor, filter_bits: torch.Tensor, k: torch.Tensor,
                history: Optional[RequestHistory] = None, fresh: Optional[FreshItems] = None
                ) -> AnnResult:
        """As the wrapped stage, the requests' raw history ids pooled first (fresh items
        count); with `fresh`, filter_bits holds the fresh words after the main ones
        (FreshFilter) and rows at and past fresh_row_offset(N) are fresh rows."""
        has_fresh_words = filter_bits.shape[1] > self.main_words
        main_bits = filter_bits[:, : self.main_words].contiguous() if has_fresh_words \
            else filter_bits
        pooled: Optional[PooledHistory] = None
        if history is not None:
            if fresh is None:
                pooled = self.ann.pooling(history)
            else:
                pooled = self.ann.pooling(history, fresh.item_ids, fresh.embeddings, fresh.live)
        found = self.ann(user_ids, main_bits, k, pooled)
        if fresh is None or not has_fresh_words:
            return found
        rows, scores, counts = merge_fresh(
            found.user_embedding, filter_bits[:, self.main_words:], fresh, found.rows,
            found.scores, found.counts, k * self.oversample, self.offset)
        return AnnResult(rows, scores, counts, found.user_embedding, found.history_rows)
