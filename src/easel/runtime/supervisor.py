"""The supervisor of a runtime's background work: its workers and its extensions.

Workers run under :func:`keep_running`, so a store or bus outage stops nothing for good:
they reconnect with jittered backoff. Extensions (``runtime/extensions.py``) start after
the workers and stop after them, newest first, so that webhooks and uploads still see the
last jobs' final events. Stopping gives running jobs ``grace`` seconds, then puts back
what did not finish without spending an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from easel.errors import EaselError
from easel.events.bus import EventBus
from easel.jobs import Event, EventType
from easel.queue.backoff import retry_delay
from easel.runtime.extensions import Extension
from easel.runtime.worker import Worker
from easel.store.base import JobStore

log = logging.getLogger("easel")
_RECONNECT_CAP_SECONDS = 10.0


async def keep_running(worker: Worker) -> int:
    """``worker.run()``, started again after a store or bus outage until it is stopped."""
    done = failures = 0
    while True:
        began = time.monotonic()
        try:
            return done + await worker.run()
        except Exception as exc:
            if worker.stopping:
                return done
            if time.monotonic() - began > _RECONNECT_CAP_SECONDS:
                failures = 0  # it ran fine for a while: this is a new outage
            failures += 1
            delay = retry_delay(failures, base=0.2, cap=_RECONNECT_CAP_SECONDS)
            if isinstance(exc, EaselError):
                log.warning("worker %s: %s; reconnecting in %.1fs", worker.id, exc.message, delay)
            else:
                log.exception("worker %s crashed; restarting in %.1fs", worker.id, delay)
            await asyncio.sleep(delay)


class Supervisor:
    def __init__(self, store: JobStore, bus: EventBus) -> None:
        self.store = store
        self.bus = bus
        self.workers: list[Worker] = []
        self.extensions: list[Extension] = []
        self._tasks: list[asyncio.Task[int]] = []  # one per worker

    def run_workers(self, workers: Iterable[Worker]) -> None:
        for worker in workers:
            self.workers.append(worker)
            self._tasks.append(asyncio.create_task(keep_running(worker), name=f"easel-{worker.id}"))

    async def start_extensions(self, extensions: Iterable[Extension]) -> None:
        """Start each extension whose events this process's bus carries; say which not."""
        carried = self.bus.topics
        for extension in extensions:
            if extension.follows and carried is not None and not extension.follows <= carried:
                log.info(
                    "%s: not started here; this process's bus carries only %s events",
                    extension.name, ", ".join(sorted(carried)),
                )  # fmt: skip
                continue
            await extension.start()
            self.extensions.append(extension)

    async def stop(self, grace: float) -> None:
        """Stop claiming, give running jobs ``grace`` seconds, put the rest back unspent;
        then stop the extensions, newest first."""
        await self.stop_workers(grace)
        for extension in reversed(self.extensions):
            try:
                await extension.stop(grace)
            except Exception:
                log.exception("%s did not stop cleanly", extension.name)
        self.extensions.clear()
        self.workers.clear()  # after the extensions: the registry's says they left

    async def stop_workers(self, grace: float) -> None:
        """Stop claiming, give running jobs ``grace`` seconds, put the rest back unspent
        (their final events are out when this returns). Once stopped, returns at once."""
        for worker in self.workers:
            worker.stop()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for worker in self.workers:
                for job in worker.current:
                    with contextlib.suppress(Exception):
                        back = await self.store.requeue(
                            job.id, worker_id=worker.id, spend_attempt=False
                        )
                        await self.bus.publish(Event.of(back, EventType.queued))
                worker.cancel_current()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
