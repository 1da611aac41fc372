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

from world.synthetic import Catalog, World

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


class TableWriter:
    """One table written a slice of rows at a time: Parquet (a row group per slice), or CSV
    with list columns joined by '|'. The file is created by the first slice."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.writer = None

    def write(self, table: pa.Table) -> None:
        parquet = self.path.suffix == ".parquet"
        if not parquet:
            table = pa.table({name: pc.binary_join(col.cast(pa.list_(pa.string())), "|")
                              if pa.types.is_list(col.type) else col
                              for name, col in zip(table.column_names, table.columns)})
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema) if parquet \
                else pacsv.CSVWriter(self.path, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
    return write_worlds([world], directory, fmt, with_vectors)


def write_worlds(worlds: Iterable[World], directory: Path, fmt: str = "parquet",
                 with_vectors: bool = True) -> Path:
    """Several worlds as the tables of one catalog directory, one after the other (a
    generator of worlds holds one in memory at a time): shards of one catalog, so their
    item ids and user ids must be distinct and their schemas and tasks the same. Vectors
    beside CSV (item_vectors.npy) are written for one world only."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"format must be parquet or csv, not {fmt!r}")
    vectors = 'vectors = "embedding"\n' if fmt == "parquet" else \
        'vectors = "item_vectors.npy"\n'
    tables = {stem: TableWriter(directory / f"{stem}.{fmt}")
              for stem in ("items", "interactions", "users")}
    num_items = shards = 0
    try:
        for world in worlds:  # not enumerate(): its reused result tuple would hold the world
            c = world.catalog
            shards += 1
            if with_vectors and fmt == "csv":
                if shards > 1:
                    raise ValueError("item vectors beside CSV (item_vectors.npy) are written "
                                     "for one world only: write Parquet")
                np.save(directory / "item_vectors.npy", c.embeddings)
            for rows in _row_slices(c.num_items):
                tables["items"].write(_items(c, rows, with_vectors and fmt == "parquet"))
            for rows in _row_slices(len(world.interactions.user_index)):
                tables["interactions"].write(_interactions(world, rows))
            for rows in _row_slices(len(world.user_ids)):
                tables["users"].write(_users(world, rows))
            num_items += c.num_items
            del world, c  # a generator's next world is drawn without this one
    finally:
        for table in tables.values():
            table.close()
    (directory / "catalog.toml").write_text(CATALOG_TOML.format(
        name=f"synthetic-{num_items}", ext=fmt, vectors=vectors if with_vectors else ""))
    return directory


def _items(c: Catalog, rows: slice, vector_column: bool) -> pa.Table:
    columns = {"item_id": pa.array(c.item_ids[rows])}
    for spec, values in zip(c.schema.features, c.features):
        columns[spec.name] = feature_array(spec, values[rows])
    if vector_column:
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(c.embeddings[rows].reshape(-1)), c.embeddings.shape[1])
    return pa.table(columns)


def _interactions(world: World, rows: slice) -> pa.Table:
    log = world.interactions
    columns = {"user_id": pa.array(world.user_ids[log.user_index[rows]]),
               "item_id": pa.array(world.catalog.item_ids[log.item_index[rows]]),
               "timestamp": pa.array(log.timestamp[rows])}
    for t, task in enumerate(world.tasks):
        columns[task] = pa.array(log.labels[rows, t].astype(np.int8))
    return pa.table(columns)


def _users(world: World, rows: slice) -> pa.Table:
    schema = world.catalog.schema
    languages = pa.array(schema.features[schema.feature_id("language")].vocabulary)
    return pa.table({"user_id": pa.array(world.user_ids[rows]),
                     "language": languages.take(pa.array(world.user_language[rows]))})
