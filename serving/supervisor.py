"""Keeps a tritonserver answering through crashes of its parts (docs/reliability.md).

Triton 2.51's Python backend does not restart a stub process that dies (killed, out of
memory): the model stays READY while every request to it fails with "Stub process
'<model>_0_0' is not healthy", for ever. And a few malformed requests make the server itself
abort (docs/reliability.md). A `Supervisor` is a thread next to the launcher that checks, every
`interval` seconds:

- the server process: when it has exited, it is started again (same config and ports);
- the stubs of each loaded version of each Python model: when one has fewer live stubs than
  its config's instance count on two checks in a row, the model is reloaded through the
  restricted repository API under explicit model control (only that model is out: about 15 s
  on 2 cores), or, under "none" model control where nothing can be reloaded, the server is
  restarted.

A version unloaded on purpose (explicit mode: its state is no longer READY, e.g. after an
index swap) is left alone. Every recovery is logged and kept in `events`; one that fails (e.g.
an artifact broke meanwhile) is tried again after growing pauses, up to a minute. When the
same recovery fails the same way `give_up_after` times in a row (e.g. another process took the
server's port), the supervisor says so in one error line, stops checking and sets `gave_up`
(`make serve` then exits non-zero).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from serving.launcher import ServerError, StartCancelled, TritonServer

log = logging.getLogger(__name__)


@dataclass
class Recovery:
    cause: str  # what was wrong
    action: str  # what the supervisor did
    started: float  # time.time() when it began
    seconds: float  # how long until the server answered again (or gave up)
    error: str = ""  # why the recovery failed; empty when it worked


class Supervisor:
    """Args:
        server: a started TritonServer.
        interval: seconds between checks.
        stop_timeout: seconds a restart waits for the broken server to exit cleanly before
            killing it (Triton would otherwise wait its 30 s exit timeout for a dead stub).
        give_up_after: identical failures in a row (same action, same error) after which
            supervision ends and `gave_up` is set.
    """

    def __init__(self, server: TritonServer, interval: float = 1.0, stop_timeout: float = 5.0,
                 give_up_after: int = 3):
        self.server = server
        self.interval = interval
        self.stop_timeout = stop_timeout
        self.give_up_after = give_up_after
        self.events: List[Recovery] = []
        self.gave_up = threading.Event()
        self._instances: Dict[tuple, int] = {}  # (model, version) -> stubs its config asks for
        self._suspect: set = set()  # (model, version)s short of stubs at the last check
        self._failures = 0  # recoveries failed in a row: the next check waits longer
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self._loop, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(min(60.0, self.interval * 4 ** self._failures)):
            try:
                self.check()
            except Exception:  # a bug here must not end supervision
                log.exception("supervisor: check failed")
            if self._gave_up_now():
                return

    def check(self) -> Optional[Recovery]:
        """One round: finds what is broken and recovers it; returns the recovery, if any."""
        process = self.server.process
        if process.poll() is not None:
            return self._recover(f"tritonserver exited with code {process.returncode}",
                                 "restarted the server", self._restart)
        short = self._versions_short_of_stubs()
        confirmed, self._suspect = short & self._suspect, short
        if not confirmed:
            return None
        self._suspect = set()
        models = sorted({model for model, _ in confirmed})
        cause = "stub process of " + ", ".join(f"'{m}' version {v}" for m, v in sorted(confirmed))
        cause += " died"
        if self.server.config.model_control == "explicit":
            return self._recover(cause, f"reloaded {', '.join(map(repr, models))}",
                                 lambda: [self.server.reload_model(m) for m in models])
        return self._recover(cause, "restarted the server", self._restart)

    def _versions_short_of_stubs(self) -> set:
        stubs: Dict[tuple, int] = {}
        for group in self.server.stubs().values():
            for stub in group:
                key = (stub.model, stub.version)
                stubs[key] = stubs.get(key, 0) + 1
        for key in stubs.keys() - self._instances.keys():  # first seen: ask its config
            try:
                self._instances[key] = self._instance_count(*key)
            except ServerError:  # a version still loading has no config yet: next round
                continue
        short = {key for key, n in self._instances.items() if stubs.get(key, 0) < n}
        if short and self.server.config.model_control == "explicit":
            states = self.server.model_states()
            for key in [k for k in short if states.get(k) != "READY"]:  # unloaded on purpose
                short.discard(key)
                self._instances.pop(key, None)
        return short

    def _instance_count(self, model: str, version: str) -> int:
        config = self.server.call_api("GET", f"/v2/models/{model}/versions/{version}/config")
        return sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1

    def _restart(self) -> None:
        # cancelled by stop(): a stop asked for meanwhile does not wait for the new server
        self.server.restart(stop_timeout=self.stop_timeout, cancel=self._stop)
        self._instances.clear()  # asked again of the new server

    def _gave_up_now(self) -> bool:
        """The last `give_up_after` recoveries all failed with the same action and error."""
        last = self.events[-self.give_up_after:]  # all failed when _failures is that high
        if self._failures < self.give_up_after or len({(e.action, e.error) for e in last}) > 1:
            return False
        log.error("supervisor: gave up: %s failed %d times in a row with the same error: %s",
                  last[-1].action, len(last), last[-1].error)
        self.gave_up.set()
        return True

    def _recover(self, cause: str, action: str, fix: Callable[[], object]) -> Recovery:
        log.warning("supervisor: %s; recovering", cause)
        started, t0 = time.time(), time.monotonic()
        event = Recovery(cause, action, started, 0.0)
        try:
            fix()
        except StartCancelled:  # stop() during a restart: nothing failed
            log.warning("supervisor: %s cancelled: supervision stopped", action)
            return event
        except (ServerError, OSError) as e:
            event.error = str(e).splitlines()[0]
            log.error("supervisor: %s failed: %s", action, event.error)
        event.seconds = time.monotonic() - t0
        self._failures = self._failures + 1 if event.error else 0
        if not event.error:
            log.warning("supervisor: %s in %.1f s", action, event.seconds)
        self.events.append(event)
        return event
