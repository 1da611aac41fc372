"""Start, wait for and stop a real `tritonserver`.

The binary is the one on PATH (NVIDIA's container images), else the one shipped in the PyPI
package `nvidia-pytriton` (server 2.51), run with a backend directory assembled from the same
package: the Python backend plus the backend stub built for the running Python version.

Lifecycle (docs/reliability.md, "Server lifecycle"):
- the server never outlives its launcher: it is started with PR_SET_PDEATHSIG (the kernel
  SIGKILLs it when the launcher dies, even by SIGKILL). Its Python-backend stubs usually exit by
  themselves a second or two after the server's death, removing their shared-memory regions,
  but not a stub still loading its model: that one hangs for ever. So each start also has a
  watchdog process (serving/watchdog.py) that outlives the launcher and then kills what is left
  of the server's process group and removes its regions;
- each start has its own identity (`--id`, read back from the server metadata at GET /v2) and
  its own shared-memory prefix: readiness is that of this start's server, never of another one
  answering on the same port, and leftovers are found by name;
- ports already taken are reported before the start, with the process holding them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]


class ServerError(RuntimeError):
    pass


class StartCancelled(ServerError):
    """start() gave up because its `cancel` event was set (a stop was asked for meanwhile)."""


# Triton APIs that only holders of the admin key may use, besides the repository API
ADMIN_APIS = "shared-memory,trace,logging"
STUB_BINARY = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class Stub:
    """A Python-backend stub process: one per instance of a Python model."""

    model: str
    version: str
    pid: int
    shm_region: str  # its shared-memory region (a file in /dev/shm)


def free_ports(count: int) -> List[int]:
    """`count` distinct loopback ports free right now (the OS picks them), for servers that
    tests and benchmarks start next to whatever else runs on the machine."""
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


@dataclass
class ServerConfig:
    repository: Path = ROOT / "model_repository"
    host: str = field(default_factory=lambda: os.environ.get("TRITON_HOST", "127.0.0.1"))
    http_port: int = field(default_factory=lambda: _env_int("TRITON_HTTP_PORT", 8000))
    grpc_port: int = field(default_factory=lambda: _env_int("TRITON_GRPC_PORT", 8001))
    metrics_port: int = field(default_factory=lambda: _env_int("TRITON_METRICS_PORT", 8002))
    # "none": the repository is fixed at start (safe default); "explicit": models are loaded
    # and unloaded through the repository API (needed for index swaps), see README.
    model_control: str = field(
        default_factory=lambda: os.environ.get("TRITON_MODEL_CONTROL", "none"))
    # explicit mode: models to load at start (empty: all of them)
    load_models: List[str] = field(default_factory=list)
    # Key of the restricted repository API (load/unload/index); requests send it in the
    # `admin-key` header. Explicit mode needs one (TRITON_ADMIN_KEY); "none" mode gets a random
    # one per start, so that nobody can change what is deployed.
    admin_key: str = field(default_factory=lambda: os.environ.get("TRITON_ADMIN_KEY", ""))
    # the fresh-item store of the models (fresh/store.py); None: next to the repository
    fresh_dir: Optional[Path] = None
    log_path: Path = ROOT / "logs" / "tritonserver.log"
    log_verbose: int = 0
    # Triton's --exit-timeout-secs: how long a stop waits for in-flight requests and model
    # unloads before the server exits anyway (Triton's default is 30 s). stop() kills the
    # server a few seconds after it, so a stop takes at most about this long.
    exit_timeout: int = field(default_factory=lambda: _env_int("TRITON_EXIT_TIMEOUT", 10))
    extra_args: List[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"


def _pytriton_dir() -> Optional[Path]:
    try:
        import pytriton  # noqa: F401  (the package directory holds the server)
    except ImportError:
        return None
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def find_server() -> tuple[Path, Optional[Path], dict]:
    """(binary, backend directory or None for the binary's own, extra environment)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None, {}
    base = _pytriton_dir()
    if base is None or not (base / "bin" / "tritonserver").exists():
        raise ServerError("no tritonserver found: not on PATH, and the PyPI package "
                          "nvidia-pytriton is not installed (run `make setup`)")
    stub = base / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" \
        / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python "
                          f"{sys.version_info.major}.{sys.version_info.minor} ({stub})")
    backends = ROOT / ".triton" / "backends"
    target = backends / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (base / "backends" / "python" / "libtriton_python.so",
                base / "backends" / "python" / "triton_python_backend_utils.py", stub):
        dst = target / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    libs = base.parent.parent / "nvidia_pytriton.libs"
    ld = os.pathsep.join(p for p in (str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    return base / "bin" / "tritonserver", backends, {"LD_LIBRARY_PATH": ld}


class TritonServer:
    """A tritonserver process. Use as a context manager, or start()/stop()."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.process: Optional[subprocess.Popen] = None
        self._log = None
        self._watchdog: Optional[subprocess.Popen] = None
        self._starts = 0
        self._stop_pending = False  # a server was started and not yet stopped
        # this start's name: the server's --id (GET /v2 answers it) and the prefix of its stubs'
        # shared-memory regions in /dev/shm; new at every start
        self.identity = ""

    def command(self) -> tuple[List[str], dict]:
        binary, backends, extra_env = find_server()
        c = self.config
        args = [str(binary), f"--model-repository={c.repository}",
                f"--http-address={c.host}", f"--http-port={c.http_port}",
                f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
                f"--metrics-address={c.host}", f"--metrics-port={c.metrics_port}",
                f"--model-control-mode={c.model_control}",
                f"--log-verbose={c.log_verbose}", "--strict-readiness=true",
                f"--exit-timeout-secs={c.exit_timeout}"]
        if c.model_control == "explicit" and not c.admin_key:
            raise ServerError("explicit model control needs an admin key for the repository "
                              "API: set TRITON_ADMIN_KEY (clients send it as `admin-key`)")
        # the repository API (load, unload, index) only for holders of the key; in "none" mode
        # the key is random: nothing may change what is deployed
        key = c.admin_key if c.model_control == "explicit" else _admin_key()
        args += [f"--http-restricted-api=model-repository:admin-key={key}",
                 f"--grpc-restricted-protocol=model-repository:admin-key={key}"]
        # and what changes the server for every caller: shared-memory regions (Triton reads
        # inputs from and writes outputs into any region a caller registers), trace and log
        # settings; left open: health, metadata, model config, statistics, inference
        args += [f"--http-restricted-api={ADMIN_APIS}:admin-key={key}",
                 f"--grpc-restricted-protocol={ADMIN_APIS}:admin-key={key}"]
        if c.model_control == "explicit":
            args += [f"--load-model={m}" for m in (c.load_models or ["*"])]
        if backends is not None:
            args.append(f"--backend-directory={backends}")
        if self.identity:
            args += [f"--id={self.identity}",
                     f"--backend-config=python,shm-region-prefix-name={self.identity}_"]
        env = dict(os.environ, **extra_env)
        # The backend stub embeds an interpreter that finds its prefix through the first
        # `python3` on PATH: put this environment's first so model.py runs with its packages
        # (torch, numpy), and the project root on PYTHONPATH for the project's own packages.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        if c.fresh_dir is not None:
            from fresh.store import FRESH_DIR_ENV

            env[FRESH_DIR_ENV] = str(c.fresh_dir)
        return args + list(c.extra_args), env

    def start(self, timeout: float = 180.0,
              cancel: Optional[threading.Event] = None) -> TritonServer:
        """Start and wait until ready; `cancel` set meanwhile stops it and raises
        StartCancelled. Raises ServerError, before starting anything, when a port is taken."""
        self.check_ports()
        self.identity = f"iam-{secrets.token_hex(8)}"
        args, env = self.command()
        self.config.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.config.log_path, "ab" if self._starts else "wb")  # keep a crash's log
        self._starts += 1
        self.process = _spawn_tied_to_this_process(args, stdout=self._log,
                                                   stderr=subprocess.STDOUT, env=env,
                                                   start_new_session=True)
        self._stop_pending = True
        try:
            # in a session of its own, so that signals to the launcher's process group miss it
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "serving.watchdog", str(self.process.pid), self.identity],
                stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
            self.wait_ready(timeout, cancel)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, timeout: float = 180.0, stop_timeout: Optional[float] = None,
                cancel: Optional[threading.Event] = None) -> TritonServer:
        """Stop (if still running) and start again with the same config and ports."""
        self.stop(stop_timeout)
        return self.start(timeout, cancel)

    def check_ports(self) -> None:
        """Raises ServerError naming the first of the server's ports that is already taken and,
        where /proc shows it, the process listening on it."""
        c = self.config
        for name, port, flag in (("HTTP", c.http_port, "http"), ("gRPC", c.grpc_port, "grpc"),
                                 ("metrics", c.metrics_port, "metrics")):
            if not _port_is_free(c.host, port):
                holder = port_holder(port)
                raise ServerError(f"{name} port {port} on {c.host} is already in use"
                                  f"{f' by {holder}' if holder else ''}: stop it or choose "
                                  f"another port (--{flag}-port or TRITON_{flag.upper()}_PORT)")

    def is_ready(self) -> bool:
        """This start's server answers ready: /v2/health/ready says so and the server metadata
        (GET /v2) carries this start's identity. Another server on the port, e.g. one that a
        killed launcher left behind, is not ours."""
        base = f"http://{self.config.http_url}"
        try:
            with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as r:
                if r.status != 200:
                    return False
            with urllib.request.urlopen(f"{base}/v2", timeout=2) as r:
                return json.loads(r.read()).get("name") == self.identity
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout: float, cancel: Optional[threading.Event] = None) -> None:
        deadline = time.monotonic() + timeout
        cancel = cancel or threading.Event()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} "
                                  f"before it was ready.{self.load_failures()}\n"
                                  f"{self.log_tail()}")
            if self.is_ready():
                return
            if cancel.wait(0.5):
                raise StartCancelled("start cancelled: a stop was asked for")
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s."
                          f"{self.load_failures()}\n{self.log_tail()}")

    def load_failures(self) -> str:
        """The log's reasons why models failed to load (e.g. a missing or corrupt artifact),
        one line per model, or "" when there are none."""
        try:
            text = self.config.log_path.read_text(errors="replace")
        except OSError:
            return ""
        reasons = {}
        for m in re.finditer(r"failed to load '([^']+)' version \d+: (.*)", text):
            reasons.setdefault(m.group(1), m.group(2).split("\\n")[0].rstrip('"'))
        return "".join(f"\n  model '{model}' failed to load: {reason}"
                       for model, reason in reasons.items())

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.config.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return f"--- last lines of {self.config.log_path} ---\n" + "\n".join(text[-lines:])

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stops the server, its stubs and their shared memory; does nothing when stopped (so
        that a process group id that may have been reused is never signalled). SIGINT and
        SIGTERM arriving meanwhile are ignored (see _signals_ignored). The server gets
        `timeout` seconds (default: its exit timeout and 5 more) to exit cleanly, then it and
        its stubs are killed."""
        if timeout is None:
            timeout = self.config.exit_timeout + 5.0
        with _signals_ignored():
            if self._stop_pending:
                if self.process.poll() is None:
                    # Triton shuts down cleanly on SIGINT
                    os.killpg(self.process.pid, signal.SIGINT)
                    try:
                        self.process.wait(timeout)
                    except subprocess.TimeoutExpired:
                        print(f"tritonserver did not exit {timeout:.0f} s after SIGINT: "
                              f"killed", file=sys.stderr, flush=True)
                        os.killpg(self.process.pid, signal.SIGKILL)
                        self.process.wait()
                remove_leftovers(self.process.pid, self.identity)
                self._stop_pending = False
            if self._watchdog is not None:  # its work is done: "stopped", then end of input
                try:
                    self._watchdog.communicate(b"stopped", timeout=10)
                except subprocess.TimeoutExpired:
                    self._watchdog.kill()
                    self._watchdog.wait()
                self._watchdog = None
            if self._log is not None:
                self._log.close()
                self._log = None

    def stubs(self) -> Dict[str, List[Stub]]:
        """The server's live Python-backend stub processes, by model (from /proc: the
        members of the server's process group running the stub binary)."""
        found: Dict[str, List[Stub]] = {}
        if self.process is None:
            return found
        for pid in group_members(self.process.pid):
            argv = cmdline(pid)
            if len(argv) < 3 or not argv[0].endswith(STUB_BINARY):
                continue
            # argv: stub, <repository>/<model>/<version>/model.py, shm region, ...
            version_dir = Path(argv[1]).parent
            stub = Stub(model=version_dir.parent.name, version=version_dir.name, pid=pid,
                        shm_region=argv[2])
            found.setdefault(stub.model, []).append(stub)
        return found

    def model_states(self) -> Dict[tuple, str]:
        """(model, version) -> state ("READY", "UNAVAILABLE", ...) from the repository index
        API (restricted: needs the admin key, i.e. explicit model control)."""
        index = self.call_api("POST", "/v2/repository/index", admin=True)
        return {(m["name"], m.get("version", "")): m.get("state", "") for m in index}

    def reload_model(self, model: str, timeout: float = 300.0) -> None:
        """Load `model` again with new instances (explicit model control), e.g. after its stub
        died. Triton reloads only a changed model, so the request carries the model's current
        config with a new value of the parameter `reload_token` (the runners ignore it)."""
        if self.config.model_control != "explicit":
            raise ServerError("models can be reloaded only under explicit model control")
        config = self.call_api("GET", f"/v2/models/{model}/config")
        config.setdefault("parameters", {})["reload_token"] = {"string_value": str(time.time_ns())}
        self.call_api("POST", f"/v2/repository/models/{model}/load",
                      {"parameters": {"config": json.dumps(config)}}, admin=True, timeout=timeout)

    def call_api(self, method: str, path: str, body: Optional[dict] = None, admin: bool = False,
                 timeout: float = 10.0):
        headers = {"Content-Type": "application/json"}
        if admin:
            headers["admin-key"] = self.config.admin_key
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST"
                                                                      else None)
        req = urllib.request.Request(f"http://{self.config.http_url}{path}", data=data,
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                payload = r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"{method} {path}: HTTP {e.code}: "
                              f"{e.read().decode(errors='replace')}") from None
        return json.loads(payload) if payload else None

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- processes, signals, ports --------------------------------------------------------------

def remove_leftovers(pgid: int, identity: str, timeout: float = 10.0) -> List[str]:
    """What is left of a server that is gone: the processes of its group `pgid` (stubs that a
    crash orphaned keep it) and the shared-memory regions named after its `identity` (of stubs
    that did not exit cleanly). Returns what it found, for a log line."""
    found = [f"process {pid}" for pid in group_members(pgid)]
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # nothing left: the usual case
        pass
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if identity:
        for region in SHM_DIR.glob(f"{identity}_*"):
            region.unlink(missing_ok=True)
            found.append(f"/dev/shm/{region.name}")
    return found


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_spawner: Optional[ThreadPoolExecutor] = None
_spawner_lock = threading.Lock()


def _spawn_tied_to_this_process(args: List[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen of a child that the kernel SIGKILLs when this process dies, however it
    dies (PR_SET_PDEATHSIG). The signal fires when the *thread* that forked the child ends, so
    every child is forked by one thread that lives as long as the process: a server that the
    supervisor's thread restarted would otherwise die when supervision stops."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="triton-spawner")
    preexec = _die_with_parent(os.getpid())
    return _spawner.submit(subprocess.Popen, args, preexec_fn=preexec, **popen_kwargs).result()


def _die_with_parent(parent: int):
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    kill = int(signal.SIGKILL)

    def in_child() -> None:  # between fork and exec: only a system call, no imports
        prctl(_PR_SET_PDEATHSIG, kill)
        if os.getppid() != parent:  # the parent died before the prctl: no signal will come
            os._exit(1)

    return in_child


@contextlib.contextmanager
def _signals_ignored():
    """SIGINT and SIGTERM are ignored while the body runs (a stop): a second Ctrl-C, or the
    SIGTERM that GNU make forwards to its child after the whole process group got one, would
    otherwise raise KeyboardInterrupt inside the stop and abandon it. Only the main thread
    handles signals, so only there is anything to do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _note_ignored) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _note_ignored(signum, frame) -> None:
    # os.write, not print: a handler may run in the middle of a print to the same stream
    os.write(2, f"{signal.Signals(signum).name}: already stopping, ignored\n".encode())


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as a server does: connections of a closed one (TIME_WAIT) do not count, listeners do
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def listening_sockets(port: int) -> Dict[str, str]:
    """Sockets listening on TCP `port`: local address as /proc/net/tcp{,6} writes it (hex) ->
    socket inode."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found[address] = fields[9]
    return found


def port_holder(port: int) -> str:
    """"process PID (command line)" of a process holding a socket listening on `port` (socket
    inodes from /proc/net/tcp{,6}, their holders from /proc/*/fd), or "" when none is visible
    (e.g. another user's process)."""
    links = {f"socket:[{inode}]" for inode in listening_sockets(port).values()}
    if not links:
        return ""
    for pid in sorted(int(e) for e in os.listdir("/proc") if e.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # exited, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in links:
                    argv = cmdline(pid)
                    command = " ".join([Path(argv[0]).name] + argv[1:3]) if argv else "?"
                    return f"process {pid} ({command[:120]})"
            except OSError:
                continue
    return ""


def group_members(pgid: int) -> List[int]:
    """Live (not zombie) processes of process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        state, process_group = fields[0], int(fields[2])
        if process_group == pgid and state != "Z":
            members.append(int(entry))
    return members


def cmdline(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _admin_key() -> str:
    """Key for the restricted repository API: TRITON_ADMIN_KEY, else a random one per start
    (so that nobody can use the API)."""
    key = os.environ.get("TRITON_ADMIN_KEY")
    if key:
        return key
    return secrets.token_hex(16)
