"""The fresh-item store: state rebuilt from the log equals the updates applied, readers follow
writers incrementally, torn tails (a writer killed mid-write) are ignored and then cut off,
acknowledged updates always survive, damage is reported, and a full index refuses cleanly."""

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fresh.items import UpdateError, feature_row, parse_features, spell_features
from fresh.log import MAX_GROUP_BYTES, CorruptLog, encode_group
from fresh.store import LOG_NAME, FreshFull, FreshStore, create_store, header_for
from world.schema import FeatureSpec, Schema
from world.synthetic import WorldConfig, make_schema

SCHEMA = make_schema(WorldConfig())
DIM = 16
FEATURES = ["category=comedy,language=en,creator=7,tags=funny|live",
            "category=drama,language=es,creator=123456,tags=",
            "category=music,language=ja,creator=0,tags=short|long|viral|4k"]


def header(capacity=64, max_probe=16):
    return header_for(SCHEMA, DIM, capacity, [1, 1, 1, 3], max_probe=max_probe)


def update_of(h, i: int):
    """The i-th update of a deterministic stream over 20 item ids: mostly upserts, every
    fifth a retire."""
    item_id = 1000 + (i * 7) % 20
    if i % 5 == 4:
        return h.retire(item_id)
    emb = np.random.default_rng(i).normal(size=DIM)
    return h.upsert(item_id, emb, FEATURES[i % len(FEATURES)])


class Reference:
    """What the store must hold after a sequence of updates, in plain Python."""

    def __init__(self):
        self.items, self.hidden = {}, set()

    def apply(self, u):
        self.hidden.add(u.item_id)
        if u.retire:
            if u.item_id in self.items:
                self.items[u.item_id] = (None, None)
        else:
            self.items[u.item_id] = (u.embedding, u.features)

    def assert_matches(self, store: FreshStore):
        assert store.hidden_ids().tolist() == sorted(self.hidden)
        live = {int(store.item_ids[r]): r for r in np.flatnonzero(store.live)}
        assert set(live) == {i for i, (e, _) in self.items.items() if e is not None}
        for item_id, (emb, feats) in self.items.items():
            if emb is None:
                assert store.row_of(item_id) == -1
                continue
            row = live[item_id]
            np.testing.assert_array_equal(store.embeddings[row], emb)
            np.testing.assert_array_equal(store.features[row], feats)
        # every id ever upserted keeps one row, and no two ids share one
        used = store.item_ids[store.item_ids >= 0]
        assert len(set(used.tolist())) == len(used)


@pytest.fixture
def store_dir(tmp_path):
    create_store(tmp_path, header())
    return tmp_path


def test_reader_follows_writer_and_replay_gives_the_same_state(store_dir):
    writer, reader = FreshStore(store_dir, writable=True), FreshStore(store_dir)
    h, ref = writer.header, Reference()
    assert not reader.refresh()  # nothing new: no change, no version bump
    for i in range(60):
        u = update_of(h, i)
        rows = writer.write([[u]])[0]
        ref.apply(u)
        assert reader.refresh()  # the next refresh sees it
        ref.assert_matches(reader)
        if not u.retire:
            assert rows == [reader.row_of(u.item_id)]
    ref.assert_matches(writer)
    ref.assert_matches(FreshStore(store_dir))  # a new process replays the log
    ref.assert_matches(FreshStore(store_dir, writable=True))  # and re-derives the same map


