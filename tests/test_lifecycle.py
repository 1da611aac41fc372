"""Server lifecycle (docs/reliability.md, "Server lifecycle"): the launcher `python -m
serving.serve` (and `make serve`) runs as a real process serving a small built repository and is
stopped every way it can be: SIGKILL, SIGTERM to its process group, two SIGTERMs in quick
succession, SIGINT. After each, within seconds, no tritonserver, no Python-backend stub and no
shared-memory region of that server is left, and its ports are free. A start on a taken port
fails at once, naming the port and the process holding it; a supervisor whose recovery keeps
failing the same way gives up and the launcher exits non-zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from serving.launcher import (
    SHM_DIR,
    STUB_BINARY,
    TritonServer,
    cmdline,
    free_ports,
    group_members,
    listening_sockets,
)

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3
GONE_WITHIN = 15.0  # seconds after a stop's signal until nothing of the server may be left
# Two models under explicit model control start in a few seconds (all eight: 10 to 20 s on 2
# cores), so most runs use them; the runs killed while loading and `make serve` use the default
# settings (every model).
LIGHT = ["filter", "unified"]


@dataclass
class Launched:
    """A launcher process (or `make serve`) and, once it is ready, what it started."""

    process: subprocess.Popen
    output: Path  # its stdout and stderr
    ports: Tuple[int, int, int]  # http, grpc, metrics
    ready_seconds: float = 0.0
    server: int = 0  # tritonserver's pid
    identity: str = ""  # the server's --id: its stubs' shared-memory regions start with it
    stubs: List[int] = field(default_factory=list)
    regions: List[str] = field(default_factory=list)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240.0) -> Launched:  # the launcher gives up at 180 s
        t0 = time.monotonic()
        while "\nready." not in self.text():
            assert self.process.poll() is None, f"the launcher exited:\n{self.text()}"
            assert time.monotonic() - t0 < timeout, f"not ready after {timeout} s:\n{self.text()}"
            time.sleep(0.2)
        self.ready_seconds = time.monotonic() - t0
        return self._note_server()

    def wait_loading(self, stubs: int = 2, timeout: float = 60.0) -> Launched:
        """Until the server has started `stubs` stubs (the models load), not yet ready."""
        t0 = time.monotonic()
        while True:
            assert self.process.poll() is None, f"the launcher exited:\n{self.text()}"
            assert time.monotonic() - t0 < timeout, f"no stubs after {timeout} s:\n{self.text()}"
            server = servers_on(self.ports[0])
            if server and len(stubs_of(server[0])) >= stubs:
                break
            time.sleep(0.05)
        self._note_server()
        assert "\nready." not in self.text(), "ready already: the models loaded too fast"
        return self

    def _note_server(self) -> Launched:
        (self.server,) = servers_on(self.ports[0])
        argv = cmdline(self.server)
        self.identity = next(a.split("=", 1)[1] for a in argv if a.startswith("--id="))
        stubs = stubs_of(self.server)
        self.stubs, self.regions = list(stubs), [argv[2] for argv in stubs.values()]
        assert self.stubs and all(r.startswith(self.identity) for r in self.regions), self.regions
        return self

    def wait_exit(self, timeout: float = 60.0) -> int:
        """The launcher's exit status; fails with its output and the server log's tail when
        it has not exited after `timeout` seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in [self.process.pid] + group_members(self.process.pid):
                if "serving.serve" in cmdline(pid):  # its threads' stacks (faulthandler)
                    os.kill(pid, signal.SIGUSR1)
            time.sleep(1.0)
            logs = [p for p in (self.output.parent / "tritonserver.log",
                                ROOT / "logs" / "tritonserver.log") if p.exists()]
            tail = "\n".join(line for p in logs[:1]
                              for line in p.read_text(errors="replace").splitlines()[-30:])
            pytest.fail(f"the launcher did not exit {timeout:.0f} s after the signal; left: "
                        f"{self.leftovers()}\n--- its output ---\n{self.text()}\n"
                        f"--- server log ---\n{tail}")

    def leftovers(self) -> List[str]:
        """What is left of the server: live processes, shared-memory regions, listening ports."""
        left = [f"tritonserver {p}" for p in servers_on(self.ports[0])]
        left += [f"process {p} of the server's group: {cmdline(p)[:2]}"
                 for p in group_members(self.server)]
        left += [f"/dev/shm/{r.name}" for r in SHM_DIR.glob(f"{self.identity}_*")]
        left += [f"port {p} listening" for p in self.ports if listening_sockets(p)]
        return left

    def wait_gone(self, since: float) -> float:
        """Seconds from `since` until nothing of the server is left."""
        while self.leftovers():
            assert time.monotonic() - since < GONE_WITHIN, \
                f"left after {GONE_WITHIN} s: {self.leftovers()}\n{self.text()}"
            time.sleep(0.1)
        return time.monotonic() - since


