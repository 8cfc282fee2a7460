"""The runtime's facade: the job methods every surface calls.

The API is one view of a :class:`Runtime`; ``easel generate`` (no server) is another. Both
submit, cancel and watch jobs through the same methods, so nothing is computed twice. Its
parts come from the composition root (``compose.py``); its workers and side effects run
under the supervisor (``supervisor.py``, ``extensions.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from easel.backends.base import Backend, ModelInfo
from easel.config import Settings
from easel.effects.webhooks import check_webhook_url
from easel.errors import (
    AudioNotFound,
    EaselError,
    Forbidden,
    ImageNotFound,
    InvalidRequest,
    JobFinished,
    JobNotFound,
    ShuttingDown,
)
from easel.events.bus import EventBus, Subscription
from easel.jobs import (
    FINAL_EVENTS,
    FINAL_STATES,
    AudioRef,
    Event,
    EventType,
    GenerationRequest,
    Job,
    JobState,
    JobView,
    random_seed,
)
from easel.queue.admission import check_limits
from easel.queue.scheduler import account, user_cap
from easel.results.files import LocalStorage
from easel.runtime._etas import Etas
from easel.runtime._timings import SharedTimings
from easel.runtime.compose import assemble, extensions_for, open_parts, worker_for
from easel.runtime.registry import WorkerInfo
from easel.runtime.supervisor import Supervisor
from easel.runtime.worker import Worker
from easel.safety.services import current_service, may_see
from easel.store.base import JobStore

log = logging.getLogger("easel")


class Runtime:
    """The job facade: submit, cancel, watch and list jobs over parts assembled from
    settings (``runtime/compose.py``); background work runs under a supervisor."""

    def __init__(
        self,
        settings: Settings,
        *,
        backends: Mapping[str, Backend] | None = None,
        store: JobStore | None = None,
        bus: EventBus | None = None,
        storage: LocalStorage | None = None,
    ) -> None:
        parts = assemble(settings, backends=backends, store=store, bus=bus, storage=storage)
        self.parts = parts
        self.settings = settings
        self.backends = parts.backends
        self.default_backend = parts.default_backend
        self.store = parts.store
        self.bus = parts.bus
        self.registry = parts.registry
        self.storage = parts.storage
        self.run_times = parts.run_times
        self.uploads = parts.uploads
        self.webhooks = parts.webhooks
        self.gate = parts.gate
        self.metrics = parts.metrics
        self._wakeup = parts.doorbell
        self.fleet = parts.fleet
        self.supervisor = Supervisor(parts.store, parts.bus)
        self.timings = SharedTimings(
            parts.store, parts.run_times, interval=settings.eta_update_seconds
        )
        self.closing = asyncio.Event()
        """Set when a shutdown begins (:meth:`drain`)."""
        self._streams: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._streams_ended = False
        self.etas = Etas(self, interval=settings.eta_update_seconds)

    @property
    def workers(self) -> list[Worker]:
        return self.supervisor.workers

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, *, workers: bool = True) -> None:
        await self.store.open()
        await open_parts(self.bus, self.registry)
        for backend in self.backends.values():
            await backend.start()
        if workers:
            self.start_workers()
        extensions = [*extensions_for(self.parts, lambda: self.workers), self.timings, self.etas]
        await self.supervisor.start_extensions(extensions)

    def start_workers(self) -> None:
        """Each backend's slots (the fleet file's ``slots``, else ``concurrency``);
        ``concurrency`` 0 runs none (API only)."""
        settings = self.settings
        self.supervisor.run_workers(
            worker_for(self.parts, member.backend)
            for member in self.fleet.members.values()
            for _ in range(
                (member.spec.slots if settings.backends else settings.concurrency)
                if settings.concurrency
                else 0
            )
        )

    def worker_for(self, backend: Backend) -> Worker:
        return worker_for(self.parts, backend)

    async def drain(self, grace: float) -> None:
        """The first step of a shutdown: stop claiming, give running jobs ``grace`` seconds
        and put the rest back unspent, then end every client's event stream and wait
        (their last events are out by then; clients resume elsewhere or after a restart,
        and a request waiting for a job gets ``shutting_down``)."""
        self.closing.set()
        await self.supervisor.stop_workers(grace)
        self._streams_ended = True
        for subscription in list(self._streams):
            subscription.close()

    def subscribe(
        self,
        *,
        job_id: str | None = None,
        user_id: str | None = None,
        after: int | None = None,
    ) -> Subscription:
        """A client's event stream (websocket, SSE, a request waiting for its job): the bus's,
        ended by :meth:`drain` so that a shutdown never waits for a job to end."""
        subscription = self.bus.subscribe(job_id=job_id, user_id=user_id, after=after)
        self._streams.add(subscription)
        if self._streams_ended:  # too late: it ends at once
            subscription.close()
        return subscription

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming, give running jobs ``grace`` seconds, put the rest back unspent."""
        await self.drain(grace)
        await self.supervisor.stop(grace)
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

    def served_models(self) -> list[ModelInfo]:
        """Every model a request may name here, across the backends (compat APIs list these)."""
        return [model for backend in self.backends.values() for model in backend.pipelines()]

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
            if request.sync_with_s3 and self.uploads is None:
                raise InvalidRequest(
                    "sync_with_s3 needs S3, and this server has none configured "
                    "(EASEL_S3__BUCKET); resend without sync_with_s3"
                )
            if _carries_images(request):  # decoding them to check them is not loop work
                await asyncio.to_thread(check_limits, request, self.settings.limits)
            else:
                check_limits(request, self.settings.limits)
            service = current_service.get()
            owner = service.name if service is not None else None
            if idempotency_key is not None:  # a resend is answered before any cap or limit
                known = await self.store.known(owner, request.user_id, idempotency_key)
                if known is not None:
                    return await self.view(known)
            backend = await self.fleet.route(request)
            if request.seed is None:
                request = request.model_copy(update={"seed": random_seed()})
            await self.gate.check(request, service)
        except EaselError as refusal:
            self.metrics.rejected.labels(refusal.code).inc()
            raise
        cap = user_cap(
            request.max_user_queue_size,
            self.settings.max_user_queue_size,
            self.settings.max_user_queue_size_limit,
        )
        new = Job(request=request, backend=backend, service=owner)
        job = await self.store.enqueue(new, user_cap=cap, idempotency_key=idempotency_key)
        view = await self.view(job)
        if job.id == new.id:
            self.metrics.label(job.id, backend, request.model)
            self._wakeup.set()
            self.etas.announced(view)
            await self.bus.publish(_queued(job, view))
        return view

    async def setting(self, key: str) -> str | None:
        """The calling service's setting ``key`` (A1111's ``/options`` model), from the
        store: every replica answers the same, and it outlives a restart."""
        return await self.store.get_setting(_scope(), key)

    async def set_setting(self, key: str, value: str) -> None:
        """Set the calling service's setting ``key`` for every replica."""
        await self.store.put_setting(_scope(), key, value)

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
            "users": _users_seen(stats.users),
            "averages": self.run_times.averages(),
            "waiting": await self._waiting(),
        }

    async def worker_list(self) -> list[WorkerInfo]:
        """Live workers of every process; a service sees only its own jobs' ids among
        what they run (``GET /v1/workers``)."""
        workers = await self.registry.list()
        if _sees_all():
            return workers
        shown = []
        for worker in workers:
            own = []
            for job_id in worker.current_jobs:
                with contextlib.suppress(JobNotFound):
                    if may_see((await self.store.get(job_id)).service):
                        own.append(job_id)
            shown.append(worker.model_copy(update={"current_jobs": own}))
        return shown

    async def _waiting(self, limit: int = 50) -> list[dict[str, object]]:
        """The next ``limit`` queued jobs the caller may see, with their projected ETAs."""
        projected = await self.etas.projections()
        if projected is None:
            return []
        rows: list[dict[str, object]] = []
        for job_id, projection in projected.by_id.items():
            with contextlib.suppress(EaselError):
                job = await self.store.get(job_id)
                if not may_see(job.service):
                    continue
                rows.append(
                    {"job_id": job_id, "user_id": job.user_id, "position": projection.position,
                     **self.etas.fields_of(projected, projection)}
                )  # fmt: skip
            if len(rows) >= limit:
                break
        return rows

    async def get(self, job_id: str) -> JobView:
        return await self.view(await self._visible(job_id))

    async def list_jobs(
        self,
        *,
        user_id: str | None = None,
        state: JobState | None = None,
        limit: int = 100,
        text: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: str | None = None,
    ) -> list[Job]:
        """Newest first; a service sees only its own jobs (scoped inside the store query)."""
        caller = current_service.get()
        service = None if caller is None or caller.is_admin else caller.name
        return await self.store.list_jobs(
            user_id=user_id, state=state, limit=limit, service=service, text=text,
            model=model, since=since, until=until, before=before,
        )  # fmt: skip

    async def line(self, limit: int = 500) -> list[JobView]:
        """The running jobs, then the queued ones in the order they will be served."""
        running = await self.store.list_jobs(state=JobState.running, limit=limit)
        queued = await self.store.list_jobs(state=JobState.queued, limit=limit)
        views = [await self.view(job) for job in queued]
        views.sort(key=lambda v: (v.position is None, v.position or 0))
        return [await self.view(job) for job in running] + views

    async def move(self, job_id: str, *, front: bool) -> JobView:
        """An operator puts a queued job first or last in line of its tier."""
        caller = current_service.get()
        if caller is not None and not caller.is_admin:
            raise Forbidden("moving jobs in the queue needs a token with the admin scope")
        job = await self.store.move(job_id, front=front)
        view = await self.view(job)
        await self.bus.publish(_queued(job, view))
        return view

    async def view(self, job: Job) -> JobView:
        """The job with its queue position and ETA: wait and run apart, with a p10-p90
        range (queued and running jobs; see :mod:`easel.runtime._etas`)."""
        average = self.run_times.estimate(job.backend, job.request)
        fields = await self.etas.fields(job)
        reason = None
        if job.state is JobState.queued:
            with contextlib.suppress(EaselError):  # a view without it beats no view
                reason = await self.fleet.waiting_reason(job.backend)
        # construct, not validate: the record was validated when it was made
        return JobView.model_construct(
            **dict(job), average_seconds=average, waiting_reason=reason, **fields
        )

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Until the job ends; returns its final record."""
        async with asyncio.timeout(timeout):
            async with self.subscribe(job_id=job_id) as events:
                job = await self.store.get(job_id)
                if job.state in FINAL_STATES:
                    return job
                async for event in events:
                    if event.type in FINAL_EVENTS:
                        break
            job = await self.store.get(job_id)
            if job.state not in FINAL_STATES and self.closing.is_set():
                raise ShuttingDown(
                    f"this server is shutting down; job {job_id} is kept ({job.state}): "
                    f"follow it with GET /v1/jobs/{job_id} on another replica or after the restart"
                )
            return job

    async def image_path(self, job_id: str, index: int) -> Path:
        job = await self._visible(job_id)
        if not 0 <= index < len(job.images):
            raise ImageNotFound(f"job {job_id} has no image {index} (it has {len(job.images)})")
        return self.storage.path(job.images[index])

    async def audio_path(self, job_id: str, index: int) -> tuple[Path, AudioRef]:
        """The stored file of clip ``index`` and its ref (format, media type)."""
        job = await self._visible(job_id)
        if not 0 <= index < len(job.audio):
            raise AudioNotFound(f"job {job_id} has no audio {index} (it has {len(job.audio)})")
        ref = job.audio[index]
        return self.storage.path(ref), ref


def _carries_images(request: GenerationRequest) -> bool:
    return bool(request.init_image or request.mask_image or request.controlnet or request.mix)


def _sees_all() -> bool:
    service = current_service.get()
    return service is None or service.is_admin


def _queued(job: Job, view: JobView) -> Event:
    """The ``queued`` event of a job just placed in line: its position and estimates."""
    return Event.of(
        job,
        EventType.queued,
        position=view.position,
        eta_seconds=view.eta_seconds,
        wait_eta_seconds=view.wait_eta_seconds,
        run_eta_seconds=view.run_eta_seconds,
        eta_low_seconds=view.eta_low_seconds,
        eta_high_seconds=view.eta_high_seconds,
        average_seconds=view.average_seconds,
    )


def _users_seen(accounts: dict[str, int]) -> dict[str, int]:
    """Queued jobs per account as the caller may see them: all (``service/user`` keys,
    bare user ids for jobs no service owns) for admin and open deployments; a service,
    its own users by their bare ids (user ids are per service)."""
    caller = current_service.get()
    if caller is None or caller.is_admin:
        return dict(accounts)
    prefix = account(caller.name, "")
    return {name[len(prefix) :]: n for name, n in accounts.items() if name.startswith(prefix)}


def _scope() -> str:
    """Whose settings a call reads: its service's ('' when no tokens are configured)."""
    service = current_service.get()
    return service.name if service is not None else ""
