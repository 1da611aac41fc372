"""What training and evaluation read from a data source: a catalog, users and logged impressions.

Two sources produce it: the synthetic world (`from_world`, with ground truth) and a user's
catalog directory (`from_catalog`: catalog/, MovieLens directories included). Everything
downstream (the two-tower model, the OverArch, evaluation) sees only `LoggedData`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from catalog import CatalogSource
from world.synthetic import Catalog, Interactions, World


@dataclass
class FeatureColumns:
    """Categorical features of a set of entities (users or items), ready for an embedding bag.

    values: int64 [R, M] value ids of all features side by side, each feature's ids offset so
        that they index one shared table of `num_values` rows; -1 = padding.
    weights: float32 [R, M] 1 / (number of values the entity has for that feature) on valid
        slots, 0 on padding: every feature contributes the mean of its values' embeddings.
    """

    values: np.ndarray
    weights: np.ndarray
    num_values: int

    @staticmethod
    def from_features(features: Sequence[np.ndarray], sizes: Sequence[int]) -> FeatureColumns:
        """`features[f]` int64 [R, M_f] value ids in [0, sizes[f]) padded with -1."""
        if not features:
            raise ValueError("no features: use FeatureColumns.empty(rows)")
        # filled column by column into the final arrays (a 10M-item catalog's float64
        # temporaries and concatenated copies would be gigabytes)
        rows, width = features[0].shape[0], sum(int(c.shape[1]) for c in features)
        values = np.empty((rows, width), dtype=np.int64)
        weights = np.empty((rows, width), dtype=np.float32)
        at, offset = 0, 0
        for column, size in zip(features, sizes):
            valid = column >= 0
            if column.size and column.max() >= size:  # padding (-1) is below any size
                raise ValueError(f"feature value {int(column.max())} outside [0, {size})")
            count = np.maximum(valid.sum(1, keepdims=True), 1)
            end = at + column.shape[1]
            values[:, at:end] = np.where(valid, column + offset, -1)
            weights[:, at:end] = np.where(valid, (1.0 / count).astype(np.float32),
                                          np.float32(0.0))
            at, offset = end, offset + int(size)
        return FeatureColumns(values, weights, offset)

    @staticmethod
    def empty(rows: int) -> FeatureColumns:
        return FeatureColumns(np.full((rows, 1), -1, np.int64), np.zeros((rows, 1), np.float32), 0)

    def take(self, rows: np.ndarray) -> FeatureColumns:
        return FeatureColumns(self.values[rows], self.weights[rows], self.num_values)


@dataclass
class LoggedData:
    """One data source, in the form training and evaluation use.

    catalog: items in catalog order; `catalog.embeddings` is the item content vector fed to
        the item tower (width 0 when the source has none).
    item_features / user_features: categorical features of items (catalog order) and users.
    interactions: logged impressions with one 0/1 label per task; `user_index` rows into
        `user_ids`, `item_index` into the catalog.
    world: the synthetic world when the source is one (ground truth for evaluation).
    logged_impressions: see below.
    """

    name: str
    catalog: Catalog
    item_features: FeatureColumns
    user_ids: np.ndarray  # int64 [U] raw ids
    user_features: FeatureColumns
    interactions: Interactions
    tasks: Tuple[str, ...]
    # identifies the source for weight caching (e.g. the world config)
    fingerprint: dict = field(default_factory=dict)
    world: Optional[World] = None
    # whether the negatives in `interactions` are items a recommender showed (the synthetic
    # world) rather than random unseen items (MovieLens): training_config_for() adds negatives
    # from the retrieval itself when they are not
    logged_impressions: bool = True
    # how the holdout is cut (holdout_split): "global", the latest interactions of everyone
    # (the synthetic world: its logs cover all users evenly in time), or "per_user", each
    # user's own latest (MovieLens: users rate in bursts years apart, so a global cut would
    # hold out only the few users active at the end; ml-latest-small: 74 of 610)
    split: str = "global"


# features of the synthetic catalog that feed the item tower; `creator` is left out: the world
# draws creators independently of everything a user cares about
WORLD_ITEM_FEATURES = ("category", "language", "tags")


def feature_sizes(catalog: Catalog, names: Sequence[str]) -> List[int]:
    sizes = []
    for name in names:
        spec = catalog.schema.features[catalog.schema.feature_id(name)]
        column = catalog.features[catalog.schema.feature_id(name)]
        sizes.append(len(spec.vocabulary) if spec.kind == "str" else int(column.max()) + 1)
    return sizes


def from_world(world: World) -> LoggedData:
    """The synthetic world as logged data: users have one feature (their language)."""
    catalog = world.catalog
    item_cols = [catalog.features[catalog.schema.feature_id(n)] for n in WORLD_ITEM_FEATURES]
    items = FeatureColumns.from_features(item_cols, feature_sizes(catalog, WORLD_ITEM_FEATURES))
    users = FeatureColumns.from_features([world.user_language[:, None]],
                                         [world.config.num_languages])
    return LoggedData("synthetic", catalog, items, world.user_ids, users, world.interactions,
                      tuple(world.tasks), {"source": "synthetic", "world": asdict(world.config)},
                      world)


@dataclass(frozen=True)
class NegativeSampling:
    """Negatives for sources whose interactions are positives only (no logged impressions):
    unrated items drawn uniformly, each stamped with the time of one of the user's
    interactions so that a time split keeps the ratio."""

    per_positive: int = 4
    seed: int = 0


def dense_codes(values: np.ndarray) -> Tuple[np.ndarray, int]:
    """Value ids [R, M] (-1 padding) -> (codes 0..V-1 in value order, -1 kept; V): embedding
    rows for features whose ids are sparse (int features such as a year or a brand id)."""
    valid = values >= 0
    distinct, codes = np.unique(values[valid], return_inverse=True)
    out = np.full(values.shape, -1, dtype=np.int64)
    out[valid] = codes
    return out, int(len(distinct))


def feature_columns(features: Sequence[np.ndarray], rows: int) -> FeatureColumns:
    """Embedding-bag columns of categorical features (any value ids), or none."""
    if not features:
        return FeatureColumns.empty(rows)
    coded = [dense_codes(f) for f in features]
    return FeatureColumns.from_features([c for c, _ in coded], [max(n, 1) for _, n in coded])


def from_catalog(source: CatalogSource, negatives: NegativeSampling = NegativeSampling()
                 ) -> LoggedData:
    """A catalog with interactions as logged data: every item feature and user feature feeds
    its tower, the item vectors are the item tower's content input, the holdout is each
    user's latest interactions, and sources without logged impressions get sampled
    negatives (`negatives`)."""
    if source.interactions is None:
        raise ValueError(f"{source.name}: no interactions to train from")
    catalog = source.catalog
    log = source.interactions
    fingerprint = dict(source.fingerprint)
    if not source.logged_impressions:
        users, items, times = sample_negatives(
            log.user_index, log.item_index, log.timestamp, catalog.num_items,
            negatives.per_positive, np.random.default_rng(negatives.seed))
        log = Interactions(np.concatenate([log.user_index, users]).astype(np.int64),
                           np.concatenate([log.item_index, items]).astype(np.int64),
                           np.concatenate([log.labels, np.zeros((len(users), log.labels.shape[1]),
                                                                np.float32)]),
                           np.concatenate([log.timestamp, times]))
        fingerprint["negatives"] = asdict(negatives)
    return LoggedData(source.name, catalog, feature_columns(catalog.features, catalog.num_items),
                      source.user_ids, feature_columns(source.user_features,
                                                       len(source.user_ids)),
                      log, tuple(source.tasks), fingerprint,
                      logged_impressions=source.logged_impressions, split="per_user")


def sample_negatives(user_index: np.ndarray, item_index: np.ndarray, timestamp: np.ndarray,
                     num_items: int, per_rating: int, rng: np.random.Generator):
    """`per_rating` items each user never interacted with per interaction, uniformly, with
    that interaction's timestamp."""
    n = len(user_index) * per_rating
    users = np.repeat(user_index, per_rating)
    times = np.repeat(timestamp, per_rating)
    items = rng.integers(0, num_items, size=n)
    # a (user, item) pair as one int64 key, for vectorised membership tests
    seen = np.unique(user_index.astype(np.int64) * num_items + item_index)
    redraw = np.arange(n)
    for _ in range(1000):  # redraw the (few) draws that hit a seen item until none does
        keys = users[redraw].astype(np.int64) * num_items + items[redraw]
        pos = np.searchsorted(seen, keys).clip(max=len(seen) - 1)
        redraw = redraw[seen[pos] == keys]
        if redraw.size == 0:
            break
        items[redraw] = rng.integers(0, num_items, size=redraw.size)
    return users, items, times


