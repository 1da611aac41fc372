"""Columns of a catalog table (Parquet or CSV) as checked numpy arrays.

Every function here takes a table (a `ParquetColumns`, read a column at a time, or a
pyarrow table) and the file's name and either returns numpy arrays or raises CatalogError
naming the file, the row (1-based data row, header excluded) and the column. Work is
vectorised (pyarrow compute, numpy); Python loops over rows run only to locate the first bad
row once an error is certain.

Memory: a Parquet column is read when it is converted and dropped after, and a vector column
is copied batch by batch into its array, so a catalog's peak stays near the size of the arrays
it becomes (docs/catalog.md, "Large catalogs").
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from catalog.errors import CatalogError
from world.schema import FeatureSpec

# A str feature's vocabulary is held by every model that parses filters (schema.json) and by
# the fresh store's header, so it is bounded; int features use their values as ids (any
# int64 >= 0).
MAX_DISTINCT_VALUES = 1_000_000
# values of one item for one multi-valued feature: the filter's exact check and the fresh
# store keep a fixed number of columns per feature (the longest item's count)
MAX_VALUES_PER_ITEM = 256
MULTI_SEPARATOR = "|"  # multi-valued cells of CSV tables
_INT_PATTERN = r"^\s*[+-]?\d+\s*$"


# rows per batch where a column is copied batch by batch (a vector column: 16 MiB at 64 wide)
BATCH_ROWS = 65_536


class ParquetColumns:
    """A Parquet table read one column at a time, when a function here asks for it: the
    part of `pa.Table` this module uses (`num_rows`, `column_names`, `schema`, `column`),
    and `batches` for a column too large to hold twice."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = pq.ParquetFile(self.path)
        self.schema = self.file.schema_arrow
        self.column_names: List[str] = self.schema.names
        self.num_rows: int = self.file.metadata.num_rows

    def column(self, name: str) -> pa.ChunkedArray:
        try:
            return self.file.read(columns=[name]).column(0)
        except (pa.ArrowInvalid, OSError) as e:
            raise CatalogError(f"{self.path}: cannot read column {name!r}: {e}") from None

    def batches(self, name: str) -> Iterator[pa.Array]:
        try:
            for batch in self.file.iter_batches(batch_size=BATCH_ROWS, columns=[name]):
                yield batch.column(0)
        except (pa.ArrowInvalid, OSError) as e:
            raise CatalogError(f"{self.path}: cannot read column {name!r}: {e}") from None


Table = Union[ParquetColumns, pa.Table]


def column_batches(table: Table, name: str) -> Iterator[pa.Array]:
    """A column's values as consecutive arrays (row groups or batches)."""
    if isinstance(table, ParquetColumns):
        yield from table.batches(name)
    else:
        yield from table.column(name).chunks


