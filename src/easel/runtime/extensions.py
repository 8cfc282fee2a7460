"""Side effects with one lifecycle: start, stop, and the event types each one follows.

Metrics, the gate's per-service slots, webhooks, uploads, the lease reaper, registry
heartbeats and cross-process wake-ups all hang off the same small interface, so the
composition root (``runtime/compose.py``) lists them in one place and the supervisor
(``runtime/supervisor.py``) starts and stops them alike. An extension that follows events
says which: in a process whose bus carries only some topics (``easel worker`` reads only
``queued`` and ``cancelled``), one that needs others is not started, and the log says so,
instead of waiting forever for events that never come.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from easel.backends.base import executor_capabilities, sampler_capabilities
from easel.constants import WORKER_TTL_BEATS
from easel.effects.deliveries import DELIVERED_TYPES
from easel.effects.metrics import Metrics
from easel.effects.webhooks import Webhooks
from easel.errors import EaselError, StoreUnavailable
from easel.events.bus import EventBus
from easel.jobs import EVENT_FOR_STATE, FINAL_EVENTS, Event, EventType, Phase
from easel.results.s3 import Uploads
from easel.runtime.registry import WorkerInfo, WorkerRegistry
from easel.safety.gate import Gate
from easel.store.base import JobStore

if TYPE_CHECKING:
    from easel.runtime.fleet import Fleet
    from easel.runtime.worker import Doorbell, Worker

log = logging.getLogger("easel")
job_log = logging.getLogger("easel.jobs")
_HOST = socket.gethostname()

ALL_EVENTS: frozenset[EventType] = frozenset(EventType)


class Extension:
    """One side effect of the runtime. ``follows``: the event types it reads from the bus
    (empty: none). ``start`` may spawn tasks; ``stop`` ends them within ``grace`` seconds."""

    name: str = "extension"
    follows: frozenset[EventType] = frozenset()

    async def start(self) -> None:
        """Begin (after the store, bus and backends are open, and the workers started)."""

    async def stop(self, grace: float) -> None:
        """End (after the workers stopped, before the store and bus close)."""


class _Loop(Extension, ABC):
    """An extension that is one background task. It stops on a flag as well as on cancel:
    on CPython < 3.12 a cancel landing as a Redis reply arrives can be swallowed (gh-86296)."""

    def __init__(self) -> None:
        self.stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.stopping = False
        self._task = asyncio.create_task(self.run(), name=f"easel-{self.name}")

    async def stop(self, grace: float) -> None:
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=max(grace, 0.1))
            self._task = None

    @abstractmethod
    async def run(self) -> None: ...


class Follower(_Loop):
    """Reads the bus (``follows`` only) and hands each event to ``on_event``."""

    def __init__(self, bus: EventBus) -> None:
        super().__init__()
        self.bus = bus

    async def run(self) -> None:
        while not self.stopping:
            try:
                async with self.bus.subscribe(types=self.follows) as events:
                    async for event in events:
                        await self.on_event(event)
            except EaselError as exc:
                log.warning("%s: not following events for now: %s", self.name, exc.message)
            await asyncio.sleep(1.0)  # the subscription ended (fell behind, bus closing)

    @abstractmethod
    async def on_event(self, event: Event) -> None: ...


class MetricsFollower(Follower):
    """Prometheus counters and histograms from every event, labelled from the job record
    (a job submitted through another replica has the same labels as one of this one's)."""

    name = "metrics"
    follows = ALL_EVENTS

    def __init__(self, metrics: Metrics, bus: EventBus, store: JobStore) -> None:
        super().__init__(bus)
        self.metrics = metrics
        self.store = store

    async def on_event(self, event: Event) -> None:
        if event.type is not EventType.progress and not self.metrics.knows(event.job_id):
            try:
                job = await self.store.get(event.job_id)
            except EaselError:
                pass  # gone or the store is down: counted as "unknown"
            else:
                queued_at = None if event.type is EventType.queued else job.created_at
                self.metrics.label(job.id, job.backend, job.request.model, queued_at=queued_at)
        self.metrics.observe(event)


class GateClose(Extension):
    """Closes the gate's moderation client (a service's active jobs are counted by the
    store, so no slot needs freeing here)."""

    name = "gate"

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def stop(self, grace: float) -> None:
        await self.gate.close()


class WakeOnQueued(Follower):
    """A job queued by another process wakes this one's idle workers at once."""

    name = "wake"
    follows = frozenset({EventType.queued})

    def __init__(self, bus: EventBus, doorbell: Doorbell) -> None:
        super().__init__(bus)
        self.doorbell = doorbell

    async def on_event(self, event: Event) -> None:
        self.doorbell.set()  # the same ring a local submit() gives


class JobLog(Follower):
    """One log line per job state change (queued, started, succeeded, failed, cancelled):
    what ``easel serve`` prints, as text or JSON (``log_format``), with the job, user and
    service ids as fields of their own. Prompts stay out of the log."""

    name = "job-log"
    follows = frozenset({EventType.queued, EventType.started, *FINAL_EVENTS})

    async def on_event(self, event: Event) -> None:
        job_log.info(
            "job %s %s%s",
            event.job_id,
            event.type.value,
            _detail(event),
            extra={"job_id": event.job_id, "user_id": event.user_id, "service": event.service},
        )


def _detail(event: Event) -> str:
    if event.type is EventType.queued and event.position is not None:
        eta = f", eta {event.eta_seconds:.0f}s" if event.eta_seconds is not None else ""
        return f" (position {event.position}{eta})"
    if event.type is EventType.started and event.phase is Phase.loading_model:
        return f" (loading model {event.model})"
    if event.type is EventType.succeeded:
        files = len(event.images or ()) + len(event.audio or ())
        return f" ({files} file{'s' if files != 1 else ''})"
    if event.type is EventType.failed and event.error is not None:
        return f" ({event.error.code}: {event.error.message})"
    return ""


class FleetUpkeep(Extension):
    """Health checks and breakers of this process's backends, and jobs moved off down
    backends or to idle ones (``runtime/fleet.py``); a move rings the doorbell."""

    name = "fleet"

    def __init__(self, fleet: Fleet, doorbell: Doorbell) -> None:
        self.fleet, self.doorbell = fleet, doorbell
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.fleet.tend(self.doorbell.set), name="easel-fleet")

    async def stop(self, grace: float) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class WebhookDelivery(Extension):
    """Signed POSTs of each job's events to the URL it named."""

    name = "webhooks"
    follows = DELIVERED_TYPES

    def __init__(self, webhooks: Webhooks) -> None:
        self.webhooks = webhooks

    async def start(self) -> None:
        await self.webhooks.start()

    async def stop(self, grace: float) -> None:
        await self.webhooks.close()


