"""`make serve`: run tritonserver in the foreground, supervised (serving/supervisor.py: a crashed
server is restarted, a dead stub's model recovered), until SIGINT (Ctrl-C) or SIGTERM.

The default repository (model_repository/) is built first if it is not yet; another one must
have been built (`python -m builder --catalog CATALOG --repository DIR`, or
`python -m builder --repository DIR` for a synthetic world). Ports and bind address default to
TRITON_HTTP_PORT / TRITON_GRPC_PORT / TRITON_METRICS_PORT (8000 / 8001 / 8002) and TRITON_HOST
(127.0.0.1), model control to TRITON_MODEL_CONTROL (none).

Exit status: 0 after a stop by signal; 1 when the server cannot start (e.g. a port is taken,
named with the process holding it) or the supervisor gave up recovering it; 2 for a
repository that is not built.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from builder.build import TEMPLATE, is_built
from serving.launcher import ServerConfig, ServerError, StartCancelled, TritonServer
from serving.supervisor import Supervisor


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    defaults = ServerConfig()  # the TRITON_* environment variables, else the safe defaults
    p = argparse.ArgumentParser(prog="python -m serving.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=defaults.repository,
                   help="model repository to serve (default: %(default)s)")
    p.add_argument("--fresh-dir", type=Path, default=None,
                   help="fresh-item store (default: next to the repository)")
    p.add_argument("--host", default=defaults.host,
                   help="bind address of all three endpoints (default: %(default)s)")
    p.add_argument("--http-port", type=int, default=defaults.http_port,
                   help="(default: %(default)s)")
    p.add_argument("--grpc-port", type=int, default=defaults.grpc_port,
                   help="(default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=defaults.metrics_port,
                   help="(default: %(default)s)")
    p.add_argument("--model-control", choices=["none", "explicit"],
                   default=defaults.model_control,
                   help="none: the repository is fixed at start; explicit: models are loaded "
                        "through the repository API, which needs TRITON_ADMIN_KEY "
                        "(default: %(default)s)")
    p.add_argument("--load-model", action="append", default=[], metavar="MODEL",
                   help="explicit model control: a model to load at start (repeatable; "
                        "default: all)")
    p.add_argument("--exit-timeout", type=int, default=defaults.exit_timeout, metavar="SECONDS",
                   help="a stop waits this long for in-flight requests and model unloads, "
                        "then the server is killed (TRITON_EXIT_TIMEOUT; default: "
                        "%(default)s)")
    p.add_argument("--log", type=Path, default=defaults.log_path,
                   help="the server's log file (default: %(default)s)")
    args = p.parse_args(argv)
    if args.load_model and args.model_control != "explicit":
        p.error("--load-model needs --model-control explicit")
    return args


class StopRequest:
    """SIGINT and SIGTERM ask for a stop by setting `event`; they never raise, so no signal can
    interrupt a stop half-way. Later ones (GNU make forwards to its child the SIGTERM that its
    whole process group got) are reported as ignored.

    The handler takes no lock: it runs in the main thread between two bytecodes, possibly in
    the middle of `Event.set()` (the first signal's, or the main thread's own), whose lock is
    not reentrant. It writes one byte to a pipe instead, and a relay thread sets the event.
    (Calling `event.set()` in the handler deadlocked a launcher whose second SIGTERM arrived
    while the first one's `set()` held that lock: `make serve` never stopped.)
    """

    def __init__(self):
        self.event = threading.Event()
        self._requested = False  # a plain flag: read and written by the handler only
        self._read, self._write = os.pipe()

    def install(self) -> None:
        threading.Thread(target=self._relay, name="stop-relay", daemon=True).start()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _relay(self) -> None:
        while os.read(self._read, 1):
            self.event.set()

    def _handle(self, signum, frame) -> None:
        stopping = self._requested or self.event.is_set()  # is_set() takes no lock
        self._requested = True
        said = "already stopping, ignored" if stopping else "stopping"
        # os.write, not print: a handler may run in the middle of a print to stdout
        os.write(sys.stdout.fileno(), f"{signal.Signals(signum).name}: {said}\n".encode())
        os.write(self._write, b"s")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not is_built(args.repository):
        if args.repository.resolve() != TEMPLATE.resolve():
            print(f"{args.repository} is not a built model repository (a model's artifacts are "
                  f"missing). Build it first, from your catalog (docs/catalog.md):\n"
                  f"  python -m builder --catalog CATALOG_DIR --repository {args.repository}\n"
                  f"or from a synthetic world:\n  python -m builder --repository "
                  f"{args.repository}\n(python -m builder --help: all options)",
                  file=sys.stderr)
            return 2
        print("model repository not built yet: building it (python -m builder)")
        subprocess.run([sys.executable, "-m", "builder"], check=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = ServerConfig(repository=args.repository, fresh_dir=args.fresh_dir, host=args.host,
                          http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, model_control=args.model_control,
                          load_models=args.load_model, log_path=args.log,
                          exit_timeout=args.exit_timeout)
    server = TritonServer(config)
    supervisor = Supervisor(server)
    stop = StopRequest()
    stop.install()
    # `kill -USR1 <launcher>` prints every thread's stack to stderr: where a stop hangs
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    print(f"starting tritonserver: repository {config.repository}; http {config.http_url}, "
          f"grpc {config.grpc_url}, metrics {config.host}:{config.metrics_port}; model control "
          f"{config.model_control}; log {config.log_path}", flush=True)
    ready = False
    try:
        try:
            server.start(cancel=stop.event)
        except StartCancelled:
            return 0
        except ServerError as e:
            print(f"tritonserver did not start: {e}", file=sys.stderr)
            return 1
        ready = True
        supervisor.start()
        print("ready. Try: .venv/bin/python -m client query --user-id 42 "
              "--filter 'category:comedy' -k 5      (Ctrl-C stops the server)", flush=True)
        while not stop.event.wait(0.5):  # the supervisor keeps it serving
            if supervisor.gave_up.is_set():
                print("the supervisor gave up recovering the server (see the error above)",
                      file=sys.stderr)
                return 1
        return 0
    finally:
        stop.event.set()  # from here on, every signal only sets it again
        supervisor.stop()
        if ready:
            print("stopping tritonserver ...", flush=True)
        t0 = time.monotonic()
        server.stop()  # also when the start failed: stop() does nothing twice
        if ready:
            print(f"stopped ({time.monotonic() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
