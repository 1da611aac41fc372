"""A catalog directory -> `CatalogSource`, every value checked (docs/catalog.md).

The layouts read, in this order:
1. `catalog.toml` declares the tables, features and tasks (catalog/spec.py);
2. MovieLens (`movies.csv` + `ratings.csv`, the ml-latest-small / ml-25m layout), read as it is
   (catalog/movielens.py);
3. otherwise the schema is inferred from `items.*`, `interactions.*`, `users.*` and printed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.errors import CatalogError
from catalog.spec import CatalogSpec, TableDecl, infer_spec, read_spec
from catalog.tables import (
    binary_column,
    check_unique,
    check_vectors,
    column_types,
    encode_feature,
    int_column,
    read_table,
    require_columns,
    timestamp_column,
    vector_column,
)
from world.schema import Schema
from world.synthetic import Catalog, Interactions


@dataclass
class CatalogSource:
    """What a catalog directory holds, validated and in arrays.

    catalog: items in table order (`item_ids` distinct int64, `features` value ids padded
        with -1, `embeddings` the item vectors [N, D], width 0 when the catalog has none).
    titles: display text per item (MovieLens titles, a `title` column) or None.
    tasks / task_weights: the interactions' task columns and their default Value Model
        weights.
    user_ids: int64 [U] every user of the interactions and the users table, sorted.
    user_schema / user_features: categorical user features (value ids [U, M] per feature).
    user_vectors: float32 [U, D] pretrained user vectors, or None.
    interactions: `user_index` into user_ids, `item_index` into the catalog; None when the
        catalog has none.
    logged_impressions: the interactions hold the negatives a recommender showed (rows with
        every task 0); False: positives only (training samples negatives).
    skipped_interactions: rows naming unknown items, skipped (unknown_items = "skip").
    fingerprint: identifies the content, for the weights cache.
    """

    name: str
    catalog: Catalog
    tasks: Tuple[str, ...]
    task_weights: Tuple[float, ...]
    user_ids: np.ndarray
    interactions: Optional[Interactions] = None
    titles: Optional[np.ndarray] = None
    user_schema: Schema = field(default_factory=lambda: Schema([]))
    user_features: List[np.ndarray] = field(default_factory=list)
    user_vectors: Optional[np.ndarray] = None
    logged_impressions: bool = True
    skipped_interactions: int = 0
    spec: Optional[CatalogSpec] = None
    fingerprint: Dict = field(default_factory=dict)
    layout: str = "catalog.toml"  # or "movielens", "inferred"

    @property
    def num_items(self) -> int:
        return self.catalog.num_items

    def summary(self) -> str:
        c = self.catalog
        feats = ", ".join(f"{f.name} ({f.kind}{', multi' if f.multi_valued else ''}"
                          + (f", {len(f.vocabulary):,} values)" if f.kind == "str" else ")")
                          for f in c.schema.features)
        lines = [f"catalog {self.name!r} ({self.layout}): {c.num_items:,} items; features: "
                 f"{feats or 'none'}"]
        if c.embeddings.shape[1]:
            lines.append(f"  item vectors: {c.embeddings.shape[1]} wide")
        if self.interactions is not None:
            n = len(self.interactions.user_index)
            lines.append(f"  interactions: {n:,} rows, {len(self.user_ids):,} users; tasks "
                         + ", ".join(f"{t} (weight {w:g})" for t, w in
                                     zip(self.tasks, self.task_weights))
                         + ("" if self.logged_impressions else "; positives only: training "
                            "samples negatives"))
            if self.skipped_interactions:
                lines.append(f"  skipped {self.skipped_interactions:,} interactions naming "
                             "items not in the catalog")
        if self.user_vectors is not None:
            lines.append(f"  user vectors: {len(self.user_ids):,} users, "
                         f"{self.user_vectors.shape[1]} wide")
        return "\n".join(lines)


def read_catalog(directory: Path, unknown_items: Optional[str] = None,
                 echo: Callable[[str], None] = lambda s: None) -> CatalogSource:
    """Read and check a catalog directory. `unknown_items` ("error" or "skip") overrides
    catalog.toml's; `echo` receives the inferred spec when there is no catalog.toml."""
    from catalog.movielens import is_movielens, read_movielens

    directory = Path(directory)
    if not directory.is_dir():
        raise CatalogError(f"{directory}: no such directory")
    spec = read_spec(directory)
    if spec is None and is_movielens(directory):
        return read_movielens(directory, unknown_items or "error")
    tables = {}
    if spec is None:
        from catalog.spec import find_table

        for stem in ("items", "interactions", "users"):
            path = find_table(directory, stem)
            if path is not None:
                tables[stem] = read_table(path)
        if "items" not in tables:
            infer_spec(directory, {})  # raises: not a catalog directory
        spec = infer_spec(directory, {s: column_types(t) for s, t in tables.items()})
        echo("no catalog.toml: inferred this schema (write it to catalog.toml to change it)\n"
             + spec.describe())
    if unknown_items is not None:
        spec.unknown_items = unknown_items
    return from_spec(spec, tables)