def test_one_group_holds_several_requests_and_retire_then_upsert(store_dir):
    writer = FreshStore(store_dir, writable=True)
    h = writer.header
    a = h.upsert(5, np.ones(DIM), FEATURES[0])
    b = h.upsert(6, np.full(DIM, 2.0), FEATURES[1])
    out = writer.write([[a, b], [h.retire(5)], [h.retire(777)]])
    assert out[0][0] == out[1][0] >= 0 and out[2] == [-1]  # 777 never had a fresh row
    reader = FreshStore(store_dir)
    assert reader.version == 2  # header group + one update group
    assert reader.row_of(5) == -1 and reader.row_of(6) == out[0][1]
    assert reader.hidden_ids().tolist() == [5, 6, 777]
    writer.write([[h.upsert(5, np.full(DIM, 3.0), FEATURES[2])]])  # back, same row
    reader.refresh()
    assert reader.row_of(5) == out[0][0]
    np.testing.assert_array_equal(reader.embeddings[out[0][0]], np.full(DIM, 3.0))


def test_two_writers_interleave_without_losing_updates(store_dir):
    w1, w2 = FreshStore(store_dir, writable=True), FreshStore(store_dir, writable=True)
    ref = Reference()
    for i in range(30):
        u = update_of(w1.header, i)
        (w1 if i % 2 else w2).write([[u]])
        ref.apply(u)
    w1.refresh()
    ref.assert_matches(w1)
    ref.assert_matches(FreshStore(store_dir, writable=True))


def test_torn_tail_is_invisible_to_readers_and_cut_by_the_next_writer(store_dir):
    writer = FreshStore(store_dir, writable=True)
    h, ref = writer.header, Reference()
    for i in range(6):
        u = update_of(h, i)
        writer.write([[u]])
        ref.apply(u)
    log = store_dir / LOG_NAME
    good = log.read_bytes()
    extra = encode_group([b"U" + b"\x00" * 200, b"R" + b"\x01" * 16])  # an unfinished write
    for cut in [1, 7, 8, 9, 100, len(extra) - 1]:
        log.write_bytes(good + extra[:cut])
        reader = FreshStore(store_dir)
        ref.assert_matches(reader)
        assert log.stat().st_size == len(good) + cut  # readers never modify the log
        u = update_of(h, 100 + cut)
        FreshStore(store_dir, writable=True).write([[u]])  # cuts the tail, then appends
        ref.apply(u)
        reader.refresh()
        ref.assert_matches(reader)
        good = log.read_bytes()
    log.write_bytes(good + b"\x00" * 4096)  # a zero-filled tail (size grew, data never did)
    ref.assert_matches(FreshStore(store_dir))
    FreshStore(store_dir, writable=True).write([[h.retire(1000)]])
    ref.apply(h.retire(1000))
    ref.assert_matches(FreshStore(store_dir))


def test_damage_before_the_tail_is_reported_not_truncated(store_dir):
    writer = FreshStore(store_dir, writable=True)
    for i in range(3):
        writer.write([[update_of(writer.header, i)]])
    log = store_dir / LOG_NAME
    data = bytearray(log.read_bytes())
    data[-30] ^= 0xFF  # flip a bit inside the last group
    log.write_bytes(bytes(data) + b"\x07" * (MAX_GROUP_BYTES + 1))
    with pytest.raises(CorruptLog, match="damaged"):
        FreshStore(store_dir, writable=True).write([[writer.header.retire(1)]])
    assert log.stat().st_size == len(data) + MAX_GROUP_BYTES + 1


def test_full_fresh_index_refuses_the_request_and_keeps_the_others(tmp_path):
    create_store(tmp_path, header(capacity=8, max_probe=2))
    writer = FreshStore(tmp_path, writable=True)
    h = writer.header
    results = []
    for i in range(40):
        results.append(writer.write([[h.upsert(i + 1, np.ones(DIM), FEATURES[0])]])[0])
    full = [r for r in results if isinstance(r, FreshFull)]
    placed = [r for r in results if not isinstance(r, FreshFull)]
    assert full and len(placed) <= 8
    assert "no free fresh row" in str(full[0])
    # a request that does not fit writes nothing, its batch-mates are written
    ok_id = next(i + 1 for i, r in enumerate(results) if not isinstance(r, FreshFull))
    bad_id = next(i + 1 for i, r in enumerate(results) if isinstance(r, FreshFull))
    mixed = writer.write([[h.upsert(ok_id, np.full(DIM, 5.0), FEATURES[1]),
                           h.upsert(bad_id, np.ones(DIM), FEATURES[0])],
                          [h.retire(ok_id)]])
    assert isinstance(mixed[0], FreshFull) and mixed[1] == placed[0]
    reader = FreshStore(tmp_path)
    assert reader.num_live == len(placed) - 1 and bad_id not in reader.hidden_ids()
    FreshStore(tmp_path, writable=True)  # the map re-derived from the log agrees with it


