"""The composition root: every part of a runtime, chosen from its settings, in one place.

Embedded (no ``redis_url``): the SQLite store, the in-process bus, a local registry.
Scaled out: all three on one Redis, so any number of ``easel serve`` and ``easel worker``
processes share one queue. Each part is built here and handed its collaborators
explicitly; nothing else in the runtime decides which implementation to use. The side
effects are listed in :func:`extensions_for`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from easel.backends.base import Backend
from easel.config import Settings
from easel.effects.deliveries import DeliveryQueue, RedisDeliveries, SqliteDeliveries
from easel.effects.metrics import Metrics
from easel.effects.webhooks import Webhooks
from easel.events.bus import EventBus, InProcessEventBus
from easel.events.redis import RedisEventBus
from easel.fleet import fleet_of
from easel.jobs import EventType
from easel.queue.run_times import RunTimes
from easel.queue.scheduler import Policy
from easel.results.clap import ClapScorer
from easel.results.files import LocalStorage
from easel.results.s3 import S3Store, Uploads
from easel.runtime._finisher import set_results_priority
from easel.runtime.extensions import (
    Extension,
    FleetUpkeep,
    GateClose,
    JobLog,
    LeaseReaper,
    MetricsFollower,
    RegistryBeats,
    UploadFlush,
    WakeOnQueued,
    WebhookDelivery,
    job_log,
)
from easel.runtime.fleet import Fleet, build_backends
from easel.runtime.registry import LocalRegistry, RedisRegistry, WorkerRegistry
from easel.runtime.worker import Doorbell, Worker, WorkerOptions, WorkerParts
from easel.safety.gate import Gate
from easel.store.base import JobStore
from easel.store.redis import RedisStore
from easel.store.sqlite import SqliteStore


@dataclass
class Parts:
    """Everything a runtime is made of (see :func:`assemble`)."""

    settings: Settings
    backends: dict[str, Backend]
    default_backend: str
    store: JobStore
    bus: EventBus
    registry: WorkerRegistry
    storage: LocalStorage
    run_times: RunTimes
    """Upload and webhook state, after a job is stored."""
    uploads: Uploads | None
    webhooks: Webhooks
    gate: Gate
    metrics: Metrics
    doorbell: Doorbell
    """Rung when a job is queued here (or, scaled out, anywhere): wakes one idle worker."""
    fleet: Fleet
    """The deployment's backends as this process sees them: routing, breakers, speeds."""


def assemble(
    settings: Settings,
    *,
    backends: Mapping[str, Backend] | None = None,
    store: JobStore | None = None,
    bus: EventBus | None = None,
    storage: LocalStorage | None = None,
) -> Parts:
    """The parts the settings ask for; a part passed in is used instead of building one."""
    specs = fleet_of(settings)
    if backends is None:
        # an API-only replica (scaled out, no workers) builds no backend at all: it admits
        # and routes by what the live workers advertise in the registry
        api_only = settings.redis_url is not None and settings.concurrency == 0
        backends = {} if api_only else build_backends(specs)
    fleet = Fleet(specs, dict(backends), settings.routing)
    built = fleet.backends
    default = (
        settings.resolved_backend
        if settings.resolved_backend in built or not built
        else next(iter(built))
    )
    store = store or store_from(settings)
    bus = bus or (redis_bus(settings) if settings.redis_url else InProcessEventBus())
    storage = storage or LocalStorage(settings.resolved_output_dir, settings.output)
    if settings.clap_model is not None and storage.scorer is None:
        storage.scorer = ClapScorer(settings.clap_model)
    registry = registry_for(settings)
    fleet.attach(store, registry, remote=settings.redis_url is not None)
    return Parts(
        settings=settings,
        backends=built,
        default_backend=default,
        store=store,
        bus=bus,
        registry=registry,
        storage=storage,
        run_times=RunTimes(),
        uploads=uploads_for(settings, storage, bus, store),
        webhooks=Webhooks(settings, bus, store, deliveries_for(settings, store)),
        gate=Gate(settings.safety, store),
        metrics=Metrics(),
        doorbell=Doorbell(),
        fleet=fleet,
    )