def from_spec(spec: CatalogSpec, tables: Optional[Dict] = None) -> CatalogSource:
    tables = tables or {}
    items_path = spec.items.path
    items = tables["items"] if "items" in tables else read_table(items_path)
    if items.num_rows == 0:
        raise CatalogError(f"{items_path}: no items (an empty catalog cannot be served)")
    require_columns(items, ["item_id"], items_path)
    item_ids = int_column(items, "item_id", items_path)
    check_unique(item_ids, items_path, "item_id", "item id")
    declared = [f.name for f in spec.items.features]
    require_columns(items, declared, items_path)
    specs, features = [], []
    for decl in spec.items.features:
        fspec, values = encode_feature(items, decl.name, decl.kind, decl.multi_valued,
                                       items_path)
        specs.append(fspec)
        features.append(values)
    vectors = _vectors(spec.items, items, item_ids, spec.directory, items_path, "item")
    titles = None
    if spec.items.title:
        require_columns(items, [spec.items.title], items_path)
        titles = np.array(items.column(spec.items.title).cast("string").to_pylist(),
                          dtype=object)
    catalog = Catalog(item_ids, vectors if vectors is not None
                      else np.zeros((len(item_ids), 0), np.float32), Schema(specs), features)

    user_id_sets, users = [], None
    interactions_raw = None
    if spec.interactions is not None:
        interactions_raw = _read_interactions(spec, tables.get("interactions"), item_ids)
        # each user once before the sort (a hash pass), not once per interaction
        user_id_sets.append(pc.unique(interactions_raw[0]).to_numpy())
    if spec.users is not None:
        users = _read_users(spec, tables.get("users"))
        user_id_sets.append(users[0])
    user_ids = np.unique(np.concatenate(user_id_sets)) if user_id_sets \
        else np.zeros(0, np.int64)
    user_id_sets = None

    source = CatalogSource(spec.name, catalog, spec.tasks, spec.task_weights, user_ids,
                           titles=titles, spec=spec,
                           layout="inferred" if spec.inferred else "catalog.toml")
    if interactions_raw is not None:
        raw_users, item_index, labels, timestamp, skipped = interactions_raw
        source.interactions = Interactions(lookup(user_ids, raw_users)[0], item_index,
                                           labels, timestamp)
        del raw_users, interactions_raw
        source.skipped_interactions = skipped
        negatives = ~labels.any(1)
        source.logged_impressions = bool(negatives.any()) if spec.impressions is None \
            else spec.impressions
    if users is not None:
        raw, schema, feats, user_vectors = users
        rows = np.searchsorted(user_ids, raw)
        source.user_schema = schema
        source.user_features = []
        for f in feats:
            full = np.full((len(user_ids), f.shape[1]), -1, dtype=np.int64)
            full[rows] = f
            source.user_features.append(full)
        if user_vectors is not None:
            if len(raw) != len(user_ids):
                missing = np.setdiff1d(user_ids, raw)
                raise CatalogError(f"{spec.users.path}: user {int(missing[0])} of the "
                                   f"interactions has no row ({len(missing):,} users without "
                                   "a vector); every user needs one")
            source.user_vectors = np.empty((len(user_ids), user_vectors.shape[1]), np.float32)
            source.user_vectors[rows] = user_vectors
    check_servable(source)
    source.fingerprint = fingerprint(spec)
    return source


