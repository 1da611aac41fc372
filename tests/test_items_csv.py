"""items.csv: the chunked writer writes what csv.writer writes row by row."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from builder.build import write_items_csv
from filtering.spelling import join_values
from world.schema import FeatureSpec, Schema
from world.synthetic import Catalog


def reference_items_csv(catalog: Catalog, path) -> None:
    """One row at a time through csv.writer (the writer before chunking)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["item_id"] + [s.name for s in catalog.schema.features])
        for r, item_id in enumerate(catalog.item_ids.tolist()):
            out.writerow([item_id] + [
                join_values([spec.spell(v) for v in column[r].tolist() if v >= 0])
                for spec, column in zip(catalog.schema.features, catalog.features)])


def awkward_catalog(n: int, seed: int) -> Catalog:
    rng = np.random.default_rng(seed)
    vocabulary = ["comedy", "Science Fiction", 'say "hi"', "a,b", "AND", "", "line\nbreak",
                  "back\\slash", "café"]
    schema = Schema([FeatureSpec("genre", "str", vocabulary=vocabulary),
                     FeatureSpec("year", "int"),
                     FeatureSpec("tags", "str", multi_valued=True, vocabulary=vocabulary),
                     FeatureSpec("sizes", "int", multi_valued=True)])
    genre = rng.integers(0, len(vocabulary), size=(n, 1))
    year = np.where(rng.random((n, 1)) < 0.1, -1, rng.integers(1900, 2030, size=(n, 1)))
    tags = np.where(rng.random((n, 3)) < 0.4, -1, rng.integers(0, len(vocabulary), (n, 3)))
    sizes = np.where(rng.random((n, 2)) < 0.3, -1, rng.integers(0, 10**9, (n, 2)))
    ids = rng.choice(10**12, size=n, replace=False)
    return Catalog(ids.astype(np.int64), np.zeros((n, 0), np.float32), schema,
                   [genre, year, tags, sizes])


@pytest.mark.parametrize("n, chunk", [(0, 7), (1, 7), (500, 7), (1000, 1000), (1001, 64)])
def test_items_csv_is_what_csv_writer_writes_row_by_row(tmp_path, n, chunk):
    catalog = awkward_catalog(n, seed=n)
    write_items_csv(catalog, tmp_path / "items.csv", chunk=chunk)
    reference_items_csv(catalog, tmp_path / "reference.csv")
    assert (tmp_path / "items.csv").read_bytes() == (tmp_path / "reference.csv").read_bytes()
    with open(tmp_path / "items.csv", newline="", encoding="utf-8") as fh:
        assert sum(1 for _ in csv.reader(fh)) == n + 1