def servers_on(http_port: int) -> List[int]:
    """Live tritonserver processes started with `http_port` (leaders of their process group:
    a child the server has forked but not yet turned into a stub has its command line too)."""
    found = []
    for pid in (int(e) for e in os.listdir("/proc") if e.isdigit()):
        argv = cmdline(pid)
        if argv and argv[0].endswith("tritonserver") and f"--http-port={http_port}" in argv \
                and _live_group_leader(pid):
            found.append(pid)
    return found


def stubs_of(server: int) -> Dict[int, List[str]]:
    """pid -> command line (stub, model.py, shared-memory region, ...) of the server's stubs."""
    found = {pid: cmdline(pid) for pid in group_members(server)}
    return {pid: argv for pid, argv in found.items()
            if len(argv) > 2 and argv[0].endswith(STUB_BINARY)}


def _live_group_leader(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and int(fields[2]) == pid


def launch(repository: Path, tmp_path: Path, ports: Optional[Tuple[int, int, int]] = None,
           make: bool = False, models: Optional[List[str]] = None,
           extra: Tuple[str, ...] = ()) -> Launched:
    """`python -m serving.serve` in a session of its own (its pid is its process group), or,
    with `make`, `setsid make serve REPOSITORY=...` (make's pid is the group). With `models`:
    only those, under explicit model control."""
    ports = ports or tuple(free_ports(3))
    output = tmp_path / f"launcher-{time.monotonic_ns()}.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    if make:
        env.update(TRITON_HTTP_PORT=str(ports[0]), TRITON_GRPC_PORT=str(ports[1]),
                   TRITON_METRICS_PORT=str(ports[2]))
        # -o: never (re)install the environment from a test
        command = ["setsid", "make", "--no-print-directory", "-o", ".venv/.installed", "serve",
                   f"REPOSITORY={repository}"]
    else:
        command = [sys.executable, "-m", "serving.serve", "--repository", str(repository),
                   "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                   "--metrics-port", str(ports[2]), "--log", str(tmp_path / "tritonserver.log")]
        if models:
            env["TRITON_ADMIN_KEY"] = "lifecycle-test-key"
            command += ["--model-control", "explicit"]
            command += [a for m in models for a in ("--load-model", m)]
        command += list(extra)
    with open(output, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=not make)
    return Launched(process, output, ports)


def _report(what: str, launched: Launched, seconds: float) -> None:
    print(f"\n{what}: ready in {launched.ready_seconds:.1f} s ({len(launched.stubs)} stubs); "
          f"nothing left {seconds:.1f} s after the signal; launcher exit "
          f"{launched.process.returncode}")


@pytest.fixture
def launched(small_build, tmp_path):
    """The launcher serving LIGHT, ready."""
    launched = launch(small_build.repository, tmp_path, models=LIGHT)
    try:
        yield launched.wait_ready()
    finally:
        if launched.process.poll() is None:  # a failed test: do not leave it running
            launched.process.kill()
            launched.process.wait()


@pytest.mark.parametrize("run", range(REPEATS))
def test_sigkill_of_the_launcher_leaves_no_server_stub_or_shared_memory(launched, run):
    os.kill(launched.process.pid, signal.SIGKILL)
    killed = time.monotonic()
    assert launched.process.wait(30) == -signal.SIGKILL
    seconds = launched.wait_gone(killed)
    _report("SIGKILL of the launcher", launched, seconds)


@pytest.mark.parametrize("run", range(REPEATS))
def test_sigkill_of_the_launcher_while_models_load_leaves_nothing(small_build, tmp_path, run):
    """Killed while the server still loads its models: the kernel kills the server, and the
    watchdog (serving/watchdog.py) the stubs that were loading, which would otherwise wait for
    the dead server for ever."""
    launched = launch(small_build.repository, tmp_path)
    try:
        launched.wait_loading()
        os.kill(launched.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert launched.process.wait(30) == -signal.SIGKILL
        seconds = launched.wait_gone(killed)
    finally:
        if launched.process.poll() is None:
            launched.process.kill()
            launched.process.wait()
    print(f"\nSIGKILL of the launcher while {len(launched.stubs)} stubs loaded: nothing left "
          f"{seconds:.1f} s after the signal; "
          f"{(tmp_path / 'tritonserver.log').read_text().splitlines()[-1]}")


def _term_the_group(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGTERM)


def _two_terms(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # the second arrives while the first one's stop runs
    p.send_signal(signal.SIGTERM)


def _interrupt(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGINT)


STOPS = {"SIGTERM to the process group": _term_the_group,
         "two SIGTERMs 0.2 s apart": _two_terms,
         "SIGINT": _interrupt}


@pytest.mark.parametrize("run", range(REPEATS))
@pytest.mark.parametrize("how", list(STOPS))
def test_signals_stop_everything_cleanly(launched, how, run):
    sent = time.monotonic()
    STOPS[how](launched.process)
    assert launched.wait_exit(60) == 0, launched.text()
    seconds = launched.wait_gone(sent)
    assert re.search(r"\nstopped \(\d+\.\d s\)$", launched.text().rstrip()), launched.text()
    assert "Traceback" not in launched.text(), launched.text()
    if how.startswith("two"):
        assert "SIGTERM: already stopping, ignored" in launched.text(), launched.text()
    _report(how, launched, seconds)


def test_a_signal_inside_the_stop_events_lock_does_not_deadlock():
    """The handler runs between two bytecodes of the main thread, which may be inside
    `Event.set()` (holding its lock) when the next SIGTERM comes: the handler must not take
    that lock (it once did, and `make serve`, whose SIGTERM arrives twice, hung for ever).
    Here the lock is held by this thread and the handler runs on another: it must return at
    once, and the event is set once the lock is free."""
    import threading

    from serving.serve import StopRequest

    stop = StopRequest()
    threading.Thread(target=stop._relay, daemon=True).start()  # install() without handlers
    with stop.event._cond:  # as if a first handler's set() were interrupted here
        handler = threading.Thread(target=stop._handle, args=(signal.SIGTERM, None),
                                   daemon=True)
        handler.start()
        handler.join(5)
        assert not handler.is_alive(), "the signal handler waits for the event's lock"
    assert stop.event.wait(5)


def test_make_serve_stops_on_sigterm_to_its_process_group(small_build, tmp_path):
    """`setsid make serve` then `kill -TERM -- -PGID`: make and the launcher both get the
    signal, and make forwards it to the launcher once more."""
    launched = launch(small_build.repository, tmp_path, make=True)
    try:
        launched.wait_ready()
        sent = time.monotonic()
        subprocess.run(["kill", "-TERM", "--", f"-{launched.process.pid}"], check=True)
        launched.wait_exit(60)
        seconds = launched.wait_gone(sent)
    finally:
        if launched.process.poll() is None:
            os.killpg(launched.process.pid, signal.SIGKILL)
    assert "stopped" in launched.text() and "Traceback" not in launched.text(), launched.text()
    _report("make serve, SIGTERM to its process group", launched, seconds)


def test_a_stop_that_triton_cannot_finish_is_bounded_by_the_exit_timeout(small_build, tmp_path):
    """A stub that never answers (SIGSTOPped) keeps Triton from unloading its model, so a
    clean exit never comes: the stop still ends within the exit timeout (3 s here) and the 5 s
    after it, killing the server and the frozen stub, and leaves nothing."""
    launched = launch(small_build.repository, tmp_path, models=LIGHT, extra=("--exit-timeout", "3"))
    try:
        launched.wait_ready()
        os.kill(launched.stubs[0], signal.SIGSTOP)
        sent = time.monotonic()
        launched.process.send_signal(signal.SIGTERM)
        assert launched.wait_exit(30) == 0, launched.text()
        stopped = time.monotonic() - sent
        seconds = launched.wait_gone(sent)
    finally:
        if launched.process.poll() is None:
            launched.process.kill()
            launched.process.wait()
        for pid in launched.stubs:  # nothing may stay frozen when the test fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert stopped < 3 + 5 + 4, launched.text()
    assert re.search(r"\nstopped \(\d+\.\d s\)$", launched.text().rstrip()), launched.text()
    _report("SIGTERM with a frozen stub (exit timeout 3 s)", launched, seconds)


@pytest.mark.parametrize("holder", ["tritonserver", "socket"])
def test_start_on_a_taken_port_fails_fast_naming_the_holder(server, small_build, tmp_path,
                                                           holder):
    """The port held by the session's server (what a killed launcher used to leave behind), or
    by a plain socket of this test's process: the launcher exits with 1 in a few seconds, names
    the port and the process, and starts nothing."""
    with socket.socket() as sock:
        if holder == "tritonserver":
            ports = (server.config.http_port, *free_ports(2))
            taken, name, pid, command = ports[0], "HTTP", server.process.pid, "tritonserver"
        else:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            http, metrics = free_ports(2)
            ports = (http, sock.getsockname()[1], metrics)
            taken, name, pid, command = ports[1], "gRPC", os.getpid(), "python"
        t0 = time.monotonic()
        launched = launch(small_build.repository, tmp_path, ports=ports)
        code = launched.process.wait(60)
        seconds = time.monotonic() - t0
    text = launched.text()
    print(f"\n{holder}: exit {code} after {seconds:.1f} s: {text.strip().splitlines()[-1]}")
    assert code == 1, text
    assert f"{name} port {taken} on 127.0.0.1 is already in use by process {pid} ({command}" \
        in text, text
    assert "ready." not in text
    assert servers_on(ports[0]) == ([server.process.pid] if holder == "tritonserver" else [])
    assert server.is_ready()


def test_help_and_an_unbuilt_repository_start_nothing(tmp_path):
    ports = free_ports(3)
    shown = subprocess.run([sys.executable, "-m", "serving.serve", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--repository" in shown.stdout, shown
    refused = subprocess.run([sys.executable, "-m", "serving.serve", "--repository",
                              str(tmp_path / "empty"), "--http-port", str(ports[0])], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused
    assert f"python -m builder --repository {tmp_path / 'empty'}" in refused.stderr
    assert not servers_on(ports[0]) and not (tmp_path / "empty").exists()


def test_readiness_is_that_of_this_start_only(server):
    """Another server answering on the same port is not ready for us (its --id differs)."""
    someone_else = TritonServer(dataclasses.replace(server.config))
    someone_else.identity = "iam-another-start"
    assert server.is_ready() and not someone_else.is_ready()


def test_supervisor_gives_up_on_a_recovery_that_fails_the_same_way(launched):
    """The server crashes and another process takes its HTTP port at once: the supervisor's
    restart fails three times the same way (the port, named with its holder); it says so and
    the launcher exits with 1."""
    os.kill(launched.server, signal.SIGKILL)
    crashed = time.monotonic()
    with socket.socket() as thief:
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        while True:
            try:
                thief.bind(("127.0.0.1", launched.ports[0]))
                break
            except OSError:
                assert time.monotonic() - crashed < 10, "the crashed server's port stayed taken"
                time.sleep(0.01)
        thief.listen()
        code = launched.process.wait(120)
    seconds = time.monotonic() - crashed
    text = launched.text()
    failures = [line for line in text.splitlines() if "restarted the server failed:" in line]
    print(f"\nsupervisor gave up {seconds:.1f} s after the crash; exit {code}\n"
          + "\n".join(failures))
    assert code == 1, text
    assert len(failures) == 3, text
    assert all(f"HTTP port {launched.ports[0]} on 127.0.0.1 is already in use by process "
               f"{os.getpid()}" in line for line in failures), failures
    assert "supervisor: gave up: restarted the server failed 3 times" in text, text
    assert not launched.leftovers()
