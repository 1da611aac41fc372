"""What a build is made from: the items to index (`BuildInput`: the synthetic world or a
catalog directory, catalog/), and the fresh store's items folded into a rebuild
(`fold_fresh`). The retrieval model over them is training/retrieval.py's `RetrievalModel`:
trained from the source's interactions, or made of its pretrained vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from catalog import CatalogSource
from fresh.store import LOG_NAME, FreshStore
from stages.scorer import DotProductScorer
from training.data import LoggedData, from_catalog, from_world
from training.retrieval import RetrievalModel
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

    def provenance(self) -> Provenance:
        return Provenance(self.name, self.info, tuple(self.task_weights), self.user_ids)

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


class Provenance(NamedTuple):
    """What the written repository records about its source (build_info.json, users.csv):
    all a build keeps of the source once the stage modules exist."""

    name: str
    info: Dict
    task_weights: Tuple[float, ...]
    user_ids: np.ndarray


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
