"""Faults: broken artifacts at startup, a model's stub process killed under load, the server
process crashing under load. The server must say clearly what is wrong, or recover by itself
(serving/supervisor.py) without ever giving a wrong answer.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from conftest import start_server
from tritonclient.utils import InferenceServerException

from client import Retriever, format_features
from client.catalog import load_items
from fresh.store import FreshStore, create_store, fresh_dir_for
from serving.launcher import ServerError
from serving.runners import RUNNERS
from serving.supervisor import Supervisor

pytestmark = pytest.mark.server

QUERIES = [("", 10), ("language:en", 5), ("category:comedy OR tags:funny", 20),
           ("NOT language:en", 8)]


# --- artifacts at startup ------------------------------------------------------------------

def _copy_model(src_repo: Path, dst_repo: Path, model: str) -> Path:
    shutil.copytree(src_repo / model, dst_repo / model)
    return dst_repo / model / "1"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BROKEN = [  # model, file, damage, words of the message
    ("scorer", "model.pt", "missing", "missing model artifact"),
    ("ann", "model.pt", "truncated", "cannot load model artifact"),
    ("filter", "schema.json", "garbage", "cannot load model artifact"),
    # a tensor file the archive maps (stages/archive.py)
    ("unified", "ann.ann.search.codes.npy", "truncated", "cannot load model artifact"),
]


def test_broken_artifacts_at_startup_are_named(small_build, tmp_path):
    """A repository of three broken models (and nothing else, so that the server fails fast):
    start() raises, and the message's first lines name each model, its file and the problem
    before the log's tail."""
    paths = {}
    for model, artifact, damage, _ in BROKEN:
        path = _copy_model(small_build.repository, tmp_path / "repo", model) / artifact
        if damage == "missing":
            path.unlink()
        elif damage == "truncated":
            _truncate(path)
        else:
            path.write_bytes(b"\x00\xff not json")
        paths[model] = path
    with pytest.raises(ServerError) as e:
        start_server(tmp_path / "repo", tmp_path / "tritonserver.log")
    head = str(e.value).splitlines()[: 1 + len(BROKEN)]
    print("\n" + "\n".join(head))
    assert head[0].startswith("tritonserver exited with code 1 before it was ready.")
    for model, _, _, words in BROKEN:
        (line,) = [h for h in head if f"model '{model}' failed to load" in h]
        assert words in line and str(paths[model]) in line, line


