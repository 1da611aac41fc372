"""`catalog.toml`: what a catalog directory holds, and the schema inferred when it is absent.

    name = "shop"                       # optional; default: the directory's name

    [items]
    path = "items.parquet"              # default: items.parquet, else items.csv
    title = "title"                     # optional display column (tables, not filters)
    vectors = "embedding"               # optional: a fixed-width float list column, or a .npy
    vector_ids = "vector_ids.npy"       #   file; with a .npy, its rows' item ids (default:
                                        #   the items table's row order)
    [features]                          # the filterable features, in this order
    genres = { kind = "str", multi_valued = true }
    year = { kind = "int" }

    [interactions]                      # optional
    path = "interactions.parquet"
    unknown_items = "error"             # or "skip": rows naming items not in the catalog
    impressions = true                  # rows with every task 0 are logged impressions
                                        #   (default: true when any such row exists)
    [tasks]                             # task column = default Value Model weight, in order
    click = 1.0
    like = 2.0

    [users]                             # optional
    path = "users.parquet"
    vectors = "embedding"               # pretrained user vectors (list column or .npy)
    [users.features]
    country = { kind = "str" }

docs/catalog.md is the user's page; this module is the one place that reads the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from catalog.errors import CatalogError

KINDS = ("str", "int")
UNKNOWN_ITEMS = ("error", "skip")
SPEC_FILE = "catalog.toml"
TABLE_SUFFIXES = (".parquet", ".csv")


@dataclass(frozen=True)
class FeatureDecl:
    name: str
    kind: str  # "str" or "int"
    multi_valued: bool = False


@dataclass
class TableDecl:
    """One table of the catalog: its file, the declared columns and an optional vector column
    (or .npy file) and display column."""

    path: Optional[Path] = None
    features: List[FeatureDecl] = field(default_factory=list)
    vectors: Optional[str] = None
    vector_ids: Optional[str] = None
    title: Optional[str] = None


@dataclass
class CatalogSpec:
    """Everything catalog.toml says (or the inference decided)."""

    directory: Path
    name: str
    items: TableDecl
    interactions: Optional[TableDecl] = None
    users: Optional[TableDecl] = None
    tasks: Tuple[str, ...] = ()  # empty: every interactions column but the key ones
    task_weights: Tuple[float, ...] = ()
    unknown_items: str = "error"
    impressions: Optional[bool] = None  # None: inferred from the rows
    inferred: bool = False  # True when there was no catalog.toml

    def describe(self) -> str:
        """The spec as catalog.toml would declare it (what `--catalog` prints)."""
        d = self.directory
        lines = [f'name = "{self.name}"', "", "[items]",
                 f'path = "{self.items.path.relative_to(d)}"']
        for key in ("title", "vectors", "vector_ids"):
            if getattr(self.items, key):
                lines.append(f'{key} = "{getattr(self.items, key)}"')
        lines += ["", "[features]"] + [_feature_line(f) for f in self.items.features]
        if self.interactions is not None:
            lines += ["", "[interactions]", f'path = "{self.interactions.path.relative_to(d)}"',
                      f'unknown_items = "{self.unknown_items}"']
            if self.impressions is not None:
                lines.append(f"impressions = {str(self.impressions).lower()}")
            if self.tasks:
                lines += ["", "[tasks]"] + [f"{t} = {w:g}" for t, w in
                                            zip(self.tasks, self.task_weights)]
        if self.users is not None:
            lines += ["", "[users]", f'path = "{self.users.path.relative_to(d)}"']
            if self.users.vectors:
                lines.append(f'vectors = "{self.users.vectors}"')
            if self.users.features:
                lines += ["", "[users.features]"] + [_feature_line(f)
                                                     for f in self.users.features]
        return "\n".join(lines) + "\n"


def _feature_line(f: FeatureDecl) -> str:
    multi = ", multi_valued = true" if f.multi_valued else ""
    return f'{_toml_key(f.name)} = {{ kind = "{f.kind}"{multi} }}'


def _toml_key(name: str) -> str:
    bare = name and all(c.isalnum() or c in "_-" for c in name) and name.isascii()
    return name if bare else '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def find_table(directory: Path, stem: str) -> Optional[Path]:
    """`<stem>.parquet`, else `<stem>.csv`, in `directory`; None when neither exists."""
    for suffix in TABLE_SUFFIXES:
        if (directory / f"{stem}{suffix}").exists():
            return directory / f"{stem}{suffix}"
    return None


def read_spec(directory: Path) -> Optional[CatalogSpec]:
    """The CatalogSpec of `directory/catalog.toml`, or None when there is none (the caller
    infers one). Raises CatalogError naming the file and key of any problem."""
    directory = Path(directory)
    path = directory / SPEC_FILE
    if not path.exists():
        return None
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CatalogError(f"{path}: not valid TOML: {e}") from None
    _only(doc, ("name", "items", "features", "interactions", "tasks", "users"), path, "")
    items = _table(doc.get("items", {}), directory, "items", path)
    items.features = _features(doc.get("features", {}), path, "features")
    spec = CatalogSpec(directory, str(doc.get("name", directory.resolve().name)), items)
    if "interactions" in doc:
        section = doc["interactions"]
        spec.interactions = _table(section, directory, "interactions", path,
                                   extra=("unknown_items", "impressions"))
        unknown = section.get("unknown_items", "error")
        if unknown not in UNKNOWN_ITEMS:
            raise CatalogError(f"{path}: interactions.unknown_items must be one of "
                               f"{', '.join(UNKNOWN_ITEMS)}, got {unknown!r}")
        spec.unknown_items = unknown
        impressions = section.get("impressions")
        if impressions is not None and not isinstance(impressions, bool):
            raise CatalogError(f"{path}: interactions.impressions must be true or false")
        spec.impressions = impressions
    tasks = doc.get("tasks", {})
    if not isinstance(tasks, dict):
        raise CatalogError(f"{path}: [tasks] must be a table of task = default weight")
    for task, weight in tasks.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0 \
                or weight != weight or weight in (float("inf"),):
            raise CatalogError(f"{path}: tasks.{task} must be a finite weight >= 0, "
                               f"got {weight!r}")
    spec.tasks, spec.task_weights = tuple(tasks), tuple(float(w) for w in tasks.values())
    if "users" in doc:
        section = doc["users"]
        spec.users = _table(section, directory, "users", path, extra=("features",))
        spec.users.features = _features(section.get("features", {}), path, "users.features")
    return spec


def _only(section: dict, keys: tuple, path: Path, where: str) -> None:
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise CatalogError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(where + k for k in unknown)} (known: "
                           f"{', '.join(where + k for k in keys)})")


def _table(section, directory: Path, stem: str, path: Path, extra: tuple = ()) -> TableDecl:
    if not isinstance(section, dict):
        raise CatalogError(f"{path}: [{stem}] must be a table")
    _only(section, ("path", "vectors", "vector_ids", "title") + extra, path, f"{stem}.")
    table = section.get("path")
    file = directory / table if table else find_table(directory, stem)
    if file is None:
        raise CatalogError(f"{path}: [{stem}] names no path and the directory has no "
                           f"{stem}.parquet or {stem}.csv")
    if file.suffix not in TABLE_SUFFIXES:
        raise CatalogError(f"{path}: {stem}.path {table!r}: a table is .parquet or .csv")
    if not file.exists():
        raise CatalogError(f"{path}: {stem}.path: {file} does not exist")
    decl = TableDecl(file, vectors=section.get("vectors"), vector_ids=section.get("vector_ids"),
                     title=section.get("title"))
    if decl.vector_ids and not (decl.vectors or "").endswith(".npy"):
        raise CatalogError(f"{path}: {stem}.vector_ids goes with a .npy vectors file")
    return decl


def _features(section, path: Path, where: str) -> List[FeatureDecl]:
    if not isinstance(section, dict):
        raise CatalogError(f"{path}: [{where}] must be a table of name = {{ kind = ... }}")
    out = []
    for name, decl in section.items():
        if isinstance(decl, str):  # shorthand: name = "str"
            decl = {"kind": decl}
        if not isinstance(decl, dict):
            raise CatalogError(f"{path}: {where}.{name} must be {{ kind = \"str\" | \"int\", "
                               "multi_valued = true | false }")
        _only(decl, ("kind", "multi_valued"), path, f"{where}.{name}.")
        kind = decl.get("kind")
        if kind not in KINDS:
            raise CatalogError(f"{path}: {where}.{name}: unknown kind {kind!r} (kinds: "
                               f"{', '.join(map(repr, KINDS))})")
        multi = decl.get("multi_valued", False)
        if not isinstance(multi, bool):
            raise CatalogError(f"{path}: {where}.{name}.multi_valued must be true or false")
        out.append(FeatureDecl(name, kind, multi))
    return out


def infer_spec(directory: Path, columns: Dict[str, Dict[str, Tuple[str, bool]]]) -> CatalogSpec:
    """The spec of a directory without catalog.toml, from its tables' columns.

    `columns[stem][column] = (type, multi)`, type one of "int", "str", "float", "vector",
    "other" (catalog/tables.py column_types). Item features: every int or str column but
    `item_id` and a `title`/`name` display column; a vector column is the item vectors;
    interaction tasks: every column but user_id, item_id and timestamp, weight 1.
    """
    items_path = find_table(directory, "items")
    if items_path is None:
        raise CatalogError(f"{directory}: no catalog.toml, items.parquet or items.csv (nor "
                           "MovieLens's movies.csv + ratings.csv): not a catalog directory")
    item_cols = columns["items"]
    items = TableDecl(items_path)
    for name, (kind, multi) in item_cols.items():
        if name == "item_id":
            continue
        if kind == "vector" and items.vectors is None:
            items.vectors = name
        elif kind == "str" and name.lower() in ("title", "name") and items.title is None \
                and not multi:
            items.title = name
        elif kind in KINDS:
            items.features.append(FeatureDecl(name, kind, multi))
    if items.vectors is None and (directory / "item_vectors.npy").exists():
        items.vectors = "item_vectors.npy"
        if (directory / "item_vector_ids.npy").exists():
            items.vector_ids = "item_vector_ids.npy"
    spec = CatalogSpec(directory, directory.resolve().name, items, inferred=True)
    path = find_table(directory, "interactions")
    if path is not None:
        spec.interactions = TableDecl(path)
        spec.tasks = tuple(c for c in columns["interactions"]
                           if c not in ("user_id", "item_id", "timestamp"))
        spec.task_weights = (1.0,) * len(spec.tasks)
    path = find_table(directory, "users")
    if path is not None:
        spec.users = TableDecl(path)
        for name, (kind, multi) in columns["users"].items():
            if name == "user_id":
                continue
            if kind == "vector" and spec.users.vectors is None:
                spec.users.vectors = name
            elif kind in KINDS:
                spec.users.features.append(FeatureDecl(name, kind, multi))
    if spec.users is not None and spec.users.vectors is None \
            and (directory / "user_vectors.npy").exists():
        spec.users.vectors = "user_vectors.npy"
    return spec