def extensions_for(parts: Parts, workers: Callable[[], Sequence[Worker]]) -> list[Extension]:
    """The runtime's side effects, in start order (they stop in reverse)."""
    settings = parts.settings
    extensions: list[Extension] = [
        LeaseReaper(parts.store, parts.bus, parts.doorbell, settings.lease_seconds),
        GateClose(parts.gate),
        MetricsFollower(parts.metrics, parts.bus, parts.store),
        RegistryBeats(parts.registry, workers, settings.heartbeat_seconds),
        FleetUpkeep(parts.fleet, parts.doorbell),
    ]
    if settings.webhook_allowed_hosts:
        extensions.append(WebhookDelivery(parts.webhooks))
    if parts.uploads is not None:
        extensions.append(UploadFlush(parts.uploads))
    if settings.redis_url is not None and workers():
        extensions.append(WakeOnQueued(parts.bus, parts.doorbell))
    if job_log.isEnabledFor(logging.INFO) and parts.bus.topics is None:
        # easel serve's log (an embedded run logs at warning); a worker's bus lacks the events
        extensions.append(JobLog(parts.bus))
    return extensions


def worker_for(parts: Parts, backend: Backend) -> Worker:
    settings = parts.settings
    set_results_priority(settings.results_nice)
    options = WorkerOptions(
        lease_seconds=settings.lease_seconds,
        heartbeat_seconds=settings.heartbeat_seconds,
        batch_limit=settings.batch_limit,
        retry_base_seconds=settings.retry_base_seconds,
        results_depth=settings.results_depth,
    )
    shared = WorkerParts(
        store=parts.store,
        bus=parts.bus,
        storage=parts.storage,
        run_times=parts.run_times,
        wakeup=parts.doorbell,
        uploads=parts.uploads,
        fleet=parts.fleet,
    )
    return Worker(backend, shared, options)


def store_from(settings: Settings) -> JobStore:
    if settings.redis_url:
        return redis_store(settings)
    return SqliteStore(
        settings.resolved_db_path,
        max_attempts=settings.max_attempts,
        policy=Policy(aging_seconds=settings.aging_seconds, weights=settings.user_weights),
        max_queue_size=settings.max_queue_size,
    )


def redis_store(settings: Settings) -> RedisStore:
    if settings.redis_url is None:
        raise ValueError("redis_store needs settings.redis_url")
    return RedisStore(
        settings.redis_url,
        prefix=settings.redis_prefix,
        max_attempts=settings.max_attempts,
        policy=Policy(aging_seconds=settings.aging_seconds, weights=settings.user_weights),
        max_queue_size=settings.max_queue_size,
        retention_seconds=settings.retention_seconds,
        durability=settings.redis_durability,
        socket_timeout=settings.redis_socket_timeout,
    )


WORKER_TOPICS = frozenset({EventType.cancelled, EventType.queued})
"""All that a worker-only process listens to: cancellations and new work."""


def redis_bus(settings: Settings, *, workers_only: bool = False) -> RedisEventBus:
    """``workers_only``: a process without HTTP reads only the events its workers need."""
    if settings.redis_url is None:
        raise ValueError("redis_bus needs settings.redis_url")
    return RedisEventBus(
        settings.redis_url,
        prefix=settings.redis_prefix,
        maxlen=settings.event_stream_maxlen,
        socket_timeout=settings.redis_socket_timeout,
        topics=WORKER_TOPICS if workers_only else None,
    )


def registry_for(settings: Settings) -> WorkerRegistry:
    if settings.redis_url is None:
        return LocalRegistry()
    return RedisRegistry(
        settings.redis_url,
        prefix=settings.redis_prefix,
        socket_timeout=settings.redis_socket_timeout,
    )


async def open_parts(bus: EventBus, registry: WorkerRegistry) -> None:
    """What the ABCs do not open themselves (the stream reader starts at the stream's end)."""
    if isinstance(bus, RedisEventBus):
        await bus.open()
    await registry.open()


def deliveries_for(settings: Settings, store: JobStore) -> DeliveryQueue:
    """The durable webhook queue: the deployment's Redis, or a file beside the job db."""
    if settings.redis_url is not None:
        return RedisDeliveries(
            settings.redis_url,
            store,
            prefix=settings.redis_prefix,
            lease_seconds=2 * settings.webhook_timeout_seconds + 2,
            retention_seconds=settings.retention_seconds,
        )
    return SqliteDeliveries(settings.resolved_db_path.with_suffix(".webhooks.db"), store)


def uploads_for(
    settings: Settings, storage: LocalStorage, bus: EventBus, store: JobStore
) -> Uploads | None:
    if not settings.s3.bucket:
        return None
    return Uploads(S3Store(settings.s3), storage, bus, store)


def backends_from(settings: Settings) -> dict[str, Backend]:
    """The backends of the settings' fleet (the file's, or the one-entry fleet)."""
    return build_backends(fleet_of(settings))
