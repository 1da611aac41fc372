"""`make serve`: build the repository if it is missing, then run tritonserver in the
foreground until Ctrl-C (ports from TRITON_HTTP_PORT / TRITON_GRPC_PORT / TRITON_METRICS_PORT,
defaults 8000 / 8001 / 8002; bind address TRITON_HOST, default 127.0.0.1)."""

from __future__ import annotations

import signal
import subprocess
import sys

from builder.build import TEMPLATE, is_built
from serving.launcher import ServerConfig, TritonServer


def main() -> int:
    if not is_built(TEMPLATE):
        print("model repository not built yet: building it (python -m builder)")
        subprocess.run([sys.executable, "-m", "builder"], check=True)
    config = ServerConfig()
    server = TritonServer(config)
    print(f"starting tritonserver: http {config.http_url}, grpc {config.grpc_url}, metrics "
          f"{config.host}:{config.metrics_port}; model control {config.model_control}; "
          f"log {config.log_path}")
    try:
        server.start()
        print("ready. Try: .venv/bin/python -m client query --user-id 42 "
              "--filter 'category:comedy' -k 5      (Ctrl-C stops the server)")
        code = server.process.wait()
        print(f"tritonserver exited with code {code}\n{server.log_tail()}")
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping tritonserver ...")
        server.stop()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
