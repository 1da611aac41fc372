"""The retrieval model as stage modules: trained weights (training/train.py) or pretrained
vectors -> the user side (raw id -> query vector), the item vectors the ANN indexes and the
scorer; and `retrieval_stages`, the ann, scorer and aggregator stages over a catalog.

The builder exports these stages; training/evaluate.py runs the same ones in-process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import nn

from idmap.zero_collision import ZeroCollisionConfig, ZeroCollisionMap
from stages.aggregator import ValueModel
from stages.ann import (
    AnnConfig,
    AnnStage,
    build_search,
    index_layout,
    item_vectors_of,
    refinable,
)
from stages.history import BuiltHistory, HistoryPooling
from stages.item_vectors import Fp32Vectors
from stages.scorer import DotProductScorer, OverArch, OverArchConfig, OverArchScorer
from stages.user import UserTable, UserTower, UserTowerConfig
from training.weights import TrainedWeights
from world.synthetic import Catalog


def build_user_tower(weights: TrainedWeights) -> nn.Module:
    """The trained user side (serving: the id map is only read): the user tower, or for the
    linear history model (training/linear.py) its table of user vectors."""
    spec = weights.user_tower
    if spec.get("kind") == "linear":
        return UserTable(spec["raw_ids"], spec["user_vectors"], spec["cold_start"],
                         normalize=True).eval()
    tower = UserTower(ZeroCollisionMap(ZeroCollisionConfig(**spec["id_map"])),
                      spec["feature_values"],
                      spec["feature_weights"], spec["num_feature_values"], spec["history"],
                      UserTowerConfig(**spec["config"]))
    tower.load_state_dict(spec["state"])
    return tower.requires_grad_(False).eval()


def build_over_arch(weights: TrainedWeights) -> OverArch:
    spec = weights.over_arch
    model = OverArch(int(weights.item_vectors.shape[1]), len(weights.tasks),
                     OverArchConfig(**spec["config"]))
    model.load_state_dict(spec["state"])
    return model.requires_grad_(False).eval()


@dataclass
class RetrievalModel:
    """The model the ann, scorer and aggregator stages are made of.

    users: raw user id int64 [B] -> query vector [B, D] (the ANN's queries).
    item_vectors: float32 [N, D] what the ANN indexes, catalog order.
    item_extra / over_arch: the trained OverArch and its per-item vectors [N, E]; None for a
        pretrained model (dot-product scorer).
    history_vectors: float32 [N, D] what each item adds to a request history's pooled vector
        (stages/history.py), catalog order; None: the item vectors (the two towers share
        them; the linear model has its own history side).
    histories: each user's built history (TrainedWeights.histories: raw user ids, offsets,
        catalog rows; None: none), what the target-aware scorer attends over.
    history_recency: how a request history's mean weighs its newest items (stages/history.py
        recency_weight; 0: a plain mean): the linear model's own pooling (LinearConfig).
    """

    tasks: Tuple[str, ...]
    users: nn.Module
    item_vectors: np.ndarray
    item_extra: Optional[np.ndarray] = None
    over_arch: Optional[nn.Module] = None
    history_vectors: Optional[np.ndarray] = None
    histories: Optional[Dict[str, torch.Tensor]] = None
    history_recency: float = 0.0

    @staticmethod
    def trained(weights: TrainedWeights) -> RetrievalModel:
        spec = weights.user_tower
        history = spec.get("history_vectors")
        # a linear model saved before the weighting pooled plainly (recency 0)
        recency = float(spec["config"].get("recency", 0.0)) if spec.get("kind") == "linear" \
            else 0.0
        return RetrievalModel(tuple(weights.tasks), build_user_tower(weights),
                              weights.item_vectors.numpy(), weights.item_extra.numpy(),
                              build_over_arch(weights),
                              None if history is None else history.numpy(),
                              weights.histories or None, recency)

    @staticmethod
    def pretrained(user_ids: np.ndarray, user_vectors: np.ndarray, item_vectors: np.ndarray
                   ) -> RetrievalModel:
        """Exact user-id lookup of the given vectors; unknown users get the mean user vector."""
        users = torch.from_numpy(np.ascontiguousarray(user_vectors, dtype=np.float32))
        table = UserTable(torch.from_numpy(user_ids), users, users.mean(0))
        return RetrievalModel(DotProductScorer.TASKS, table.eval(),
                              np.ascontiguousarray(item_vectors, dtype=np.float32))

    def scorer(self, order: np.ndarray, item_vectors: Optional[nn.Module] = None
               ) -> nn.Module:
        """The scorer stage with its per-item tensors in index row order (`order[r]` = the
        catalog row at index row r), reading `item_vectors` (stages/item_vectors.py; None: an
        fp32 copy of the model's item vectors)."""
        rows = torch.from_numpy(np.asarray(order, dtype=np.int64))
        if item_vectors is None:
            item_vectors = Fp32Vectors(torch.from_numpy(self.item_vectors)[rows])
        if self.over_arch is None:
            return DotProductScorer(item_vectors)
        return OverArchScorer(item_vectors, torch.from_numpy(self.item_extra)[rows],
                              self.over_arch)

    def with_items(self, rows: np.ndarray, new_vectors: np.ndarray) -> RetrievalModel:
        """The model over catalog rows `rows` followed by new items with `new_vectors` (in the
        index's space; the OverArch gives them the mean per-item vector, as fresh items; a
        separate history side gives them nothing: no history vector was learned for them)."""
        vectors = np.concatenate([self.item_vectors[rows], new_vectors.astype(np.float32)])
        extra = None
        if self.item_extra is not None:
            mean = self.item_extra.mean(0, keepdims=True)
            extra = np.concatenate([self.item_extra[rows],
                                    np.repeat(mean, len(new_vectors), 0)]).astype(np.float32)
        history = None
        if self.history_vectors is not None:
            history = np.concatenate([self.history_vectors[rows], np.zeros(
                (len(new_vectors), self.history_vectors.shape[1]), np.float32)])
        histories = None
        if self.histories is not None:  # catalog rows move; items no longer served drop out
            position = torch.full((len(self.item_vectors),), -1, dtype=torch.int64)
            position[torch.from_numpy(np.asarray(rows, dtype=np.int64))] = torch.arange(
                len(rows))
            histories = remap_histories(self.histories, position)
        return replace(self, item_vectors=vectors, item_extra=extra, history_vectors=history,
                       histories=histories)

    def built_history(self, order: np.ndarray) -> Optional[BuiltHistory]:
        """The built histories as index rows (`order[r]` = the catalog row at index row r)."""
        if self.histories is None:
            return None
        index_row = torch.empty(len(order), dtype=torch.int64)
        index_row[torch.from_numpy(np.asarray(order, dtype=np.int64))] = torch.arange(len(order))
        h = remap_histories(self.histories, index_row)
        return BuiltHistory(h["user_ids"], h["offsets"], h["items"])

    @property
    def fresh_in_history(self) -> bool:
        """Whether a fresh item (its vector in the index's space) can count in a request
        history: only when histories are pooled from the index's space too."""
        return self.history_vectors is None

    def history_table(self, order: np.ndarray, item_vectors: nn.Module) -> nn.Module:
        """The vectors request histories are pooled from, index row order: the item vectors
        the scorer reads (one copy) unless the model has a separate history side."""
        if self.history_vectors is None:
            return item_vectors
        rows = torch.from_numpy(np.asarray(order, dtype=np.int64))
        return Fp32Vectors(torch.from_numpy(np.ascontiguousarray(self.history_vectors))[rows])


def remap_histories(histories: Dict[str, torch.Tensor], position: torch.Tensor
                    ) -> Dict[str, torch.Tensor]:
    """`histories` with item row r moved to position[r] (-1: dropped, order kept)."""
    items = position[histories["items"]]
    kept = items >= 0
    owner = torch.repeat_interleave(torch.arange(len(histories["user_ids"])),
                                    histories["offsets"][1:] - histories["offsets"][:-1])
    lengths = torch.bincount(owner[kept], minlength=len(histories["user_ids"]))
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return {"user_ids": histories["user_ids"], "offsets": offsets, "items": items[kept]}


class IndexedStages(NamedTuple):
    stages: Dict[str, torch.nn.Module]  # ann, scorer, aggregator
    catalog: Catalog  # in index row order: row r of every stage tensor
    order: np.ndarray  # the catalog row stored at each index row


def retrieval_stages(catalog: Catalog, model: RetrievalModel, ann: AnnConfig,
                     task_weights: tuple) -> IndexedStages:
    """The ann, scorer and aggregator stages of `model`, and the catalog they index.

    The ANN indexes the model's item vectors (the item tower's outputs, or the pretrained
    vectors: what the user side's queries live with), so they replace the catalog's content
    embeddings before the index decides the row order.
    """
    if len(task_weights) != len(model.tasks):
        raise ValueError(f"{len(task_weights)} task weights for the {len(model.tasks)} tasks "
                         f"{', '.join(model.tasks)}")
    learned = replace(catalog, embeddings=model.item_vectors)
    layout = index_layout(learned, ann)
    order = layout.order
    indexed = learned.take(order)
    search = build_search(indexed, layout, ann)
    # one copy of the item vectors: the index's, read by the scorer and the history pooling
    vectors = item_vectors_of(search, indexed, ann)
    pooling = HistoryPooling(torch.from_numpy(indexed.item_ids),
                             model.history_table(order, vectors), model.fresh_in_history,
                             model.history_recency)
    stages = {
        "ann": AnnStage(model.users, search, pooling, ann.oversample,
                        ann.refine if refinable(search, vectors) else 1, vectors,
                        model.built_history(order)),
        "scorer": model.scorer(order, vectors),
        "aggregator": ValueModel(torch.from_numpy(indexed.item_ids),
                                 torch.tensor(task_weights, dtype=torch.float32)),
    }
    return IndexedStages(stages, indexed, order)
