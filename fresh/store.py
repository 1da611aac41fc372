"""The fresh-item store: items added, replaced or retired after the main index was built.

State, rebuilt by every process from the update log (fresh/log.py) and kept current by
`refresh()` (one `stat` when nothing changed):

    embeddings  float32 [C, D]   row r = fresh row r (C = the store's capacity)
    features    int64   [C, S]   value ids, columns as `header.widths`, -1 padded
    item_ids    int64   [C]      raw item id owning the row, -1 for a row never used
    live        bool    [C]      the row's item is currently served
    hidden ids  raw ids of MAIN items that must not be served from the main index: retired,
                or replaced by a fresh row. Kept as raw ids, not rows, so the same store works
                with every version of the main index.

Raw item id -> fresh row is the zero-collision mapping (idmap/zero_collision.py, insert mode,
no eviction): an id keeps its row for the store's life, re-upserts overwrite that row, and two
ids never share one. Only writers need the map; records carry the row, so readers apply them
without it, and a writer re-deriving the map from the log checks it gets the same rows.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from fresh.items import (
    ItemUpdate,
    UpdateError,
    check_embedding,
    check_item_id,
    feature_row,
    parse_features,
)
from fresh.log import CorruptLog, UpdateLog
from world.schema import Schema

LOG_NAME = "updates.log"
FORMAT = 1
HEADER, UPSERT, RETIRE = b"H", b"U", b"R"
IDS = struct.Struct("<qq")  # raw item id, fresh row (-1: none)
FRESH_DIR_ENV = "IAM_FRESH_DIR"


def fresh_dir_for(repository: Path) -> Path:
    """Where the store of a model repository lives: $IAM_FRESH_DIR when set, else the
    `fresh_items/` directory next to the repository."""
    override = os.environ.get(FRESH_DIR_ENV)
    return Path(override) if override else Path(repository).resolve().parent / "fresh_items"


@dataclass
class FreshHeader:
    dim: int  # embedding width (the main index's)
    capacity: int  # fresh rows (= zero-collision slots)
    widths: List[int]  # columns per feature in the fresh feature matrix
    schema: dict  # world.schema.Schema as a dict: what value ids mean
    max_probe: int = 16  # zero-collision probe window
    format: int = FORMAT
    _schema: Optional[Schema] = field(default=None, repr=False, compare=False)

    @property
    def feature_schema(self) -> Schema:
        if self._schema is None:
            self._schema = Schema.from_json(json.dumps(self.schema))
        return self._schema

    @property
    def column_start(self) -> np.ndarray:
        """int64 [F + 1]: feature f owns columns column_start[f]:column_start[f + 1]."""
        return np.cumsum([0] + list(self.widths)).astype(np.int64)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("_schema")
        return json.dumps(d, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> FreshHeader:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise CorruptLog(f"fresh store format {d.get('format')}, expected {FORMAT}")
        return FreshHeader(**d)

    def upsert(self, item_id, embedding, features: str) -> ItemUpdate:
        """A validated upsert: `features` spelled `name=value|value,...` (fresh/items.py)."""
        values = parse_features(features, self.feature_schema)
        return ItemUpdate(check_item_id(item_id), check_embedding(embedding, self.dim),
                          feature_row(values, self.feature_schema, self.widths))

    def retire(self, item_id) -> ItemUpdate:
        return ItemUpdate(check_item_id(item_id))

    def compatible_with(self, other: FreshHeader) -> bool:
        """Same meaning of every stored byte (capacity and probe window may not change either:
        rows were assigned under them)."""
        return self.to_json() == other.to_json()


def header_for(schema: Schema, dim: int, capacity: int, catalog_widths: Sequence[int],
               multi_valued_width: int = 8, max_probe: int = 16) -> FreshHeader:
    """The header of a store next to a main index with `catalog_widths` feature columns:
    multi-valued features get room for at least `multi_valued_width` values."""
    widths = [max(int(w), multi_valued_width) if f.multi_valued else 1
              for f, w in zip(schema.features, catalog_widths)]
    return FreshHeader(dim=int(dim), capacity=int(capacity), widths=widths,
                       schema=json.loads(schema.to_json()), max_probe=int(max_probe))


def create_store(directory: Path, header: FreshHeader, replace: bool = False) -> Path:
    """An empty store in `directory`. An existing store is kept when `replace` is False and it
    has the same header; a different header raises (its rows mean something else)."""
    path = Path(directory) / LOG_NAME
    if path.exists() and not replace:
        existing = FreshStore(directory).header
        if not existing.compatible_with(header):
            raise ValueError(f"{path} holds a fresh store of another layout ({existing}); "
                             "rebuild with a new store (replace=True) to discard it")
        return path
    UpdateLog.create(path, [HEADER + header.to_json().encode()])
    return path


class FreshFull(UpdateError):
    """No free fresh row in the item id's probe window."""