def read_table(path: Path) -> Table:
    """A Parquet table (its columns read when asked for), or a CSV table with every column
    as text ("" = null)."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            return ParquetColumns(path)
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
        if not header:
            raise CatalogError(f"{path}: empty file (a CSV table starts with a header row)")
        dupes = sorted({c for c in header if header.count(c) > 1})
        if dupes:
            raise CatalogError(f"{path}: column {dupes[0]!r} appears twice in the header")
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise CatalogError(f"{path}: cannot read the table: {e}") from None


def column_types(table: Table) -> Dict[str, Tuple[str, bool]]:
    """column -> (kind, multi-valued), kind one of int, str, float, vector, other. CSV text
    columns are typed by their contents: all integers -> int; any cell with '|' ->
    multi-valued."""
    out = {}
    for name in table.column_names:
        t = table.schema.field(name).type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            out[name] = _text_kind(table.column(name))
        elif pa.types.is_integer(t):
            out[name] = ("int", False)
        elif pa.types.is_dictionary(t) and pa.types.is_string(t.value_type):
            out[name] = ("str", False)
        elif pa.types.is_floating(t):
            out[name] = ("float", False)
        elif _is_list(t):
            v = t.value_type
            if pa.types.is_floating(v):
                out[name] = ("vector", False)
            elif pa.types.is_integer(v):
                out[name] = ("int", True)
            elif pa.types.is_string(v) or pa.types.is_large_string(v):
                out[name] = ("str", True)
            else:
                out[name] = ("other", True)
        else:
            out[name] = ("other", False)
    return out


def _is_list(t) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _text_kind(col) -> Tuple[str, bool]:
    valid = pc.drop_null(col)
    multi = bool(pc.any(pc.match_substring(valid, MULTI_SEPARATOR)).as_py() or False)
    tokens = pc.list_flatten(pc.split_pattern(valid, MULTI_SEPARATOR)) if multi else valid
    tokens = pc.filter(tokens, pc.not_equal(tokens, ""))
    if len(tokens) and pc.all(pc.match_substring_regex(tokens, _INT_PATTERN)).as_py():
        return "int", multi
    if len(tokens) and not multi:
        try:
            pc.cast(pc.utf8_trim_whitespace(tokens), pa.float64())
            return "float", False
        except pa.ArrowInvalid:
            pass
    return "str", multi


def require_columns(table: Table, names, path: Path) -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise CatalogError(f"{path}: no column {missing[0]!r} (columns: "
                           f"{', '.join(table.column_names)})")


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _array(table: Table, name: str):
    col = table.column(name)
    return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)


def int_column(table: Table, name: str, path: Path, allow_null: bool = False) -> np.ndarray:
    """int64 [rows] of an integer column (Parquet integers, integral floats, or CSV text).
    Nulls are an error unless `allow_null` (then they read as -1)."""
    col = _array(table, name)
    null = np.asarray(col.is_null()) if col.null_count else np.zeros(len(col), bool)
    if col.null_count and not allow_null:
        raise CatalogError(f"{path}: row {_first(null) + 1}, column {name!r}: empty value")
    t = col.type
    if pa.types.is_integer(t):
        if pa.types.is_uint64(t):
            big = np.asarray(pc.fill_null(pc.greater(col, 2 ** 63 - 1), False))
            if big.any():
                r = _first(big)
                raise CatalogError(f"{path}: row {r + 1}, column {name!r}: {col[r].as_py()} "
                                   "does not fit int64")
        if not col.null_count:  # one copy, straight from arrow's buffer
            return np.array(col.to_numpy(), dtype=np.int64)
        values = np.asarray(pc.fill_null(col.cast(pa.int64()), -1))
    elif pa.types.is_floating(t):
        f = np.asarray(pc.fill_null(col, 0.0), dtype=np.float64)
        bad = ~np.isfinite(f) | (f != np.round(f)) | (np.abs(f) >= 2.0 ** 63)
        if bad.any():
            r = _first(bad)
            raise CatalogError(f"{path}: row {r + 1}, column {name!r}: {f[r]!r} is not an "
                               "int64 integer")
        values = f.astype(np.int64)
        values[null] = -1
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        ok = np.asarray(pc.fill_null(pc.match_substring_regex(col, _INT_PATTERN), True))
        if not ok.all():
            r = _first(~ok)
            raise CatalogError(f"{path}: row {r + 1}, column {name!r}: {col[r].as_py()!r} is "
                               "not an int64 integer")
        try:
            values = np.asarray(pc.fill_null(pc.cast(pc.utf8_trim_whitespace(col), pa.int64()),
                                             -1))
        except pa.ArrowInvalid:  # out of range
            for r, v in enumerate(col.to_pylist()):
                if v is not None and not -2 ** 63 <= int(v) < 2 ** 63:
                    raise CatalogError(f"{path}: row {r + 1}, column {name!r}: {v.strip()} "
                                       "does not fit int64") from None
            raise
    else:
        raise CatalogError(f"{path}: column {name!r} has type {t}, expected int64 integers")
    return np.array(values, dtype=np.int64)  # writable (arrow's buffers are read-only)


def value_lists(table: Table, name: str, kind: str, multi: bool, path: Path
                ) -> Tuple[np.ndarray, pa.Array]:
    """(row of each value, the values) of a feature column, nulls and empty strings dropped:
    a single-valued column gives one value per non-null row, a multi-valued one (a Parquet
    list column, or CSV cells joined by '|') any number."""
    col = _array(table, name)
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = col.type
    if _is_list(t):
        if not multi:
            raise CatalogError(f"{path}: column {name!r} holds lists but is declared single-"
                               "valued (multi_valued = true in catalog.toml)")
        rows = np.asarray(pc.list_parent_indices(col))
        values = pc.list_flatten(col)
    elif multi and (pa.types.is_string(t) or pa.types.is_large_string(t)):
        split = pc.split_pattern(col, MULTI_SEPARATOR)
        rows = np.asarray(pc.list_parent_indices(split))
        values = pc.list_flatten(split)
    else:
        rows = np.arange(len(col), dtype=np.int64)
        values = col
    keep = np.asarray(pc.fill_null(pc.is_valid(values), False))
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        keep &= np.asarray(pc.fill_null(pc.not_equal(values, ""), False))
    if not keep.all():
        rows, values = rows[keep], values.filter(pa.array(keep))
    return rows.astype(np.int64), values


def encode_feature(table: Table, name: str, kind: str, multi: bool, path: Path
                   ) -> Tuple[FeatureSpec, np.ndarray]:
    """(FeatureSpec, value ids int64 [rows, M] padded with -1) of one feature column: str
    values get ids in their sorted vocabulary, int values are their own ids (>= 0)."""
    rows, values = value_lists(table, name, kind, multi, path)
    num_rows = table.num_rows
    if kind == "str":
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            values = values.cast(pa.string())
        encoded = pc.dictionary_encode(values)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        dictionary = np.array(encoded.dictionary.to_pylist(), dtype=object)
        if len(dictionary) > MAX_DISTINCT_VALUES:
            raise CatalogError(
                f"{path}: column {name!r} has {len(dictionary):,} distinct values, over the "
                f"filter index's limit of {MAX_DISTINCT_VALUES:,} for a str feature (its "
                "vocabulary lives in every filtering model); declare it kind = \"int\" if "
                "its values are integer ids, or leave it out of [features]")
        order = np.argsort(dictionary, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        ids = rank[np.asarray(encoded.indices, dtype=np.int64)]
        spec = FeatureSpec(name, "str", multi, [str(v) for v in dictionary[order]])
    else:
        sub = pa.table({name: values})
        ids = int_column(sub, name, path) if len(values) else np.zeros(0, np.int64)
        negative = ids < 0
        if negative.any():
            r = int(rows[_first(negative)])
            raise CatalogError(f"{path}: row {r + 1}, column {name!r}: {int(ids[negative][0])}"
                               " is negative (int feature values are >= 0)")
        spec = FeatureSpec(name, "int", multi)
    return spec, pad_values(rows, ids, num_rows, name, path)


def pad_values(rows: np.ndarray, ids: np.ndarray, num_rows: int, name: str, path: Path
               ) -> np.ndarray:
    """int64 [num_rows, M]: each row's distinct value ids (ascending), padded with -1."""
    span = int(ids.max(initial=0)) + 1
    if len(ids) and ids.min() >= 0 and num_rows < 2 ** 62 // span:
        # one int64 key per (row, id): a stable sort of it is lexsort's order, and fast
        # (rows arrive in order, so the keys are runs already sorted)
        order = np.argsort(rows * span + ids, kind="stable")
    else:
        order = np.lexsort((ids, rows))
    rows, ids = rows[order], ids[order]
    distinct = np.ones(len(ids), dtype=bool)
    distinct[1:] = (rows[1:] != rows[:-1]) | (ids[1:] != ids[:-1])
    rows, ids = rows[distinct], ids[distinct]
    counts = np.bincount(rows, minlength=num_rows)
    width = max(int(counts.max(initial=0)), 1)
    if width > MAX_VALUES_PER_ITEM:
        r = int(np.argmax(counts))
        raise CatalogError(f"{path}: row {r + 1}, column {name!r}: {width} values, over the "
                           f"limit of {MAX_VALUES_PER_ITEM} per item")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.full((num_rows, width), -1, dtype=np.int64)
    out[rows, np.arange(len(rows)) - starts[rows]] = ids
    return out


