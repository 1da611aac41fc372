"""The `scorer` stage: per-task probabilities for every (user, candidate) pair, by the OverArch.

The OverArch is a learned similarity over (user vector u, item vector v): an MLP over
[u, v, u * v, e] (e: a free per-item vector) followed by one small head per task (click, like,
share), plus a per-task linear term in the retrieval score <u, v> (so that it starts from, and
can always fall back to, the calibrated dot product). Its first layer splits by input,

    h1 = relu(W_u u + b + W_v [v, e] + W_x (u * v)),

so the user term W_u u + b is computed once per request and broadcast to the request's
candidates inside the stage (request-only computation): the user vector arrives once per
request ([B, D]) and no per-candidate copy of user data crosses a stage boundary.

Target-aware history (issue 17, the target-aware idea of the Foundation-Expert paper): each
candidate also attends over the request's history items (the items the user side pooled:
the request's `history`, else the built one; stages/history.py). With keys and values
k_j, w_j = W_k h_j, W_w h_j of the history items' vectors h_j and a query q_c = W_q v_c of the
candidate,

    s_cj = <q_c, k_j> / sqrt(A),   a_c = sum_j softmax_j(s_cj) w_j,

and [a_c, max_j s_cj, mean_j s_cj] enter the first layer (W_h), the two similarities also a
per-task linear term. W_h and that term start at zero, so an untrained OverArch is the
history-free one (and training starts from the logistic fit on the dot product). An empty
history (a new user, a request whose history holds no known item) gives zeros.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from stages.fresh import FreshItems
from stages.rows import main_rows, with_fresh


@dataclass
class OverArchConfig:
    hidden_dim: int = 128  # width of the first (user x item) layer
    trunk_dim: int = 64  # width of the shared representation the task heads read
    head_dim: int = 32  # hidden width of each task's head
    # free per-item vector learned with the OverArch (what the item vector misses, e.g. the
    # synthetic world's item quality); small, as most items have a handful of impressions
    item_extra_dim: int = 4
    # target-aware attention over the history items: width A of its queries, keys and values
    # (0: off, the scorer reads no history)
    attention_dim: int = 32


class OverArch(nn.Module):
    """Task logits of (user, item) pairs.

    Args:
        dim: width of the user and item vectors (the two towers' output).
        num_tasks: number of task heads.
    """

    def __init__(self, dim: int, num_tasks: int, config: OverArchConfig):
        super().__init__()
        h, t, k = config.hidden_dim, config.trunk_dim, config.head_dim
        self.user_layer = nn.Linear(dim, h)
        self.item_layer = nn.Linear(dim + config.item_extra_dim, h, bias=False)
        self.cross_layer = nn.Linear(dim, h, bias=False)
        self.trunk = nn.Linear(h, t)
        # one 2-layer head per task, stored stacked so that all heads run as one einsum
        self.head_hidden = nn.Parameter(torch.randn(num_tasks, t, k) / t ** 0.5)
        self.head_hidden_bias = nn.Parameter(torch.zeros(num_tasks, k))
        self.head_out = nn.Parameter(torch.randn(num_tasks, k) / k ** 0.5)
        self.head_out_bias = nn.Parameter(torch.zeros(num_tasks))
        # per-task weight of the retrieval score; training starts it (and head_out_bias) at the
        # logistic fit of the labels on the dot product (training/over_arch.py)
        self.dot_scale = nn.Parameter(torch.ones(num_tasks))
        # target-aware attention (module docstring); its outputs start at zero
        a = max(config.attention_dim, 1)
        self.attention_dim = a
        self.attends = config.attention_dim > 0
        self.history_query = nn.Linear(dim, a, bias=False)
        self.history_key_value = nn.Linear(dim, 2 * a, bias=False)
        self.history_layer = nn.Linear(a + 2, h, bias=False)
        nn.init.zeros_(self.history_layer.weight)
        self.history_scale = nn.Parameter(torch.zeros(num_tasks, 2))

    def project_history(self, vectors: torch.Tensor) -> torch.Tensor:
        """History item vectors [..., D] -> their keys and values [..., 2A]."""
        return self.history_key_value(vectors)

    def history_features(self, items: torch.Tensor, history: torch.Tensor,
                         history_mask: torch.Tensor) -> torch.Tensor:
        """items [B, C, D], history keys and values [B, L, 2A] (project_history), history_mask
        bool [B, L] -> [B, C, A + 2]: the attention-pooled value, the largest and the mean
        similarity (zeros for an empty history)."""
        a = self.attention_dim
        keys, values = history[..., :a], history[..., a:]
        query = self.history_query(items)
        sims = torch.einsum("bca,bla->bcl", query, keys) / a ** 0.5
        mask = history_mask.unsqueeze(1)
        masked = sims.masked_fill(~mask, float("-inf"))
        top = masked.amax(-1, keepdim=True)
        top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
        weights = torch.exp(masked - top)  # exp(-inf) = 0 off the history
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1.0)  # max term is 1
        pooled = torch.einsum("bcl,bla->bca", weights, values)
        count = mask.sum(-1, keepdim=True).clamp(min=1).to(sims.dtype)
        mean = (sims * mask.to(sims.dtype)).sum(-1, keepdim=True) / count
        return torch.cat([pooled, top, mean], -1)

    def user_side(self, user: torch.Tensor) -> torch.Tensor:
        """The per-request part of the first layer: [B, D] -> [B, H]."""
        return self.user_layer(user)

    def forward(self, user: torch.Tensor, items: torch.Tensor, item_extra: torch.Tensor,
                history: Optional[torch.Tensor] = None,
                history_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """user [B, D] (once per request), items [B, C, D], item_extra [B, C, E], history
        [B, L, 2A] the history items' keys and values (project_history) with history_mask
        bool [B, L] (None: no history) -> task logits [B, C, T]."""
        h = self.user_side(user).unsqueeze(1) \
            + self.item_layer(torch.cat([items, item_extra], -1)) \
            + self.cross_layer(user.unsqueeze(1) * items)
        similarity_term = torch.zeros(1, dtype=items.dtype, device=items.device)
        if self.attends and history is not None and history_mask is not None:
            features = self.history_features(items, history, history_mask)
            h = h + self.history_layer(features)
            similarity_term = features[..., -2:] @ self.history_scale.T
        h = torch.relu(self.trunk(torch.relu(h)))
        g = torch.relu(torch.einsum("bch,thk->bctk", h, self.head_hidden)
                       + self.head_hidden_bias)
        dot = torch.einsum("bd,bcd->bc", user, items).unsqueeze(-1)
        return (g * self.head_out).sum(-1) + self.head_out_bias + dot * self.dot_scale \
            + similarity_term


class OverArchScorer(nn.Module):
    """Task probabilities of candidate rows for one user vector per request.

    Args:
        item_vectors: the candidates' vectors, index row order (stages/item_vectors.py: the
            index's int8 vectors, or fp32 ones): what the ANN indexes.
        item_extra: float32 [N, E] the OverArch's per-item vectors, index row order.
        over_arch: the trained OverArch.
    """

    def __init__(self, item_vectors: nn.Module, item_extra: torch.Tensor, over_arch: OverArch):
        super().__init__()
        self.item_vectors = item_vectors
        self.register_buffer("item_extra", item_extra.float().contiguous())
        # fresh items (stages/fresh.py) have no learned per-item vector yet: the mean item's
        self.register_buffer("fresh_item_extra", item_extra.float().mean(0, keepdim=True))
        self.over_arch = over_arch

    def forward(self, user_embedding: torch.Tensor, rows: torch.Tensor,
                history_rows: Optional[torch.Tensor] = None,
                fresh: Optional[FreshItems] = None) -> torch.Tensor:
        """user_embedding [B, D], rows int64 [B, C] (-1 = padding; fresh rows read `fresh`,
        stages/fresh.py), history_rows int64 [B, L] the rows of the history the user vector
        was made of (-1 = padding; None: no history) -> task scores [B, C, T]."""
        fresh_vectors = None if fresh is None else fresh.embeddings
        # gather() checks the rows once; the per-item extras are read at the same rows
        items = self.item_vectors.gather(rows, fresh_vectors)
        n = self.item_extra.shape[0]
        extra = self.item_extra[main_rows(rows, n)]
        if fresh is not None:
            extra = with_fresh(extra, self.fresh_item_extra.expand(
                fresh.embeddings.shape[0], -1), rows, n)
        history: Optional[torch.Tensor] = None
        history_mask: Optional[torch.Tensor] = None
        if history_rows is not None and self.over_arch.attends:
            history = self.over_arch.project_history(
                self.item_vectors.gather(history_rows, fresh_vectors))
            history_mask = history_rows >= 0
        return torch.sigmoid(self.over_arch(user_embedding, items, extra, history,
                                            history_mask))


class DotProductScorer(nn.Module):
    """The scorer of a pretrained two-tower model without interactions to learn heads from:
    one task, `similarity` = sigmoid(<u, v>), the retrieval score itself (monotone in it, so
    the Value Model keeps the ANN's order; not a calibrated probability).

    Args:
        item_vectors: the indexed item vectors, index row order (stages/item_vectors.py).
    """

    TASKS = ("similarity",)

    def __init__(self, item_vectors: nn.Module):
        super().__init__()
        self.item_vectors = item_vectors

    def forward(self, user_embedding: torch.Tensor, rows: torch.Tensor,
                history_rows: Optional[torch.Tensor] = None,
                fresh: Optional[FreshItems] = None) -> torch.Tensor:
        """user_embedding [B, D], rows int64 [B, C] (-1 = padding), history_rows: not read
        (the signature of OverArchScorer) -> task scores [B, C, 1]."""
        items = self.item_vectors.gather(rows, None if fresh is None else fresh.embeddings)
        return torch.sigmoid(torch.einsum("bd,bcd->bc", user_embedding, items)).unsqueeze(-1)
