"""Small catalog directories for the tests, in every form docs/catalog.md describes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BRANDS = ["Procter & Gamble", "Acme (EU)", 'say "hi"', "Unilever", "plain"]
CATEGORIES = ["Science Fiction", "home", "garden tools", "NOT", "a:b"]
TAGS = ["sale", "new", "eco|friendly", "x"]
TASKS_TOML = """
[tasks]
click = 1.0
buy = 3.0
"""


def shop_items(num_items: int = 300, dim: int = 16, seed: int = 0) -> dict:
    """Columns of a shop: awkward str values (spaces, quotes, &, a keyword), an int feature,
    a multi-valued feature, a float column that is not a feature, a title, vectors."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**12, size=num_items, replace=False).astype(np.int64) + 1
    vectors = rng.normal(size=(num_items, dim)).astype(np.float32)
    return {
        "item_id": ids,
        "brand": [BRANDS[i] for i in rng.integers(0, len(BRANDS), num_items)],
        "category": [CATEGORIES[i] for i in rng.integers(0, len(CATEGORIES), num_items)],
        "shelf": rng.integers(0, 40, num_items).astype(np.int64),
        "tags": [sorted({TAGS[j] for j in rng.integers(0, len(TAGS), rng.integers(0, 3))})
                 for _ in range(num_items)],
        "price": rng.uniform(1, 100, num_items),
        "title": [f"item {i}" for i in range(num_items)],
        "embedding": vectors,
    }


def shop_interactions(items: dict, num_users: int = 120, per_user: int = 25,
                      seed: int = 1) -> dict:
    """Impressions with click/buy labels: users prefer one brand."""
    rng = np.random.default_rng(seed)
    ids = items["item_id"]
    users = np.repeat(rng.choice(10**15, size=num_users, replace=False) + 7, per_user)
    favourite = np.repeat(rng.integers(0, len(BRANDS), num_users), per_user)
    rows = rng.integers(0, len(ids), len(users))
    brand = np.array([BRANDS.index(b) for b in items["brand"]])[rows]
    click = (rng.random(len(users)) < np.where(brand == favourite, 0.7, 0.1)).astype(np.int8)
    buy = (click & (rng.random(len(users)) < 0.3)).astype(np.int8)
    return {"user_id": users.astype(np.int64), "item_id": ids[rows],
            "timestamp": rng.integers(1_600_000_000, 1_700_000_000, len(users)),
            "click": click, "buy": buy}


def to_arrow(columns: dict) -> pa.Table:
    out = {}
    for name, values in columns.items():
        if name == "embedding" and isinstance(values, list):  # rows of any width
            out[name] = pa.array(values, pa.list_(pa.float32()))
        elif name == "embedding":
            v = np.asarray(values, dtype=np.float32)
            out[name] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
        else:
            out[name] = pa.array(values if not isinstance(values, np.ndarray) else values)
    return pa.table(out)


def write_csv(columns: dict, path: Path) -> None:
    import csv

    names = [n for n in columns if n != "embedding"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(names)
        for r in range(len(columns[names[0]])):
            row = []
            for n in names:
                v = columns[n][r]
                row.append("|".join(map(str, v)) if isinstance(v, list) else v)
            out.writerow(row)


FEATURES_TOML = """
[features]
brand = { kind = "str" }
category = { kind = "str" }
shelf = { kind = "int" }
tags = { kind = "str", multi_valued = true }
"""


def parquet_shop(directory: Path, interactions: bool = True, num_items: int = 300) -> Path:
    """items.parquet (vectors as a list column) + interactions.parquet + catalog.toml."""
    directory.mkdir(parents=True, exist_ok=True)
    items = shop_items(num_items)
    pq.write_table(to_arrow(items), directory / "items.parquet")
    toml = 'name = "shop"\n[items]\npath = "items.parquet"\ntitle = "title"\n' \
           'vectors = "embedding"\n' + FEATURES_TOML
    if interactions:
        pq.write_table(to_arrow(shop_interactions(items)), directory / "interactions.parquet")
        toml += '\n[interactions]\npath = "interactions.parquet"\n' + TASKS_TOML
    (directory / "catalog.toml").write_text(toml)
    return directory


def csv_shop(directory: Path) -> Path:
    """items.csv + interactions.csv, no catalog.toml (the schema is inferred), vectors in
    item_vectors.npy with their ids in item_vector_ids.npy (in another order)."""
    directory.mkdir(parents=True, exist_ok=True)
    items = shop_items()
    items["tags"] = [[t for t in tags if "|" not in t] for tags in items["tags"]]
    write_csv(items, directory / "items.csv")
    write_csv(shop_interactions(items), directory / "interactions.csv")
    order = np.random.default_rng(5).permutation(len(items["item_id"]))
    np.save(directory / "item_vectors.npy", items["embedding"][order])
    np.save(directory / "item_vector_ids.npy", items["item_id"][order])
    return directory


def pretrained_shop(directory: Path, num_users: int = 50) -> Path:
    """Items with vectors, users with vectors of the same width, no interactions."""
    directory.mkdir(parents=True, exist_ok=True)
    items = shop_items()
    pq.write_table(to_arrow(items), directory / "items.parquet")
    rng = np.random.default_rng(3)
    users = {"user_id": np.arange(1, num_users + 1, dtype=np.int64) * 1000,
             "embedding": rng.normal(size=(num_users, 16)).astype(np.float32)}
    pq.write_table(to_arrow(users), directory / "users.parquet")
    (directory / "catalog.toml").write_text(
        '[items]\ntitle = "title"\nvectors = "embedding"\n' + FEATURES_TOML
        + '\n[users]\nvectors = "embedding"\n')
    return directory


MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
2,"American President, The (1995)",Comedy|Drama|Romance
5,Heat (1995),Action|Crime|Thriller
7,Untitled,(no genres listed)
11,"Fifth Element, The (1997)",Action|Sci-Fi
"""


def movielens_dir(directory: Path, num_users: int = 40, seed: int = 0) -> Path:
    """A MovieLens-layout directory: the five movies above, random ratings."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "movies.csv").write_text(MOVIES)
    rng = np.random.default_rng(seed)
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(1, num_users + 1):
        for m in rng.choice([1, 2, 5, 7, 11], size=3, replace=False):
            lines.append(f"{u},{m},{rng.integers(1, 11) / 2},{rng.integers(10**9, 2 * 10**9)}")
    (directory / "ratings.csv").write_text("\n".join(lines) + "\n")
    return directory