def vector_column(table: Table, name: str, path: Path) -> np.ndarray:
    """float32 [rows, D] of a fixed-width float list column: every row the same width,
    finite, not all zeros. Copied batch by batch into the array; the first problem is
    reported in this order: a row without a vector, a row of another width than row 1, a
    null inside a vector, then check_vectors's."""
    t = table.schema.field(name).type
    if not (_is_list(t) and pa.types.is_floating(t.value_type)):
        raise CatalogError(f"{path}: column {name!r} has type {t}, expected a list of "
                           "floats (the item's vector)")
    vectors = None
    no_vector = other_width = null_inside = None  # first (row, ...) of each problem
    start = 0
    for col in column_batches(table, name):
        n = len(col)
        if n == 0:
            continue
        if vectors is None:
            width = int(pc.list_value_length(col)[0].as_py() or 0)
            vectors = np.empty((table.num_rows, width), dtype=np.float32)
        null = np.asarray(col.is_null())
        if null.any() and no_vector is None:
            no_vector = start + _first(null)
        lengths = np.asarray(pc.fill_null(pc.list_value_length(col), width), dtype=np.int64)
        if (lengths != width).any() and other_width is None:
            r = _first(lengths != width)
            other_width = (start + r, int(lengths[r]))
        flat = pc.list_flatten(col)
        if flat.null_count and null_inside is None:
            null_inside = start + int(np.asarray(pc.list_parent_indices(col))[
                _first(np.asarray(flat.is_null()))])
        if no_vector is None and other_width is None and null_inside is None:
            vectors[start:start + n] = np.asarray(flat, dtype=np.float32).reshape(n, width)
        start += n
    if no_vector is not None:
        raise CatalogError(f"{path}: row {no_vector + 1}, column {name!r}: no vector")
    if other_width is not None:
        r, length = other_width
        raise CatalogError(f"{path}: row {r + 1}, column {name!r}: vector of {length} "
                           f"values, row 1 has {width} (vectors have one width)")
    if null_inside is not None:
        raise CatalogError(f"{path}: row {null_inside + 1}, column {name!r}: null inside the "
                           "vector")
    if vectors is None:
        vectors = np.zeros((0, 0), dtype=np.float32)
    check_vectors(vectors, f"{path}: column {name!r}", row_names="row")
    return vectors


