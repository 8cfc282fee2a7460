"""The worker: lease a job, run its backend, store the result, then announce it.

Order matters and is kept for every job: ``started``, ``progress`` 1..N, then exactly one
of ``succeeded`` / ``failed``; results are on disk before ``succeeded`` is published and
the final store write runs under ``asyncio.shield`` so a cancel cannot half-write it.
A cancelled job (``cancelled`` on the bus, or a lost lease) stops at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterable

from PIL.Image import Image

from easel.backends.base import Backend, RunContext
from easel.errors import Cancelled, EaselError, GenerationError, JobFinished, LeaseLost
from easel.events import EventBus
from easel.jobs import Event, EventType, ImageRef, Job, JobError
from easel.scheduler import RunTimes
from easel.storage import LocalStorage
from easel.store.base import JobStore

log = logging.getLogger("easel.worker")


class Worker:
    def __init__(
        self,
        *,
        store: JobStore,
        bus: EventBus,
        backend: Backend,
        storage: LocalStorage,
        run_times: RunTimes | None = None,
        worker_id: str | None = None,
        lease_seconds: float = 30.0,
        heartbeat_seconds: float = 5.0,
        poll_seconds: float = 1.0,
        wakeup: asyncio.Event | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.backend = backend
        self.storage = storage
        self.run_times = run_times or RunTimes()
        self.id = worker_id or f"{backend.name}-{uuid.uuid4().hex[:8]}"
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.wakeup = wakeup or asyncio.Event()
        self.current: Job | None = None
        self._cancel = threading.Event()
        self._stopping = False

    async def run(self, *, burst: bool = False) -> int:
        """Process jobs until stopped (``burst``: until the queue is empty); returns jobs run."""
        done = 0
        async with self.bus.subscribe(types={EventType.cancelled}) as cancellations:
            watcher = asyncio.create_task(self._watch(cancellations))
            try:
                while not self._stopping:
                    self.wakeup.clear()
                    job = await self.store.claim(
                        self.id, [self.backend.name], lease_seconds=self.lease_seconds
                    )
                    if job is None:
                        if burst:
                            break
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.wakeup.wait(), self.poll_seconds)
                        continue
                    await self.process(job)
                    done += 1
            finally:
                watcher.cancel()
        return done

    def stop(self) -> None:
        """Stop claiming; the job in hand finishes (or is cancelled by the caller)."""
        self._stopping = True
        self.wakeup.set()

    def cancel_current(self) -> None:
        self._cancel.set()

    async def _watch(self, cancellations: AsyncIterable[Event]) -> None:
        async for event in cancellations:
            if self.current is not None and event.job_id == self.current.id:
                self._cancel.set()

    async def process(self, job: Job) -> None:
        """Run one claimed job to its end; never raises for the job's own failures."""
        self.current = job
        self._cancel = threading.Event()
        await self.bus.publish(Event.of(job, EventType.started))
        heartbeat = asyncio.create_task(self._heartbeat(job))
        began = time.monotonic()
        try:
            images = await self._run(job)
            finished = await asyncio.shield(self.store.complete(job.id, self.id, images))
        except (Cancelled, LeaseLost, JobFinished):
            log.info("job %s stopped: cancelled or no longer ours", job.id)
        except EaselError as exc:
            await self._fail(job, JobError(code=exc.code, message=exc.message))
        except Exception as exc:
            log.exception("job %s failed in backend %s", job.id, self.backend.name)
            message = f"{type(exc).__name__}: {exc}"
            await self._fail(job, JobError(code=GenerationError.code, message=message))
        else:
            self.run_times.observe(job.backend, job.request.cost, time.monotonic() - began)
            await self.bus.publish(Event.of(finished, EventType.succeeded, images=finished.images))
        finally:
            heartbeat.cancel()
            self.current = None

    async def _run(self, job: Job) -> list[ImageRef]:
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[Event | None] = asyncio.Queue()

        def on_progress(step: int, total: int, preview: Image | None) -> None:
            event = Event.of(job, EventType.progress, step=step, total=total)
            if preview is not None:
                event.preview = _jpeg_base64(preview)
            loop.call_soon_threadsafe(pending.put_nowait, event)

        async def pump() -> None:
            while (event := await pending.get()) is not None:
                await self.bus.publish(event)

        publisher = asyncio.create_task(pump())
        try:
            context = RunContext(on_progress=on_progress, cancel_event=self._cancel)
            result = await self.backend.generate(job.request, context)
        finally:
            # progress scheduled from the thread is queued before the sentinel: order is kept
            pending.put_nowait(None)
            await publisher
        if self._cancel.is_set():
            raise Cancelled("the job was cancelled")
        return await asyncio.to_thread(self.storage.save, job, result)

    async def _fail(self, job: Job, error: JobError) -> None:
        try:
            failed = await asyncio.shield(self.store.fail(job.id, error, worker_id=self.id))
        except (LeaseLost, JobFinished):
            return
        await self.bus.publish(Event.of(failed, EventType.failed, error=error))

    async def _heartbeat(self, job: Job) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            held = await self.store.heartbeat(job.id, self.id, lease_seconds=self.lease_seconds)
            if not held:
                self._cancel.set()
                return


def _jpeg_base64(image: Image, max_side: int = 256) -> str:
    preview = image.copy()
    preview.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    preview.convert("RGB").save(buffer, "JPEG", quality=70)
    return base64.b64encode(buffer.getvalue()).decode()
