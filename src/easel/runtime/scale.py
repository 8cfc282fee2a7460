"""The parts of a runtime chosen from its settings, and what keeps its workers going.

Embedded (no ``redis_url``): the SQLite store, the in-process bus, a dict of workers.
Scaled out: all three on one Redis, so any number of ``easel serve`` and ``easel worker``
processes share one queue. Workers run under :func:`keep_running`: a Redis outage stops
nothing for good; they reconnect with jittered backoff. Background loops beat for the
registry and, scaled out, wake idle workers when another process queues a job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from easel.config import Settings
from easel.constants import WORKER_TTL_BEATS
from easel.errors import EaselError
from easel.events.bus import EventBus
from easel.events.redis import RedisEventBus
from easel.jobs import EventType
from easel.queue.scheduler import Policy, retry_delay
from easel.runtime.registry import LocalRegistry, RedisRegistry, WorkerInfo, WorkerRegistry
from easel.runtime.worker import Worker
from easel.store.redis import RedisStore

if TYPE_CHECKING:
    from easel.runtime.facade import Runtime

log = logging.getLogger("easel")
_HOST = socket.gethostname()


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


async def keep_running(worker: Worker) -> int:
    """``worker.run()``, started again after a store or bus outage until it is stopped."""
    done = failures = 0
    while True:
        try:
            return done + await worker.run()
        except Exception as exc:
            if worker.stopping:
                return done
            failures += 1
            delay = retry_delay(failures, base=0.2, cap=10.0)
            if isinstance(exc, EaselError):
                log.warning("worker %s: %s; reconnecting in %.1fs", worker.id, exc.message, delay)
            else:
                log.exception("worker %s crashed; restarting in %.1fs", worker.id, delay)
            await asyncio.sleep(delay)


class Background:
    """The runtime's helper loops. They stop on a flag as well as on cancel: on CPython
    < 3.12 a cancel landing as a Redis reply arrives can be swallowed (gh-86296)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.stopping = False
        self.tasks = [asyncio.create_task(self._beat(), name="easel-worker-beats")]
        if runtime.settings.redis_url is not None and runtime.workers:
            self.tasks.append(asyncio.create_task(self._wake_on_queued(), name="easel-wake"))

    async def stop(self) -> None:
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        await asyncio.wait(self.tasks, timeout=self.runtime.settings.redis_socket_timeout)

    async def _beat(self) -> None:
        """Heartbeats for the registry (job leases have their own, in the worker)."""
        runtime = self.runtime
        interval = runtime.settings.heartbeat_seconds
        started = time.time()
        while not self.stopping:
            for worker in list(runtime.workers):
                try:
                    info = info_of(worker, started)
                    await runtime.registry.beat(info, interval * WORKER_TTL_BEATS)
                except EaselError as exc:
                    log.warning("worker heartbeat not recorded: %s", exc.message)
            await asyncio.sleep(interval)

    async def _wake_on_queued(self) -> None:
        """A job queued by another process wakes this one's idle workers at once."""
        runtime = self.runtime
        while not self.stopping:
            try:
                async with runtime.bus.subscribe(types={EventType.queued}) as queued:
                    async for _event in queued:
                        runtime._wakeup.set()  # the same event its submit() sets
            except EaselError as exc:
                log.warning("not woken by other processes' jobs for now: %s", exc.message)
            await asyncio.sleep(1.0)


def start_background(runtime: Runtime) -> Background:
    return Background(runtime)


async def stop_background(runtime: Runtime, background: Background | None) -> None:
    if background is not None:
        await background.stop()
    for worker in runtime.workers:
        try:
            await runtime.registry.remove(worker.id)
        except EaselError as exc:
            log.warning("could not unregister worker %s: %s", worker.id, exc.message)


def info_of(worker: Worker, started_at: float) -> WorkerInfo:
    backend = worker.backend
    return WorkerInfo(
        id=worker.id,
        backend=backend.name,
        models=[model.name for model in backend.models()],
        capabilities=sorted(backend.capabilities),
        current_jobs=[job.id for job in worker.current],
        host=_HOST,
        pid=os.getpid(),
        started_at=started_at,
    )
