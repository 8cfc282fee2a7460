"""Response bodies that the server writes and the client reads, defined once for both.

The API returns these models and the client parses them, so a field added here reaches
both sides at once; the client never imports a server module to get them.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from easel.jobs import Capability, Job


class JobList(BaseModel):
    jobs: list[Job]


class ModelEntry(BaseModel):
    name: str
    backend: str
    family: str
    loaded: bool
    kind: str = "pipeline"
    size_bytes: int | None = None
    description: str | None = None
    base_model: str | None = None
    merged_from: list[str] = Field(default_factory=list)
    format: str | None = None
    state: str = Field(default="on_disk", description="loaded or on_disk")


class BackendEntry(BaseModel):
    name: str
    capabilities: list[Capability]
    default: bool


class Models(BaseModel):
    """``GET /v1/models``: every model each backend serves, and each backend's abilities."""

    models: list[ModelEntry]
    backends: list[BackendEntry]


class Health(BaseModel):
    status: str = Field(description='"healthy" while the server answers.')
    version: str
    backends: list[str]


class BackendStatus(BaseModel):
    """One backend as ``GET /v1/backends`` shows it."""

    name: str
    kind: str
    state: str = Field(description="up, down (breaker open) or probing.")
    where: str = Field(description="local (this process) or workers (advertised in Redis).")
    slots: int
    slots_in_use: int
    capabilities: list[str]
    models: list[str]
    loaded_models: list[str]
    loading: str | None = Field(
        default=None, description="A model it is loading ahead of the jobs that want it."
    )
    model_loads: int = Field(default=0, description="Models it loaded ahead of their jobs.")
    load_seconds: float | None = Field(
        default=None, description="Measured model load time (what routing counts for a load)."
    )
    tags: list[str]
    queued_work: float = Field(description="Work units queued for it (cost: steps x pixels).")
    speed: float | None = Field(description="Measured work units per second (one slot).")
    consecutive_failures: int = 0
    last_error: str | None = None
    workers: list[str] = Field(default_factory=list)


class Backends(BaseModel):
    """``GET /v1/backends``: every backend of the fleet, local or run by live workers."""

    backends: list[BackendStatus]
