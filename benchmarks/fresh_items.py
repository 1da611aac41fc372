"""Fill a built repository's fresh-item store, to measure serving with fresh items.

    .venv/bin/python -m benchmarks.fresh_items --repository runs/benchmark/model_repository \\
        --items-csv runs/benchmark/items.csv --count 1000

Writes straight to the store (fresh/store.py; no server needed, a running one sees the items
at its next batch). Item i copies the vector and features of a random indexed item under a new
raw id, with a little noise on the vector, so fresh items land in the same neighbourhoods and
pass the same filters as indexed ones; in addition every 10th update replaces an indexed item
and every 20th retires one, so the filter also hides main rows. Seeded: the same arguments
give the same store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from client import format_features
from client.catalog import embeddings_path, load_items
from fresh.store import FreshStore, fresh_dir_for

FIRST_NEW_ID = 10**15  # above every synthetic catalog id (< 10**12)


def fill(repository: Path, items_csv: Path, count: int, seed: int = 0) -> FreshStore:
    items = load_items(items_csv)
    ids = list(items)
    vectors = np.load(embeddings_path(items_csv), mmap_mode="r")
    store = FreshStore(fresh_dir_for(repository), writable=True)
    header = store.header
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(count):
        row = int(rng.integers(len(ids)))
        spelled = format_features(items[ids[row]])
        noisy = vectors[row] + 0.05 * rng.normal(size=vectors.shape[1]).astype(np.float32)
        updates.append(header.upsert(FIRST_NEW_ID + i, noisy / np.linalg.norm(noisy), spelled))
        if i % 10 == 9:  # replace an indexed item by a fresh row of its own
            other = int(rng.integers(len(ids)))
            spelled = format_features(items[ids[other]])
            updates.append(header.upsert(ids[other], vectors[other], spelled))
        if i % 20 == 19:
            updates.append(header.retire(ids[int(rng.integers(len(ids)))]))
    for start in range(0, len(updates), 64):
        results = store.write([updates[start: start + 64]])
        if not isinstance(results[0], list):
            raise SystemExit(f"store full after {start} updates: {results[0]}")
    return store


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fresh_items", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--items-csv", type=Path, required=True)
    p.add_argument("--count", type=int, default=1000, help="new items (plus replaces/retires)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    store = fill(a.repository, a.items_csv, a.count, a.seed)
    hidden = np.intersect1d(store.hidden_ids(), np.array(list(load_items(a.items_csv))))
    print(f"{store.directory}: {store.num_live} live fresh rows of {store.header.capacity}, "
          f"{hidden.size} indexed items hidden (replaced or retired)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
