"""MovieLens-format loading: labels per task, sampled negatives, genres; the real
ml-latest-small when it is present (its research licence keeps it out of the repository)."""

from pathlib import Path

import numpy as np
import pytest
from catalogs import MOVIES

from catalog import CatalogError
from training.data import NegativeSampling, holdout_split, per_user_time_split, time_split
from training.movielens import load_movielens

ML_LATEST_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"

RATINGS = """userId,movieId,rating,timestamp
3,1,4.0,100
3,2,2.5,200
3,11,5.0,300
9,5,4.5,150
9,1,3.0,250
"""


def test_loader_labels_negatives_and_genres(tmp_path):
    (tmp_path / "movies.csv").write_text(MOVIES)
    (tmp_path / "ratings.csv").write_text(RATINGS)
    data = load_movielens(tmp_path, NegativeSampling(per_positive=2, seed=3))
    assert data.catalog.item_ids.tolist() == [1, 2, 5, 7, 11]
    assert data.user_ids.tolist() == [3, 9]
    assert data.catalog.embeddings.shape == (5, 0)
    genres = data.catalog.schema.features[0]
    spelled = [[genres.vocabulary[v] for v in row if v >= 0]
               for row in data.catalog.features[0].tolist()]
    assert spelled[1] == ["Comedy", "Drama", "Romance"]
    assert spelled[3] == ["(no genres listed)"]  # a value: genres:"(no genres listed)" finds it
    years = data.catalog.features[1][:, 0].tolist()
    assert years == [1995, 1995, 1995, -1, 1997]  # "Untitled" has no year
    log = data.interactions
    assert log.labels.shape == (5 * 3, 3)
    rated = log.labels[:, 0] > 0
    pairs = {(int(data.user_ids[u]), int(data.catalog.item_ids[i]))
             for u, i in zip(log.user_index[rated], log.item_index[rated])}
    assert pairs == {(3, 1), (3, 2), (3, 11), (9, 5), (9, 1)}
    by_pair = {(int(data.user_ids[u]), int(data.catalog.item_ids[i])): tuple(y)
               for u, i, y in zip(log.user_index[rated], log.item_index[rated],
                                  log.labels[rated].tolist())}
    assert by_pair[(3, 1)] == (1.0, 1.0, 0.0)  # 4.0: liked, not loved
    assert by_pair[(3, 2)] == (1.0, 0.0, 0.0)
    assert by_pair[(9, 5)] == (1.0, 1.0, 1.0)
    # negatives: never a movie the user rated, all labels 0, a rating's timestamp
    neg = ~rated
    assert np.all(log.labels[neg] == 0)
    for u, i in zip(log.user_index[neg], log.item_index[neg]):
        assert (int(data.user_ids[u]), int(data.catalog.item_ids[i])) not in pairs
    assert set(log.timestamp[neg].tolist()) <= {100, 200, 300, 150, 250}
    # every user's first feature row: no user features in MovieLens
    assert data.user_features.num_values == 0


def test_loader_rejects_ratings_of_unknown_movies(tmp_path):
    (tmp_path / "movies.csv").write_text(MOVIES)
    (tmp_path / "ratings.csv").write_text(RATINGS + "9,404,3.0,400\n")
    with pytest.raises(CatalogError, match=r"ratings.csv: row 6, column 'movieId': movie 404 "
                                           r"is not in movies.csv \(1 ratings"):
        load_movielens(tmp_path)
    with pytest.raises(FileNotFoundError, match="MovieLens-format"):
        load_movielens(tmp_path / "nowhere")


def test_per_user_split_holds_out_each_users_latest(tmp_path):
    (tmp_path / "movies.csv").write_text(MOVIES)
    (tmp_path / "ratings.csv").write_text(RATINGS)
    data = load_movielens(tmp_path, NegativeSampling(per_positive=1))
    assert data.split == "per_user" and not data.logged_impressions
    train, held = holdout_split(data, 0.5)
    assert not (train & held).any() and (train | held).all()
    inter = data.interactions
    for u in np.unique(inter.user_index):
        mine = inter.user_index == u
        n = int(mine.sum())
        assert int((held & mine).sum()) == n // 2  # floor(0.5 * n) per user
        assert inter.timestamp[held & mine].min() >= inter.timestamp[train & mine].max()


def test_per_user_split_rounds_down_and_keeps_log_order_within_a_timestamp():
    from world.synthetic import Interactions

    users = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    times = np.array([5, 1, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3])
    inter = Interactions(users, np.arange(14), np.zeros((14, 1), np.float32), times)
    train, held = per_user_time_split(inter, 0.3)
    # user 0: floor(0.9) = 0 held; user 1: floor(3.0) = 3, its three latest; user 2: none
    assert held.tolist() == [False] * 10 + [True] * 3 + [False]
    _, held = per_user_time_split(inter, 0.5)
    # user 0: 1 held: of its two interactions at time 5, the later in the log
    assert held[:3].tolist() == [False, False, True]


@pytest.mark.skipif(not ML_LATEST_SMALL.exists(), reason=f"{ML_LATEST_SMALL} absent")
def test_ml_latest_small_loads_with_a_time_holdout():
    data = load_movielens(ML_LATEST_SMALL)
    assert data.catalog.num_items == 9742 and len(data.user_ids) == 610
    rated = data.interactions.labels[:, 0] > 0
    assert int(rated.sum()) == 100836
    assert len(data.catalog.schema.features[0].vocabulary) == 20  # (no genres listed) too
    train, held = time_split(data.interactions, 0.1)
    assert not (train & held).any()
    assert data.interactions.timestamp[held].min() >= data.interactions.timestamp[train].max()


@pytest.mark.skipif(not ML_LATEST_SMALL.exists(), reason=f"{ML_LATEST_SMALL} absent")
def test_ml_latest_small_per_user_holdout_evaluates_most_users():
    data = load_movielens(ML_LATEST_SMALL)
    train, held = holdout_split(data, 0.1)
    rated = data.interactions.labels[:, 0] > 0
    users_with_heldout_ratings = np.unique(data.interactions.user_index[held & rated])
    assert len(users_with_heldout_ratings) > 500  # a global cut leaves 74 of 610
    assert abs(held.mean() - 0.1) < 0.01