def check_vectors(vectors: np.ndarray, where: str, row_names: str = "row",
                  ids: Optional[np.ndarray] = None) -> None:
    """Finite and not all zeros (an item or user needs a direction), row by row."""
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise CatalogError(f"{where}: vectors must be a [rows, width] array of floats with "
                           f"width >= 1, got shape {list(vectors.shape)}")
    not_finite = zero = None  # first row of each
    for start in range(0, len(vectors), BATCH_ROWS):  # a batch at a time: no [rows, D] masks
        block = vectors[start:start + BATCH_ROWS]
        if not_finite is None:
            bad = ~np.isfinite(block).all(1)
            not_finite = start + _first(bad) if bad.any() else None
        if zero is None:
            bad = ~np.any(block != 0, axis=1)
            zero = start + _first(bad) if bad.any() else None
    for what, r in (("NaN or infinity", not_finite), ("all zeros", zero)):
        if r is not None:
            label = f"{row_names} {r + 1}" + (f" (id {int(ids[r])})" if ids is not None else "")
            raise CatalogError(f"{where}: {label}: vector has {what}")


def timestamp_column(table: Table, name: str, path: Path) -> np.ndarray:
    """int64 seconds of a time column: integers (seconds), Parquet timestamps or dates, or
    CSV text (integers or ISO 8601 such as 2024-05-01T12:00:00)."""
    col = _array(table, name)
    null = np.asarray(col.is_null())
    if null.any():
        raise CatalogError(f"{path}: row {_first(null) + 1}, column {name!r}: empty timestamp")
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return np.asarray(col.cast(pa.timestamp("s")).cast(pa.int64()), dtype=np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        is_int = np.asarray(pc.match_substring_regex(col, _INT_PATTERN))
        if is_int.all():
            return int_column(table, name, path)
        try:
            parsed = pc.cast(pc.utf8_trim_whitespace(col), pa.timestamp("s"))
            return np.asarray(parsed.cast(pa.int64()), dtype=np.int64)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for r, v in enumerate(col.to_pylist()):
                try:
                    if not is_int[r]:
                        np.datetime64(v.strip(), "s")
                except ValueError:
                    raise CatalogError(f"{path}: row {r + 1}, column {name!r}: cannot read "
                                       f"{v!r} as a time (seconds or ISO 8601, e.g. "
                                       "2024-05-01T12:00:00)") from None
            raise CatalogError(f"{path}: column {name!r}: mixes integer seconds and dates; "
                               "use one form") from None
    return int_column(table, name, path)


def binary_column(table: Table, name: str, path: Path) -> np.ndarray:
    """float32 [rows] of a 0/1 task column (integers, booleans, 0.0/1.0, or CSV text
    0/1/true/false)."""
    col = _array(table, name)
    if pa.types.is_boolean(col.type):
        col = col.cast(pa.int8())
    if pa.types.is_integer(col.type) and not pa.types.is_uint64(col.type) \
            and not col.null_count:  # as stored: no int64 copy
        values = col.to_numpy()
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        lowered = pc.utf8_lower(pc.utf8_trim_whitespace(col))
        col = pc.replace_substring_regex(pc.replace_substring_regex(lowered, "^true$", "1"),
                                         "^false$", "0")
        values = int_column(pa.table({name: col}), name, path)
    else:
        values = int_column(pa.table({name: col}), name, path)
    bad = (values != 0) & (values != 1)
    if bad.any():
        r = _first(bad)
        raise CatalogError(f"{path}: row {r + 1}, column {name!r}: task labels are 0 or 1, got "
                           f"{int(values[r])}")
    return values.astype(np.float32)


def check_unique(ids: np.ndarray, path, column: Optional[str], what: str) -> None:
    """Raises CatalogError naming the first repeated id (in row order of its second
    occurrence) and both of its rows."""
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    same = np.flatnonzero(s[1:] == s[:-1])
    if not len(same):
        return
    later = order[same + 1]
    j = int(np.argmin(later))
    first, second = int(order[same[j]]), int(later[j])
    where = f", column '{column}'" if column else ""
    raise CatalogError(f"{path}: rows {first + 1} and {second + 1}{where}: duplicate {what} "
                       f"{int(ids[second])}")
