"""The `scorer` stage: per-task probabilities for every (user, candidate) pair.

Request-only: the user embedding arrives once per request ([B, D]) and is broadcast to the
request's candidates inside the stage; no per-candidate copy of user data crosses a stage.
"""

import torch
from torch import nn

from training.fit_heads import BaselineWeights
from world.synthetic import Catalog


def build_scorer_stage(catalog: Catalog, weights: BaselineWeights) -> nn.Module:
    """The scorer over `catalog` (in index row order) from fitted weights."""
    return DotProductTaskScorer(torch.from_numpy(catalog.embeddings),
                                torch.from_numpy(weights.head_scale),
                                torch.from_numpy(weights.head_bias))


class DotProductTaskScorer(nn.Module):
    """p_t = sigmoid(scale_t * <user, item> + bias_t): one logistic head per task over the
    retrieval dot product, fitted to the logged labels (training/fit_heads.py).

    Args:
        item_embeddings: float32 [N, D] in index row order.
        scale, bias: float32 [T].
    """

    def __init__(self, item_embeddings: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("item_embeddings", item_embeddings.float().contiguous())
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", bias.float())

    def forward(self, user_embedding: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """user_embedding [B, D], rows int64 [B, C] (-1 = padding) -> task scores [B, C, T]."""
        items = self.item_embeddings[rows.clamp(min=0)]  # [B, C, D]
        dot = torch.einsum("bd,bcd->bc", user_embedding, items)
        return torch.sigmoid(dot.unsqueeze(-1) * self.scale + self.bias)
