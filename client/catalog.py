"""Read the indexed catalog (`items.csv`, written by the builder) to show and check results."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List

DEFAULT_ITEMS_CSV = Path(__file__).resolve().parents[1] / "build" / "items.csv"


def load_items(path: Path = DEFAULT_ITEMS_CSV) -> Dict[int, Dict[str, List[str]]]:
    """item_id -> {feature name: list of values as spelled in filter expressions}."""
    items = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            item_id = int(row.pop("item_id"))
            items[item_id] = {name: (value.split("|") if value else [])
                              for name, value in row.items()}
    return items
