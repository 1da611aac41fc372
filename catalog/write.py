"""Writing catalog directories (docs/catalog.md): the synthetic world in the catalog format,
for the tests, `benchmarks/catalog_build.py` and anyone who wants a worked example."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from world.synthetic import World

CATALOG_TOML = """\
name = "{name}"

[items]
path = "items.{ext}"
{vectors}
[features]
category = {{ kind = "str" }}
language = {{ kind = "str" }}
creator = {{ kind = "int" }}
tags = {{ kind = "str", multi_valued = true }}

[interactions]
path = "interactions.{ext}"

[tasks]
click = 1.0
like = 2.0
share = 4.0

[users]
path = "users.{ext}"

[users.features]
language = {{ kind = "str" }}
"""


# rows per Parquet row group (and per CSV write): the writer holds one such slice of a table
# in Arrow at a time, and the reader copies vector columns batch by batch (catalog/tables.py)
ROW_GROUP_ROWS = 131_072


def feature_array(spec, values: np.ndarray) -> pa.Array:
    """One feature of a catalog (value ids [N, M], -1 padded) as an Arrow column of raw
    values: a list per item for a multi-valued feature, one value (or null) otherwise."""
    vocabulary = pa.array(spec.vocabulary, pa.string()) if spec.kind == "str" else None

    def raw(ids: np.ndarray, mask=None) -> pa.Array:
        if vocabulary is None:
            return pa.array(ids, pa.int64(), mask=mask)
        return vocabulary.take(pa.array(ids, pa.int64(), mask=mask))  # null ids -> null

    if spec.multi_valued:
        valid = values >= 0
        offsets = np.zeros(len(values) + 1, np.int32)
        np.cumsum(valid.sum(1), out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), raw(values[valid]))
    return raw(values[:, 0], mask=values[:, 0] < 0)


def feature_column(spec, values: np.ndarray) -> list:
    """feature_array's values as Python values (a list per item, or a value or None)."""
    return feature_array(spec, values).to_pylist()


def write_table(slices: Iterable[pa.Table], path: Path) -> None:
    """A table given as consecutive slices of rows: Parquet (a row group per slice), or CSV
    with list columns joined by '|'."""
    writer = None
    try:
        for table in slices:
            if path.suffix != ".parquet":
                table = pa.table({name: pc.binary_join(col.cast(pa.list_(pa.string())), "|")
                                  if pa.types.is_list(col.type) else col
                                  for name, col in zip(table.column_names, table.columns)})
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema) if path.suffix == ".parquet" \
                    else pacsv.CSVWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _row_slices(num_rows: int) -> Iterator[slice]:
    """Slices of ROW_GROUP_ROWS rows covering num_rows (one empty slice when there are none,
    so that an empty table is still written)."""
    for start in range(0, max(num_rows, 1), ROW_GROUP_ROWS):
        yield slice(start, start + ROW_GROUP_ROWS)


def write_world(world: World, directory: Path, fmt: str = "parquet",
                with_vectors: bool = True) -> Path:
    """`world` as a catalog directory: items (features, and the content vectors as a list
    column in Parquet or item_vectors.npy beside CSV), interactions, users, catalog.toml.
    Each table is written a slice of rows at a time, from the world's arrays (no per-row
    Python objects)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"format must be parquet or csv, not {fmt!r}")
    c = world.catalog
    vectors = ""
    if with_vectors and fmt == "parquet":
        vectors = 'vectors = "embedding"\n'
    elif with_vectors:
        np.save(directory / "item_vectors.npy", c.embeddings)
        vectors = 'vectors = "item_vectors.npy"\n'

    def items(rows: slice) -> pa.Table:
        columns = {"item_id": pa.array(c.item_ids[rows])}
        for spec, values in zip(c.schema.features, c.features):
            columns[spec.name] = feature_array(spec, values[rows])
        if with_vectors and fmt == "parquet":
            block = c.embeddings[rows]
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(
                pa.array(block.reshape(-1)), c.embeddings.shape[1])
        return pa.table(columns)

    log = world.interactions

    def interactions(rows: slice) -> pa.Table:
        columns = {"user_id": pa.array(world.user_ids[log.user_index[rows]]),
                   "item_id": pa.array(c.item_ids[log.item_index[rows]]),
                   "timestamp": pa.array(log.timestamp[rows])}
        for t, task in enumerate(world.tasks):
            columns[task] = pa.array(log.labels[rows, t].astype(np.int8))
        return pa.table(columns)

    languages = pa.array(c.schema.features[c.schema.feature_id("language")].vocabulary)

    def users(rows: slice) -> pa.Table:
        return pa.table({"user_id": pa.array(world.user_ids[rows]),
                         "language": languages.take(pa.array(world.user_language[rows]))})

    write_table(map(items, _row_slices(c.num_items)), directory / f"items.{fmt}")
    write_table(map(interactions, _row_slices(len(log.user_index))),
                directory / f"interactions.{fmt}")
    write_table(map(users, _row_slices(len(world.user_ids))), directory / f"users.{fmt}")
    (directory / "catalog.toml").write_text(CATALOG_TOML.format(
        name=f"synthetic-{c.num_items}", ext=fmt, vectors=vectors))
    return directory
