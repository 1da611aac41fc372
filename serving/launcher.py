"""Start, wait for and stop a real `tritonserver`.

The binary is the one on PATH (NVIDIA's container images), else the one shipped in the PyPI
package `nvidia-pytriton` (server 2.51), run with a backend directory assembled from the same
package: the Python backend plus the backend stub built for the running Python version.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]


class ServerError(RuntimeError):
    pass


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
    load_models: List[str] = field(default_factory=list)  # explicit mode: models to load at start
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

    def command(self) -> tuple[List[str], dict]:
        binary, backends, extra_env = find_server()
        c = self.config
        args = [str(binary), f"--model-repository={c.repository}",
                f"--http-address={c.host}", f"--http-port={c.http_port}",
                f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
                f"--metrics-address={c.host}", f"--metrics-port={c.metrics_port}",
                f"--model-control-mode={c.model_control}",
                f"--log-verbose={c.log_verbose}", "--strict-readiness=true"]
        if c.model_control == "none":
            # nothing may change what is deployed: the repository API is refused to everyone
            key = _admin_key()
            args += [f"--http-restricted-api=model-repository:admin-key={key}",
                     f"--grpc-restricted-protocol=model-repository:admin-key={key}"]
        args += [f"--load-model={m}" for m in c.load_models]
        if backends is not None:
            args.append(f"--backend-directory={backends}")
        env = dict(os.environ, **extra_env)
        # The backend stub embeds an interpreter that finds its prefix through the first
        # `python3` on PATH: put this environment's first so model.py runs with its packages
        # (torch, numpy), and the project root on PYTHONPATH for the project's own packages.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        return args + list(c.extra_args), env

    def start(self, timeout: float = 180.0) -> TritonServer:
        args, env = self.command()
        self.config.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.config.log_path, "wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

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
                                  f"before it was ready.\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.5)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s.\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.config.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return f"--- last lines of {self.config.log_path} ---\n" + "\n".join(text[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # Triton shuts down cleanly on SIGINT
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _admin_key() -> str:
    """Key for the restricted repository API: TRITON_ADMIN_KEY, else a random one per start
    (so that nobody can use the API)."""
    key = os.environ.get("TRITON_ADMIN_KEY")
    if key:
        return key
    import secrets

    return secrets.token_hex(16)
