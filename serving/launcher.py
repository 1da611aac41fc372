"""Start, wait for and stop a real `tritonserver`.

The binary is the one on PATH (NVIDIA's container images), else the one shipped in the PyPI
package `nvidia-pytriton` (server 2.51), run with a backend directory assembled from the same
package: the Python backend plus the backend stub built for the running Python version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]


class ServerError(RuntimeError):
    pass


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
        self._starts = 0
        self._shm_regions: set = set()  # of this server's stubs, removed if a crash leaves them

    def command(self) -> tuple[List[str], dict]:
        binary, backends, extra_env = find_server()
        c = self.config
        args = [str(binary), f"--model-repository={c.repository}",
                f"--http-address={c.host}", f"--http-port={c.http_port}",
                f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
                f"--metrics-address={c.host}", f"--metrics-port={c.metrics_port}",
                f"--model-control-mode={c.model_control}",
                f"--log-verbose={c.log_verbose}", "--strict-readiness=true"]
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

    def start(self, timeout: float = 180.0) -> TritonServer:
        args, env = self.command()
        self.config.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.config.log_path, "ab" if self._starts else "wb")  # keep a crash's log
        self._starts += 1
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.stubs()  # note their shared-memory regions
        return self

    def restart(self, timeout: float = 180.0, stop_timeout: float = 30.0) -> TritonServer:
        """Stop (if still running) and start again with the same config and ports."""
        self.stop(stop_timeout)
        return self.start(timeout)

    def is_ready(self) -> bool:
        url = f"http://{self.config.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} "
                                  f"before it was ready.{self.load_failures()}\n"
                                  f"{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.5)
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

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            self.stubs()
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGINT)  # Triton shuts down cleanly on SIGINT
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            self._remove_leftovers()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _remove_leftovers(self) -> None:
        """After the server is gone: stubs a crash orphaned (they keep the server's process
        group) and the shared-memory regions of stubs that did not exit cleanly."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # nothing left: the usual case
            pass
        deadline = time.monotonic() + 10
        while _group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        for name in self._shm_regions:
            (SHM_DIR / name).unlink(missing_ok=True)
        self._shm_regions.clear()

    def stubs(self) -> Dict[str, List[Stub]]:
        """The server's live Python-backend stub processes, by model (from /proc: the
        members of the server's process group running the stub binary)."""
        found: Dict[str, List[Stub]] = {}
        if self.process is None:
            return found
        for pid in _group_members(self.process.pid):
            argv = _cmdline(pid)
            if len(argv) < 3 or not argv[0].endswith(STUB_BINARY):
                continue
            # argv: stub, <repository>/<model>/<version>/model.py, shm region, ...
            version_dir = Path(argv[1]).parent
            stub = Stub(model=version_dir.parent.name, version=version_dir.name, pid=pid,
                        shm_region=argv[2])
            found.setdefault(stub.model, []).append(stub)
            self._shm_regions.add(stub.shm_region)
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


def _group_members(pgid: int) -> List[int]:
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


def _cmdline(pid: int) -> List[str]:
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
    import secrets

    return secrets.token_hex(16)
