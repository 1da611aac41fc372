"""catalog/read.py against a naive per-row reader written for clarity: every array of
`read_catalog` equals the reference's, for catalogs with every feature kind (single- and
multi-valued str and int features, values with spaces, repeated values, missing values), item
vectors, users with features, and interactions naming unknown items (skipped, or an error).
Parquet tables are written in many small row groups, so that reading column by column and
batch by batch meets values on either side of a row-group boundary. And catalog/write.py's
write_world, which writes slice by slice from arrays, against tables built row by row."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import catalog.write
from catalog import CatalogError, read_catalog
from world.synthetic import WorldConfig, generate_world

ROW_GROUP_ROWS = 37  # small and odd: most rows sit in a later row group than the first
BRANDS = ["Procter & Gamble", " padded ", "Acme (EU)", 'say "hi"', "ünïcode", "plain"]
TAGS = ["sale", "new arrival", "eco", "x", "Z"]
COUNTRIES = ["DE", "FR", "United States"]

TOML = """name = "awkward"
[items]
path = "items.{ext}"
title = "title"
vectors = "{vectors}"
{vector_ids}
[features]
brand = {{ kind = "str" }}
shelf = {{ kind = "int" }}
tags = {{ kind = "str", multi_valued = true }}
sizes = {{ kind = "int", multi_valued = true }}

[interactions]
path = "interactions.{ext}"
unknown_items = "{unknown}"

[tasks]
click = 1.0
buy = 2.5

[users]
path = "users.{ext}"

[users.features]
country = {{ kind = "str" }}
langs = {{ kind = "str", multi_valued = true }}
"""


def awkward_rows(num_items: int = 250, num_users: int = 60, seed: int = 0) -> dict:
    """Rows as Python values (None = missing): items, interactions (a few naming unknown
    items), users (not every user of the interactions has a row, and some rows no
    interactions)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**12, size=num_items, replace=False) + 1

    def maybe(value, p_missing=0.15):
        return None if rng.random() < p_missing else value

    items = []
    for r in range(num_items):
        tags = [TAGS[j] for j in rng.integers(0, len(TAGS), rng.integers(0, 5))]  # repeats
        items.append({
            "item_id": int(ids[r]),
            "brand": maybe(BRANDS[rng.integers(0, len(BRANDS))]),
            "shelf": maybe(int(rng.integers(0, 1000))),
            "tags": maybe(tags, 0.1),
            "sizes": maybe([int(v) for v in rng.integers(0, 6, rng.integers(0, 4))], 0.1),
            "title": maybe(f"item {r}, the {BRANDS[r % len(BRANDS)]}", 0.05),
            "price": float(rng.uniform(1, 100)),
            "embedding": [float(v) for v in rng.normal(size=8).astype(np.float32)],
        })
    user_pool = rng.choice(10**15, size=num_users, replace=False) + 7
    interactions = []
    for _ in range(num_items * 4):
        click = int(rng.random() < 0.3)
        row = int(rng.integers(0, num_items))
        interactions.append({
            "user_id": int(user_pool[rng.integers(0, num_users)]),
            "item_id": int(ids[row]) if rng.random() > 0.01 else int(rng.integers(1, 10**6)),
            "timestamp": int(rng.integers(1_600_000_000, 1_700_000_000)),
            "click": click, "buy": int(click and rng.random() < 0.4)})
    users = [{"user_id": int(u) if k < num_users - 10 else int(u) + 1,  # 10 without interactions
              "country": maybe(COUNTRIES[rng.integers(0, len(COUNTRIES))]),
              "langs": maybe([["en", "de", "fr"][j] for j in rng.integers(0, 3, 2)])}
             for k, u in enumerate(user_pool[rng.permutation(num_users)[:num_users - 5]])]
    return {"items": items, "interactions": interactions, "users": users}


def write_parquet(rows: list, path: Path, types: dict) -> None:
    table = pa.table({name: pa.array([r[name] for r in rows]).cast(t) if t == pa.bool_()
                      else pa.array([r[name] for r in rows], t) for name, t in types.items()})
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)


def write_csv(rows: list, path: Path, columns: list, spell=lambda c, v: str(v)) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(columns)
        for r in rows:
            out.writerow(["" if r[c] is None else "|".join(map(str, r[c]))
                          if isinstance(r[c], list) else spell(c, r[c]) for c in columns])


