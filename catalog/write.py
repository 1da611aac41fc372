"""Writing catalog directories (docs/catalog.md): the synthetic world in the catalog format,
for the tests, `benchmarks/catalog_build.py` and anyone who wants a worked example."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
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


def feature_column(spec, values: np.ndarray):
    """One feature of a catalog (value ids [N, M], -1 padded) as raw values: a list per item
    for a multi-valued feature, one value (or None) otherwise."""
    def raw(v):
        return int(v) if spec.kind == "int" else spec.vocabulary[v]
    if spec.multi_valued:
        return [[raw(v) for v in row if v >= 0] for row in values.tolist()]
    return [raw(row[0]) if row[0] >= 0 else None for row in values.tolist()]


def write_table(table: pa.Table, path: Path) -> None:
    """Parquet, or CSV with list columns joined by '|'."""
    if path.suffix == ".parquet":
        pq.write_table(table, path)
        return
    columns = {}
    for name, col in zip(table.column_names, table.columns):
        if pa.types.is_list(col.type):
            columns[name] = pa.array(["|".join(map(str, v)) for v in col.to_pylist()])
        else:
            columns[name] = col
    pacsv.write_csv(pa.table(columns), path)


def write_world(world: World, directory: Path, fmt: str = "parquet",
                with_vectors: bool = True) -> Path:
    """`world` as a catalog directory: items (features, and the content vectors as a list
    column in Parquet or item_vectors.npy beside CSV), interactions, users, catalog.toml."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"format must be parquet or csv, not {fmt!r}")
    c = world.catalog
    columns = {"item_id": pa.array(c.item_ids)}
    for spec, values in zip(c.schema.features, c.features):
        columns[spec.name] = pa.array(feature_column(spec, values))
    vectors = ""
    if with_vectors and fmt == "parquet":
        d = c.embeddings.shape[1]
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(c.embeddings.reshape(-1)), d)
        vectors = 'vectors = "embedding"\n'
    elif with_vectors:
        np.save(directory / "item_vectors.npy", c.embeddings)
        vectors = 'vectors = "item_vectors.npy"\n'
    write_table(pa.table(columns), directory / f"items.{fmt}")
    log = world.interactions
    inter = {"user_id": pa.array(world.user_ids[log.user_index]),
             "item_id": pa.array(c.item_ids[log.item_index]),
             "timestamp": pa.array(log.timestamp)}
    for t, task in enumerate(world.tasks):
        inter[task] = pa.array(log.labels[:, t].astype(np.int8))
    write_table(pa.table(inter), directory / f"interactions.{fmt}")
    languages = c.schema.features[c.schema.feature_id("language")].vocabulary
    write_table(pa.table({"user_id": pa.array(world.user_ids),
                          "language": pa.array([languages[v] for v in world.user_language])}),
                directory / f"users.{fmt}")
    (directory / "catalog.toml").write_text(CATALOG_TOML.format(
        name=f"synthetic-{c.num_items}", ext=fmt, vectors=vectors))
    return directory
