"""The worker: lease jobs, run their backend, store the results, then announce them.

Order matters and is kept for every job: ``started``, ``progress`` 1..N, then exactly one
of ``succeeded`` / ``failed`` (or ``queued`` again for a retry). ``started`` has the phase
``loading_model`` when the backend loads the job's model first (not in memory there, or
being loaded ahead of it). Results are on disk before ``succeeded`` is published, and final
store writes run under ``asyncio.shield`` so a cancel cannot half-write them. A cancelled
job (``cancelled`` on the bus, or a lost lease) stops at the next step; in a batch, the
others go on. A store outage never fails a run: final writes and events wait for the store
to come back (:mod:`easel.runtime._outage`).

Results are finished off the backend's critical path (:mod:`easel.runtime._finisher`):
once a backend call returns, the worker starts its next job while the previous results
are encoded, written, committed and announced, ``results_depth`` calls at most; that next
job was claimed when the call reported its last step (:mod:`easel.runtime._ahead`), so
no store round trip separates two calls either.
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
from collections import deque
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL.Image import Image

from easel.backends.base import Backend, GenerationResult, RunContext
from easel.errors import (
    BackendUnavailable,
    Cancelled,
    EaselError,
    GenerationError,
    JobFinished,
    LeaseLost,
    StoreUnavailable,
)
from easel.events.bus import EventBus
from easel.jobs import (
    Attempt,
    AudioRef,
    Event,
    EventType,
    ImageRef,
    Job,
    JobError,
    JobState,
    Phase,
)
from easel.queue.backoff import retry_delay
from easel.queue.run_times import RunTimes
from easel.results.files import LocalStorage
from easel.results.s3 import Ref, Uploads
from easel.runtime._ahead import Ahead
from easel.runtime._finisher import Finisher, in_results_future, in_results_thread
from easel.runtime._outage import announce, try_announce, until_noted, until_stored
from easel.store.base import JobStore

if TYPE_CHECKING:
    from easel.runtime.fleet import Fleet

log = logging.getLogger("easel.runtime.worker")


class Doorbell:
    """Wakes ONE idle worker per ring. An ``asyncio.Event`` shared by the workers of a
    process would wake them all to race for the same job (one claim wins, the rest are
    wasted round trips to the store). A ring with nobody waiting is kept for the next."""

    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._pending = False

    def set(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._pending = True

    def clear(self) -> None:
        self._pending = False

    async def wait(self) -> None:
        if self._pending:
            self._pending = False
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.set()  # rung as we left (a timeout): pass the ring on
            raise


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker claims and runs jobs (``runtime/compose.py`` fills it from settings)."""

    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 1.0
    """Longest idle wait before looking at the queue again (a ring wakes it sooner)."""
    batch_limit: int = 1
    retry_base_seconds: float = 2.0
    results_depth: int = 2
    """Backend calls whose results may be in flight (encoding, writing) at once; above 0
    the next job is also claimed when the running call reports its last step."""


@dataclass
class _Held:
    """Claimed jobs, leased to this worker: their cancel flags and lease heartbeat."""

    jobs: list[Job]
    cancels: dict[str, threading.Event]
    heartbeat: asyncio.Task[None]


@dataclass
class WorkerParts:
    """What a worker works with, handed to it by the composition root."""

    store: JobStore
    bus: EventBus
    storage: LocalStorage
    run_times: RunTimes = field(default_factory=RunTimes)
    wakeup: Doorbell = field(default_factory=Doorbell)
    uploads: Uploads | None = None
    fleet: Fleet | None = None
    """Where the backend's breaker, speed and slots are kept; a job that fails
    transiently may move to another backend through it."""