def check_servable(source: CatalogSource) -> None:
    """A model can be built: interactions to train from, or item and user vectors of one
    width to rank with."""
    item_dim = source.catalog.embeddings.shape[1]
    where = source.spec.directory if source.spec else source.name
    if source.interactions is not None:
        if len(source.interactions.user_index) == 0:
            raise CatalogError(f"{where}: the interactions table has no rows left to train on")
        if not source.tasks:
            raise CatalogError(f"{where}: the interactions have no task columns (0/1 labels "
                               "such as click, like)")
        return
    if not item_dim:
        raise CatalogError(f"{where}: nothing to rank by: give interactions (to train the "
                           "towers) or item vectors with user vectors (pretrained two-tower)")
    if source.user_vectors is None:
        raise CatalogError(f"{where}: item vectors without interactions need pretrained user "
                           "vectors too ([users] vectors = ...)")
    if source.user_vectors.shape[1] != item_dim:
        raise CatalogError(f"{where}: user vectors are {source.user_vectors.shape[1]} wide, "
                           f"item vectors {item_dim}: they must match (one embedding space)")


def _vectors(decl: TableDecl, table, ids: np.ndarray, directory: Path, path: Path,
             what: str) -> Optional[np.ndarray]:
    if not decl.vectors:
        return None
    if not decl.vectors.endswith(".npy"):
        require_columns(table, [decl.vectors], path)
        return vector_column(table, decl.vectors, path)
    npy = directory / decl.vectors
    vectors = _load_npy(npy)
    if vectors.ndim != 2 or vectors.dtype.kind not in "fiu":
        raise CatalogError(f"{npy}: expected a 2-D array of floats [rows, width], got "
                           f"{vectors.dtype} of shape {list(vectors.shape)}")
    vectors = np.array(vectors, dtype=np.float32)  # a copy: the file is mapped read-only
    if not decl.vector_ids:
        if len(vectors) != len(ids):
            raise CatalogError(f"{npy}: {len(vectors):,} vectors for {len(ids):,} {what}s of "
                               f"{path} (rows align with the table's rows; or give "
                               "vector_ids)")
        check_vectors(vectors, str(npy), "row", ids)
        return vectors
    ids_path = directory / decl.vector_ids
    vector_ids = _load_npy(ids_path)
    if vector_ids.ndim != 1 or vector_ids.dtype.kind not in "iu" \
            or len(vector_ids) != len(vectors):
        raise CatalogError(f"{ids_path}: expected {len(vectors):,} int64 ids (one per row of "
                           f"{npy}), got {vector_ids.dtype} of shape {list(vector_ids.shape)}")
    vector_ids = vector_ids.astype(np.int64)
    check_unique(vector_ids, ids_path, None, "id")
    order = np.argsort(vector_ids)
    pos = np.searchsorted(vector_ids[order], ids).clip(max=len(order) - 1)
    found = vector_ids[order][pos] == ids
    if not found.all():
        r = int(np.flatnonzero(~found)[0])
        raise CatalogError(f"{path}: row {r + 1}: {what} {int(ids[r])} has no vector in "
                           f"{ids_path} ({int((~found).sum()):,} {what}s without one)")
    vectors = vectors[order[pos]]
    check_vectors(vectors, str(npy), what, ids)
    return vectors


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CatalogError(f"{path}: cannot read the .npy file: {e}") from None


