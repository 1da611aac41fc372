"""Shared fixtures: a small built repository and a real tritonserver serving it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.build import BuildConfig, build
from serving.launcher import ServerConfig, TritonServer, free_ports
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
    cfg = BuildConfig(world=SMALL_WORLD, repository=root / "model_repository",
                      items_csv=root / "items.csv")
    world = build(cfg, progress=False)
    return Built(cfg, world)


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
