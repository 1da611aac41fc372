"""Move every replica of the server to index version N, one replica at a time.

    python -m builder --version 2                   # (the build Job) version 2 on the shared volume
    python deploy/rollout_swap.py --version 2 --dns iam-triton-replicas:8001
    python deploy/rollout_swap.py --version 2 --replica 10.0.0.7:8001 --replica 10.0.0.8:8001

Each replica runs `serving.swap` (serving/swap.py), which moves one server to version N without
failing a request or mixing versions within one. This script adds what many replicas need:
- a plan first: every replica is asked what it serves; the rollout refuses to start when one
  serves a version newer than N (versions only move forward) or the repository has no N;
  replicas that already serve N are skipped, so a rollout that stopped can be run again;
- one replica at a time: loading N holds two index versions in memory and takes CPU; the others
  keep serving at full strength meanwhile, and a failure stops the rollout with every other
  replica untouched;
- after each swap: the replica is ready (/v2/health/ready), its ensembles run N, its index
  models have N ready, and a canary query of `unified` and `retrieval` answers; then a pause
  (--settle) before the next.
While it runs, replicas answer from different versions: each answer is wholly one version's,
but two requests of one client may see different versions until the last replica moves.

The replicas share one model repository (a ReadWriteMany volume): the first swap rewrites the
ensembles' config.pbtxt, and every later replica loads the same files. --repository must be
that repository as this process sees it. The repository API needs the servers' admin key
(TRITON_ADMIN_KEY). Addresses are gRPC host:port (the swap loads over gRPC; see serving/swap.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's packages
    sys.path.insert(0, str(ROOT))

from serving.swap import SwapError, admin_headers, swap_index  # noqa: E402

CANARY_MODELS = ("unified", "retrieval")


class RolloutError(RuntimeError):
    pass


@dataclass
class ReplicaState:
    """What one replica serves, as its repository index and model configs say."""

    address: str
    ready: bool
    ensembles: Dict[str, int] = field(default_factory=dict)  # ensemble -> version its steps use
    models: Dict[str, List[int]] = field(default_factory=dict)  # model -> READY versions
    error: str = ""  # why the replica could not be asked

    def serves(self, version: int, expected: Sequence[str]) -> bool:
        """Every ensemble runs `version`, and every served model that the repository has
        `version` of (`expected`) has it ready."""
        return (self.ready and all(v == version for v in self.ensembles.values())
                and all(version in self.models[m] for m in expected if m in self.models))

    def newest(self) -> int:
        return max([*self.ensembles.values(), *(max(v) for v in self.models.values() if v)],
                   default=0)


@dataclass
class Step:
    address: str
    action: str  # "swap" or "skip"
    reason: str


def models_with_version(repository: Path, version: int) -> List[str]:
    """The models the builder wrote `version` of (<repository>/<model>/<version>/)."""
    return sorted(p.parent.name for p in Path(repository).glob(f"*/{version}") if p.is_dir())


def plan_rollout(states: Sequence[ReplicaState], version: int,
                 expected: Sequence[str]) -> List[Step]:
    """One step per replica, in the given order; raises RolloutError when the rollout must not
    start (no such version on disk, a replica unreachable or serving a newer version)."""
    if not expected:
        raise RolloutError(f"the repository has no version {version} of any model: build it "
                           f"first (python -m builder --version {version})")
    if not states:
        raise RolloutError("no replicas to roll out to")
    problems = [f"{s.address}: {s.error}" for s in states if s.error]
    problems += [f"{s.address} already serves version {s.newest()}, newer than {version}; to "
                 "serve an older index, build it again as a new version"
                 for s in states if not s.error and s.newest() > version]
    if problems:
        raise RolloutError("not starting the rollout:\n  " + "\n  ".join(problems))
    return [Step(s.address, "skip", f"serves version {version} already")
            if s.serves(version, expected)
            else Step(s.address, "swap", f"serves {s.ensembles or s.newest()}")
            for s in states]


def expand_dns(name_port: str) -> List[str]:
    """host:port -> ip:port for every address the name resolves to (a headless Service: one
    per pod), sorted so that reruns walk the replicas in the same order."""
    host, _, port = name_port.rpartition(":")
    if not host or not port.isdigit():
        raise RolloutError(f"--dns {name_port!r}: expected NAME:PORT")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RolloutError(f"--dns {name_port!r}: {e}") from None
    addresses = {(f"[{i[4][0]}]" if i[0] == socket.AF_INET6 else i[4][0]) for i in infos}
    return [f"{a}:{port}" for a in sorted(addresses)]


class Replica:
    """One server's gRPC endpoint: health, repository index, model configs."""

    def __init__(self, address: str, admin_key: str):
        import tritonclient.grpc as grpcclient

        self.address = address
        self.client = grpcclient.InferenceServerClient(address)
        self.headers = admin_headers(admin_key, "grpc")

    def is_ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready(client_timeout=5))
        except Exception:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise RolloutError(f"{self.address} not ready after {timeout:.0f} s")
            time.sleep(1)

    def state(self) -> ReplicaState:
        from google.protobuf import json_format

        ready = self.is_ready()
        try:
            index = self.client.get_model_repository_index(headers=self.headers)
            state = ReplicaState(self.address, ready)
            for m in (json_format.MessageToDict(m) for m in index.models):
                if m.get("state") == "READY" and m.get("version"):
                    state.models.setdefault(m["name"], []).append(int(m["version"]))
            for name in list(state.models):
                config = self.client.get_model_config(name).config
                if config.platform == "ensemble":  # the versions its steps run, as loaded
                    state.ensembles[name] = max(int(step.model_version)
                                                for step in config.ensemble_scheduling.step)
                    del state.models[name]
            return state
        except Exception as e:  # unreachable, wrong key, ...: reported by the plan
            return ReplicaState(self.address, ready, error=f"{type(e).__name__}: {e}"[:300])

    def canary(self) -> None:
        """A plain query of each served canary model must answer with an item."""
        from client import Retriever

        for model in CANARY_MODELS:
            if not self.client.is_model_ready(model):
                continue
            with Retriever(self.address, "grpc", model, timeout=30) as r:
                if len(r.query(1, "", 1).item_ids) != 1:
                    raise RolloutError(f"{self.address}: canary query of {model} returned "
                                       "no item")

    def close(self) -> None:
        self.client.close()


