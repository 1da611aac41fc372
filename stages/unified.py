"""The `unified` model: filter, ANN, scorer and Value Model in one TorchScript graph.

Same contract as the `retrieval` ensemble, but nothing crosses a process or stage boundary:
the filter bitmap, the candidate lists and the user vector stay tensors inside one forward.
Fresh items (stages/fresh.py) take the same path as in the ensemble: the filter and ANN layers
get the fresh wrappers the builder exports for the ensemble's stages, the scorer and the Value
Model read fresh rows from the `fresh` argument.
"""

from typing import Optional

import torch
from torch import nn

from stages.aggregator import Ranked
from stages.fresh import FreshAnn, FreshFilter, FreshItems
from stages.history import RequestHistory


class UnifiedRetrieval(nn.Module):
    """Args: the four stage modules as the ensemble's stages export them (filter and ann are
    given their fresh wrappers here when they do not have them yet)."""

    def __init__(self, filter: nn.Module, ann: nn.Module, scorer: nn.Module,
                 aggregator: nn.Module):
        super().__init__()
        item_ids = aggregator.item_ids
        self.filter = filter if isinstance(filter, FreshFilter) else FreshFilter(filter, item_ids)
        self.ann = ann if isinstance(ann, FreshAnn) else FreshAnn(ann, int(item_ids.shape[0]))
        self.scorer = scorer
        self.aggregator = aggregator

    @torch.jit.export
    def live_main_words(self, hidden_ids: torch.Tensor) -> torch.Tensor:
        """The `main_live` bitmap of FreshItems (FreshFilter.live_main_words)."""
        return self.filter.live_main_words(hidden_ids)

    def forward(self, plans: torch.Tensor, user_ids: torch.Tensor, k: torch.Tensor,
                task_weights: torch.Tensor, history: Optional[RequestHistory] = None,
                fresh: Optional[FreshItems] = None) -> Ranked:
        """
        Args:
            plans int64 [B, L, 3] (filtering/expression.py), user_ids int64 [B], k int64 [B],
            task_weights float32 [B, T], history: the requests' `history` inputs (None: none
            carried one; stages/history.py), fresh: the fresh store's tables (None: main only).
        Returns:
            item_ids int64 [B, K], scores [B, K], task_scores [B, K, T], counts int64 [B]
            (valid results per query).
        """
        bits = self.filter(plans, fresh)
        found = self.ann(user_ids, bits, k, history, fresh)
        task_scores = self.scorer(found.user_embedding, found.rows, found.history_rows, fresh)
        return self.aggregator(found.rows, task_scores, found.counts, k, task_weights, fresh)
