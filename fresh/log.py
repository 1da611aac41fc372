"""The fresh store's append-only update log: framed records written in commit groups.

File layout: a sequence of frames `<u32 payload length><u32 crc32(payload)><payload>`. Records
are written in *groups*: the records of one write, then a commit record. A writer appends a
group with one `write` and `fsync`s before it acknowledges anything, so a group is on disk
before a client hears about it. Readers apply a group only once its commit record is there
and every frame of it checks, so a reader never sees half of a group.

A writer killed mid-write leaves a *torn tail*: bytes after the last commit that do not form
a complete group. Readers stop in front of it (it may also be a write in progress); the next
writer, holding the lock, cuts it off before it appends. A bad frame followed by more than one
group's worth of bytes is not a torn write but damage, and is reported (`CorruptLog`) instead
of silently dropping acknowledged records.

Writers serialise on an exclusive `flock` of the log file, so any number of processes may
write (the `item_updates` model, a CLI tool) and any number may read.
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Tuple

FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
COMMIT = b"C"  # payload type of the record that ends a group: b"C" + <i64 records in group>
MAX_RECORD_BYTES = 1 << 20  # no legitimate record is larger; a bigger length is garbage
# A group is written with one write(); a torn tail is at most one group, so a bad frame
# followed by more than this is damage, not a crash mid-write.
MAX_GROUP_BYTES = 8 << 20


class CorruptLog(RuntimeError):
    """The log is damaged before its tail: records after the damage cannot be trusted."""


@dataclass
class Scan:
    """What `scan` found in `data[start:]`."""

    groups: List[List[bytes]] = field(default_factory=list)  # committed groups, payloads
    end: int = 0  # offset just past the last commit record (where the next group goes)
    tail: int = 0  # bytes after `end`: an uncommitted group, a torn write or damage


def frame(payload: bytes) -> bytes:
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def encode_group(payloads: List[bytes]) -> bytes:
    """The bytes of one group: its records, then the commit record."""
    body = [frame(p) for p in payloads]
    body.append(frame(COMMIT + struct.pack("<q", len(payloads))))
    return b"".join(body)


def scan(data: bytes, start: int = 0) -> Scan:
    """Every complete, committed group in `data[start:]`; stops at the first frame that is
    incomplete or fails its check."""
    out = Scan(end=start)
    pending: List[bytes] = []
    pos = start
    while pos + FRAME.size <= len(data):
        length, crc = FRAME.unpack_from(data, pos)
        if length == 0 or length > MAX_RECORD_BYTES or pos + FRAME.size + length > len(data):
            break
        payload = data[pos + FRAME.size: pos + FRAME.size + length]
        if zlib.crc32(payload) != crc:
            break
        pos += FRAME.size + length
        if payload[:1] == COMMIT:
            (count,) = struct.unpack_from("<q", payload, 1)
            if count != len(pending):
                break  # a commit that does not close what precedes it: not a valid group
            out.groups.append(pending)
            out.end = pos
            pending = []
        else:
            pending.append(payload)
    out.tail = len(data) - out.end
    return out


class UpdateLog:
    """One process's handle on the log file at `path` (created by `create`).

    Readers call `read_new()` to get the groups committed since their last call. Writers wrap
    reading and appending in `with log.locked():` so that nobody appends in between.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no fresh-item log at {self.path}")
        self.offset = 0  # end of the last committed group this handle has returned
        self._inode = None  # of the file this handle read: another one means a new store

    @staticmethod
    def create(path: Path, first_group: List[bytes]) -> None:
        """Write a new log holding `first_group` (its header) atomically: a reader sees either
        no file or the complete header."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(encode_group(first_group))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def read_new(self, writer: bool = False) -> Tuple[List[List[bytes]], bool]:
        """Groups committed after `offset`, and whether the handle started again from the
        beginning (the file was replaced by a new store, or cut below `offset`), in which case
        the groups are the whole log and the caller must drop what it had applied.

        Args:
            writer: the caller holds the lock (no write is in progress), so a torn tail is cut
                off; readers leave it alone (it may be a group being written right now).
        """
        st = os.stat(self.path)
        restarted = False
        if st.st_ino != self._inode or st.st_size < self.offset:
            restarted = self._inode is not None or self.offset > 0
            self._inode, self.offset = st.st_ino, 0
        elif st.st_size == self.offset:
            return [], False  # the common case: one stat per batch
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        found = scan(data)
        if found.tail and writer:
            if found.tail > MAX_GROUP_BYTES:
                raise CorruptLog(
                    f"{self.path}: bad record at byte {self.offset + found.end} followed by "
                    f"{found.tail} more bytes: the log is damaged, not just torn by a crash")
            # a crashed writer's unacknowledged group: cut it off before appending after it
            os.truncate(self.path, self.offset + found.end)
        self.offset += found.end
        return found.groups, restarted

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive writer section (blocks while another writer is inside)."""
        with open(self.path, "rb") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def append(self, payloads: List[bytes]) -> Tuple[int, int]:
        """Write one group and fsync it; call inside `locked()` after `read_new(writer=True)`.
        Returns the (start, end) offsets of the group. Once this returns, the group survives a
        crash or power loss."""
        if not payloads:
            return self.offset, self.offset
        data = encode_group(payloads)
        if len(data) > MAX_GROUP_BYTES:
            raise ValueError(f"group of {len(data)} bytes exceeds {MAX_GROUP_BYTES}; split it")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            if start != self.offset:
                raise RuntimeError(f"{self.path}: log ends at {start}, expected {self.offset} "
                                   "(append outside `locked()`?)")
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.offset = start + len(data)
        return start, self.offset


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
