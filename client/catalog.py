"""Read the indexed catalog (`items.csv`, written by the builder) to show and check results."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Collection, Dict, List, Optional

from filtering.expression import All, And, Not, Or, Term
from filtering.spelling import join_values, split_values
from world.schema import Schema

DEFAULT_ITEMS_CSV = Path(__file__).resolve().parents[1] / "build" / "items.csv"


def load_items(path: Path = DEFAULT_ITEMS_CSV, ids: Optional[Collection[int]] = None
               ) -> Dict[int, Dict[str, List[str]]]:
    """item_id -> {feature name: list of values}: the values themselves, read from their
    spelling in the cells (`"Science Fiction"` is the value `Science Fiction`). With `ids`,
    only those items are kept (one pass over the file: a 10M-item catalog's answers are
    checked without holding the catalog)."""
    items = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            item_id = int(row.pop("item_id"))
            if ids is None or item_id in ids:
                items[item_id] = {name: split_values(cell) for name, cell in row.items()}
    return items


def satisfies(node, item: Dict[str, List[str]], schema: Schema) -> bool:
    """Whether `item` (a load_items value: feature name -> spelled values) matches the parsed
    filter `node`: the filter's meaning read from the catalog's own spelling, independent of
    every index the builder makes (what served answers are checked against)."""
    if isinstance(node, All):
        return True
    if isinstance(node, Term):
        spec = schema.features[node.feature_id]
        return spec.spell(node.value_id) in item[spec.name]
    if isinstance(node, Not):
        return not satisfies(node.child, item, schema)
    if isinstance(node, And):
        return all(satisfies(c, item, schema) for c in node.children)
    assert isinstance(node, Or)
    return any(satisfies(c, item, schema) for c in node.children)


def embeddings_path(items_csv: Path = DEFAULT_ITEMS_CSV) -> Path:
    """The indexed item embeddings the builder writes next to items.csv (float32 [N, D], rows
    in items.csv order)."""
    return Path(items_csv).with_name("item_embeddings.npy")


def item_embedding(item_id: int, items_csv: Path = DEFAULT_ITEMS_CSV):
    """The embedding of an indexed item, from the builder's files (for `client update
    --embedding-from-item`)."""
    import numpy as np

    with open(items_csv, newline="", encoding="utf-8") as fh:
        for row, record in enumerate(csv.DictReader(fh)):
            if int(record["item_id"]) == item_id:
                return np.load(embeddings_path(items_csv), mmap_mode="r")[row].copy()
    raise KeyError(f"item {item_id} is not in {items_csv}")


def spell_item_features(item_id: int, items_csv: Path = DEFAULT_ITEMS_CSV) -> str:
    """The features of an indexed item as `client update --features` spells them."""
    features = load_items(items_csv).get(item_id)
    if features is None:
        raise KeyError(f"item {item_id} is not in {items_csv}")
    return ",".join(f"{name}=" + join_values(values) for name, values in features.items())
