"""Shared fixtures: a small built repository and a real tritonserver serving it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from builder.build import BuildConfig, build
from fresh.store import FreshStore, create_store, fresh_dir_for
from serving.launcher import ServerConfig, TritonServer, free_ports
from stages.ann import AnnConfig
from world.synthetic import World, WorldConfig

SMALL_WORLD = WorldConfig(seed=7, num_items=6000, num_users=1500, num_creators=400,
                          impressions_per_user=30)



@dataclass
class Built:
    config: BuildConfig
    world: World

    @property
    def repository(self) -> Path:
        return Path(self.config.repository)


@pytest.fixture(scope="session")
def small_build(tmp_path_factory) -> Built:
    root = tmp_path_factory.mktemp("build")
    # int8 item vectors (what AnnConfig's "auto" picks past ~1M items): the server tests then
    # serve the scorer and history pooling of large catalogs; smaller builds elsewhere serve
    # the fp32 copy "auto" picks for them
    cfg = BuildConfig(world=SMALL_WORLD, repository=root / "model_repository",
                      items_csv=root / "items.csv", ann=AnnConfig(item_vectors="int8"))
    world = build(cfg, progress=False)
    return Built(cfg, world)


@dataclass
class TwoVersions:
    """A copy of the session's build (version 1) and, aside, version 2 of another catalog (the
    next world seed) that a swap test moves in next to it."""

    repository: Path  # served: version 1, with a fresh store of its own
    staging: Path  # version 2 (and a copy of version 1) of every index model
    items_csv_v1: Path
    items_csv_v2: Path


def two_versions(small_build: Built, root: Path) -> TwoVersions:
    repo = root / "model_repository"
    shutil.copytree(small_build.repository, repo)
    header = FreshStore(fresh_dir_for(small_build.repository)).header
    create_store(fresh_dir_for(repo), header)
    staging = root / "staging" / "model_repository"
    shutil.copytree(small_build.repository, staging)
    create_store(fresh_dir_for(staging), header)
    items_v2 = root / "staging" / "items.csv"
    build(BuildConfig(world=replace(SMALL_WORLD, seed=SMALL_WORLD.seed + 1), repository=staging,
                      items_csv=items_v2, version=2), progress=False)
    return TwoVersions(repo, staging, Path(small_build.config.items_csv), items_v2)


def start_server(repository: Path, log_path: Path, **kwargs) -> TritonServer:
    http, grpc, metrics = free_ports(3)
    cfg = ServerConfig(repository=repository, http_port=http, grpc_port=grpc,
                       metrics_port=metrics, log_path=log_path, **kwargs)
    return TritonServer(cfg).start()


@pytest.fixture(scope="session")
def server(small_build, tmp_path_factory):
    srv = start_server(small_build.repository,
                       tmp_path_factory.mktemp("logs") / "tritonserver.log")
    yield srv
    srv.stop()