def test_store_of_another_layout_is_not_reused(tmp_path):
    create_store(tmp_path, header())
    create_store(tmp_path, header())  # same layout: kept
    with pytest.raises(ValueError, match="another layout"):
        create_store(tmp_path, header(capacity=128))
    create_store(tmp_path, header(capacity=128), replace=True)
    assert FreshStore(tmp_path).header.capacity == 128


def test_reader_notices_a_new_store_created_over_the_old_one(store_dir):
    writer = FreshStore(store_dir, writable=True)
    writer.write([[update_of(writer.header, 0)]])
    reader = FreshStore(store_dir)
    assert reader.num_live == 1
    create_store(store_dir, header(), replace=True)
    assert reader.refresh() and reader.num_live == 0 and reader.hidden_ids().size == 0


@pytest.mark.parametrize("text, words", [
    ("category=comdy,language=en,creator=1", "has no value comdy"),
    ("language=en,creator=1", "'category' takes exactly one value, got 0"),
    ("category=comedy,language=en", "'creator' takes exactly one value"),
    ("colour=red", "unknown feature 'colour'"),
    ("category=comedy,category=drama,language=en,creator=1", "given twice"),
    ("category=comedy|drama,language=en,creator=1", "takes exactly one value, got 2"),
    ("category=comedy,language=en,creator=x", "takes integer values"),
    ("category=comedy,language=en,creator=-4", "non-negative"),
    ("category=comedy,language=en,creator=1,tags=" + "|".join(
        ["short", "long", "live", "trending", "classic", "new", "tutorial", "review", "funny"]),
     "at most 8 values"),
    ("category", "expected name=value"),
])
def test_bad_features_are_named(text, words):
    with pytest.raises(UpdateError, match=words):
        header().upsert(1, np.ones(DIM), text)


def test_bad_ids_and_embeddings_are_named():
    h = header()
    for item_id, emb, words in [(0, np.ones(DIM), "positive"), (-5, np.ones(DIM), "positive"),
                                (1, np.ones(DIM + 1), f"expected {DIM} values"),
                                (1, np.full(DIM, np.nan), "finite"),
                                (1, np.zeros(DIM), "all zeros")]:
        with pytest.raises(UpdateError, match=words):
            h.upsert(item_id, emb, FEATURES[0])


def test_features_spell_back():
    h = header()
    for text in FEATURES:
        row = h.upsert(1, np.ones(DIM), text).features
        assert spell_features(row, SCHEMA, h.widths) == text


def test_quoted_values_in_features():
    """Values are spelled as filter expressions spell them: quoted ones may hold ',' '|' '='."""
    vocabulary = ["Science Fiction", "a|b", "x,y=z", 'say "hi"', "plain", "AND"]
    schema = Schema([FeatureSpec("genres", "str", True, vocabulary),
                     FeatureSpec("brand", "str", False, vocabulary)])
    text = 'genres="Science Fiction"|"a|b"|"x,y=z"|"say \\"hi\\"",brand="AND"'
    values = parse_features(text, schema)
    assert values == {"genres": [0, 1, 2, 3], "brand": [5]}
    row = feature_row(values, schema, [4, 1])
    assert spell_features(row, schema, [4, 1]) == text
    assert parse_features(" genres = plain | \"a|b\" , brand=plain,", schema) == {
        "genres": [4, 1], "brand": [4]}
    for bad, words in [('genres="Science Fiction,brand=plain', "is not closed"),
                       ("genres=Science Fiction", "expected '|' after the value"),
                       ('brand="nope"', 'has no value nope (values: "Science Fiction", "a|b"')]:
        with pytest.raises(UpdateError) as e:
            parse_features(bad, schema)
        assert words in str(e.value)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.booleans(), st.integers(0, 2)),
                min_size=1, max_size=40),
       st.integers(1, 4))