class FreshStore:
    """One process's view of the store in `directory`; `writable` to apply updates.

    Reading is lock-free: call `refresh()` before using the state (the runners do, once per
    batch). `version` changes whenever the state does, for caches keyed on it; `updates` counts
    the update groups applied (0: an empty store).
    """

    def __init__(self, directory: Path, writable: bool = False):
        self.directory = Path(directory)
        self.log = UpdateLog(self.directory / LOG_NAME)
        self.writable = writable
        self.header: Optional[FreshHeader] = None
        self.version = 0
        self.refresh()
        if self.header is None:
            raise CorruptLog(f"{self.log.path} has no header")

    # --- reading ------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Apply the groups committed since the last call; True when anything changed."""
        groups, restarted = self.log.read_new(writer=False)
        if restarted:
            self.header = None
        for group in groups:
            self._apply(group)
        return bool(groups) or restarted

    def hidden_ids(self) -> np.ndarray:
        """Sorted raw ids of main-index items not to serve (retired or replaced)."""
        if self._hidden_sorted is None:
            self._hidden_sorted = np.array(sorted(self._hidden), dtype=np.int64)
        return self._hidden_sorted

    @property
    def num_live(self) -> int:
        return int(self.live.sum())

    def row_of(self, item_id: int) -> int:
        """The live fresh row serving `item_id`, or -1."""
        rows = np.flatnonzero((self.item_ids == item_id) & self.live)
        return int(rows[0]) if rows.size else -1

    def _reset(self, header: FreshHeader) -> None:
        self.header = header
        c, d, s = header.capacity, header.dim, int(sum(header.widths))
        self.embeddings = np.zeros((c, d), dtype=np.float32)
        self.features = np.full((c, s), -1, dtype=np.int64)
        self.item_ids = np.full(c, -1, dtype=np.int64)
        self.live = np.zeros(c, dtype=bool)
        self._hidden: set = set()
        self._hidden_sorted: Optional[np.ndarray] = None
        self.id_map = self._new_id_map() if self.writable else None
        self.updates = 0  # update groups applied since the header

    def _apply(self, group: List[bytes]) -> None:
        """One committed group, record by record (the writer produced them in this order)."""
        self.version += 1
        if self.header is None:
            if len(group) != 1 or group[0][:1] != HEADER:
                raise CorruptLog(f"{self.log.path}: the first group is not a header")
            self._reset(FreshHeader.from_json(group[0][1:].decode()))
            return
        self.updates += 1
        d, s = self.header.dim, int(sum(self.header.widths))
        upsert_size = 1 + IDS.size + 4 * d + 8 * s
        if self.id_map is not None:  # re-derive the writer's map; it must agree with the log
            ids = [IDS.unpack_from(p, 1)[0] for p in group if p[:1] == UPSERT]
            self._check_rows(ids, [IDS.unpack_from(p, 1)[1] for p in group if p[:1] == UPSERT])
        for payload in group:
            kind = payload[:1]
            item_id, row = IDS.unpack_from(payload, 1)
            if kind == UPSERT:
                if len(payload) != upsert_size or not 0 <= row < self.header.capacity:
                    raise CorruptLog(f"{self.log.path}: malformed upsert of item {item_id}")
                at = 1 + IDS.size
                self.embeddings[row] = np.frombuffer(payload, "<f4", d, at)
                self.features[row] = np.frombuffer(payload, "<i8", s, at + 4 * d)
                self.item_ids[row] = item_id
                self.live[row] = True
            elif kind == RETIRE:
                if row >= 0:
                    self.live[row] = False
            else:
                raise CorruptLog(f"{self.log.path}: unknown record type {kind!r}")
            if item_id not in self._hidden:
                self._hidden.add(item_id)
                self._hidden_sorted = None

    # --- writing ------------------------------------------------------------------------
    def _new_id_map(self):
        from idmap.zero_collision import ZeroCollisionConfig, ZeroCollisionMap

        return ZeroCollisionMap(ZeroCollisionConfig(
            num_slots=self.header.capacity, max_probe=self.header.max_probe,
            eviction_policy="none"))

    def _check_rows(self, ids: List[int], rows: List[int]) -> None:
        import torch

        if not ids:
            return
        got = self.id_map.insert(torch.tensor(ids, dtype=torch.int64), 0).rows.tolist()
        if got != rows:
            raise CorruptLog(f"{self.log.path}: rows in the log {rows} differ from the "
                             f"zero-collision map's {got} (store written with another map?)")

    def write(self, requests: Sequence[Sequence[ItemUpdate]]
              ) -> List[Union[List[int], FreshFull]]:
        """Apply the updates of several requests as one durable group (one write, one fsync):
        per request, the fresh row of each update (-1 for a retire of an item without one),
        or `FreshFull` for a request that found no room (it writes nothing; the others do).

        When this returns, the updates are on disk and in this process's state; readers see
        them at their next `refresh()`.
        """
        if not self.writable:
            raise RuntimeError("FreshStore opened read-only")
        import torch

        with self.log.locked():
            groups, restarted = self.log.read_new(writer=True)
            if restarted:
                self.header = None
            for group in groups:
                self._apply(group)
            results: List[Union[List[int], FreshFull]] = []
            payloads: List[bytes] = []
            for updates in requests:
                saved = (self.id_map.identities.clone(), self.id_map.metadata.clone())
                rows, records = [], []
                for u in updates:
                    if u.retire:
                        row = int(self.id_map.lookup(torch.tensor([u.item_id]))[0])
                        row = -1 if row == self.id_map.unknown_row else row
                        records.append(RETIRE + IDS.pack(u.item_id, row))
                    else:
                        row = int(self.id_map.insert(torch.tensor([u.item_id]), 0).rows[0])
                        if row == self.id_map.unknown_row:
                            break
                        records.append(UPSERT + IDS.pack(u.item_id, row)
                                       + u.embedding.astype("<f4").tobytes()
                                       + u.features.astype("<i8").tobytes())
                    rows.append(row)
                if len(rows) < len(updates):  # no room: undo this request's claims
                    self.id_map.identities.copy_(saved[0])
                    self.id_map.metadata.copy_(saved[1])
                    results.append(FreshFull(
                        f"item_id: no free fresh row for item {updates[len(rows)].item_id} "
                        f"(fresh index of {self.header.capacity} rows, {self.num_live} live); "
                        "rebuild the main index to take in the fresh items"))
                    continue
                results.append(rows)
                payloads.extend(records)
            if payloads:
                self.log.append(payloads)
                self._apply(payloads)
        return results
