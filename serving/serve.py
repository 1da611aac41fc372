"""`make serve`: build the repository if it is missing, then run tritonserver in the
foreground until Ctrl-C (ports from TRITON_HTTP_PORT / TRITON_GRPC_PORT / TRITON_METRICS_PORT,
defaults 8000 / 8001 / 8002; bind address TRITON_HOST, default 127.0.0.1), supervised: a crashed
server is restarted and a dead stub's model recovered (serving/supervisor.py)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from builder.build import TEMPLATE, is_built
from serving.launcher import ServerConfig, TritonServer
from serving.supervisor import Supervisor


def main() -> int:
    if not is_built(TEMPLATE):
        print("model repository not built yet: building it (python -m builder)")
        subprocess.run([sys.executable, "-m", "builder"], check=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = ServerConfig()
    server = TritonServer(config)
    supervisor = Supervisor(server)
    print(f"starting tritonserver: http {config.http_url}, grpc {config.grpc_url}, metrics "
          f"{config.host}:{config.metrics_port}; model control {config.model_control}; "
          f"log {config.log_path}")
    try:
        server.start()
        supervisor.start()
        print("ready. Try: .venv/bin/python -m client query --user-id 42 "
              "--filter 'category:comedy' -k 5      (Ctrl-C stops the server)")
        while True:  # the supervisor keeps it serving; Ctrl-C or SIGTERM ends this
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping tritonserver ...")
        supervisor.stop()
        server.stop()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