def test_any_update_sequence_any_grouping(tmp_path_factory, ops, per_group):
    directory = tmp_path_factory.mktemp("fresh")
    create_store(directory, header(capacity=32))
    writer, reader, ref = FreshStore(directory, writable=True), FreshStore(directory), Reference()
    h = writer.header
    updates = [h.retire(i) if retire else
               h.upsert(i, np.arange(DIM) + i + 10 * f, FEATURES[f]) for i, retire, f in ops]
    for start in range(0, len(updates), per_group):
        group = updates[start: start + per_group]
        writer.write([[u] for u in group])
        for u in group:
            ref.apply(u)
        reader.refresh()
        ref.assert_matches(reader)
    ref.assert_matches(FreshStore(directory, writable=True))


# --- a writer process killed with SIGKILL, again and again -------------------------------

def _writer_child(directory: Path, start: int, out_fd: int) -> None:
    """Forked writer: applies update_of(start), update_of(start + 1), ... one group each and
    reports every acknowledgement on `out_fd`. Its writes are split in two with a pause in
    between, so that most kills land inside a write and leave a torn record on disk."""
    import fresh.log

    real_write = os.write

    def torn_prone_write(fd, data):
        half = max(1, len(data) // 2)
        n = real_write(fd, bytes(data[:half]))
        time.sleep(0.02)
        return n

    fresh.log.os.write = torn_prone_write  # this process only (a forked copy)
    store = FreshStore(directory, writable=True)
    i = start
    while True:
        store.write([[update_of(store.header, i)]])
        real_write(out_fd, f"{i}\n".encode())
        i += 1


def test_writer_killed_mid_update_never_loses_an_acknowledged_update(tmp_path):
    create_store(tmp_path, header())
    FreshStore(tmp_path, writable=True)  # import torch and the map before forking
    rng = np.random.default_rng(0)
    committed, torn_seen = 0, 0
    for _ in range(12):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                os.close(read_fd)
                _writer_child(tmp_path, committed, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        with os.fdopen(read_fd) as acks:
            first = [acks.readline() for _ in range(2)]  # let it get going
            assert all(first), "writer child died"
            time.sleep(float(rng.uniform(0.0, 0.06)))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            acked = [int(x) for x in first + acks.read().split()]
        log = tmp_path / LOG_NAME
        size_before = log.stat().st_size
        reader = FreshStore(tmp_path)  # reading does not repair anything ...
        torn_seen += reader.log.offset < size_before
        groups = reader.version - 1  # minus the header group
        assert groups >= acked[-1] + 1, "an acknowledged update is missing"
        assert groups <= acked[-1] + 2, "more updates than were attempted"
        ref = Reference()
        for i in range(groups):
            ref.apply(update_of(reader.header, i))
        ref.assert_matches(reader)
        ref.assert_matches(FreshStore(tmp_path, writable=True))
        committed = groups
    assert committed >= 24
    assert torn_seen >= 3, "kills did not land inside writes: torn tails were not tested"


def test_item_updates_config_matches_its_runner():
    from serving.updates import RUNNERS
    from tests.test_config import load_config, tensors

    (name, runner), = RUNNERS.items()
    config = load_config(name)
    assert config.name == name and config.backend == "python"
    assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
    assert tensors(config.input) == {s.name: (s.dtype, s.dims, s.optional) for s in runner.INPUTS}
    assert tensors(config.output) == {s.name: (s.dtype, s.dims, s.optional)
                                      for s in runner.OUTPUTS}