def _read_interactions(spec: CatalogSpec, table, item_ids: np.ndarray):
    path = spec.interactions.path
    table = table if table is not None else read_table(path)
    require_columns(table, ["user_id", "item_id", "timestamp"], path)
    tasks = spec.tasks or tuple(c for c in table.column_names
                                if c not in ("user_id", "item_id", "timestamp"))
    if not spec.tasks:
        spec.tasks, spec.task_weights = tasks, (1.0,) * len(tasks)
    require_columns(table, list(tasks), path)
    users = int_column(table, "user_id", path)
    items = int_column(table, "item_id", path)
    # matched before the other columns are read (its hash pass then runs beside fewer arrays);
    # an unknown item is reported after their checks, as it always was
    item_index, known = lookup(item_ids, items)
    skipped = int((~known).sum())
    first_unknown = int(np.flatnonzero(~known)[0]) if skipped else None
    unknown_id = int(items[first_unknown]) if skipped else None
    del items
    timestamp = timestamp_column(table, "timestamp", path)
    labels = np.empty((table.num_rows, len(tasks)), np.float32)
    for t, task in enumerate(tasks):
        labels[:, t] = binary_column(table, task, path)
    if skipped:
        if spec.unknown_items == "error":
            raise CatalogError(f"{path}: row {first_unknown + 1}, column 'item_id': item "
                               f"{unknown_id} is not in the catalog ({skipped:,} of "
                               f"{len(users):,} rows name unknown items; unknown_items = "
                               "\"skip\" in catalog.toml or --unknown-items skip drops them)")
        users, item_index, labels, timestamp = (users[known], item_index[known], labels[known],
                                                timestamp[known])
    return users, item_index, labels, timestamp, skipped


def lookup(ids: np.ndarray, wanted: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(row of each wanted id in `ids` (its first row; 0 when absent), found mask). A hash
    table of `ids` (pyarrow index_in): one pass over `wanted`, where a binary search was
    several times slower once `ids` outgrew the cache."""
    rows = pc.index_in(pa.array(wanted, pa.int64()), value_set=pa.array(ids, pa.int64()))
    if not rows.null_count:  # every id found: no filled copy
        return rows.to_numpy().astype(np.int64), np.ones(len(rows), bool)
    return np.asarray(rows.fill_null(0)).astype(np.int64), np.asarray(rows.is_valid())


def _read_users(spec: CatalogSpec, table):
    decl = spec.users
    path = decl.path
    table = table if table is not None else read_table(path)
    require_columns(table, ["user_id"] + [f.name for f in decl.features], path)
    raw = int_column(table, "user_id", path)
    check_unique(raw, path, "user_id", "user id")
    specs, feats = [], []
    for f in decl.features:
        fspec, values = encode_feature(table, f.name, f.kind, f.multi_valued, path)
        specs.append(fspec)
        feats.append(values)
    vectors = _vectors(decl, table, raw, spec.directory, path, "user")
    return raw, Schema(specs), feats, vectors


def fingerprint(spec: CatalogSpec, extra: Optional[Dict] = None) -> Dict:
    """Identifies the catalog's content for the weights cache: the files read (contents)
    and the spec."""
    digest = hashlib.sha1(spec.describe().encode())
    files = [spec.items.path]
    for decl in (spec.interactions, spec.users):
        if decl is not None:
            files.append(decl.path)
    for decl in (spec.items, spec.users):
        if decl is not None:
            for name in (decl.vectors, decl.vector_ids):
                if name and name.endswith(".npy"):
                    files.append(spec.directory / name)
    for path in files:
        digest.update(file_digest(Path(path)).encode())
    return {"source": "catalog", "name": spec.name, "content": digest.hexdigest()[:16],
            **(extra or {})}


def file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
