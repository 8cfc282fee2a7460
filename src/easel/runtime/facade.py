"""The embedded server without HTTP: store, bus, backends, workers and storage, assembled.

The API is one view of a :class:`Runtime`; ``easel generate`` (no server) is another. Both
submit, cancel and watch jobs through the same methods, so nothing is computed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from easel.backends import registry as backends_registry
from easel.backends.base import Backend
from easel.config import Settings
from easel.effects.metrics import Metrics
from easel.effects.notes import JobNotes
from easel.effects.webhooks import Webhooks, check_webhook_url
from easel.errors import AudioNotFound, EaselError, ImageNotFound, JobFinished, JobNotFound
from easel.events.bus import EventBus, InProcessEventBus
from easel.jobs import (
    EVENT_FOR_STATE,
    FINAL_EVENTS,
    FINAL_STATES,
    AudioRef,
    Event,
    EventType,
    GenerationRequest,
    Job,
    JobState,
    JobView,
)
from easel.queue.admission import admit
from easel.queue.scheduler import Policy, RunTimes, user_cap
from easel.results.files import LocalStorage
from easel.results.s3 import S3Store, Uploads
from easel.runtime import scale
from easel.runtime.worker import Doorbell, Worker
from easel.safety.gate import Gate
from easel.safety.services import current_service, may_see
from easel.store.base import JobStore
from easel.store.sqlite import SqliteStore

log = logging.getLogger("easel")


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        backends: Mapping[str, Backend] | None = None,
        store: JobStore | None = None,
        bus: EventBus | None = None,
        storage: LocalStorage | None = None,
    ) -> None:
        self.settings = settings
        self.backends = dict(backends) if backends is not None else _backends_from(settings)
        self.default_backend = (
            settings.resolved_backend
            if settings.resolved_backend in self.backends
            else next(iter(self.backends))
        )
        if store is None and settings.redis_url:
            store = scale.redis_store(settings)
        self.store = store or SqliteStore(
            settings.resolved_db_path,
            max_attempts=settings.max_attempts,
            policy=Policy(aging_seconds=settings.aging_seconds, weights=settings.user_weights),
            max_queue_size=settings.max_queue_size,
        )
        self.bus = bus or (scale.redis_bus(settings) if settings.redis_url else InProcessEventBus())
        self.registry = scale.registry_for(settings)
        self.storage = storage or LocalStorage(settings.resolved_output_dir, settings.output)
        self.run_times = RunTimes()
        self.notes = JobNotes()  # upload and webhook state, after a job is stored
        self.uploads = _uploads_for(settings, self.storage, self.bus, self.notes)
        self.webhooks = Webhooks(settings, self.bus, self.store, self.notes)
        self.workers: list[Worker] = []
        self._tasks: list[asyncio.Task[object]] = []  # one per worker
        self._reaper: asyncio.Task[None] | None = None
        self._gatekeeper: asyncio.Task[None] | None = None
        self._metering: asyncio.Task[None] | None = None
        self.gate = Gate(settings.safety)
        self.metrics = Metrics()
        self._wakeup = Doorbell()
        self._background: scale.Background | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, *, workers: bool = True) -> None:
        await self.store.open()
        await scale.open_parts(self.bus, self.registry)
        for backend in self.backends.values():
            await backend.start()
        if workers:
            self.start_workers()
        self._reaper = asyncio.create_task(self._reap_leases(), name="easel-reaper")
        if self.settings.webhook_allowed_hosts:
            self.webhooks.start()
        self._gatekeeper = asyncio.create_task(self.gate.follow(self.bus), name="easel-gate")
        self._metering = asyncio.create_task(self.metrics.follow(self.bus), name="easel-metrics")
        self._background = scale.start_background(self)

    def start_workers(self) -> None:
        for backend in self.backends.values():
            for _ in range(self.settings.concurrency):
                worker = self.worker_for(backend)
                self.workers.append(worker)
                self._tasks.append(
                    asyncio.create_task(scale.keep_running(worker), name=f"easel-{worker.id}")
                )

    def worker_for(self, backend: Backend) -> Worker:
        return Worker(
            store=self.store,
            bus=self.bus,
            backend=backend,
            storage=self.storage,
            run_times=self.run_times,
            lease_seconds=self.settings.lease_seconds,
            heartbeat_seconds=self.settings.heartbeat_seconds,
            batch_limit=self.settings.batch_limit,
            retry_base_seconds=self.settings.retry_base_seconds,
            wakeup=self._wakeup,
            uploads=self.uploads,
            results_depth=self.settings.results_depth,
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming, give running jobs ``grace`` seconds, put the rest back unspent."""
        for helper in (self._reaper, self._gatekeeper, self._metering):
            if helper is not None:
                helper.cancel()
                await asyncio.gather(helper, return_exceptions=True)
        await self.gate.close()
        for worker in self.workers:
            worker.stop()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for worker in self.workers:
                for job in worker.current:
                    with contextlib.suppress(Exception):
                        await self.store.requeue(job.id, worker_id=worker.id, spend_attempt=False)
                worker.cancel_current()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
        await scale.stop_background(self, self._background)
        self.workers.clear()
        if self.uploads is not None:
            await self.uploads.close(grace)
        await self.webhooks.close()
        for backend in self.backends.values():
            await backend.close()
        await self.bus.close()
        await self.store.close()
        await self.registry.close()

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- jobs -----------------------------------------------------------------------------

    async def submit(
        self, request: GenerationRequest, *, idempotency_key: str | None = None
    ) -> JobView:
        """Admit, make durable, announce ``queued``; returns once the job cannot be lost.

        The same ``idempotency_key`` from the same user returns the first job again.
        """
        try:
            if request.webhook_url is not None:
                check_webhook_url(
                    request.webhook_url,
                    self.settings.webhook_allowed_hosts,
                    self.settings.webhook_secret is not None,
                )
            admission = (request, self.backends, self.default_backend, self.settings.limits)
            if _carries_images(request):  # decoding them to check them is not loop work
                request, backend = await asyncio.to_thread(admit, *admission)
            else:
                request, backend = admit(*admission)
            service = current_service.get()
            await self.gate.check(request, service)
        except EaselError as refusal:
            self.metrics.rejected.labels(refusal.code).inc()
            raise
        cap = user_cap(
            request.max_user_queue_size,
            self.settings.max_user_queue_size,
            self.settings.max_user_queue_size_limit,
        )
        owner = service.name if service is not None else None
        new = Job(request=request, backend=backend.name, service=owner)
        job = await self.store.enqueue(new, user_cap=cap, idempotency_key=idempotency_key)
        view = await self.view(job)
        if job.id == new.id:
            self.gate.accepted(job.id, service)
            self.metrics.label(job.id, backend.name, request.model)
            self._wakeup.set()
            await self.bus.publish(
                Event.of(
                    job,
                    EventType.queued,
                    position=view.position,
                    eta_seconds=view.eta_seconds,
                    average_seconds=view.average_seconds,
                )
            )
        return view

    async def _visible(self, job_id: str) -> Job:
        """The job, if the calling service may see it; else as if it did not exist."""
        job = await self.store.get(job_id)
        if not may_see(job.service):
            raise JobNotFound(f"no job with id {job_id!r}")
        return job

    async def cancel(self, job_id: str) -> Job:
        """A queued job ends at once; a running one stops at its next step."""
        await self._visible(job_id)
        job = await self.store.cancel(job_id)
        await self.bus.publish(Event.of(job, EventType.cancelled))
        return job

    async def cancel_user(self, user_id: str) -> list[Job]:
        """Cancel every queued and running job of a user; returns those cancelled."""
        cancelled = []
        for state in (JobState.queued, JobState.running):
            for job in await self.store.list_jobs(user_id=user_id, state=state, limit=100_000):
                if not may_see(job.service):
                    continue
                with contextlib.suppress(JobFinished):
                    cancelled.append(await self.cancel(job.id))
        return cancelled

    async def queue(self) -> dict[str, object]:
        """Counts per tier and per user, and the measured averages: ``GET /v1/queue``."""
        stats = await self.store.stats()
        return {
            "queued": stats.queued,
            "running": stats.running,
            "tiers": {str(tier): count for tier, count in stats.tiers.items()},
            "users": stats.users,
            "averages": self.run_times.averages(),
        }

    async def get(self, job_id: str) -> JobView:
        return await self.view(await self._visible(job_id))

    async def list_jobs(
        self, *, user_id: str | None = None, state: JobState | None = None, limit: int = 100
    ) -> list[Job]:
        """Newest first; a service sees only its own jobs (the newest ``limit`` of them)."""
        if current_service.get() is None:
            return await self.store.list_jobs(user_id=user_id, state=state, limit=limit)
        jobs = await self.store.list_jobs(user_id=user_id, state=state, limit=limit * 10)
        return [job for job in jobs if may_see(job.service)][:limit]

    async def view(self, job: Job) -> JobView:
        """The job with its queue position and ETA (queued jobs only)."""
        position = eta = None
        job = self.notes.apply(job)
        average = self.run_times.estimate(job.backend, job.request)
        if job.state is JobState.queued and (place := await self.store.place(job.id)) is not None:
            position = place.position
            workers = sum(1 for worker in self.workers if worker.backend.name == job.backend)
            eta = self.run_times.eta(job.backend, job.request, place.cost_ahead, workers)
        # construct, not validate: the record was validated when it was made
        return JobView.model_construct(
            **dict(job), position=position, eta_seconds=eta, average_seconds=average
        )

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Until the job ends; returns its final record."""
        async with asyncio.timeout(timeout):
            async with self.bus.subscribe(job_id=job_id) as events:
                job = await self.store.get(job_id)
                if job.state in FINAL_STATES:
                    return job
                async for event in events:
                    if event.type in FINAL_EVENTS:
                        break
            return await self.store.get(job_id)

    async def image_path(self, job_id: str, index: int) -> Path:
        job = await self._visible(job_id)
        if not 0 <= index < len(job.images):
            raise ImageNotFound(f"job {job_id} has no image {index} (it has {len(job.images)})")
        return self.storage.path(job.images[index])

    async def audio_path(self, job_id: str, index: int) -> tuple[Path, AudioRef]:
        """The stored file of clip ``index`` and its ref (format, media type)."""
        job = self.notes.apply(await self._visible(job_id))
        if not 0 <= index < len(job.audio):
            raise AudioNotFound(f"job {job_id} has no audio {index} (it has {len(job.audio)})")
        ref = job.audio[index]
        return self.storage.path(ref), ref

    async def _reap_leases(self) -> None:
        """Put back jobs whose worker stopped renewing its lease (a hung backend)."""
        interval = max(self.settings.lease_seconds / 2, 0.5)
        while True:
            await asyncio.sleep(interval)
            try:
                for job in await self.store.expire_leases():
                    type = EVENT_FOR_STATE[job.state]
                    await self.bus.publish(Event.of(job, type, error=job.error))
                    self._wakeup.set()
            except Exception:
                log.exception("could not expire leases; trying again in %.0fs", interval)


def _carries_images(request: GenerationRequest) -> bool:
    return bool(request.init_image or request.mask_image or request.controlnet or request.mix)


def _uploads_for(
    settings: Settings, storage: LocalStorage, bus: EventBus, notes: JobNotes
) -> Uploads | None:
    if not settings.s3.bucket:
        return None
    return Uploads(S3Store(settings.s3), storage, bus, notes)


def _backends_from(settings: Settings) -> dict[str, Backend]:
    name = settings.resolved_backend
    options: dict[str, object] = {"device": settings.device}
    if name == "mock":
        options["step_delay"] = settings.mock_step_delay
        options["preview_every"] = settings.mock_preview_every
        if settings.mock_folder is not None:
            options["folder"] = str(settings.mock_folder)
    if name == "diffusers":
        options.update(settings.diffusers.model_dump())
        if settings.models_dir is not None:
            options["models_dir"] = str(settings.models_dir)
    if settings.model:
        options["model"] = settings.model
    return {name: backends_registry.create(name, **options)}
