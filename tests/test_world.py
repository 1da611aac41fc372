"""The synthetic world is a function of its config: chunked generation (what bounds a 10M-item
world's memory) gives the world a single pass over all items gives, and the world of the
version before chunking."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from world.synthetic import World, WorldConfig, generate_world

CONFIG = WorldConfig(seed=3, num_items=5000, num_users=700, num_creators=300)
# digest() of CONFIG's world and the sums of its embeddings, computed with the generator as
# it was before chunking (one draw of all items per distribution; commit 0f5eb4a)
PINNED_DIGEST = "0f40442a0a21e788e4126f20a672e022afeb4f3a22190ef612b1aa28727ff48c"
PINNED_EMBEDDING_SUM = -361.13444830470274
PINNED_EMBEDDING_ABS_SUM = 31929.32131590673


def arrays(world: World):
    """Every array of the world except the content embeddings (compared apart)."""
    return [world.catalog.item_ids, *world.catalog.features, world.user_ids,
            world.user_language, world.interactions.user_index, world.interactions.item_index,
            world.interactions.labels, world.interactions.timestamp, world.user_latent,
            world.item_latent, world.item_quality]


def digest(world: World) -> str:
    h = hashlib.sha256()
    for a in arrays(world):
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def one_pass() -> World:
    return generate_world(CONFIG, chunk=CONFIG.num_items)


@pytest.mark.parametrize("chunk", [1, 7, 1000, 4096])
def test_chunked_generation_is_the_one_pass_world(one_pass, chunk):
    world = generate_world(CONFIG, chunk=chunk)
    for a, b in zip(arrays(world) + [world.catalog.embeddings],
                    arrays(one_pass) + [one_pass.catalog.embeddings]):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_world_is_the_one_before_chunking(one_pass):
    # everything but the embeddings to the bit; the embeddings are one BLAS product, whose
    # last bit depends on the BLAS build and its threads, so they are checked by their sums
    assert digest(one_pass) == PINNED_DIGEST
    emb = one_pass.catalog.embeddings.astype(np.float64)
    assert emb.sum() == pytest.approx(PINNED_EMBEDDING_SUM, rel=1e-6)
    assert np.abs(emb).sum() == pytest.approx(PINNED_EMBEDDING_ABS_SUM, rel=1e-7)


def test_world_arrays_have_the_documented_types(one_pass):
    catalog = one_pass.catalog
    assert catalog.embeddings.dtype == np.float32
    assert catalog.embeddings.shape == (CONFIG.num_items, CONFIG.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(catalog.embeddings, axis=1), 1.0, rtol=1e-5)
    assert all(f.dtype == np.int64 and f.ndim == 2 for f in catalog.features)
    tags = catalog.features[3]
    assert ((tags >= 0).sum(1) >= 1).all()  # every item has a tag


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="chunk"):
        generate_world(CONFIG, chunk=0)
