"""Categorical features as one vector per entity: the mean embedding of each feature's values,
summed over features (an embedding bag with per-value weights)."""

import torch
from torch import nn


class FeatureBag(nn.Module):
    """sum_f mean_{v in values_f} E[v], from value ids already offset into one shared table.

    Args:
        num_values: rows of the shared table (all features' vocabularies side by side).
        dim: embedding width.
    """

    def __init__(self, num_values: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(max(num_values, 1), dim)
        nn.init.normal_(self.table.weight, std=0.1)

    def forward(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """values int64 [..., M] (-1 = padding), weights float32 [..., M] (0 on padding)
        -> float32 [..., dim]."""
        return (self.table(values.clamp(min=0)) * weights.unsqueeze(-1)).sum(-2)
