"""MovieLens directories (`movies.csv` + `ratings.csv`: ml-latest-small, ml-25m, ...) read as
a catalog, as they are.

Movies are items (item id = movieId) with the features `genres` (multi-valued, as listed,
`(no genres listed)` included: `genres:"(no genres listed)"` finds those movies) and `year`
(from the title's trailing `(1995)`; movies without one have no year); titles are the display
column. Ratings are positive interactions with three tasks:

    rated  = 1                 (the user rated the movie: the "click")
    liked  = rating >= 4.0
    loved  = rating >= 4.5

There are no logged negatives (training samples unrated movies: training/data.py), no item or
user vectors and no user features.

The research licence of the GroupLens data sets forbids redistribution: read them from where
they are (e.g. ../shared/data/ml-latest-small), never copy them into the repository.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.errors import CatalogError
from catalog.read import CatalogSource, file_digest, lookup
from catalog.tables import (
    check_unique,
    encode_feature,
    int_column,
    read_table,
    require_columns,
    timestamp_column,
)
from world.schema import Schema
from world.synthetic import Catalog, Interactions

MOVIELENS_TASKS = ("rated", "liked", "loved")
# Value Model defaults: value = rated + 2 liked + 4 loved (as the synthetic world's click,
# like, share)
MOVIELENS_TASK_WEIGHTS = (1.0, 2.0, 4.0)
NO_GENRES = "(no genres listed)"


@dataclass(frozen=True)
class MovieLensConfig:
    liked_threshold: float = 4.0
    loved_threshold: float = 4.5


def is_movielens(directory: Path) -> bool:
    d = Path(directory)
    return (d / "movies.csv").exists() and (d / "ratings.csv").exists()


def read_movielens(directory: Path, unknown_items: str = "error",
                   config: MovieLensConfig = MovieLensConfig()) -> CatalogSource:
    directory = Path(directory)
    movies_path, ratings_path = directory / "movies.csv", directory / "ratings.csv"
    movies = read_table(movies_path)
    require_columns(movies, ["movieId", "title", "genres"], movies_path)
    item_ids = int_column(movies, "movieId", movies_path)
    if len(item_ids) == 0:
        raise CatalogError(f"{movies_path}: no movies (an empty catalog cannot be served)")
    check_unique(item_ids, movies_path, "movieId", "movie id")
    titles = movies.column("title")
    year = pc.struct_field(pc.extract_regex(titles, r"\((?P<year>\d{4})\)\s*$"), "year")
    table = pa.table({"genres": movies.column("genres"), "year": year})
    genre_spec, genres = encode_feature(table, "genres", "str", True, movies_path)
    year_spec, years = encode_feature(table, "year", "int", False, movies_path)
    catalog = Catalog(item_ids, np.zeros((len(item_ids), 0), np.float32),
                      Schema([genre_spec, year_spec]), [genres, years])

    ratings = read_table(ratings_path)
    require_columns(ratings, ["userId", "movieId", "rating", "timestamp"], ratings_path)
    raw_users = int_column(ratings, "userId", ratings_path)
    raw_items = int_column(ratings, "movieId", ratings_path)
    try:
        stars = np.asarray(pc.cast(ratings.column("rating"), pa.float64()), dtype=np.float64)
    except pa.ArrowInvalid as e:
        raise CatalogError(f"{ratings_path}: column 'rating': {e}") from None
    timestamp = timestamp_column(ratings, "timestamp", ratings_path)
    item_index, known = lookup(item_ids, raw_items)
    skipped = int((~known).sum())
    if skipped:
        r = int(np.flatnonzero(~known)[0])
        if unknown_items == "error":
            raise CatalogError(f"{ratings_path}: row {r + 1}, column 'movieId': movie "
                               f"{int(raw_items[r])} is not in movies.csv ({skipped:,} ratings "
                               "name unknown movies; --unknown-items skip drops them)")
        raw_users, item_index, stars, timestamp = (raw_users[known], item_index[known],
                                                   stars[known], timestamp[known])
    user_ids, user_index = np.unique(raw_users, return_inverse=True)
    labels = np.stack([np.ones_like(stars), stars >= config.liked_threshold,
                       stars >= config.loved_threshold], 1).astype(np.float32)
    interactions = Interactions(user_index.astype(np.int64), item_index, labels,
                                timestamp.astype(np.int64))
    digest = file_digest(movies_path)[:8] + file_digest(ratings_path)[:8]
    fingerprint = {"source": "movielens", "directory": directory.resolve().name,
                   "content": digest, "loader": asdict(config)}
    return CatalogSource(directory.resolve().name, catalog, MOVIELENS_TASKS,
                         MOVIELENS_TASK_WEIGHTS, user_ids.astype(np.int64),
                         interactions=interactions,
                         titles=np.array(titles.to_pylist(), dtype=object),
                         logged_impressions=False, skipped_interactions=skipped,
                         fingerprint=fingerprint, layout="movielens")
