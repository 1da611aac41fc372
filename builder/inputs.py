"""What a build is made from: the items to index (`BuildInput`), the retrieval model over them
(`RetrievalModel`), and the fresh store's items folded into a rebuild (`fold_fresh`).

Two sources give a BuildInput: the synthetic world, and a catalog directory (catalog/). A
RetrievalModel is either trained from the source's interactions (two-tower + OverArch + task
heads) or made of pretrained vectors (a user table and a dot-product scorer).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from catalog import CatalogSource
from fresh.store import LOG_NAME, FreshStore
from stages.scorer import DotProductScorer, OverArchScorer, build_over_arch
from stages.user import UserTable, build_user_tower
from training.data import LoggedData, from_catalog, from_world
from training.weights import TrainedWeights
from world.schema import FeatureSpec, Schema
from world.synthetic import Catalog, World

SYNTHETIC_TASK_WEIGHTS = (1.0, 2.0, 4.0)  # click, like, share


@dataclass
class BuildInput:
    """The items a build indexes and what its model is learned or taken from.

    catalog: items in source order; `embeddings` are content vectors (width 0: none).
    data: logged data to train the towers, OverArch and heads from; None when the model is
        pretrained vectors (`user_vectors` + the catalog's embeddings).
    titles: display text per item (items.csv's neighbour item_titles.csv), or None.
    """

    name: str
    catalog: Catalog
    tasks: Tuple[str, ...]
    task_weights: Tuple[float, ...]
    user_ids: np.ndarray
    data: Optional[LoggedData] = None
    user_vectors: Optional[np.ndarray] = None
    titles: Optional[np.ndarray] = None
    info: Dict = field(default_factory=dict)

    @staticmethod
    def from_world(world: World) -> BuildInput:
        return BuildInput("synthetic", world.catalog, tuple(world.tasks), SYNTHETIC_TASK_WEIGHTS,
                          world.user_ids, data=from_world(world),
                          info={"source": "synthetic", "world": vars(world.config)})

    @staticmethod
    def from_catalog(source: CatalogSource) -> BuildInput:
        base = BuildInput(source.name, source.catalog, tuple(source.tasks),
                          tuple(source.task_weights), source.user_ids, titles=source.titles,
                          info={"source": "catalog", "layout": source.layout,
                                **source.fingerprint})
        if source.interactions is not None:
            return replace(base, data=from_catalog(source))
        # pretrained two-tower, no interactions: one task, the dot product
        return replace(base, tasks=DotProductScorer.TASKS, task_weights=(1.0,),
                       user_vectors=source.user_vectors)


@dataclass
class RetrievalModel:
    """The model the ann, scorer and aggregator stages are made of.

    users: raw user id int64 [B] -> query vector [B, D] (the ANN's queries).
    item_vectors: float32 [N, D] what the ANN indexes, catalog order.
    item_extra / over_arch: the trained OverArch and its per-item vectors [N, E]; None for a
        pretrained model (dot-product scorer).
    """

    tasks: Tuple[str, ...]
    users: nn.Module
    item_vectors: np.ndarray
    item_extra: Optional[np.ndarray] = None
    over_arch: Optional[nn.Module] = None

    @staticmethod
    def trained(weights: TrainedWeights) -> RetrievalModel:
        return RetrievalModel(tuple(weights.tasks), build_user_tower(weights),
                              weights.item_vectors.numpy(), weights.item_extra.numpy(),
                              build_over_arch(weights))

    @staticmethod
    def pretrained(user_ids: np.ndarray, user_vectors: np.ndarray, item_vectors: np.ndarray
                   ) -> RetrievalModel:
        """Exact user-id lookup of the given vectors; unknown users get the mean user vector."""
        users = torch.from_numpy(np.ascontiguousarray(user_vectors, dtype=np.float32))
        table = UserTable(torch.from_numpy(user_ids), users, users.mean(0))
        return RetrievalModel(DotProductScorer.TASKS, table.eval(),
                              np.ascontiguousarray(item_vectors, dtype=np.float32))

    def scorer(self, order: np.ndarray) -> nn.Module:
        """The scorer stage with its per-item tensors in index row order (`order[r]` = the
        catalog row at index row r)."""
        rows = torch.from_numpy(np.asarray(order, dtype=np.int64))
        vectors = torch.from_numpy(self.item_vectors)[rows]
        if self.over_arch is None:
            return DotProductScorer(vectors)
        return OverArchScorer(vectors, torch.from_numpy(self.item_extra)[rows], self.over_arch)

    def with_items(self, rows: np.ndarray, new_vectors: np.ndarray) -> RetrievalModel:
        """The model over catalog rows `rows` followed by new items with `new_vectors` (in the
        index's space; the OverArch gives them the mean per-item vector, as fresh items)."""
        vectors = np.concatenate([self.item_vectors[rows], new_vectors.astype(np.float32)])
        extra = None
        if self.item_extra is not None:
            mean = self.item_extra.mean(0, keepdims=True)
            extra = np.concatenate([self.item_extra[rows],
                                    np.repeat(mean, len(new_vectors), 0)]).astype(np.float32)
        return replace(self, item_vectors=vectors, item_extra=extra)


@dataclass
class Folded:
    """A catalog with the fresh store's state taken in."""

    catalog: Catalog
    model: RetrievalModel
    titles: Optional[np.ndarray]
    added: int  # fresh items now in the main index
    dropped: int  # catalog items retired or replaced through the store


def read_fresh(directory: Path) -> Optional[FreshStore]:
    """The store in `directory` when it holds any update, else None."""
    if not (Path(directory) / LOG_NAME).exists():
        return None
    store = FreshStore(directory)
    return store if store.updates else None


def fold_fresh(catalog: Catalog, model: RetrievalModel, titles: Optional[np.ndarray],
               store: FreshStore) -> Folded:
    """`catalog` without the items the store retired or replaced, plus its live fresh items
    (their vectors as given, their feature values respelled in the catalog's schema: a str
    value the catalog does not have is added to its vocabulary)."""
    header = store.header
    if header.dim != model.item_vectors.shape[1]:
        raise ValueError(f"the fresh store holds {header.dim}-wide vectors and the rebuilt "
                         f"index {model.item_vectors.shape[1]}-wide ones: they are not one "
                         "space; rebuild with --discard-fresh to drop the fresh items")
    keep = ~np.isin(catalog.item_ids, store.hidden_ids())
    live = np.flatnonzero(store.live)
    schema = Schema([FeatureSpec(f.name, f.kind, f.multi_valued, list(f.vocabulary))
                     for f in catalog.schema.features])
    stored = header.feature_schema
    start = header.column_start
    features: List[np.ndarray] = []
    for spec, column in zip(schema.features, catalog.features):
        values: List[List[int]] = [[] for _ in live]
        if spec.name in [f.name for f in stored.features]:
            f = stored.feature_id(spec.name)
            old = stored.features[f]
            cells = store.features[live, start[f]: start[f + 1]]
            for i, cell in enumerate(cells.tolist()):
                values[i] = [_respell(spec, old.spell(v)) for v in cell if v >= 0]
        width = max([column.shape[1]] + [len(v) for v in values])
        new = np.full((len(live), width), -1, dtype=np.int64)
        for i, v in enumerate(values):
            new[i, : len(v)] = sorted(v)
        old_rows = np.full((int(keep.sum()), width), -1, dtype=np.int64)
        old_rows[:, : column.shape[1]] = column[keep]
        features.append(np.concatenate([old_rows, new]))
    rows = np.flatnonzero(keep)
    folded = Catalog(np.concatenate([catalog.item_ids[keep], store.item_ids[live]]),
                     np.zeros((len(rows) + len(live), 0), np.float32), schema, features)
    if titles is not None:
        titles = np.concatenate([titles[keep], np.full(len(live), "", dtype=object)])
    return Folded(folded, model.with_items(rows, store.embeddings[live]), titles,
                  added=len(live), dropped=int((~keep).sum()))


def _respell(spec: FeatureSpec, spelled: str) -> int:
    if spec.kind == "int":
        return int(spelled)
    try:
        return spec.value_id(spelled)
    except ValueError:
        spec.vocabulary.append(spelled)
        spec._index = None
        return len(spec.vocabulary) - 1