class UploadFlush(Extension):
    """Uploads to S3 run in the background; stopping gives those in flight ``grace``."""

    name = "uploads"

    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads

    async def stop(self, grace: float) -> None:
        await self.uploads.close(grace)


class LeaseReaper(_Loop):
    """Puts back jobs whose worker stopped renewing its lease (a hung or killed worker).

    A store outage silences every worker's heartbeats at once, so right after one every
    lease looks run out: the reaper then waits one more lease before it reaps, and the
    workers, alive all along, renew their leases (or commit their results) first. Only
    the jobs of workers that really went away are put back, a lease later.
    """

    name = "reaper"

    def __init__(
        self, store: JobStore, bus: EventBus, doorbell: Doorbell, lease_seconds: float
    ) -> None:
        super().__init__()
        self.store, self.bus, self.doorbell = store, bus, doorbell
        self.lease_seconds = lease_seconds
        self.interval = max(lease_seconds / 2, 0.5)

    async def run(self) -> None:
        outage = False
        while not self.stopping:
            await asyncio.sleep(self.interval)
            try:
                if outage:
                    await self.store.stats()  # back? then give the workers a lease
                    outage = False
                    log.info("the store is back; leases are reaped again in %.1fs",
                             self.lease_seconds)  # fmt: skip
                    await asyncio.sleep(self.lease_seconds)
                for job in await self.store.expire_leases():
                    type = EVENT_FOR_STATE[job.state]
                    await self.bus.publish(Event.of(job, type, error=job.error))
                    self.doorbell.set()
            except StoreUnavailable as exc:
                outage = True
                log.warning("could not expire leases (%s); trying again in %.1fs",
                            exc.message, self.interval)  # fmt: skip
            except Exception:
                log.exception("could not expire leases; trying again in %.0fs", self.interval)


class RegistryBeats(_Loop):
    """Heartbeats of this process's workers in the registry (``GET /v1/workers``); job
    leases have their own, in the worker. Stopping removes the workers from the registry."""

    name = "worker-beats"

    def __init__(
        self,
        registry: WorkerRegistry,
        workers: Callable[[], Sequence[Worker]],
        interval: float,
    ) -> None:
        super().__init__()
        self.registry, self.workers, self.interval = registry, workers, interval
        self.started = time.time()

    async def run(self) -> None:
        while not self.stopping:
            for worker in list(self.workers()):
                try:
                    info = info_of(worker, self.started)
                    await self.registry.beat(info, self.interval * WORKER_TTL_BEATS)
                except EaselError as exc:
                    log.warning("worker heartbeat not recorded: %s", exc.message)
            await asyncio.sleep(self.interval)

    async def stop(self, grace: float) -> None:
        await super().stop(grace)
        for worker in self.workers():
            try:
                await self.registry.remove(worker.id)
            except EaselError as exc:
                log.warning("could not unregister worker %s: %s", worker.id, exc.message)


def info_of(worker: Worker, started_at: float) -> WorkerInfo:
    """What a worker advertises: enough for an API-only replica to admit and route by it."""
    backend = worker.backend
    fleet = worker.fleet
    member = fleet.members.get(backend.name) if fleet is not None else None
    if member is not None:
        served, loaded = member.models()
        capabilities = sorted(member.capabilities | sampler_capabilities(backend))
    else:
        pipelines = [model for model in backend.models() if model.kind == "pipeline"]
        served = frozenset(model.name for model in pipelines)
        loaded = frozenset(model.name for model in pipelines if model.loaded)
        capabilities = sorted(
            {str(c) for c in backend.capabilities}
            | executor_capabilities(backend.executors)
            | sampler_capabilities(backend)
        )
    return WorkerInfo(
        id=worker.id,
        backend=backend.name,
        models=sorted(served),
        capabilities=capabilities,
        current_jobs=[job.id for job in worker.current],
        host=_HOST,
        pid=os.getpid(),
        started_at=started_at,
        kind=member.spec.kind if member is not None else "",
        tags=list(member.spec.tags) if member is not None else [],
        loaded=sorted(loaded),
        state=member.breaker.state.value if member is not None else "up",
        speed=member.speed if member is not None else None,
        last_error=member.breaker.last_error if member is not None else None,
    )
