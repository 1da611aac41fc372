"""User side of retrieval: raw 64-bit user id -> query embedding, once per request.

The user tower of the two-tower model (trained by `training/towers.py`): the raw id is mapped
to a row; the row's id embedding, the user's categorical features (e.g. language) and the
user's history vector (the mean item vector of the items they engaged with in the logs) go
through an MLP, and the L2-normalised output is the query vector the ANN searches with and the
scorer broadcasts to the candidates. Unknown ids map to the cold-start row (no features, no
history), trained on examples whose user was hidden (`TwoTowerConfig.cold_start_rate`).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from stages.features import FeatureBag
from stages.history import PooledHistory


@dataclass
class UserTowerConfig:
    output_dim: int = 64  # query vector width = the ANN index dimension
    id_dim: int = 32  # per-user id embedding width
    feature_dim: int = 16  # user feature (language) embedding width
    history_dim: int = 64  # width of the history vector (= the item vectors' width)
    hidden_dim: int = 128  # MLP hidden width


class UserTower(nn.Module):
    """query = normalize(history[row] + MLP([id_embedding[row], features[row], history[row]])),
    row = id_map(raw id).

    The MLP is a residual on the history vector and starts at zero: an untrained tower queries
    with the user's mean engaged-item vector (a closed-form baseline) and training learns what
    to add to it.

    Args:
        id_map: raw ids -> rows of the id embedding (idmap/zero_collision.py: insert mode in
            training, read-only `forward` = lookup at serving); its `unknown_row` is the
            cold-start row and the last row of the table.
        feature_values, feature_weights: [R, M] each row's categorical features as an
            embedding bag (training/data.py `FeatureColumns`), R = unknown_row + 1; the
            cold-start row has none.
        num_feature_values: size of the shared feature table.
        history: float32 [R, H] each row's history vector (zeros: no history).
    """

    def __init__(self, id_map: nn.Module, feature_values: torch.Tensor,
                 feature_weights: torch.Tensor, num_feature_values: int,
                 history: torch.Tensor, config: UserTowerConfig):
        super().__init__()
        num_rows = int(id_map.unknown_row) + 1
        for name, t in (("feature", feature_values), ("history", history)):
            if t.shape[0] != num_rows:
                raise ValueError(f"{name} rows {t.shape[0]} != id map rows {num_rows}")
        if history.shape[1] != config.history_dim:
            raise ValueError(f"history width {history.shape[1]} != {config.history_dim}")
        self.id_map = id_map
        self.id_embedding = nn.Embedding(num_rows, config.id_dim, sparse=True)
        nn.init.normal_(self.id_embedding.weight, std=0.01)
        self.register_buffer("feature_values", feature_values.to(torch.int64).contiguous())
        self.register_buffer("feature_weights", feature_weights.float().contiguous())
        self.register_buffer("history", history.float().contiguous())
        self.features = FeatureBag(num_feature_values, config.feature_dim)
        width = config.id_dim + config.feature_dim + config.history_dim
        self.mlp = nn.Sequential(nn.Linear(width, config.hidden_dim), nn.ReLU(),
                                 nn.Linear(config.hidden_dim, config.output_dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        if config.history_dim != config.output_dim:
            raise ValueError("history_dim must equal output_dim (the history is the residual's "
                             "base)")

    def forward(self, user_ids: torch.Tensor, history: Optional[PooledHistory] = None
                ) -> torch.Tensor:
        """user_ids int64 [B] -> float32 [B, D] unit-norm query vectors. With `history`
        (stages/history.py), a request that carried one uses its pooled vector instead of the
        history built from the logs (zeros when none of its items is known: no history)."""
        rows = self.id_map(user_ids)
        built = self.history[rows]
        if history is not None:
            built = torch.where((history.count >= 0).unsqueeze(1), history.vectors, built)
        return self.encode(rows, built)

    @torch.jit.export
    def encode(self, rows: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Query vectors of id-map rows with the given history vectors (training passes each
        example's history without the example's own item): int64 [B], [B, H] -> [B, D]."""
        x = torch.cat([self.id_embedding(rows),
                       self.features(self.feature_values[rows], self.feature_weights[rows]),
                       history], -1)
        return F.normalize(history + self.mlp(x), dim=-1)


class UserTable(nn.Module):
    """Exact raw-id lookup into a table of user embeddings; unknown ids get the cold-start row
    (the user side of a pretrained two-tower model: training/retrieval.py).

    A pretrained model comes without its user tower, so a request's history cannot go through
    it: a request whose history holds known items queries with the mean of their item vectors
    (the usual item-to-item fallback) instead of its user's row; an empty or unknown history
    keeps the row. With `normalize` (the linear history model, training/linear.py, whose rows
    are unit vectors) that mean is scaled to unit length like the rows.

    Args:
        raw_ids: int64 [U] known user ids (any order, distinct).
        embeddings: float32 [U, D] their embeddings.
        cold_start: float32 [D] the embedding served to users not in `raw_ids`.
    """

    def __init__(self, raw_ids: torch.Tensor, embeddings: torch.Tensor, cold_start: torch.Tensor,
                 normalize: bool = False):
        super().__init__()
        self.normalize = normalize
        order = torch.argsort(raw_ids)
        self.register_buffer("sorted_ids", raw_ids[order].contiguous())
        table = torch.cat([embeddings[order], cold_start.reshape(1, -1)]).float().contiguous()
        self.register_buffer("table", table)

    def forward(self, user_ids: torch.Tensor, history: Optional[PooledHistory] = None
                ) -> torch.Tensor:
        """user_ids int64 [B] -> float32 [B, D]."""
        n = self.sorted_ids.shape[0]
        pos = torch.searchsorted(self.sorted_ids, user_ids).clamp(max=max(n - 1, 0))
        found = self.sorted_ids[pos] == user_ids
        rows = self.table[torch.where(found, pos, torch.full_like(pos, n))]
        if history is None:
            return rows
        pooled = F.normalize(history.vectors, dim=1) if self.normalize else history.vectors
        return torch.where((history.count > 0).unsqueeze(1), pooled, rows)
