"""A deterministic synthetic recommendation world, generated from one latent model.

Items and users live in a hidden `latent_dim`-space. Item embeddings (the catalog's 64-dim
vectors), item features (category, language, creator, tags) and the logged task labels
(click, like, share) are all drawn from it, so models trained on the logs can be scored
against the ground-truth task probabilities (`World.true_task_probs`).

Everything is a function of `WorldConfig` (seed included): the same config gives the same world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np

from world.schema import FeatureSpec, Schema

TASKS = ("click", "like", "share")
# the affinity logit: AFFINITY_SCALE * u.v / sqrt(r) + LANGUAGE_BONUS * same language + quality;
# P(click) = sigmoid(affinity - CLICK_BIAS) (World.affinity, World.true_task_probs; the
# quality table's bound, training/anchors.py map_user_latents, inverts the same model)
AFFINITY_SCALE = 1.6
LANGUAGE_BONUS = 0.8
CLICK_BIAS = 3.0

CATEGORIES = [
    "action", "adventure", "animation", "anime", "arts", "beauty", "biography", "business",
    "cars", "comedy", "cooking", "crafts", "crime", "dance", "diy", "documentary", "drama",
    "education", "esports", "family", "fantasy", "fashion", "fitness", "food", "gaming",
    "gardening", "health", "history", "horror", "kids", "music", "mystery", "nature", "news",
    "parenting", "pets", "photography", "podcasts", "politics", "romance", "science", "scifi",
    "shopping", "sports", "talkshow", "tech", "thriller", "travel", "western", "wellness",
]
LANGUAGES = ["en", "es", "pt", "hi", "fr", "de", "ja", "ko", "ar", "id"]
LANGUAGE_SHARE = np.array([0.40, 0.14, 0.10, 0.09, 0.06, 0.06, 0.05, 0.04, 0.03, 0.03])
TAGS = [
    "short", "long", "live", "trending", "classic", "new", "tutorial", "review", "funny",
    "emotional", "relaxing", "intense", "educational", "behind_the_scenes", "interview",
    "compilation", "challenge", "reaction", "vlog", "series", "premiere", "award", "indie",
    "remastered", "subtitled", "dubbed", "hd", "4k", "vertical", "asmr", "unboxing",
    "recipe", "workout", "travelogue", "explainer", "highlights", "behind", "retro", "viral",
    "exclusive",
]


@dataclass
class WorldConfig:
    seed: int = 0
    num_items: int = 200_000
    num_users: int = 20_000
    embedding_dim: int = 64  # catalog embedding width (the ANN index dimension)
    latent_dim: int = 16  # width of the hidden latent space the world is drawn from
    num_categories: int = 50
    num_languages: int = 10
    num_creators: int = 10_000
    num_tags: int = 40
    max_tags_per_item: int = 3
    impressions_per_user: int = 40
    embedding_noise: float = 0.15  # noise of catalog embeddings around the latent projection


@dataclass
class Catalog:
    """Items in catalog order. `features[f]` is int64 [N, M_f] of value ids padded with -1
    (M_f = 1 for single-valued features)."""

    item_ids: np.ndarray  # int64 [N], sparse raw ids
    embeddings: np.ndarray  # float32 [N, D]
    schema: Schema
    features: List[np.ndarray]

    @property
    def num_items(self) -> int:
        return int(self.item_ids.shape[0])

    def take(self, rows: np.ndarray) -> Catalog:
        """The catalog restricted to / reordered by `rows`."""
        return Catalog(self.item_ids[rows], self.embeddings[rows], self.schema,
                       [f[rows] for f in self.features])


@dataclass
class Interactions:
    """Logged impressions: one row per (user, item) shown, with one 0/1 label per task."""

    user_index: np.ndarray  # int64 [E], row into World.user_ids
    item_index: np.ndarray  # int64 [E], row into the catalog (catalog order)
    labels: np.ndarray  # float32 [E, T], TASKS order
    timestamp: np.ndarray  # int64 [E], seconds


@dataclass
class World:
    config: WorldConfig
    catalog: Catalog
    user_ids: np.ndarray  # int64 [U], sparse 64-bit raw ids
    user_language: np.ndarray  # int64 [U], value id in LANGUAGES
    interactions: Interactions
    # hidden ground truth
    user_latent: np.ndarray = field(repr=False, default=None)  # float32 [U, r]
    item_latent: np.ndarray = field(repr=False, default=None)  # float32 [N, r]
    item_quality: np.ndarray = field(repr=False, default=None)  # float32 [N]
    tasks: tuple = TASKS

    def affinity(self, user_index: np.ndarray, item_index: np.ndarray) -> np.ndarray:
        """Ground-truth affinity logit, elementwise over broadcastable index arrays."""
        u = self.user_latent[user_index]
        v = self.item_latent[item_index]
        dot = (u * v).sum(-1) / np.sqrt(self.config.latent_dim)
        same_lang = self.user_language[user_index] == self.catalog.features[1][item_index, 0]
        return AFFINITY_SCALE * dot + LANGUAGE_BONUS * same_lang + self.item_quality[item_index]

    def true_task_probs(self, user_index: np.ndarray, item_index: np.ndarray) -> np.ndarray:
        """Ground-truth probabilities [..., T] of click, like and share (like and share are
        unconditional: P(click and like), P(click and share))."""
        a = self.affinity(user_index, item_index)
        q = self.item_quality[item_index]
        p_click = _sigmoid(a - CLICK_BIAS)
        p_like = p_click * _sigmoid(1.0 * a + 0.8 * q - 3.0)
        p_share = p_click * _sigmoid(0.6 * a + 0.15 * np.maximum(a, 0.0) ** 2 - 4.0)
        return np.stack([p_click, p_like, p_share], axis=-1).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_schema(cfg: WorldConfig) -> Schema:
    return Schema([
        FeatureSpec("category", "str", vocabulary=CATEGORIES[: cfg.num_categories]),
        FeatureSpec("language", "str", vocabulary=LANGUAGES[: cfg.num_languages]),
        FeatureSpec("creator", "int"),
        FeatureSpec("tags", "str", multi_valued=True, vocabulary=TAGS[: cfg.num_tags]),
    ])


# items generated per chunk: the per-item draws (latent noise, tag Gumbel keys, embedding
# noise) are float64 [chunk, width] temporaries instead of [N, width] ones. The world does not
# depend on it: each distribution's draws are taken chunk after chunk from the one stream, in
# the same order as a single draw of all N (tests/test_world.py checks both).
GENERATION_CHUNK = 1 << 16


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def generate_world(cfg: WorldConfig = WorldConfig(), chunk: int = GENERATION_CHUNK) -> World:
    """The world of `cfg`; `chunk` (items per step) bounds the temporaries, not the result."""
    if cfg.num_categories > len(CATEGORIES) or cfg.num_languages > len(LANGUAGES) \
            or cfg.num_tags > len(TAGS):
        raise ValueError("num_categories/num_languages/num_tags exceed the built-in vocabularies")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    rng = np.random.default_rng(cfg.seed)
    n, u, r = cfg.num_items, cfg.num_users, cfg.latent_dim

    # --- items: latent vector around its category's centre ---------------------------------
    centres = rng.normal(0.0, 0.9, size=(cfg.num_categories, r)).astype(np.float32)
    category_pop = rng.dirichlet(np.full(cfg.num_categories, 2.0))
    category = rng.choice(cfg.num_categories, size=n, p=category_pop)
    item_latent = np.empty((n, r), dtype=np.float32)
    for s, e in _chunks(n, chunk):
        item_latent[s:e] = centres[category[s:e]] + rng.normal(
            0.0, 0.6, size=(e - s, r)).astype(np.float32)
    lang_p = LANGUAGE_SHARE[: cfg.num_languages] / LANGUAGE_SHARE[: cfg.num_languages].sum()
    language = rng.choice(cfg.num_languages, size=n, p=lang_p)
    # creators: Zipf-like sizes, each creator mostly in one category
    creator_weight = 1.0 / np.arange(1, cfg.num_creators + 1) ** 0.8
    creator = rng.choice(cfg.num_creators, size=n, p=creator_weight / creator_weight.sum())
    quality = rng.normal(0.0, 0.5, size=n).astype(np.float32)
    # tags: 1..max per item, biased towards the category's favourite tags
    tag_pref = rng.dirichlet(np.full(cfg.num_tags, 0.5), size=cfg.num_categories)
    ntags = rng.integers(1, cfg.max_tags_per_item + 1, size=n)
    log_pref = np.log(tag_pref + 1e-9)
    tags = np.empty((n, cfg.max_tags_per_item), dtype=np.int64)
    for s, e in _chunks(n, chunk):
        tags[s:e] = _top_tags(rng.gumbel(size=(e - s, cfg.num_tags)) + log_pref[category[s:e]],
                              ntags[s:e], cfg.max_tags_per_item)

    proj = np.linalg.qr(rng.normal(size=(cfg.embedding_dim, r)))[0].T.astype(np.float32)
    # one product over all items (float32, the result itself: no temporary), because BLAS
    # rounds a row differently depending on how it splits the rows between its threads: a
    # chunked product would not be today's world to the last bit
    emb = item_latent @ proj
    for s, e in _chunks(n, chunk):
        block = emb[s:e]
        block += cfg.embedding_noise * rng.normal(size=(e - s, cfg.embedding_dim)).astype(
            np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    item_ids = _sparse_ids(rng, n, high=10**12)

    schema = make_schema(cfg)
    features = [category[:, None].astype(np.int64, copy=False),
                language[:, None].astype(np.int64, copy=False),
                creator[:, None].astype(np.int64, copy=False), tags]
    catalog = Catalog(item_ids, emb, schema, features)

    # --- users: latent vector near two favourite categories ---------------------------------
    favs = rng.choice(cfg.num_categories, size=(u, 2), p=category_pop)
    user_latent = (centres[favs].mean(1) + rng.normal(0.0, 0.5, size=(u, r))).astype(np.float32)
    user_language = rng.choice(cfg.num_languages, size=u, p=lang_p).astype(np.int64)
    user_ids = _sparse_ids(rng, u, high=2**63 - 1)

    world = World(cfg, catalog, user_ids, user_language, None, user_latent, item_latent, quality)

    # --- impressions: half exposure from favourite categories, half uniform -----------------
    m = cfg.impressions_per_user
    user_index = np.repeat(np.arange(u), m)
    by_cat = np.argsort(category, kind="stable")
    cat_start = np.searchsorted(category[by_cat], np.arange(cfg.num_categories))
    cat_count = np.bincount(category, minlength=cfg.num_categories)
    fav = favs[user_index, rng.integers(0, 2, size=u * m)]
    in_cat = by_cat[cat_start[fav] + (rng.random(u * m) * np.maximum(cat_count[fav], 1))
                    .astype(np.int64).clip(max=np.maximum(cat_count[fav] - 1, 0))]
    uniform = rng.integers(0, n, size=u * m)
    item_index = np.where(rng.random(u * m) < 0.5, in_cat, uniform)
    probs = world.true_task_probs(user_index, item_index)
    click = rng.random(u * m) < probs[:, 0]
    like = click & (rng.random(u * m) < probs[:, 1] / np.maximum(probs[:, 0], 1e-9))
    share = click & (rng.random(u * m) < probs[:, 2] / np.maximum(probs[:, 0], 1e-9))
    labels = np.stack([click, like, share], axis=1).astype(np.float32)
    timestamp = rng.integers(0, 30 * 86400, size=u * m)
    world.interactions = Interactions(user_index, item_index.astype(np.int64), labels, timestamp)
    return world


def _top_tags(keys: np.ndarray, ntags: np.ndarray, max_tags: int) -> np.ndarray:
    """Per row, the first `ntags` of the `max_tags` largest Gumbel keys' tag ids, sorted
    ascending and padded with -1: int64 [M, max_tags]."""
    tags = np.full((keys.shape[0], max_tags), -1, dtype=np.int64)
    top = np.argsort(-keys, axis=1)[:, :max_tags]
    keep = np.arange(max_tags)[None, :] < ntags[:, None]
    tags[keep] = top[keep]
    tags = np.sort(np.where(tags < 0, np.iinfo(np.int64).max, tags), axis=1)
    tags[tags == np.iinfo(np.int64).max] = -1
    return tags


def _sparse_ids(rng: np.random.Generator, count: int, high: int) -> np.ndarray:
    """`count` distinct ids drawn from [1, high)."""
    ids = np.unique(rng.integers(1, high, size=int(count * 1.01) + 16, dtype=np.int64))
    while ids.shape[0] < count:
        ids = np.unique(np.concatenate([ids, rng.integers(1, high, size=count, dtype=np.int64)]))
    return rng.permutation(ids)[:count]
