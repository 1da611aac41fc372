"""MovieLens-format files (ratings.csv, movies.csv) as logged data.

Every rating is an impression the user engaged with; three tasks grade it:

    rated  = 1                 (the user rated the movie: the "click")
    liked  = rating >= 4.0
    loved  = rating >= 4.5

Ratings hold positives only, so each user also gets `negatives_per_rating` impressions of movies
they never rated, drawn uniformly from the catalog (all three labels 0), each stamped with the
time of one of the user's ratings so that a time split keeps the ratio. Movies are items (raw id
= movieId) with one multi-valued feature, `genres`; there are no content vectors and no user
features, so both towers learn from ids (and genres) alone.

The research licence of the GroupLens data sets forbids redistribution: read them from where
they are (e.g. ../shared/data/ml-latest-small), never copy them into the repository.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import FeatureColumns, LoggedData
from world.schema import FeatureSpec, Schema
from world.synthetic import Catalog, Interactions

MOVIELENS_TASKS = ("rated", "liked", "loved")
NO_GENRES = "(no genres listed)"


@dataclass
class MovieLensConfig:
    negatives_per_rating: int = 4  # unrated movies shown per rating (labels all 0)
    liked_threshold: float = 4.0
    loved_threshold: float = 4.5
    seed: int = 0  # negative sampling


def load_movielens(path: Path, config: MovieLensConfig = MovieLensConfig()) -> LoggedData:
    """LoggedData from a directory holding ratings.csv and movies.csv."""
    path = Path(path)
    for name in ("ratings.csv", "movies.csv"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name}: not a MovieLens-format directory")
    movie_ids, movie_genres = [], []
    with open(path / "movies.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            movie_ids.append(int(row["movieId"]))
            movie_genres.append([g for g in row["genres"].split("|") if g and g != NO_GENRES])
    vocabulary = sorted({g for gs in movie_genres for g in gs})
    genre_id = {g: i for i, g in enumerate(vocabulary)}
    width = max(1, max(len(gs) for gs in movie_genres))
    genres = np.full((len(movie_ids), width), -1, dtype=np.int64)
    for r, gs in enumerate(movie_genres):
        genres[r, : len(gs)] = sorted(genre_id[g] for g in gs)
    item_ids = np.asarray(movie_ids, dtype=np.int64)
    schema = Schema([FeatureSpec("genres", "str", multi_valued=True, vocabulary=vocabulary)])
    catalog = Catalog(item_ids, np.zeros((len(item_ids), 0), np.float32), schema, [genres])

    ratings = np.loadtxt(path / "ratings.csv", delimiter=",", skiprows=1, ndmin=2)
    raw_users = ratings[:, 0].astype(np.int64)
    raw_items = ratings[:, 1].astype(np.int64)
    order = np.argsort(item_ids)
    pos = np.minimum(np.searchsorted(item_ids[order], raw_items), len(item_ids) - 1)
    known = item_ids[order][pos] == raw_items
    if not known.all():
        raise ValueError(f"ratings.csv rates {int((~known).sum())} movies missing from movies.csv")
    item_index = order[pos]
    user_ids, user_index = np.unique(raw_users, return_inverse=True)
    stars = ratings[:, 2]
    labels = np.stack([np.ones_like(stars), stars >= config.liked_threshold,
                       stars >= config.loved_threshold], 1).astype(np.float32)
    timestamp = ratings[:, 3].astype(np.int64)

    neg_users, neg_items, neg_times = sample_negatives(
        user_index, item_index, timestamp, len(item_ids), config.negatives_per_rating,
        np.random.default_rng(config.seed))
    interactions = Interactions(
        np.concatenate([user_index, neg_users]).astype(np.int64),
        np.concatenate([item_index, neg_items]).astype(np.int64),
        np.concatenate([labels, np.zeros((len(neg_users), 3), np.float32)]),
        np.concatenate([timestamp, neg_times]))
    fingerprint = {"source": "movielens", "directory": path.resolve().name,
                   "ratings": int(len(stars)), "movies": int(len(item_ids)),
                   "loader": vars(config), "split": "per_user"}
    return LoggedData("movielens", catalog,
                      FeatureColumns.from_features([genres], [len(vocabulary)]),
                      user_ids.astype(np.int64), FeatureColumns.empty(len(user_ids)),
                      interactions, MOVIELENS_TASKS, fingerprint, logged_impressions=False,
                      split="per_user")


def sample_negatives(user_index: np.ndarray, item_index: np.ndarray, timestamp: np.ndarray,
                     num_items: int, per_rating: int, rng: np.random.Generator):
    """`per_rating` unrated items per rating, uniformly, with the rating's timestamp."""
    n = len(user_index) * per_rating
    users = np.repeat(user_index, per_rating)
    times = np.repeat(timestamp, per_rating)
    items = rng.integers(0, num_items, size=n)
    rated = set(zip(user_index.tolist(), item_index.tolist()))
    # redraw the (few) draws that hit a rated movie until none does
    redraw = np.arange(n)
    for _ in range(1000):
        clash = np.fromiter(((u, i) in rated for u, i in zip(users[redraw].tolist(),
                                                             items[redraw].tolist())),
                            dtype=bool, count=len(redraw))
        redraw = redraw[clash]
        if redraw.size == 0:
            break
        items[redraw] = rng.integers(0, num_items, size=redraw.size)
    return users, items, times
