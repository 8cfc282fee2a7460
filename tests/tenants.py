"""Two services (and an admin) on one deployment, shared by the tenancy and hostile-input
tests: their tokens and a server for them, embedded or on Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from easel.api import create_app
from easel.config import Safety, Settings
from tests.servers import serve

ALPHA = "alpha-token-0123456789"
BRAVO = "bravo-token-0123456789"
ADMIN = "admin-token-0123456789"
TOKENS = [{"service": "alpha", "token": ALPHA}, {"service": "bravo", "token": BRAVO}]
WITH_ADMIN = [*TOKENS, {"service": "ops", "token": ADMIN, "scopes": ["admin"]}]
SMALL = {"width": 64, "height": 64, "steps": 2}


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **headers}


def settings_for(
    data_dir: Path,
    redis_url: str | None = None,
    safety: dict[str, object] | None = None,
    **extra: object,
) -> Settings:
    """The mock backend, every token; ``redis_url``: the Redis store and bus (a keyspace of
    its own) with the workers in this process; ``safety``: more safety settings."""
    fields: dict[str, object] = {
        "data_dir": data_dir,
        "backend": "mock",
        "mock_step_delay": 0.05,
        "heartbeat_seconds": 0.5,  # the registry (GET /v1/workers) is fed by heartbeats
        "safety": Safety.model_validate({"tokens": WITH_ADMIN, **(safety or {})}),
    }
    if redis_url:
        fields |= {"redis_url": redis_url, "redis_prefix": f"tenants:{uuid.uuid4().hex}:"}
    return Settings.model_validate(fields | extra)


@dataclass(frozen=True)
class Deployment:
    url: str
    grpc: str
    """host:port of its gRPC door."""


@contextmanager
def two_services_server(
    data_dir: Path,
    redis_url: str | None = None,
    safety: dict[str, object] | None = None,
    **extra: object,
) -> Iterator[Deployment]:
    """uvicorn on loopback serving :func:`settings_for`, with its gRPC door."""
    app = create_app(settings_for(data_dir, redis_url, safety, **extra), grpc_port=0)
    with serve(app) as url:
        yield Deployment(url, f"127.0.0.1:{app.state.grpc_port}")
