"""The `unified` model: filter, ANN, scorer and Value Model in one TorchScript graph.

Same contract as the `retrieval` ensemble, but nothing crosses a process or stage boundary:
the filter bitmap, the candidate lists and the user vector stay tensors inside one forward.
"""

from typing import Tuple

import torch
from torch import nn


class UnifiedRetrieval(nn.Module):
    """Args: the four stage modules exactly as the ensemble's stages export them."""

    def __init__(self, filter: nn.Module, ann: nn.Module, scorer: nn.Module,
                 aggregator: nn.Module):
        super().__init__()
        self.filter = filter
        self.ann = ann
        self.scorer = scorer
        self.aggregator = aggregator

    def forward(self, plans: torch.Tensor, user_ids: torch.Tensor, k: torch.Tensor,
                task_weights: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            plans int64 [B, L, 3] (filtering/expression.py), user_ids int64 [B], k int64 [B],
            task_weights float32 [B, T].
        Returns:
            item_ids int64 [B, K], scores [B, K], task_scores [B, K, T], counts int64 [B]
            (valid results per query).
        """
        bits = self.filter(plans)
        rows, _, counts, user_embedding = self.ann(user_ids, bits, k)
        task_scores = self.scorer(user_embedding, rows)
        return self.aggregator(rows, task_scores, counts, k, task_weights)
