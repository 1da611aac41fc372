"""The `aggregator` stage: the Value Model and the final top-k.

    value(user, item) = sum_t w_t * p_t(user, item)

with p_t the scorer's task probabilities and w the task weights: the model's defaults from
its config, or the request's `task_weights` (non-negative, one per task). Results are ordered
by value, descending; ties keep the candidate order.
"""

from typing import NamedTuple, Optional

import torch
from torch import nn

from stages.fresh import FreshItems
from stages.rows import gather_rows


class Ranked(NamedTuple):
    """The final results of a batch: query b's first counts[b] entries are its answer."""

    item_ids: torch.Tensor  # int64 [B, K] raw item ids
    scores: torch.Tensor  # float32 [B, K] Value Model values, descending
    task_scores: torch.Tensor  # float32 [B, K, T]
    counts: torch.Tensor  # int64 [B] = min(k, candidates)


class ValueModel(nn.Module):
    """Args:
        item_ids: int64 [N] raw item id of every index row.
        default_weights: float32 [T].
    """

    def __init__(self, item_ids: torch.Tensor, default_weights: torch.Tensor):
        super().__init__()
        self.register_buffer("item_ids", item_ids.to(torch.int64).contiguous())
        self.register_buffer("default_weights", default_weights.float())

    def forward(self, rows: torch.Tensor, task_scores: torch.Tensor, counts: torch.Tensor,
                k: torch.Tensor, weights: torch.Tensor, fresh: Optional[FreshItems] = None
                ) -> Ranked:
        """
        Args:
            rows int64 [B, C] (valid below counts), task_scores [B, C, T], counts int64 [B],
            k int64 [B], weights float32 [B, T], fresh: the fresh store's tables, for the raw
            ids of fresh rows (stages/fresh.py).
        Returns:
            item_ids int64 [B, K], values [B, K], task_scores [B, K, T], result counts [B]
            (= min(k, counts)); K = min(max k, C).
        """
        c = rows.shape[1]
        values = (task_scores * weights.unsqueeze(1)).sum(-1)
        valid = torch.arange(c, device=rows.device).unsqueeze(0) < counts.unsqueeze(1)
        values = values.masked_fill(~valid, float("-inf"))
        top = min(int(k.max()), c)
        sorted_values, sorted_order = torch.sort(values, dim=1, descending=True, stable=True)
        top_values, order = sorted_values[:, :top], sorted_order[:, :top]
        top_rows = torch.gather(rows, 1, order)
        top_tasks = torch.gather(task_scores, 1,
                                 order.unsqueeze(-1).expand(-1, -1, task_scores.shape[2]))
        ids = gather_rows(self.item_ids, None if fresh is None else fresh.item_ids, top_rows)
        return Ranked(ids, top_values, top_tasks, torch.minimum(k, counts))
