"""The default deployment (`make serve` settings: serving/launcher.py ServerConfig) exposes
nothing that lets a caller change what is deployed or how the server behaves: the repository
API (index, load, unload), shared-memory registration, trace and log settings are refused over
HTTP and gRPC; the server listens on loopback only. Inference, health, metadata, model
configuration and statistics stay open.
"""

from __future__ import annotations

import ast
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from serving.launcher import ServerConfig, TritonServer, listening_sockets

pytestmark = pytest.mark.server

REFUSED_HTTP = [
    ("POST", "/v2/repository/index", None),
    ("POST", "/v2/repository/models/unified/load", None),
    ("POST", "/v2/repository/models/unified/unload", None),
    ("GET", "/v2/logging", None),
    ("POST", "/v2/logging", {"log_verbose_level": 1}),
    ("GET", "/v2/trace/setting", None),
    ("POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}),
    ("GET", "/v2/models/unified/trace/setting", None),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/region/x/register",
     {"key": "/triton_python_backend_shm_region_x", "offset": 0, "byte_size": 64}),
    ("POST", "/v2/systemsharedmemory/unregister", None),
    ("GET", "/v2/cudasharedmemory/status", None),
]
OPEN_HTTP = ["/v2/health/ready", "/v2/health/live", "/v2", "/v2/models/unified",
             "/v2/models/unified/config", "/v2/models/unified/stats"]


def http(server, method: str, path: str, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(f"http://{server.config.http_url}{path}", data=data,
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("method, path, body", REFUSED_HTTP,
                         ids=[f"{m} {p}" for m, p, _ in REFUSED_HTTP])
def test_http_admin_apis_are_refused(server, method, path, body):
    for headers in (None, {"admin-key": "guess"}):
        status, text = http(server, method, path, body, headers)
        assert status == 403 and "This API is restricted" in text, (status, text)


@pytest.mark.parametrize("path", OPEN_HTTP)
def test_http_read_only_apis_stay_open(server, path):
    status, _ = http(server, "GET", path)
    assert status == 200


def test_grpc_admin_apis_are_refused(server):
    import tritonclient.grpc as grpcclient

    calls = {
        "repository index": lambda c, h: c.get_model_repository_index(headers=h),
        "load": lambda c, h: c.load_model("unified", headers=h),
        "unload": lambda c, h: c.unload_model("unified", headers=h),
        "log settings": lambda c, h: c.get_log_settings(headers=h),
        "update log settings": lambda c, h: c.update_log_settings({"log_verbose_level": 1},
                                                                  headers=h),
        "trace settings": lambda c, h: c.get_trace_settings(headers=h),
        "update trace settings": lambda c, h: c.update_trace_settings(
            settings={"trace_rate": "1"}, headers=h),
        "shared memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
        "register shared memory": lambda c, h: c.register_system_shared_memory(
            "x", "/triton_python_backend_shm_region_x", 64, headers=h),
    }
    with grpcclient.InferenceServerClient(server.config.grpc_url) as client:
        for name, call in calls.items():
            for headers in (None, {"triton-grpc-protocol-admin-key": "guess"}):
                with pytest.raises(InferenceServerException) as e:
                    call(client, headers)
                assert "This protocol is restricted" in e.value.message(), (name, e.value)
        assert client.is_model_ready("unified")  # the open ones answer
        assert client.get_inference_statistics("unified").model_stats


# 127.0.0.1 as /proc/net/tcp writes it, the same mapped into IPv6 (gRPC listens there), ::1
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def test_server_listens_on_loopback_only(server):
    for port in (server.config.http_port, server.config.grpc_port, server.config.metrics_port):
        addresses = set(listening_sockets(port))  # as /proc/net/tcp{,6} write them
        assert addresses and addresses <= LOOPBACK, (port, addresses)


def test_default_config_is_the_safe_one(monkeypatch):
    """What `make serve` runs with when no TRITON_* variable is set."""
    for name in ("TRITON_HOST", "TRITON_MODEL_CONTROL", "TRITON_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)
    config = ServerConfig()
    assert config.host == "127.0.0.1" and config.model_control == "none"
    args, _ = TritonServer(config).command()
    assert "--model-control-mode=none" in args
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                 "--metrics-address=127.0.0.1"):
        assert flag in args
    for protocol_flag in ("--http-restricted-api=", "--grpc-restricted-protocol="):
        restricted = set()
        for a in args:
            if a.startswith(protocol_flag):
                categories, _, key = a[len(protocol_flag):].partition(":admin-key=")
                assert len(key) >= 32, "a guessable admin key"
                restricted |= set(categories.split(","))
        assert restricted >= {"model-repository", "shared-memory", "trace", "logging"}
    assert not any(a.startswith("--load-model") for a in args)
    # a fresh random admin key per start: nobody knows it
    again, _ = TritonServer(config).command()
    assert [a for a in args if "restricted" in a] != [a for a in again if "restricted" in a]


ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "build", "runs", "logs", "data"}  # folders not searched


def _unsafe_loads(tree: ast.AST):
    """Calls that may unpickle: torch.load without weights_only=True, pickle.load(s),
    anything with allow_pickle=True."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = f"{func.value.id}.{func.attr}" if isinstance(func, ast.Attribute) and \
            isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        is_true = lambda v: isinstance(v, ast.Constant) and v.value is True  # noqa: E731
        if name == "torch.load" and not is_true(keywords.get("weights_only")):
            yield node.lineno, "torch.load without weights_only=True"
        elif name in ("pickle.load", "pickle.loads"):
            yield node.lineno, name
        elif is_true(keywords.get("allow_pickle")):
            yield node.lineno, "allow_pickle=True"


def test_no_code_unpickles_untrusted_files():
    """Artifacts are TorchScript (torch.jit.load, no Python pickle) or plain tensors: every
    torch.load of the project passes weights_only=True, nothing else unpickles."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and d not in SKIP]
        for name in (f for f in files if f.endswith(".py")):
            path = Path(folder) / name
            tree = ast.parse(path.read_text(errors="replace"))
            found += [f"{path.relative_to(ROOT)}:{line}: {what}"
                      for line, what in _unsafe_loads(tree)]
    assert not found, "\n".join(found)
    # the check itself sees an unsafe load
    assert list(_unsafe_loads(ast.parse("torch.load(Path(p), map_location='cpu')")))
    assert not list(_unsafe_loads(ast.parse("torch.load(Path(p), weights_only=True)")))
