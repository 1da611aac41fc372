"""Zero-downtime index swap: make a running server serve version N of the index.

    python -m builder --version 2            # writes <model>/2/ next to the served version
    python -m serving.swap --version 2       # needs --model-control-mode=explicit + admin key

How no request fails or mixes versions:
- Every index model keeps its two newest versions loaded (`version_policy: latest 2` in its
  config.pbtxt): loading a model after the builder wrote version N loads N next to the served
  version V, and unversioned requests move to N once it is ready (Triton answers them with the
  newest ready version; V keeps serving until then and finishes what it started).
- Ensembles name a version in every step (`model_version: V` in config.pbtxt, never -1): a step
  asking for the newest version would mix versions mid-swap (ann on N while the filter is still
  on V: a bitmap over the wrong rows), and Triton re-creates an ensemble whenever a member
  loads. Once every member has N ready, the swap rewrites the steps' versions in the file
  (atomically) and loads the ensemble: one step, after which new requests run wholly on N,
  while those already running finish wholly on V.
- V stays loaded (the "latest 2" partner of N) until the swap to N + 1. Versions only move
  forward: to serve an older index again, build it as version N + 1.

The repository API needs the server's admin key (TRITON_ADMIN_KEY). Loads go over gRPC by
default: Triton's HTTP load handler holds an HTTP worker thread for the whole load, and HTTP
inference connections served by that thread stall meanwhile (seen here: requests timing out
after 60 s during a swap; triton-inference-server/server #8635, #8958). The swap runs on the
server's host: it rewrites the ensembles' config.pbtxt in the model repository.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from builder.build import STEP_VERSION, pin_step_versions

LOAD_TIMEOUT_S = 900.0  # a load returns once the model is ready: minutes for a large index


@dataclass
class SwapReport:
    version: int
    loaded: List[str] = field(default_factory=list)  # models now serving `version`
    without_version: List[str] = field(default_factory=list)  # models that have no such version
    pinned: Dict[str, int] = field(default_factory=dict)  # ensemble -> version its steps use
    seconds: float = 0.0


class SwapError(RuntimeError):
    pass


def admin_headers(admin_key: str, protocol: str) -> dict:
    """The header that opens the restricted repository API (serving/launcher.py): gRPC
    metadata keys of restricted protocols carry Triton's `triton-grpc-protocol-` prefix."""
    return {("triton-grpc-protocol-admin-key" if protocol == "grpc" else "admin-key"): admin_key}


def step_versions(config_text: str) -> List[int]:
    """The model_version of every step of an ensemble's config.pbtxt."""
    return [int(v) for _, v in STEP_VERSION.findall(config_text)]


def pin_steps(config_path: Path, version: int) -> None:
    """Point every step of the ensemble at `version`, replacing the file atomically (Triton
    never reads half a file; comments and layout are kept)."""
    text = config_path.read_text()
    pinned = pin_step_versions(text, version)
    tmp = config_path.with_name(config_path.name + ".swap")
    tmp.write_text(pinned)
    os.replace(tmp, config_path)


class _Admin:
    """The few repository calls the swap needs, over HTTP or gRPC."""

    def __init__(self, url: str, admin_key: str, protocol: str):
        self.protocol = protocol
        self.headers = admin_headers(admin_key, protocol)
        if protocol == "grpc":
            import tritonclient.grpc as module

            self.client = module.InferenceServerClient(url)
        else:
            import tritonclient.http as module

            self.client = module.InferenceServerClient(url, network_timeout=LOAD_TIMEOUT_S,
                                                       connection_timeout=LOAD_TIMEOUT_S)

    def index(self) -> List[dict]:
        out = self.client.get_model_repository_index(headers=self.headers)
        if self.protocol == "grpc":
            from google.protobuf import json_format

            return [json_format.MessageToDict(m) for m in out.models]
        return out

    def is_ensemble(self, name: str) -> bool:
        config = self.client.get_model_config(name)
        if self.protocol == "grpc":
            return config.config.platform == "ensemble"
        return config.get("platform") == "ensemble"

    def load(self, name: str) -> None:
        kwargs = {"client_timeout": LOAD_TIMEOUT_S} if self.protocol == "grpc" else {}
        self.client.load_model(name, headers=self.headers, **kwargs)

    def ready(self, name: str, version: int) -> bool:
        return bool(self.client.is_model_ready(name, str(version)))

    def close(self) -> None:
        self.client.close()


