"""The durable job store: one small interface, one contract suite (``tests/test_store.py``).

A store persists job records and leases atomically; it asks :mod:`easel.queue.scheduler` which
queued job to hand out. It never publishes events: the runtime announces what a store
call changed, so every store gets the same events for free.

Promises every implementation keeps:
- ``enqueue`` returns only once the job is durable (the API answers 2xx after it);
- ``claim`` hands a job to exactly one worker and records a lease that the worker renews
  with ``heartbeat``; ``expire_leases`` puts jobs of silent workers back;
- a run counts as an attempt when claimed; a job put back with no attempts left ends
  ``failed`` with the reason given;
- final states never change again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from functools import cache
from typing import Any

from pydantic import TypeAdapter

from easel.errors import WorkerLost
from easel.jobs import Attempt, AudioRef, ImageRef, Job, JobError, JobState
from easel.queue.estimates import KEEP
from easel.queue.estimates import Timing as Timing  # the store keeps them
from easel.queue.estimates import Timings as Timings
from easel.queue.scheduler import Entry, Place, QueueStats

WORKER_LOST = JobError(
    code=WorkerLost.code, message="the worker running this job stopped answering too many times"
)


ANNOTATIONS = frozenset({"images", "audio", "upload_error", "webhook"})
"""Job fields written after the store settled the job (or beside its run): the S3 upload's
results or error, the webhook's delivery state. They never change the job's state."""


@cache
def _adapter(key: str) -> TypeAdapter[Any]:
    field: Any = Job.model_fields[key].annotation
    return TypeAdapter(field)


def annotation_json(key: str, value: Any) -> str:
    """One annotation as JSON, checked against the :class:`Job` field it sets."""
    if key not in ANNOTATIONS:
        raise ValueError(f"{key!r} is not a job annotation; known: {sorted(ANNOTATIONS)}")
    adapter = _adapter(key)
    return adapter.dump_json(adapter.validate_python(value)).decode()


def with_annotations(job: Job, notes: dict[str, str]) -> Job:
    """``job`` with stored annotations (key -> JSON) laid over its record."""
    update = {
        key: _adapter(key).validate_json(raw) for key, raw in notes.items() if key in ANNOTATIONS
    }
    return job.model_copy(update=update) if update else job


TIMINGS_KEEP = KEEP
"""Samples a store keeps per timing key (the most recent): as many as ETAs use."""


class JobStore(ABC):
    max_attempts: int = 3

    async def open(self) -> None:
        """Connect and repair what a crash left behind."""

    async def close(self) -> None:
        """Flush and disconnect."""

    @abstractmethod
    async def enqueue(self, job: Job, *, user_cap: int, idempotency_key: str | None = None) -> Job:
        """Make ``job`` durable and queued; raise ``UserQueueFull`` past ``user_cap`` and
        ``QueueFull`` past the store's size. A key the same user sent before (within a day)
        returns the job it made instead of a new one."""

    @abstractmethod
    async def known(self, service: str | None, user_id: str, idempotency_key: str) -> Job | None:
        """The job this key made for (service, user) within a day, if any: admission asks
        before any cap of its own, so a resend is answered whatever the caps."""

    @abstractmethod
    async def claim_batch(
        self, worker_id: str, routes: Collection[str], *, lease_seconds: float, limit: int = 1
    ) -> list[Job]:
        """Lease the next job for a worker serving ``routes`` and, up to ``limit``, the
        compatible jobs right behind it (same batch key); empty when none is queued."""

    async def claim(
        self, worker_id: str, routes: Collection[str], *, lease_seconds: float
    ) -> Job | None:
        """Lease the next job for a worker serving ``routes``; None when none is queued."""
        jobs = await self.claim_batch(worker_id, routes, lease_seconds=lease_seconds)
        return jobs[0] if jobs else None

    @abstractmethod
    async def heartbeat(self, job_id: str, worker_id: str, *, lease_seconds: float) -> bool:
        """Extend a lease; False when the worker no longer holds it (cancelled, expired)."""

    @abstractmethod
    async def complete(
        self,
        job_id: str,
        worker_id: str,
        images: list[ImageRef],
        *,
        audio: list[AudioRef] | None = None,
        run: Attempt | None = None,
    ) -> Job:
        """Running -> succeeded with its results; ``LeaseLost`` if the worker no longer
        holds the job. ``run`` (here and in ``fail``/``requeue``) is appended to the job's
        ``runs`` in the same write as the outcome."""

    @abstractmethod
    async def fail(
        self,
        job_id: str,
        error: JobError,
        *,
        worker_id: str | None = None,
        run: Attempt | None = None,
    ) -> Job:
        """Queued or running -> failed; with ``worker_id``, only if that worker holds it."""

    @abstractmethod
    async def requeue(
        self,
        job_id: str,
        *,
        worker_id: str | None = None,
        spend_attempt: bool = True,
        reason: JobError = WORKER_LOST,
        delay: float = 0.0,
        run: Attempt | None = None,
    ) -> Job:
        """Running -> queued (claimable after ``delay`` seconds), or failed with ``reason``
        when no attempt is left."""

    @abstractmethod
    async def cancel(self, job_id: str) -> Job:
        """Queued or running -> cancelled; ``JobFinished`` when it already ended."""

    @abstractmethod
    async def annotate(self, job_id: str, **fields: Any) -> None:
        """Lay ``fields`` (keys from :data:`ANNOTATIONS`) over the job's record, durably:
        every later ``get``/``list_jobs`` in any process shows them, after a restart too.
        Never changes the job's state; ``JobNotFound`` when there is no such job."""

    @abstractmethod
    async def get(self, job_id: str) -> Job:
        """The job, or ``JobNotFound``."""

    @abstractmethod
    async def list_jobs(
        self,
        *,
        user_id: str | None = None,
        state: JobState | None = None,
        limit: int = 100,
        service: str | None = None,
        text: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: str | None = None,
    ) -> list[Job]:
        """Newest first, filtered inside the store's query (never by over-fetching):
        ``service`` owns them, ``text`` is in the prompt (case-insensitive), ``model``
        is the requested model, created in ``[since, until)``; ``before`` is a job id,
        the cursor of the next page (jobs that arrived before it)."""

    @abstractmethod
    async def move(self, job_id: str, *, front: bool) -> Job:
        """Put a queued job first (or last) in line of its tier; ``JobNotQueued`` when it
        is not waiting in line (running, ended, or held back for a retry)."""

    @abstractmethod
    async def place(self, job_id: str) -> Place | None:
        """Where a queued job stands; None when it is not queued."""

    async def serving_order(self, limit: int) -> list[Entry] | None:
        """The first ``limit`` queued entries in the order they will be served (for ETA
        projections); None when the store cannot say (then ETAs use ``place``)."""
        return None

    @abstractmethod
    async def expire_leases(self) -> list[Job]:
        """Put back (or fail) running jobs whose lease ran out; return the jobs changed."""

    @abstractmethod
    async def active_count(self, user_id: str, service: str | None = None) -> int:
        """Queued plus running jobs of one service's user (the cap's count)."""

    @abstractmethod
    async def service_active_count(self, service: str) -> int:
        """Queued plus running jobs of a service (its ``service_max_active`` cap), counted
        in the store so that every replica sees the same number."""

    @abstractmethod
    async def stats(self) -> QueueStats:
        """Counts for ``GET /v1/queue``; ``users`` per account (``service/user``, see
        :func:`easel.queue.scheduler.account`)."""

    @abstractmethod
    async def reroute(self, job_id: str, backend: str) -> Job | None:
        """Move a queued job to another backend's line (fallback, a backend down, an idle
        backend taking work), keeping its place in the fair order; None when it is no
        longer queued (claimed, finished) or waits for a retry's backoff."""

    @abstractmethod
    async def backlog(self) -> dict[str, float]:
        """Queued work (``GenerationRequest.cost`` units) per backend, for routing."""

    @abstractmethod
    async def record_timings(self, samples: Sequence[Timing]) -> None:
        """Keep measured times, the last ``TIMINGS_KEEP`` per ``(kind, key)``, shared by
        every process of the deployment (so every replica gives the same ETA)."""

    @abstractmethod
    async def timings(self, known: int | None = None) -> Timings | None:
        """Every kept sample; None when nothing was recorded since version ``known``."""

    @abstractmethod
    async def get_setting(self, scope: str, key: str) -> str | None:
        """A setting a user chose (A1111's ``/options`` model, per service: ``scope``), as
        stored by :meth:`put_setting`; None when never set. Kept in the store so that every
        replica, and a restarted server, answers the same."""

    @abstractmethod
    async def put_setting(self, scope: str, key: str, value: str) -> None:
        """Set (replace) one setting of ``scope``, durably, for every process."""

    async def lead(self, duty: str, holder: str, seconds: float) -> bool:
        """Whether ``holder`` does ``duty`` for the deployment for the next ``seconds``
        (taken if free or its own, renewed); one process per duty, so a deployment's
        processes do not each do it. A store owned by one process: always."""
        return True