def rollout(addresses: Sequence[str], version: int, admin_key: str, repository: Path,
            settle: float = 15.0, ready_timeout: float = 900.0, canary: bool = True,
            dry_run: bool = False, log: Callable[[str], None] = print) -> List[Step]:
    """Swap each replica to `version` in turn (see the module docstring); returns the plan.
    Raises RolloutError (or SwapError) at the first failure: replicas before it serve
    `version`, the failed one and those after it what they served."""
    replicas = [Replica(a, admin_key) for a in addresses]
    try:
        expected = models_with_version(repository, version)
        steps = plan_rollout([r.state() for r in replicas], version, expected)
        for s in steps:
            log(f"plan: {s.address}: {s.action} ({s.reason})")
        if dry_run:
            return steps
        done: List[str] = []
        for n, (replica, step) in enumerate(zip(replicas, steps), 1):
            if step.action == "skip":
                continue
            try:
                replica.wait_ready(ready_timeout)
                t0 = time.monotonic()
                swap_index(replica.address, version, admin_key, repository, "grpc",
                           log=lambda line, a=replica.address: log(f"  {a}: {line}"))
                replica.wait_ready(ready_timeout)
                state = replica.state()
                if not state.serves(version, expected):
                    raise RolloutError(f"after the swap it serves {state.ensembles}, models "
                                       f"{state.models} {state.error}")
                if canary:
                    replica.canary()
            except (RolloutError, SwapError) as e:
                raise RolloutError(f"{replica.address}: {e}\nstopped: {len(done)} replica(s) "
                                   f"moved to version {version} ({', '.join(done) or 'none'});"
                                   " the others serve what they served") from e
            done.append(replica.address)
            log(f"{replica.address}: serves version {version} ({time.monotonic() - t0:.1f} s, "
                f"{n}/{len(steps)})")
            if n < len(steps):
                time.sleep(settle)
        return steps
    finally:
        for r in replicas:
            r.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python deploy/rollout_swap.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", type=int, required=True, help="index version to serve")
    p.add_argument("--replica", action="append", default=[], metavar="HOST:PORT",
                   help="a replica's gRPC address (repeat, in rollout order)")
    p.add_argument("--dns", metavar="NAME:PORT",
                   help="every address NAME resolves to, e.g. the headless Service "
                        "iam-triton-replicas:8001 (deploy/base/service.yaml)")
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository",
                   help="the replicas' shared model repository (default: %(default)s)")
    p.add_argument("--admin-key", default=os.environ.get("TRITON_ADMIN_KEY", ""),
                   help="the servers' repository API key (default: $TRITON_ADMIN_KEY)")
    p.add_argument("--settle", type=float, default=15.0,
                   help="seconds to wait after a replica moved, before the next (default 15)")
    p.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds a replica may take to be ready (default 900)")
    p.add_argument("--no-canary", dest="canary", action="store_false",
                   help="skip the canary query after each swap")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (what each replica serves) and change nothing")
    a = p.parse_args(argv)
    if not a.admin_key:
        p.error("the repository API needs the servers' admin key: --admin-key or "
                "TRITON_ADMIN_KEY")
    if a.version < 1:
        p.error("--version must be 1 or more")
    if bool(a.replica) == bool(a.dns):
        p.error("name the replicas with either --replica (repeated) or --dns")
    try:
        addresses = a.replica or expand_dns(a.dns)
        steps = rollout(addresses, a.version, a.admin_key, a.repository, a.settle,
                        a.ready_timeout, a.canary, a.dry_run)
    except (RolloutError, SwapError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not a.dry_run:
        moved = sum(s.action == "swap" for s in steps)
        print(f"all {len(steps)} replicas serve version {a.version} ({moved} moved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