def awkward_catalog(directory: Path, fmt: str, unknown: str, rows: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    items, inter, users = rows["items"], rows["interactions"], rows["users"]
    if fmt == "parquet":
        write_parquet(items, directory / "items.parquet", {
            "item_id": pa.int64(), "brand": pa.dictionary(pa.int32(), pa.string()),
            "shelf": pa.int32(), "tags": pa.list_(pa.string()), "sizes": pa.list_(pa.int64()),
            "title": pa.string(), "price": pa.float64(), "embedding": pa.list_(pa.float32())})
        write_parquet(inter, directory / "interactions.parquet", {
            "user_id": pa.int64(), "item_id": pa.int64(), "timestamp": pa.int64(),
            "click": pa.bool_(), "buy": pa.int8()})
        write_parquet(users, directory / "users.parquet", {
            "user_id": pa.int64(), "country": pa.string(), "langs": pa.list_(pa.string())})
        vectors, vector_ids = "embedding", ""
    else:
        write_csv(items, directory / "items.csv",
                  ["item_id", "brand", "shelf", "tags", "sizes", "title", "price"])
        iso = np.datetime_as_string  # timestamps as ISO 8601 text, labels as words
        write_csv(inter, directory / "interactions.csv",
                  ["user_id", "item_id", "timestamp", "click", "buy"],
                  lambda c, v: str(iso(np.datetime64(v, "s"))) if c == "timestamp"
                  else ("true" if v else "false") if c == "click" else str(v))
        write_csv(users, directory / "users.csv", ["user_id", "country", "langs"])
        order = np.random.default_rng(1).permutation(len(items))
        np.save(directory / "vectors.npy",
                np.array([items[r]["embedding"] for r in order], np.float32))
        np.save(directory / "vector_ids.npy", np.array([items[r]["item_id"] for r in order]))
        vectors, vector_ids = "vectors.npy", 'vector_ids = "vector_ids.npy"'
    (directory / "catalog.toml").write_text(TOML.format(
        ext=fmt, vectors=vectors, vector_ids=vector_ids, unknown=unknown))
    return directory


# --- the reference: one row at a time ---------------------------------------------------------
def ref_feature(rows: list, name: str, kind: str):
    """(vocabulary or None, int64 [rows, M] value ids padded with -1): each row's distinct
    values, ascending; str values numbered in their sorted order; "" is no value."""
    per_row = []
    for row in rows:
        v = row[name]
        values = [] if v is None else v if isinstance(v, list) else [v]
        per_row.append({x for x in values if x is not None and x != ""})
    vocabulary = sorted(set().union(*per_row)) if kind == "str" else None
    ids = [sorted(vocabulary.index(x) if kind == "str" else int(x) for x in s) for s in per_row]
    out = np.full((len(rows), max([1] + [len(s) for s in ids])), -1, np.int64)
    for r, s in enumerate(ids):
        out[r, :len(s)] = s
    return vocabulary, out


def reference(rows: dict, unknown: str) -> dict:
    items, users = rows["items"], rows["users"]
    item_row = {row["item_id"]: r for r, row in enumerate(items)}
    kept = [x for x in rows["interactions"] if x["item_id"] in item_row]
    if unknown == "error":
        assert len(kept) == len(rows["interactions"])
    user_ids = sorted({x["user_id"] for x in kept} | {u["user_id"] for u in users})
    user_row = {u: r for r, u in enumerate(user_ids)}
    out = {"item_ids": np.array([r["item_id"] for r in items], np.int64),
           "embeddings": np.array([r["embedding"] for r in items], np.float32),
           "titles": [r["title"] for r in items],
           "user_ids": np.array(user_ids, np.int64),
           "user_index": np.array([user_row[x["user_id"]] for x in kept], np.int64),
           "item_index": np.array([item_row[x["item_id"]] for x in kept], np.int64),
           "labels": np.array([[x["click"], x["buy"]] for x in kept], np.float32),
           "timestamp": np.array([x["timestamp"] for x in kept], np.int64),
           "skipped": len(rows["interactions"]) - len(kept)}
    for name, kind in (("brand", "str"), ("shelf", "int"), ("tags", "str"), ("sizes", "int")):
        out[name] = ref_feature(items, name, kind)
    for name in ("country", "langs"):
        vocabulary, values = ref_feature(users, name, "str")
        full = np.full((len(user_ids), values.shape[1]), -1, np.int64)
        for u, row in zip(users, values):
            full[user_row[u["user_id"]]] = row
        out[name] = (vocabulary, full)
    return out


def assert_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(a, b, err_msg=what)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_read_catalog_equals_the_per_row_reference(tmp_path, fmt):
    rows = awkward_rows()
    source = read_catalog(awkward_catalog(tmp_path / fmt, fmt, "skip", rows))
    expected = reference(rows, "skip")
    assert expected["skipped"] > 0 and source.skipped_interactions == expected["skipped"]
    c = source.catalog
    assert_same(c.item_ids, expected["item_ids"], "item_ids")
    assert_same(c.embeddings, expected["embeddings"], "embeddings")
    assert source.titles.dtype == object and source.titles.tolist() == expected["titles"]
    for spec, values in zip(c.schema.features, c.features):
        vocabulary, want = expected[spec.name]
        assert_same(values, want, spec.name)
        assert spec.vocabulary == (vocabulary or [])
    for spec, values in zip(source.user_schema.features, source.user_features):
        vocabulary, want = expected[spec.name]
        assert_same(values, want, spec.name)
        assert spec.vocabulary == vocabulary
    assert_same(source.user_ids, expected["user_ids"], "user_ids")
    for name in ("user_index", "item_index", "labels", "timestamp"):
        assert_same(getattr(source.interactions, name), expected[name], name)
    assert source.tasks == ("click", "buy") and source.task_weights == (1.0, 2.5)
    assert source.logged_impressions


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_unknown_items_are_an_error_naming_the_first(tmp_path, fmt):
    rows = awkward_rows()
    first = next(r for r, x in enumerate(rows["interactions"])
                 if x["item_id"] not in {i["item_id"] for i in rows["items"]})
    count = sum(x["item_id"] not in {i["item_id"] for i in rows["items"]}
                for x in rows["interactions"])
    d = awkward_catalog(tmp_path / fmt, fmt, "error", rows)
    with pytest.raises(CatalogError, match=(
            rf"interactions.{fmt}: row {first + 1}, column 'item_id': item "
            rf"{rows['interactions'][first]['item_id']} is not in the catalog \({count:,} of "
            rf"{len(rows['interactions']):,} rows name unknown items")):
        read_catalog(d)
    # without the unknown rows, "error" reads the same arrays as the reference
    known = {i["item_id"] for i in rows["items"]}
    rows["interactions"] = [x for x in rows["interactions"] if x["item_id"] in known]
    source = read_catalog(awkward_catalog(tmp_path / f"{fmt}-known", fmt, "error", rows))
    expected = reference(rows, "error")
    assert source.skipped_interactions == 0
    for name in ("user_index", "item_index", "labels", "timestamp"):
        assert_same(getattr(source.interactions, name), expected[name], name)
    assert_same(source.user_ids, expected["user_ids"], "user_ids")


VECTOR_ERRORS = {  # edits of the items' vectors -> the error, as one table read whole gave it
    "no vector beats a later width": (
        {150: [1.0] * 5, 200: None}, r"row 201, column 'embedding': no vector"),
    "width": ({150: [1.0] * 5, 220: [1.0, None] + [1.0] * 6},
              r"row 151, column 'embedding': vector of 5 values, row 1 has 8"),
    "null inside": ({120: [1.0, None] + [1.0] * 6},
                    r"row 121, column 'embedding': null inside the vector"),
    "NaN beats an earlier zero": ({40: [0.0] * 8, 90: [float("nan")] * 8},
                                  r"column 'embedding': row 91: vector has NaN or infinity"),
    "zero": ({240: [0.0] * 8}, r"column 'embedding': row 241: vector has all zeros"),
}


@pytest.mark.parametrize("case", sorted(VECTOR_ERRORS))
def test_vector_errors_across_row_groups_name_the_first_row(tmp_path, case):
    edits, message = VECTOR_ERRORS[case]
    rows = awkward_rows()
    for r, vector in edits.items():
        rows["items"][r]["embedding"] = vector
    with pytest.raises(CatalogError, match=r"items.parquet: " + message):
        read_catalog(awkward_catalog(tmp_path / "pq", "parquet", "skip", rows))


# --- the writer ------------------------------------------------------------------------------
def rows_of_world(world) -> dict:
    """The world's tables as columns of Python values, one row at a time."""
    c = world.catalog
    items = {"item_id": c.item_ids.tolist()}
    for spec, values in zip(c.schema.features, c.features):
        def raw(v, spec=spec):
            return v if spec.kind == "int" else spec.vocabulary[v]
        items[spec.name] = [[raw(v) for v in row if v >= 0] if spec.multi_valued
                            else raw(row[0]) if row[0] >= 0 else None
                            for row in values.tolist()]
    log = world.interactions
    inter = {"user_id": [int(world.user_ids[u]) for u in log.user_index],
             "item_id": [int(c.item_ids[i]) for i in log.item_index],
             "timestamp": log.timestamp.tolist()}
    for t, task in enumerate(world.tasks):
        inter[task] = [int(v) for v in log.labels[:, t]]
    languages = c.schema.features[c.schema.feature_id("language")].vocabulary
    users = {"user_id": world.user_ids.tolist(),
             "language": [languages[v] for v in world.user_language]}
    return {"items": items, "interactions": inter, "users": users}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_write_world_equals_tables_built_row_by_row(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(catalog.write, "ROW_GROUP_ROWS", 333)  # many slices, a short last one
    world = generate_world(WorldConfig(seed=5, num_items=1200, num_users=90, num_creators=50,
                                       impressions_per_user=11))
    world.catalog.features[2][::7] = -1  # items without a creator: null cells
    d = catalog.write.write_world(world, tmp_path / fmt, fmt=fmt)
    types = {"creator": pa.int64(), "interactions": {t: pa.int8() for t in world.tasks}}
    for stem, columns in rows_of_world(world).items():
        expected = pa.table({n: pa.array(v, types.get(n) or types.get(stem, {}).get(n))
                             for n, v in columns.items()})
        if stem == "items" and fmt == "parquet":
            e = world.catalog.embeddings
            expected = expected.append_column("embedding", pa.FixedSizeListArray.from_arrays(
                pa.array(e.reshape(-1)), e.shape[1]))
        if fmt == "parquet":
            written = pq.read_table(d / f"{stem}.parquet")
            assert pq.ParquetFile(d / f"{stem}.parquet").metadata.num_row_groups == \
                -(-len(written) // 333)
            assert written.equals(expected), stem
        else:
            joined = {n: ["|".join(map(str, v)) for v in col] if n == "tags" else col
                      for n, col in columns.items()}
            sink = pa.BufferOutputStream()
            pacsv.write_csv(pa.table({n: pa.array(v, types.get(n) or types.get(stem, {}).get(n))
                                      for n, v in joined.items()}), sink)
            assert (d / f"{stem}.csv").read_bytes() == sink.getvalue().to_pybytes(), stem
    if fmt == "csv":
        np.testing.assert_array_equal(np.load(d / "item_vectors.npy"), world.catalog.embeddings)


def test_a_world_written_in_shards_reads_as_one_catalog(tmp_path):
    """benchmarks/catalog_build.py writes a large world in shards (write_worlds); one shard is
    write_world's catalog."""
    from benchmarks.catalog_build import write_synthetic

    counts = write_synthetic(tmp_path / "sharded", 2500, 200, seed=4, shard_items=1000)
    source = read_catalog(tmp_path / "sharded")
    assert counts == (2500, 200 * WorldConfig.impressions_per_user, 200)
    assert source.num_items == 2500 and len(np.unique(source.catalog.item_ids)) == 2500
    assert len(source.interactions.item_index) == counts[1] and len(source.user_ids) == 200
    assert source.catalog.embeddings.shape == (2500, WorldConfig.embedding_dim)
    whole = write_synthetic(tmp_path / "whole", 1000, 80, seed=4, shard_items=1000)
    world = generate_world(WorldConfig(seed=4, num_items=1000, num_users=80))
    catalog.write.write_world(world, tmp_path / "direct")
    assert whole == (1000, 80 * WorldConfig.impressions_per_user, 80)
    for stem in ("items", "interactions", "users"):
        assert pq.read_table(tmp_path / "whole" / f"{stem}.parquet").equals(
            pq.read_table(tmp_path / "direct" / f"{stem}.parquet")), stem


def _set_row(table: str, row: int, column: str, value):
    return lambda rows: rows[table][row].__setitem__(column, value)


ROW_ERRORS = {  # (edit, message) past the first row groups; the same as the reader before 5840bd7
    "null item id": (_set_row("items", 30, "item_id", None),
                     r"items.{fmt}: row 31, column 'item_id': empty value"),
    "null user id": (_set_row("interactions", 500, "user_id", None),
                     r"interactions.{fmt}: row 501, column 'user_id': empty value"),
    "null label": (_set_row("interactions", 301, "buy", None),
                   r"interactions.{fmt}: row 302, column 'buy': empty value"),
    "label 2": (_set_row("interactions", 300, "buy", 2),
                r"interactions.{fmt}: row 301, column 'buy': task labels are 0 or 1, got 2"),
    "null time": (_set_row("interactions", 303, "timestamp", None),
                  r"interactions.{fmt}: row 304, column 'timestamp': empty timestamp"),
    "negative in a list": (_set_row("items", 45, "sizes", [1, -2]),
                           r"items.{fmt}: row 46, column 'sizes': -2 is negative"),
    "too many values": (_set_row("items", 46, "tags", [f"t{i}" for i in range(300)]),
                        r"items.{fmt}: row 47, column 'tags': 300 values, over the limit of "
                        r"256 per item"),
    "duplicate user": (lambda rows: rows["users"][3].__setitem__(
        "user_id", rows["users"][9]["user_id"]),
        r"users.{fmt}: rows 4 and 10, column 'user_id': duplicate user id"),
}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("case", sorted(ROW_ERRORS))
def test_row_errors_name_file_row_and_column(tmp_path, case, fmt):
    edit, message = ROW_ERRORS[case]
    rows = awkward_rows()
    edit(rows)
    with pytest.raises(CatalogError, match=message.format(fmt=fmt)):
        read_catalog(awkward_catalog(tmp_path / fmt, fmt, "skip", rows))
