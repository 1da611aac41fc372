"""An update is acknowledged only once it is durable: traced at the system-call level (strace)
on a real store, the log record is written and fsync'd, and a new log file's directory entry
fsync'd, before the writer says so. (Killing a process loses nothing from the page cache, so
the kill tests of the fresh store cannot see a missing fsync; this can.)"""

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    from fresh.store import FreshStore, create_store, header_for
    from world.schema import FeatureSpec, Schema

    directory = sys.argv[1]
    schema = Schema([FeatureSpec("category", "str", vocabulary=["a", "b"])])
    create_store(directory, header_for(schema, 4, 16, [1]))
    os.write(1, b"CREATED\\n")
    store = FreshStore(directory, writable=True)
    update = store.header.upsert(7, np.ones(4, np.float32), "category=a")
    rows = store.write([[update]])
    os.write(1, b"ACKED\\n")
""")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_update_is_fsynced_before_it_is_acknowledged(tmp_path):
    trace = tmp_path / "trace"
    store = tmp_path / "store"
    run = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,write,fsync,fdatasync,"
                          "rename,renameat,renameat2,close", "-o", str(trace),
                          sys.executable, "-c", SCRIPT, str(store)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["CREATED", "ACKED"]
    lines = trace.read_text().splitlines()
    log = str(store / "updates.log")

    def index(pattern: str, start: int = 0) -> int:
        for i in range(start, len(lines)):
            if re.search(pattern, lines[i]):
                return i
        raise AssertionError(f"no system call matching {pattern!r} after line {start}")

    # creation: the temporary log is written and fsync'd, renamed into place, and the
    # directory fsync'd, all before CREATED
    created = index(r'write\(1, "CREATED')
    tmp_open = index(re.escape(f'"{log}.tmp"') + r".*O_WRONLY.*= (\d+)")
    tmp_fd = re.search(r"= (\d+)$", lines[tmp_open]).group(1)
    tmp_sync = index(rf"fsync\({tmp_fd}\)", tmp_open)
    renamed = index(r"rename.*updates\.log\.tmp.*updates\.log", tmp_sync)
    dir_open = index(re.escape(f'"{store}"') + r".*O_RDONLY.*= (\d+)", renamed)
    dir_fd = re.search(r"= (\d+)$", lines[dir_open]).group(1)
    dir_sync = index(rf"fsync\({dir_fd}\)", dir_open)
    assert tmp_open < tmp_sync < renamed < dir_sync < created
    # the update: the log opened for appending, the record written, fsync'd, then ACKED
    acked = index(r'write\(1, "ACKED')
    append_open = index(re.escape(f'"{log}"') + r".*O_WRONLY\|O_APPEND.*= (\d+)", created)
    fd = re.search(r"= (\d+)$", lines[append_open]).group(1)
    record = index(rf"write\({fd}, ", append_open)
    synced = index(rf"fsync\({fd}\)", record)
    assert append_open < record < synced < acked
