"""Read the indexed catalog (`items.csv`, written by the builder) to show and check results."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List

from filtering.spelling import join_values, split_values

DEFAULT_ITEMS_CSV = Path(__file__).resolve().parents[1] / "build" / "items.csv"


def load_items(path: Path = DEFAULT_ITEMS_CSV) -> Dict[int, Dict[str, List[str]]]:
    """item_id -> {feature name: list of values}: the values themselves, read from their
    spelling in the cells (`"Science Fiction"` is the value `Science Fiction`)."""
    items = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            item_id = int(row.pop("item_id"))
            items[item_id] = {name: split_values(cell) for name, cell in row.items()}
    return items


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
