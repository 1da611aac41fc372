"""MovieLens-format directories (ratings.csv, movies.csv) as logged data for training and
evaluation: catalog/movielens.py reads them as a catalog (genres, year, titles; tasks rated,
liked, loved), `from_catalog` adds the sampled negatives (ratings hold positives only).

The research licence of the GroupLens data sets forbids redistribution: read them from where
they are (e.g. ../shared/data/ml-latest-small), never copy them into the repository.
"""

from __future__ import annotations

from pathlib import Path

from catalog.movielens import MOVIELENS_TASKS, is_movielens, read_movielens
from training.data import LoggedData, NegativeSampling, from_catalog

__all__ = ["MOVIELENS_TASKS", "load_movielens"]


def load_movielens(path: Path, negatives: NegativeSampling = NegativeSampling()) -> LoggedData:
    """LoggedData from a directory holding ratings.csv and movies.csv."""
    path = Path(path)
    if not is_movielens(path):
        raise FileNotFoundError(f"{path}: not a MovieLens-format directory (ratings.csv and "
                                "movies.csv)")
    return from_catalog(read_movielens(path), negatives)
