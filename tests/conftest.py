"""Shared fixtures: heavy things (the tiny pipeline) are built once per session."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from easel.config import Settings
from tests.servers import serve

if TYPE_CHECKING:
    from tests.redis_server import RedisServer
    from tests.servers import Process

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised Stable-Diffusion pipeline saved as a diffusers folder."""
    from easel.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for one test: its own database and output dir, a fast mock backend."""
    return Settings(data_dir=tmp_path / "data", mock_step_delay=0.0, backend="mock")


@pytest.fixture
def server(settings: Settings) -> Iterator[str]:
    """A real easel server (mock backend) on a loopback port; yields its base URL."""
    from easel.api import create_app

    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[str]:
    """A mock backend that takes 50 ms a step: a long job (150 steps, 7.5 s) holds the single
    worker long enough for a test to queue behind it, even on a loaded machine."""
    from easel.api import create_app

    settings = Settings(data_dir=tmp_path / "slow", mock_step_delay=0.05, backend="mock")
    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session, on a free loopback port, AOF on
    (``appendfsync always``, as the README asks). Tests share it under their own prefixes."""
    from tests.redis_server import RedisServer, redis_server_command

    if redis_server_command() is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run installs it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def engine_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, str]]:
    """A second ``easel serve`` that remote-engine tests use as their engine (its A1111,
    OpenAI and Draw Things gRPC APIs), and its gRPC address. Its mock takes 20 ms a step
    and previews every 2 steps; it moderates every prompt (deny-word "forbidden"). Tests
    tell their jobs apart by user id."""
    from tests.servers import easel_serve, free_port

    env = {
        "EASEL_MOCK_STEP_DELAY": "0.02",
        "EASEL_MOCK_PREVIEW_EVERY": "2",
        "EASEL_SAFETY__DENY_WORDS": '["forbidden"]',
        "EASEL_SAFETY__MODERATE_ALL": "true",
    }
    port = free_port()
    data = tmp_path_factory.mktemp("engine-peer") / "data"
    with easel_serve(data, "--backend", "mock", "--grpc-port", str(port), env=env) as process:
        yield process, f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, ModuleType]]:
    """``imageservice_pb2`` and ``imageservice_pb2_grpc``, made by protoc from the proto now."""
    from easel.proto import _generate

    out = tmp_path_factory.mktemp("stubs")
    _generate.generate(out, grpc=True)
    sys.path.insert(0, str(out))
    try:
        yield (
            importlib.import_module("imageservice_pb2"),
            importlib.import_module("imageservice_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("imageservice_pb2", None)
        sys.modules.pop("imageservice_pb2_grpc", None)
