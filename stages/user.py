"""User side of retrieval: raw 64-bit user id -> query embedding, once per request."""

import torch
from torch import nn

from training.fit_heads import BaselineWeights


def build_user_tower(weights: BaselineWeights) -> nn.Module:
    """user id -> query embedding module from fitted weights."""
    return UserTable(torch.from_numpy(weights.user_ids), torch.from_numpy(weights.user_embeddings),
                     torch.from_numpy(weights.cold_start))


class UserTable(nn.Module):
    """Exact raw-id lookup into a table of user embeddings; unknown ids get the cold-start row.

    Args:
        raw_ids: int64 [U] known user ids (any order, distinct).
        embeddings: float32 [U, D] their embeddings.
        cold_start: float32 [D] the embedding served to users not in `raw_ids`.
    """

    def __init__(self, raw_ids: torch.Tensor, embeddings: torch.Tensor, cold_start: torch.Tensor):
        super().__init__()
        order = torch.argsort(raw_ids)
        self.register_buffer("sorted_ids", raw_ids[order].contiguous())
        table = torch.cat([embeddings[order], cold_start.reshape(1, -1)]).float().contiguous()
        self.register_buffer("table", table)

    def forward(self, user_ids: torch.Tensor) -> torch.Tensor:
        """user_ids int64 [B] -> float32 [B, D]."""
        n = self.sorted_ids.shape[0]
        pos = torch.searchsorted(self.sorted_ids, user_ids).clamp(max=max(n - 1, 0))
        found = self.sorted_ids[pos] == user_ids
        return self.table[torch.where(found, pos, torch.full_like(pos, n))]
