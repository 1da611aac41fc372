"""Item updates and their validation: what may enter the fresh index.

An upsert carries a raw item id, an embedding in the catalog's space and the item's filter
features, spelled as filter expressions spell them (filtering/spelling.py; a quoted value may
hold `,` and `|`):

    category=comedy,language=en,creator=7,tags=funny|live|"Science Fiction"

Every single-valued feature of the schema is required (exactly one value); multi-valued
features take 0 up to the store's width values. A retire carries only the raw item id.
Problems raise `UpdateError` with a message naming the field and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from filtering.spelling import SpellingError, join_values, read_values, spell_value
from world.schema import Schema


class UpdateError(ValueError):
    """An update that cannot be applied; the message is meant for the client."""


@dataclass(frozen=True)
class ItemUpdate:
    """One upsert (embedding and features set) or retire (both None)."""

    item_id: int
    embedding: Optional[np.ndarray] = None  # float32 [D]
    features: Optional[np.ndarray] = None  # int64 [S] value ids in the store's columns, -1 pad

    @property
    def retire(self) -> bool:
        return self.embedding is None


def check_item_id(value) -> int:
    item_id = int(value)
    if item_id <= 0:
        raise UpdateError(f"item_id: raw item ids are positive 64-bit integers, got {item_id}")
    return item_id


def check_embedding(values, dim: int) -> np.ndarray:
    vec = np.asarray(values, dtype=np.float32).reshape(-1)
    if vec.shape[0] != dim:
        raise UpdateError(f"embedding: expected {dim} values (the index dimension), "
                          f"got {vec.shape[0]}")
    if not np.all(np.isfinite(vec)):
        raise UpdateError("embedding: must be finite numbers (got NaN or infinity)")
    if not np.any(vec):
        raise UpdateError("embedding: all zeros; an item needs a direction to be found")
    return vec


def parse_features(text: str, schema: Schema) -> Dict[str, List[int]]:
    """`name=value|value,...` -> {feature name: value ids}, checked against `schema`."""
    values: Dict[str, List[int]] = {}
    names = [f.name for f in schema.features]
    pos = 0
    while pos < len(text):
        comma, sep = text.find(",", pos), text.find("=", pos)
        if sep < 0 or 0 <= comma < sep:  # a part without '=' (or an empty one)
            end = len(text) if comma < 0 else comma
            part, pos = text[pos:end].strip(), end + 1
            if part:
                raise UpdateError(f"features: expected name=value, got {part!r}")
            continue
        name = text[pos:sep].strip()
        try:
            spelled, end = read_values(text, sep + 1, stop=",")
        except SpellingError as e:
            raise UpdateError(f"features: {name}: {e.problem} (at position {e.position})"
                              ) from None
        pos = end + 1
        if name not in names:
            raise UpdateError(f"features: unknown feature {name!r} (features: "
                              f"{', '.join(names)})")
        if name in values:
            raise UpdateError(f"features: {name!r} given twice")
        spec = schema.features[names.index(name)]
        ids = []
        for value in spelled:
            try:
                value_id = spec.value_id(value, spell=spell_value)
            except ValueError as e:
                raise UpdateError(f"features: {e}") from None
            if value_id < 0:
                raise UpdateError(f"features: feature {name!r} takes non-negative values, "
                                  f"got {value_id}")
            if value_id not in ids:
                ids.append(value_id)
        values[name] = ids
    return values


def feature_row(values: Dict[str, List[int]], schema: Schema, widths: Sequence[int]
                ) -> np.ndarray:
    """Value ids side by side in the store's columns (feature f owns `widths[f]` columns)."""
    row = np.full(int(sum(widths)), -1, dtype=np.int64)
    start = 0
    for spec, width in zip(schema.features, widths):
        ids = values.get(spec.name, [])
        if not spec.multi_valued and len(ids) != 1:
            raise UpdateError(f"features: {spec.name!r} takes exactly one value, got "
                              f"{len(ids)}" + ("" if ids else " (it is required)"))
        if len(ids) > width:
            raise UpdateError(f"features: {spec.name!r} takes at most {width} values, "
                              f"got {len(ids)}")
        row[start: start + len(ids)] = ids
        start += width
    return row


def spell_features(row: np.ndarray, schema: Schema, widths: Sequence[int]) -> str:
    """The inverse of `parse_features` + `feature_row`, for display."""
    parts, start = [], 0
    for spec, width in zip(schema.features, widths):
        ids = [int(v) for v in row[start: start + width] if v >= 0]
        parts.append(f"{spec.name}=" + join_values([spec.spell(v) for v in ids]))
        start += width
    return ",".join(parts)