def time_split(interactions: Interactions, fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """(train mask, holdout mask) over interactions: the latest `fraction` by time is held out."""
    ts = interactions.timestamp
    cut = np.quantile(ts, 1.0 - fraction)
    return ts < cut, ts >= cut


def per_user_time_split(interactions: Interactions, fraction: float
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """(train mask, holdout mask): each user's latest `fraction` of their interactions by time
    (rounded down; ties in time keep log order) is held out."""
    users, ts = interactions.user_index, interactions.timestamp
    order = np.lexsort((np.arange(len(ts)), ts, users))  # by user, then time, then log order
    sorted_users = users[order]
    starts = np.searchsorted(sorted_users, sorted_users, side="left")
    counts = np.bincount(users)[sorted_users]
    rank = np.arange(len(order)) - starts  # position within the user's history
    held_sorted = rank >= counts - np.floor(fraction * counts).astype(np.int64)
    held = np.zeros(len(ts), dtype=bool)
    held[order] = held_sorted
    return ~held, held


def split_interactions(interactions: Interactions, split: str, fraction: float
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """(train mask, holdout mask): the latest `fraction`, cut as `split` says ("global" or
    "per_user", see LoggedData.split)."""
    if split == "per_user":
        return per_user_time_split(interactions, fraction)
    if split == "global":
        return time_split(interactions, fraction)
    raise ValueError(f"unknown split {split!r} (global, per_user)")


def holdout_split(data: LoggedData, fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """(train mask, holdout mask) over data.interactions, cut as `data.split` says."""
    return split_interactions(data.interactions, data.split, fraction)


def subset(interactions: Interactions, mask: np.ndarray) -> Interactions:
    return Interactions(interactions.user_index[mask], interactions.item_index[mask],
                        interactions.labels[mask], interactions.timestamp[mask])
