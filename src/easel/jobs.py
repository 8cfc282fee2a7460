"""The one vocabulary: what a client asks for, what easel keeps, what it announces.

Compatibility APIs translate into :class:`GenerationRequest` at the edge; everything behind
the edge (scheduler, store, worker, backends, storage) speaks only these models.
"""

from __future__ import annotations

import random
import time
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PREMIUM_PRIORITY = 10
"""The top priority tier; ``premium: true`` means this tier."""

MIN_PRIORITY = -10
MAX_SEED = 2**32 - 1

JSONValue = str | int | float | bool | None | list[Any] | dict[str, Any]


# Seeded from os.urandom once. Ids and seeds need to be unique, not secret: access to a
# job is decided by its owner, never by knowing its id.
_random = random.Random()


def new_job_id() -> str:
    """Time-ordered ids: listing by id is listing by arrival."""
    return f"{time.time_ns() // 1_000_000:012x}{_random.getrandbits(64):016x}"


def random_seed() -> int:
    return _random.randrange(MAX_SEED + 1)


class JobKind(StrEnum):
    txt2img = "txt2img"
    img2img = "img2img"


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.running, JobState.cancelled, JobState.failed}),
    # running -> queued is a requeue (lease lost, worker stopping, transient error)
    JobState.running: frozenset(
        {JobState.queued, JobState.succeeded, JobState.failed, JobState.cancelled}
    ),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}


class GenerationRequest(BaseModel):
    """Everything needed to run, queue and reproduce one generation."""

    model_config = ConfigDict(extra="forbid")

    kind: JobKind = JobKind.txt2img
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    width: int = Field(default=512, gt=0)
    height: int = Field(default=512, gt=0)
    steps: int = Field(default=20, gt=0)
    cfg_scale: float = Field(default=7.0, ge=0, le=50)
    scheduler: str | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    strength: float = Field(default=0.75, ge=0, le=1)
    init_image: str | None = Field(
        default=None, description="Base64 PNG/JPEG/WebP (a data: URL is accepted); img2img only."
    )
    batch_size: int = Field(default=1, gt=0)
    model: str | None = None
    backend: str | None = None
    user_id: str = Field(default="anonymous", min_length=1, max_length=200)
    priority: int = Field(default=0, ge=MIN_PRIORITY, le=PREMIUM_PRIORITY)
    premium: bool = Field(default=False, description="Shorthand for the top priority tier.")
    max_user_queue_size: int | None = Field(default=None, gt=0)
    metadata: dict[str, JSONValue] = Field(default_factory=dict)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (got {value}); try {value - value % 8 or 8}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.premium:
            self.priority = PREMIUM_PRIORITY
        if self.init_image is not None and self.kind is JobKind.txt2img:
            if "kind" in self.model_fields_set:
                raise ValueError("init_image is only used by img2img; set kind to img2img")
            self.kind = JobKind.img2img
        if self.kind is JobKind.img2img and not self.init_image:
            raise ValueError("img2img needs init_image (base64 PNG, JPEG or WebP)")
        return self

    @property
    def seeds(self) -> list[int]:
        """One seed per image: image i of a batch is reproducible alone with seed + i."""
        base = self.seed if self.seed is not None else 0
        return [(base + i) % (MAX_SEED + 1) for i in range(self.batch_size)]

    @property
    def cost(self) -> float:
        """Work units, proportional to the time a diffusion run takes."""
        return self.steps * self.width * self.height * self.batch_size / 1e6


class ImageRef(BaseModel):
    """Where a result lives; ``path`` is relative to the server's output dir."""

    index: int
    seed: int
    width: int
    height: int
    path: str
    url: str


class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    id: str = Field(default_factory=new_job_id)
    request: GenerationRequest
    state: JobState = JobState.queued
    backend: str = Field(description="The backend chosen at admission.")
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = Field(default=0, description="Runs started, including the current one.")
    worker_id: str | None = None
    images: list[ImageRef] = Field(default_factory=list)
    error: JobError | None = None

    @property
    def user_id(self) -> str:
        return self.request.user_id


class JobView(Job):
    """A job as the API shows it: the record plus where it stands in the queue."""

    position: int | None = Field(
        default=None, description="Jobs that run before this one (0: next); queued jobs only."
    )
    eta_seconds: float | None = Field(
        default=None, description="Expected seconds until done, from measured run times."
    )
    average_seconds: float | None = Field(
        default=None, description="Measured average run time of jobs like this one."
    )


class EventType(StrEnum):
    queued = "queued"
    started = "started"
    progress = "progress"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Event(BaseModel):
    """One change of one job. ``id`` orders all events of a bus; resume after it."""

    id: int = 0
    type: EventType
    job_id: str
    user_id: str
    at: float = Field(default_factory=time.time)
    step: int | None = None
    total: int | None = None
    position: int | None = None
    eta_seconds: float | None = None
    average_seconds: float | None = None
    images: list[ImageRef] | None = None
    error: JobError | None = None
    preview: str | None = Field(default=None, description="Base64 JPEG of the work so far.")

    @classmethod
    def of(cls, job: Job, type: EventType, **fields: Any) -> Event:
        return cls(type=type, job_id=job.id, user_id=job.user_id, **fields)
