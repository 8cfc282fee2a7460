"""Response bodies that the server writes and the client reads, defined once for both.

The API returns these models and the client parses them, so a field added here reaches
both sides at once; the client never imports a server module to get them.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from easel.jobs import Capability, Job, JobState


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
    executors: list[str] = Field(
        default_factory=list,
        description="Engine payloads it runs (executor + payload): automatic1111, kandinsky...",
    )
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


class QueueAverage(BaseModel):
    backend: str
    model: str | None
    width: int
    height: int
    steps: int
    seconds_per_image: float


class QueueWaiting(BaseModel):
    """A queued job's place and ETA (seconds from now), from one projection of the queue."""

    job_id: str
    user_id: str
    position: int
    eta_seconds: float | None = None
    wait_eta_seconds: float | None = None
    run_eta_seconds: float | None = None
    eta_low_seconds: float | None = None
    eta_high_seconds: float | None = None


class QueueState(BaseModel):
    """``GET /v1/queue``: queued jobs per priority tier and per user, measured run times."""

    queued: int
    running: int
    tiers: dict[str, int]
    users: dict[str, int]
    averages: list[QueueAverage]
    waiting: list[QueueWaiting] = Field(
        default_factory=list,
        description="The next queued jobs the caller may see, in serving order, with ETAs.",
    )


class LineEntry(BaseModel):
    """A job in the queue as everyone may see it: the prompt only for its owner or admin."""

    id: str
    user_id: str
    service: str | None
    state: JobState
    tier: int
    position: int | None
    eta_seconds: float | None
    backend: str
    model: str | None
    width: int
    height: int
    steps: int
    batch_size: int
    created_at: float
    started_at: float | None
    prompt: str | None = Field(description="Hidden (null) unless yours or you are admin.")


class Line(BaseModel):
    """``GET /v1/queue/jobs``: running jobs, then queued ones in serving order."""

    jobs: list[LineEntry]