def swap_index(url: str, version: int, admin_key: str, repository: Path,
               protocol: str = "grpc", log=print) -> SwapReport:
    """Load `version` of every served model that has it, then move every ensemble whose
    members all have it (see the module docstring). Raises SwapError when nothing can be
    swapped or a load fails; whatever was served keeps being served."""
    t0 = time.monotonic()
    repository = Path(repository)
    admin = _Admin(url, admin_key, protocol)
    report = SwapReport(version)
    try:
        index = admin.index()
        ready: Dict[str, List[int]] = {}
        for m in index:
            if m.get("state") == "READY" and m.get("version"):
                ready.setdefault(m["name"], []).append(int(m["version"]))
        ensembles = [n for n in sorted(ready) if admin.is_ensemble(n)]
        models = [n for n in sorted(ready) if n not in ensembles]
        newer = {n: max(ready[n]) for n in models if max(ready[n]) > version}
        if newer:  # unversioned requests go to the newest ready version: no way back
            raise SwapError(f"{newer} already serve a version newer than {version}; to serve "
                            "an older index, build it again as a new version")
        configs = {e: repository / e / "config.pbtxt" for e in ensembles}
        for path in configs.values():
            if any(v < 0 for v in step_versions(path.read_text())):
                raise SwapError(f"{path}: a step asks for the newest version (-1), which mixes "
                                "versions during a swap; name the served version in every "
                                "step (the builder writes them so)")
        for n in models:  # load `version` next to the served one
            admin.load(n)
            if admin.ready(n, version):
                report.loaded.append(n)
                log(f"{n}: version {version} ready")
            else:
                report.without_version.append(n)
        if not report.loaded:
            raise SwapError(f"no model has version {version}: run `python -m builder "
                            f"--version {version}` first")
        for e, path in configs.items():  # move each ensemble whose members all have it
            members = _members(path)
            missing = [m for m in members if m not in report.loaded]
            if missing:
                report.pinned[e] = max(step_versions(path.read_text()))
                log(f"{e} stays on version {report.pinned[e]}: {missing} have no version "
                    f"{version}")
                continue
            served = max(step_versions(path.read_text()))
            pin_steps(path, version)
            try:
                admin.load(e)
            except Exception:  # the served ensemble stays; so does its file
                pin_steps(path, served)
                raise
            report.pinned[e] = version
            log(f"{e} now runs version {version}")
    except SwapError:
        raise
    except Exception as e:
        raise SwapError(f"swap to version {version} failed: {e}") from e
    finally:
        admin.close()
    report.seconds = time.monotonic() - t0
    return report


def _members(config_path: Path) -> List[str]:
    return re.findall(r'model_name\s*:\s*"([^"]+)"', config_path.read_text())


def main(argv: Optional[List[str]] = None) -> int:
    from serving.launcher import ROOT

    p = argparse.ArgumentParser(prog="python -m serving.swap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", type=int, required=True, help="index version to serve")
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository",
                   help="the server's model repository (its ensembles' configs are rewritten)")
    p.add_argument("-u", "--url", default=None,
                   help="server host:port (default 127.0.0.1:8001 for grpc, :8000 for http)")
    p.add_argument("-i", "--protocol", choices=("grpc", "http"), default="grpc",
                   help="grpc (default): an HTTP load stalls HTTP inference on its thread")
    p.add_argument("--admin-key", default=os.environ.get("TRITON_ADMIN_KEY", ""),
                   help="the server's repository API key (default: $TRITON_ADMIN_KEY)")
    a = p.parse_args(argv)
    if not a.admin_key:
        p.error("the repository API needs the server's admin key: --admin-key or "
                "TRITON_ADMIN_KEY")
    url = a.url or ("127.0.0.1:8001" if a.protocol == "grpc" else "127.0.0.1:8000")
    try:
        report = swap_index(url, a.version, a.admin_key, a.repository, a.protocol)
    except SwapError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving version {a.version} of {', '.join(report.loaded)} "
          f"({report.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