def test_artifact_with_a_pickle_payload_is_loaded_without_running_it(small_build, tmp_path):
    """model.pt replaced by a torch.save'd object whose unpickling would run code: loading it
    (torch.jit.load, as the runners do) fails, and the code never runs."""
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    version = _copy_model(small_build.repository, tmp_path / "repo", "aggregator")
    torch.save({"weights": Payload()}, version / "model.pt")
    with pytest.raises(RuntimeError, match="cannot load model artifact"):
        RUNNERS["aggregator"](version)
    with pytest.raises(pickle.UnpicklingError):  # the rule for any torch.load in the project
        torch.load(version / "model.pt", weights_only=True)
    # the same payload as a tensor file (an object array: a pickle after the .npy header)
    version = _copy_model(small_build.repository, tmp_path / "repo", "scorer")
    with open(version / "item_vectors.codes.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "|O", "fortran_order": False, "shape": (1,)})
        fh.write(pickle.dumps(np.array([Payload()], dtype=object)))
    with pytest.raises(RuntimeError, match="item_vectors.codes.npy"):
        RUNNERS["scorer"](version)
    assert not marker.exists(), "unpickling ran the payload"


# --- faults under load ---------------------------------------------------------------------

@dataclass
class Load:
    """A bounded client loop: `threads` clients query round-robin until stopped (or
    `max_seconds`), comparing every answer with the one given before any fault."""

    url: str
    model: str
    expected: list
    user: int
    threads: int = 3
    max_seconds: float = 240.0
    sent: int = 0
    wrong: List[str] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    last_ok: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Load:
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(60)

    def _run(self, seed: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        i = seed
        retriever = Retriever(self.url, "http", self.model, timeout=30)
        while not self._stop.is_set() and time.monotonic() < deadline:
            i += 1
            f, k = QUERIES[i % len(QUERIES)]
            try:
                got = retriever.query(self.user, f, k)
                outcome = "ok" if np.array_equal(got.item_ids, self.expected[i % len(QUERIES)]) \
                    else f"WRONG answer to {f!r}"
            except InferenceServerException as e:
                outcome = e.message()[:120]
            except Exception as e:  # connection refused while the server restarts
                outcome = f"{type(e).__name__}"
                time.sleep(0.2)
            with self._lock:
                self.sent += 1
                if outcome == "ok":
                    self.last_ok = time.monotonic()
                elif outcome.startswith("WRONG"):
                    self.wrong.append(outcome)
                else:
                    self.errors[outcome] += 1
        retriever.close()

    def summary(self) -> str:
        return (f"{self.model}: {self.sent} requests, {sum(self.errors.values())} failed, "
                f"{len(self.wrong)} wrong; errors: {dict(self.errors.most_common(4))}")


def _supervised(small_build, log_dir: Path, models: List[str]):
    """A server of its own under explicit model control (so that the supervisor can reload
    one model), serving only `models` (and what they need) to start fast, with a fresh-item
    store of its own (the session's server never sees its updates), and its supervisor."""
    create_store(log_dir / "fresh", FreshStore(fresh_dir_for(small_build.repository)).header)
    server = start_server(small_build.repository, log_dir / "tritonserver.log",
                          model_control="explicit", admin_key="fault-test-key",
                          load_models=models, fresh_dir=log_dir / "fresh")
    supervisor = Supervisor(server, interval=0.5).start()
    yield server, supervisor
    supervisor.stop()
    # after a dependency's reload Triton keeps the ensemble "live" through its whole 30 s exit
    # timeout; nothing is in flight any more, so do not wait for it
    server.stop(timeout=5)


@pytest.fixture(scope="module")
def supervised(small_build, tmp_path_factory):
    yield from _supervised(small_build, tmp_path_factory.mktemp("faults"),
                           ["retrieval", "unified", "item_updates"])


@pytest.fixture(scope="module")
def supervised_unified(small_build, tmp_path_factory):
    yield from _supervised(small_build, tmp_path_factory.mktemp("crash"), ["unified"])


def _expected(server, model: str, user: int) -> list:
    with Retriever(server.config.http_url, "http", model) as r:
        return [r.query(user, f, k).item_ids for f, k in QUERIES]


def _wait_recovered(supervisor: Supervisor, events_before: int, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = supervisor.events[events_before:]
        if done and not done[-1].error:
            return done
        time.sleep(0.2)
    raise AssertionError(f"no recovery within {timeout} s: {supervisor.events}")


def test_killed_stub_is_reloaded_and_no_answer_is_wrong(supervised, small_build):
    server, supervisor = supervised
    user = int(small_build.world.user_ids[30])
    loads = [Load(server.config.http_url, m, _expected(server, m, user), user).start()
             for m in ("retrieval", "unified")]
    time.sleep(2)
    events_before = len(supervisor.events)
    (victim,) = server.stubs()["scorer"]
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    try:
        (event,) = _wait_recovered(supervisor, events_before)
        time.sleep(3)  # answers after the recovery
    finally:
        for load in loads:
            load.stop()
    print(f"\nkilled scorer stub {victim.pid}: {event}\n"
          + "\n".join(load.summary() for load in loads))
    assert event.action == "reloaded 'scorer'" and "'scorer' version 1" in event.cause
    assert [s.pid for s in server.stubs()["scorer"]] != [victim.pid]
    for load in loads:
        assert not load.wrong, load.summary()
        assert load.last_ok > killed + event.seconds, f"no answer after recovery: {load.summary()}"
    retrieval, unified = loads
    assert set(retrieval.errors) <= {"in ensemble 'retrieval', Stub process 'scorer_0_0' is "
                                     "not healthy."}, retrieval.summary()
    assert not unified.errors, "a model whose stub lived must not fail"
    assert retrieval.sent > 0 and unified.sent > 0


def test_server_crash_is_restarted_and_no_answer_is_wrong(supervised_unified, small_build):
    """A malformed request aborts tritonserver 2.51 (std::bad_alloc on an HTTP JSON input
    declaring 2**40 elements; docs/reliability.md): the supervisor starts it again."""
    server, supervisor = supervised_unified
    user = int(small_build.world.user_ids[31])
    load = Load(server.config.http_url, "unified", _expected(server, "unified", user), user,
                threads=2).start()
    time.sleep(2)
    events_before = len(supervisor.events)
    bomb = json.dumps({"inputs": [
        {"name": "user_id", "datatype": "INT64", "shape": [1, 2**40], "data": [1]},
        {"name": "k", "datatype": "INT32", "shape": [1, 1], "data": [5]},
        {"name": "filter", "datatype": "BYTES", "shape": [1, 1], "data": [""]}]}).encode()
    request = urllib.request.Request(f"http://{server.config.http_url}/v2/models/unified/infer",
                                     data=bomb, method="POST")
    crashed = time.monotonic()
    with pytest.raises(OSError):  # the connection dies with the server
        urllib.request.urlopen(request, timeout=30)
    try:
        (event,) = _wait_recovered(supervisor, events_before)
        time.sleep(3)
    finally:
        load.stop()
    print(f"\nserver crash: {event}\n{load.summary()}")
    assert event.action == "restarted the server" and "exited" in event.cause
    assert not load.wrong, load.summary()
    assert load.last_ok > crashed + event.seconds, load.summary()
    assert server.is_ready()


def test_admin_key_opens_the_restricted_apis(supervised):
    """The other side of tests/test_safe_defaults.py: under explicit model control the key
    (TRITON_ADMIN_KEY) opens the repository and admin APIs, which the supervisor uses."""
    server, _ = supervised
    assert server.model_states()[("scorer", "1")] == "READY"
    assert "log_verbose_level" in server.call_api("GET", "/v2/logging", admin=True)
    with pytest.raises(ServerError, match="HTTP 403"):
        server.call_api("POST", "/v2/repository/index")


def test_killed_update_stub_leaves_no_half_written_state(supervised, small_build):
    """The `item_updates` stub SIGKILLed while clients add items: it is reloaded; every
    acknowledged item is in the store and served, nothing unacknowledged beyond the attempts
    is, and the store reads without damage."""
    server, supervisor = supervised
    items = load_items(small_build.config.items_csv)
    template = next(iter(items.values()))
    vectors = np.load(small_build.config.items_csv.with_name("item_embeddings.npy"))
    base_id, base_creator = 991_000_000_000, 770_000
    attempted, acked, errors = set(), set(), Counter()
    lock, stop = threading.Lock(), threading.Event()

    def features(i: int) -> str:
        spelled = dict(template, creator=[str(base_creator + i)])
        return format_features(spelled)

    def writer(first: int) -> None:
        i = first
        with Retriever(server.config.grpc_url, "grpc", timeout=30) as r:
            while not stop.is_set() and i < first + 100_000:
                with lock:
                    attempted.add(base_id + i)
                try:
                    r.upsert_items([base_id + i], vectors[i % len(vectors)][None], [features(i)])
                    with lock:
                        acked.add(base_id + i)
                except InferenceServerException as e:
                    with lock:
                        errors[e.message()[:100]] += 1
                i += 2

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in (0, 1)]
    for t in threads:
        t.start()
    time.sleep(2)
    events_before = len(supervisor.events)
    (victim,) = server.stubs()["item_updates"]
    os.kill(victim.pid, signal.SIGKILL)
    try:
        (event,) = _wait_recovered(supervisor, events_before)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    store = FreshStore(server.config.fresh_dir)  # reads, repairs nothing
    stored = set(store.item_ids[store.live].tolist())
    print(f"\nkilled item_updates stub: {event}\n{len(attempted)} updates sent, "
          f"{len(acked)} acknowledged, {sum(errors.values())} failed, {len(stored)} stored; "
          f"errors: {dict(errors)}")
    assert event.action == "reloaded 'item_updates'"
    assert acked and acked <= stored <= attempted
    assert set(errors) <= {"Stub process 'item_updates_0_0' is not healthy."}, errors
    newest = max(acked)  # served by the next query, through the fresh path
    with Retriever(server.config.http_url, "http", "retrieval") as r:
        found = r.query(1, f"creator:{base_creator + newest - base_id}", 5).item_ids
    assert found.tolist() == [newest]
