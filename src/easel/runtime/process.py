"""``easel worker``: a process that only runs jobs (no HTTP), on a GPU host, against Redis.

It is a :class:`~easel.runtime.facade.Runtime` whose workers claim from the shared queue. On
SIGTERM (or Ctrl-C) it stops claiming at once, gives the running jobs
``shutdown_grace_seconds`` to finish, and puts back those that did not without spending
an attempt. SIGKILL, a crash or a hang (SIGSTOP) is what leases are for: another process
puts the job back once its heartbeats stop. While Redis is unreachable at start it
retries with backoff; once running, its workers reconnect on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from easel.config import Settings
from easel.errors import EaselError
from easel.queue.backoff import retry_delay
from easel.runtime.compose import redis_bus
from easel.runtime.facade import Runtime

log = logging.getLogger("easel")


async def run_worker_process(settings: Settings) -> None:
    """Until SIGTERM/SIGINT; returns once the running jobs are finished or put back."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runtime = await _start(settings, stop)
    if runtime is None:
        return
    ids = ", ".join(worker.id for worker in runtime.workers)
    log.info("worker process ready: %s (store: %s)", ids, getattr(runtime.store, "durability", ""))
    await stop.wait()
    grace = settings.shutdown_grace_seconds
    log.info("stopping: no new jobs; running jobs get %.0fs to finish", grace)
    for worker in runtime.workers:
        worker.stop()  # at once, before anything else is awaited
    await runtime.stop(grace=grace)


async def _start(settings: Settings, stop: asyncio.Event) -> Runtime | None:
    failures = 0
    while not stop.is_set():
        runtime = Runtime(settings, bus=redis_bus(settings, workers_only=True))
        runtime.etas.announcing = False  # the API replicas announce ETA updates
        try:
            await runtime.start()
        except EaselError as exc:
            with contextlib.suppress(Exception):
                await runtime.stop(grace=0)
            failures += 1
            delay = retry_delay(failures, base=0.5, cap=10.0)
            log.warning("cannot start: %s; retrying in %.1fs", exc.message, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            continue
        return runtime
    return None