class Worker:
    def __init__(
        self,
        backend: Backend,
        parts: WorkerParts,
        options: WorkerOptions | None = None,
        *,
        worker_id: str | None = None,
    ) -> None:
        options = options or WorkerOptions()
        self.options = options
        self.store = parts.store
        self.bus = parts.bus
        self.backend = backend
        self.storage = parts.storage
        self.run_times = parts.run_times
        self.id = worker_id or f"{backend.name}-{uuid.uuid4().hex[:8]}"
        self.lease_seconds = options.lease_seconds
        self.heartbeat_seconds = options.heartbeat_seconds
        self.poll_seconds = options.poll_seconds
        self.batch_limit = options.batch_limit if backend.batches else 1
        self.retry_base_seconds = options.retry_base_seconds
        self.wakeup = parts.wakeup
        self.uploads = parts.uploads
        self.finisher = Finisher(options.results_depth)
        self.fleet = parts.fleet
        member = self.fleet.members.get(backend.name) if self.fleet is not None else None
        self.job_timeout = member.spec.timeouts.job_seconds if member is not None else None
        self._running: list[Job] = []  # on the backend
        self._finishing: dict[str, Job] = {}  # results in flight
        self._ahead: Ahead[_Held] = Ahead(self._claim_ahead)
        self._held_ahead: list[Job] = []  # claimed ahead, not started
        self._cancels: dict[str, threading.Event] = {}
        self._notes: dict[str, asyncio.Task[None]] = {}  # notes waiting out a store outage
        self._stopping = False
        self.model: str | None = None
        """The model of the last run here: a run of another one loads it first."""
        self.cold = False
        """Whether the run on the backend now loads its model first."""
        self._ran = False
        self._ended: float | None = None  # when the last run ended, if busy ever since

    @property
    def running(self) -> list[Job]:
        """Jobs on the backend now."""
        return list(self._running)

    @property
    def ahead(self) -> list[Job]:
        """Jobs claimed ahead: they run next, after the jobs on the backend."""
        return list(self._held_ahead)

    @property
    def current(self) -> list[Job]:
        """Jobs this worker holds: claimed ahead, on the backend, or being finished."""
        return [*self._held_ahead, *self._running, *self._finishing.values()]

    async def run(self, *, burst: bool = False) -> int:
        """Process jobs until stopped (``burst``: until the queue is empty); returns jobs run."""
        done = 0
        async with self.bus.subscribe(types={EventType.cancelled}) as cancellations:
            watcher = asyncio.create_task(self._watch(cancellations))
            try:
                while not self._stopping:
                    self.wakeup.clear()
                    held = await self._ahead.take()
                    self._held_ahead = []
                    if held is None:
                        held = await self._claim()
                    if held is None:
                        self._ended = None  # idle: the next gap is not overhead
                        if burst:
                            break
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.wakeup.wait(), self.poll_seconds)
                        continue
                    await self.process(held.jobs, held)
                    done += len(held.jobs)
                await self._give_back(await self._ahead.take())
                await self.finisher.drain()
            except asyncio.CancelledError:
                if (ahead := self._ahead.cancel()) is not None:
                    ahead.heartbeat.cancel()  # left to its lease, like the rest
                self.finisher.cancel()  # leases expire: the jobs run again, or stay committed
                raise
            except Exception:
                await self.finisher.drain()  # a store outage: what is in flight ends first
                raise
            finally:
                watcher.cancel()
                await self._drop_notes()
        return done

    def stop(self) -> None:
        """Stop claiming; the jobs in hand finish (or are cancelled by the caller); a job
        claimed ahead goes back to the queue."""
        self._stopping = True
        self._ahead.now()
        self.wakeup.set()

    async def _claim(self) -> _Held | None:
        jobs = await self.store.claim_batch(
            self.id, [self.backend.name], lease_seconds=self.lease_seconds, limit=self.batch_limit
        )
        if not jobs:
            return None
        for job in jobs:
            if (stale := self._cancels.get(job.id)) is not None:
                stale.set()  # our earlier run of it lost its lease: its results are void
        cancels = {job.id: threading.Event() for job in jobs}
        self._cancels.update(cancels)
        return _Held(jobs, cancels, asyncio.create_task(self._heartbeat(jobs, cancels)))

    async def _claim_ahead(self) -> _Held | None:
        """The next job, claimed while the backend runs (see ``_ahead.py``)."""
        if self._stopping:
            return None
        held = await self._claim()
        if held is None:
            return None
        self._held_ahead = held.jobs
        try:
            for job in held.jobs:  # a cancel that landed between the claim and its flag
                try:
                    fresh = await self.store.get(job.id)
                except EaselError:
                    continue  # the heartbeat finds out soon enough
                if fresh.state is not JobState.running or fresh.worker_id != self.id:
                    held.cancels[job.id].set()
        except BaseException:
            held.heartbeat.cancel()  # abandoned (the worker is going down): leases expire
            raise
        return held

    async def _give_back(self, held: _Held | None) -> None:
        """Jobs claimed ahead but not started: back to the queue, no attempt spent."""
        if held is None:
            return
        self._held_ahead = []
        held.heartbeat.cancel()
        for job in held.jobs:
            if self._cancels.get(job.id) is held.cancels[job.id]:
                del self._cancels[job.id]
            if held.cancels[job.id].is_set():
                continue  # cancelled or no longer ours
            try:
                after = await self.store.requeue(job.id, worker_id=self.id, spend_attempt=False)
            except (LeaseLost, JobFinished):
                continue
            await try_announce(self.bus, Event.of(after, EventType.queued))
            self.wakeup.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def cancel_current(self) -> None:
        for cancel in self._cancels.values():
            cancel.set()

    async def _watch(self, cancellations: AsyncIterable[Event]) -> None:
        async for event in cancellations:
            if (cancel := self._cancels.get(event.job_id)) is not None:
                cancel.set()

    async def process(self, jobs: list[Job], held: _Held) -> None:
        """Run claimed jobs (one backend call); returns once the call returned and its
        results are handed to the finisher. Never raises for the jobs' failures."""
        cancels, heartbeat = held.cancels, held.heartbeat
        if any(cancels[job.id].is_set() for job in jobs):  # while claimed ahead
            void = [job for job in jobs if cancels[job.id].is_set()]
            for job in void:
                log.info("job %s was cancelled before it started; not run", job.id)
            jobs = [job for job in jobs if not cancels[job.id].is_set()]
            if not jobs:
                self._release(void, heartbeat, cancels)
                return
            self._release(void, None, cancels)
        self._running = jobs
        handed_over = False
        try:
            loading = self._must_load(jobs[0].request.model)
            phase = Phase.loading_model if loading is not None else None
            for job in jobs:
                await try_announce(
                    self.bus, Event.of(job, EventType.started, phase=phase, model=loading)
                )
            if self._ended is not None:  # back to back: what a job costs besides its run
                self.run_times.observe_gap(self.backend.name, time.monotonic() - self._ended)
            ready = None  # a model loaded ahead of these jobs (model pressure): loaded first
            if self.fleet is not None:
                ready = await self.fleet.settled(self.backend.name)
            model = jobs[0].request.model
            cold = (not self._ran or model != self.model) and (ready is None or ready != model)
            self.model, self._ran, self.cold = model, True, cold
            began = time.monotonic()
            if self.finisher.depth > 0 and not self._stopping:
                self._ahead.start()  # claimed when this call reports its last step
            try:
                results = await self._generate_timed(jobs, cancels)
            except Exception as exc:
                self._ahead.now()
                self._report(exc)
                for job in jobs:
                    await self._failed(job, exc, cancels[job.id])
                return
            self._ended = time.monotonic()
            self._ahead.now()  # the backend is free: its next job now, if not in hand yet
            seconds = (self._ended - began) / len(jobs)
            if self.fleet is not None:
                self.fleet.succeeded(self.backend.name)
                cost = sum(job.request.cost for job in jobs)
                self.fleet.observe_speed(self.backend.name, cost, seconds * len(jobs), cold=cold)
            await self.finisher.wait_for_room()
            self._finishing.update({job.id: job for job in jobs})
            self._running = []
            handed_over = True
            for job in jobs:
                self.run_times.observe(job.backend, job.request, seconds, cold=cold)
            finishing = self._finish_all(jobs, results, seconds, heartbeat, cancels)
            await self.finisher.finish(jobs, finishing)
        finally:
            self._running = []
            if not handed_over:
                self._release(jobs, heartbeat, cancels)

    def _must_load(self, model: str | None) -> str | None:
        """The model a run of ``model`` waits for while the backend loads it (not loaded
        there, or being loaded ahead of its jobs); None when it is in memory, or when the
        backend does not say what it has loaded."""
        pipelines = self.backend.pipelines()
        name = model or (pipelines[0].name if pipelines else None)  # the default first
        member = self.fleet.members.get(self.backend.name) if self.fleet is not None else None
        if name is None or (member is not None and member.loading == name):
            return name
        listed = next((m for m in pipelines if m.name == name), None)
        return name if listed is not None and not listed.loaded else None

    async def _finish_all(
        self,
        jobs: list[Job],
        results: list[GenerationResult],
        seconds: float,
        heartbeat: asyncio.Task[None],
        cancels: dict[str, threading.Event],
    ) -> None:
        """The results of one backend call, each job's in parallel; the leases are kept
        (``heartbeat`` goes on) until every one is committed or given up."""
        try:
            await asyncio.gather(
                *(
                    self._finish(job, result, seconds, cancels[job.id])
                    for job, result in zip(jobs, results, strict=True)
                )
            )
        finally:
            self._release(jobs, heartbeat, cancels)

    def _release(
        self,
        jobs: list[Job],
        heartbeat: asyncio.Task[None] | None,
        cancels: dict[str, threading.Event],
    ) -> None:
        if heartbeat is not None:
            heartbeat.cancel()
        for job in jobs:
            if self._cancels.get(job.id) is cancels[job.id]:  # not a newer run's
                del self._cancels[job.id]
                self._finishing.pop(job.id, None)

    async def _generate_timed(
        self, jobs: list[Job], cancels: dict[str, threading.Event]
    ) -> list[GenerationResult]:
        """The backend call, counted in the fleet's slots, within the fleet file's
        ``timeouts.job_seconds`` (past it: a transient failure, the run is cancelled)."""
        name = self.backend.name
        if self.fleet is not None:
            self.fleet.started(name, len(jobs))
        try:
            async with asyncio.timeout(self.job_timeout):
                return await self._generate(jobs)
        except TimeoutError:
            for cancel in cancels.values():
                cancel.set()
            raise BackendUnavailable(
                f"backend {name!r} took longer than {self.job_timeout}s (timeouts.job_seconds)"
            ) from None
        finally:
            if self.fleet is not None:
                self.fleet.ended(name, len(jobs))

    def _report(self, exc: Exception) -> None:
        """A transient failure counts against the backend's breaker; the job's own faults
        (bad input, cancellation) do not."""
        if self.fleet is not None and isinstance(exc, EaselError) and exc.retryable:
            self.fleet.failed(self.backend.name, f"{exc.code}: {exc.message}")

    def _run(self, job: Job, error: JobError | None) -> Attempt:
        """This attempt's record (where, by whom, when, how it ended), kept on the job."""
        return Attempt(
            backend=self.backend.name,
            worker=self.id,
            started_at=job.started_at,
            ended_at=time.time(),
            error=error,
        )

    async def _elsewhere(self, job: Job) -> str | None:
        """Another backend for a job that failed transiently here, if it may move."""
        if self.fleet is None:
            return None
        try:
            return await self.fleet.relocate(job, leaving=self.backend.name)
        except EaselError as exc:
            log.warning("job %s: not moved: %s", job.id, exc.message)
            return None

    async def _generate(self, jobs: list[Job]) -> list[GenerationResult]:
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[Event | asyncio.Future[Event] | None] = asyncio.Queue()

        def progress_of(job: Job) -> RunContext:
            def on_progress(step: int, total: int, preview: Image | None) -> None:
                event = Event.of(job, EventType.progress, step=step, total=total)
                if not _in_loop(loop):  # a backend's thread: encode the preview here
                    if preview is not None:
                        event.preview = _jpeg_base64(preview)
                    loop.call_soon_threadsafe(pending.put_nowait, event)
                elif preview is None:  # an async backend reports from the loop itself
                    pending.put_nowait(event)
                else:  # never encode on the loop: in the results pool, published in order
                    pending.put_nowait(in_results_future(_with_preview, event, preview))

            return RunContext(on_progress=on_progress, cancel_event=self._cancels[job.id])

        async def pump() -> None:
            while (item := await pending.get()) is not None:
                event = item if isinstance(item, Event) else await item
                if event.total and event.step is not None and event.step >= event.total - 1:
                    self._ahead.now()  # the last step: the next job is claimed meanwhile
                await try_announce(self.bus, event)

        publisher = asyncio.create_task(pump())
        contexts = [progress_of(job) for job in jobs]
        try:
            if len(jobs) == 1:
                return [await self.backend.generate(jobs[0].request, contexts[0])]
            return await self.backend.generate_batch([job.request for job in jobs], contexts)
        finally:
            # progress scheduled from the thread is queued before the sentinel: order is kept
            pending.put_nowait(None)
            await publisher

    async def _finish(
        self, job: Job, result: GenerationResult, seconds: float, cancel: threading.Event
    ) -> None:
        if cancel.is_set():
            log.info("job %s was cancelled; its result is discarded", job.id, extra=_ids(job))
            return
        upload_error = None
        began = time.monotonic()
        try:
            images, audio = await in_results_thread(self._save, job, result)
            content = None
            if job.request.include_images:
                content = await asyncio.to_thread(self.storage.inline, [*images, *audio])
            if cancel.is_set():  # cancelled (or lease lost) while encoding
                raise JobFinished(f"job {job.id} was cancelled")
            if self.uploads is not None and job.request.sync_with_s3:
                images, upload_error = await _upload_now(self.uploads, job, images)
                if audio and upload_error is None:
                    audio, upload_error = await _upload_now(self.uploads, job, audio)
            run = self._run(job, None)
            done = await until_stored(
                lambda: self.store.complete(job.id, self.id, images, audio=audio, run=run),
                store=self.store, job_id=job.id, run=run, lost=cancel,
            )  # fmt: skip
            self.run_times.observe_finish(job.backend, time.monotonic() - began)
        except (LeaseLost, JobFinished):
            log.info("job %s is no longer ours; its result is discarded", job.id, extra=_ids(job))
        except Exception as exc:
            if cancel.is_set():  # a void run's trouble is not the job's
                log.info("job %s: a void run failed (%s); discarded", job.id, exc, extra=_ids(job))
                return
            await self._failed(job, exc, cancel)
        else:
            if upload_error is not None:
                await self._note_upload_error(done, upload_error)
            await announce(
                self.bus,
                Event.of(
                    done,
                    EventType.succeeded,
                    images=done.images,
                    audio=done.audio or None,
                    upload_error=upload_error,
                    content=content,
                ),
            )
            if self.uploads is not None and not job.request.sync_with_s3:
                self.uploads.schedule(done)

    def _save(self, job: Job, result: GenerationResult) -> tuple[list[ImageRef], list[AudioRef]]:
        """Write a result's files (its images, or its audio clips); blocks."""
        if result.audio:
            return [], self.storage.save_audio(job, result)
        return self.storage.save(job, result), []

    async def _note_upload_error(self, job: Job, error: str) -> None:
        """On the record (every replica, after a restart); the succeeded event carries it
        too. A store that is down gets it once it is back: tried again with backoff in the
        background while this worker lives, so the event is not held for it."""

        async def write() -> None:
            await self.store.annotate(job.id, upload_error=error)

        try:
            await write()
        except StoreUnavailable:
            note = asyncio.create_task(until_noted(write, job_id=job.id, what="its upload error"))
            self._notes[job.id] = note
            note.add_done_callback(lambda _: self._notes.pop(job.id, None))
        except Exception as exc:
            log.error(
                "job %s: could not record its upload error (%s)", job.id, exc, extra=_ids(job)
            )

    async def _drop_notes(self) -> None:
        """The worker ends: notes still waiting for the store are given up, logged."""
        notes = dict(self._notes)
        for job_id, note in notes.items():
            note.cancel()
            log.error("job %s: its upload error was not recorded (the store is away)", job_id)
        await asyncio.gather(*notes.values(), return_exceptions=True)

    async def _failed(self, job: Job, exc: Exception, lost: threading.Event) -> None:
        """Record a failure: retry it later if it was transient, else fail it with its reason
        (the write rides out a store outage until it lands or the lease is ``lost``)."""
        if isinstance(exc, Cancelled | LeaseLost | JobFinished):
            return
        if isinstance(exc, EaselError):
            error = JobError(code=exc.code, message=exc.message)
        else:
            log.exception(
                "job %s failed in backend %s", job.id, self.backend.name, exc_info=exc,
                extra=_ids(job),
            )  # fmt: skip
            error = JobError(code=GenerationError.code, message=f"{type(exc).__name__}: {exc}")
        run = self._run(job, error)
        try:
            if isinstance(exc, EaselError) and exc.retryable:
                outage = isinstance(exc, StoreUnavailable)  # not the job's fault: no attempt
                target = None if outage else await self._elsewhere(job)
                delay = 0.0 if target else retry_delay(job.attempts, base=self.retry_base_seconds)
                after = await until_stored(
                    lambda: self.store.requeue(
                        job.id, worker_id=self.id, reason=error, delay=delay, run=run,
                        spend_attempt=not outage,
                    ),
                    store=self.store, job_id=job.id, run=run, lost=lost,
                )  # fmt: skip
                if target is not None and after.state is JobState.queued:
                    with contextlib.suppress(StoreUnavailable):  # it waits in its own line
                        after = await self.store.reroute(job.id, target) or after
            else:
                after = await until_stored(
                    lambda: self.store.fail(job.id, error, worker_id=self.id, run=run),
                    store=self.store, job_id=job.id, run=run, lost=lost,
                )  # fmt: skip
        except (LeaseLost, JobFinished):
            return
        if after.state is JobState.queued:
            log.warning(
                "job %s: %s; retrying (attempt %d)", job.id, error.message, after.attempts,
                extra=_ids(job),
            )  # fmt: skip
            await announce(self.bus, Event.of(after, EventType.queued, error=error))
            self.wakeup.set()
        else:
            await announce(self.bus, Event.of(after, EventType.failed, error=after.error))

    async def _heartbeat(self, jobs: list[Job], cancels: dict[str, threading.Event]) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            for job in jobs:
                try:
                    held = await self.store.heartbeat(
                        job.id, self.id, lease_seconds=self.lease_seconds
                    )
                except StoreUnavailable as exc:  # keep beating: the store may be back in time
                    log.warning("job %s: heartbeat failed: %s", job.id, exc.message)
                    continue
                if not held:
                    cancels[job.id].set()


async def _upload_now(uploads: Uploads, job: Job, refs: list[Ref]) -> tuple[list[Ref], str | None]:
    """``sync_with_s3``: the refs with their URLs, or the local refs and why not."""
    try:
        return await uploads.upload(job, refs), None
    except Exception as exc:
        log.error("job %s: upload failed for good; its images stay local: %s", job.id, exc)
        return refs, f"{type(exc).__name__}: {exc}"


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _ids(job: Job) -> dict[str, str | None]:
    """Fields for structured logs (``EASEL_LOG_FORMAT=json``)."""
    return {"job_id": job.id, "user_id": job.user_id, "service": job.service}


def _with_preview(event: Event, preview: Image) -> Event:
    """The progress event with its preview (an unreadable preview: the event without)."""
    try:
        event.preview = _jpeg_base64(preview)
    except (OSError, ValueError) as exc:
        log.warning("job %s: preview not encoded: %s", event.job_id, exc)
    return event


def _jpeg_base64(image: Image, max_side: int = 256) -> str:
    preview = image.copy()
    preview.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    preview.convert("RGB").save(buffer, "JPEG", quality=70)
    return base64.b64encode(buffer.getvalue()).decode()
