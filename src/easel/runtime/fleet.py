"""The fleet as one process sees it: its own backends, the workers others advertise, and
a circuit breaker and measured speed for each of its own.

:class:`Fleet` builds the backends of the fleet file (``settings.backends``, or the
one-entry fleet of the single-backend flags), turns what it knows into the router's
:class:`~easel.queue.routing.BackendView` values, and keeps each local backend's breaker:
transient failures and failed health checks open it, a probe closes it. Worker processes
advertise the same facts in the registry, so an API-only replica routes by them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from easel.backends import registry as backend_kinds
from easel.backends.base import (
    EXECUTOR_PREFIX,
    SAMPLER_PREFIX,
    Backend,
    Capability,
    executor_capabilities,
    sampler_capabilities,
)
from easel.errors import EaselError
from easel.fleet import BackendSpec, Routing
from easel.jobs import GenerationRequest, Job, JobState
from easel.queue.admission import route_request, want_of
from easel.queue.routing import BackendView, Breaker, BreakerState, Policy, choose, claim
from easel.runtime.registry import WorkerInfo, WorkerRegistry
from easel.store.base import JobStore
from easel.views import BackendStatus

log = logging.getLogger("easel.fleet")


@dataclass
class Member:
    """One local backend of the fleet and what this process knows of it."""

    spec: BackendSpec
    backend: Backend
    breaker: Breaker
    in_use: int = 0
    speed: float | None = None
    load_seconds: float | None = None
    """Measured model load time (smoothed), once one was seen."""
    loading: str | None = None
    """The model it is loading ahead of its jobs (model pressure), while it loads."""
    loads: int = 0
    """Models loaded ahead of their jobs so far."""
    ready: str | None = None
    """The model last loaded ahead of its jobs, until the next run there (not cold)."""
    load_task: asyncio.Task[None] | None = field(default=None, repr=False)
    checking: bool = field(default=False, repr=False)

    @property
    def capabilities(self) -> frozenset[str]:
        """What it can do, and the engine payloads it runs (``executor:kandinsky``)."""
        if self.spec.capabilities is not None:
            declared = frozenset(self.spec.capabilities)
        else:
            declared = frozenset(str(c) for c in self.backend.capabilities)
        return declared | executor_capabilities(self.backend.executors)

    def models(self) -> tuple[frozenset[str], frozenset[str]]:
        """(served, loaded) pipeline models; a model being loaded counts as loaded, so the
        router sends its jobs here rather than start a second load elsewhere."""
        listed = [m for m in self.backend.models() if m.kind == "pipeline"]
        served = frozenset(self.spec.models) or frozenset(m.name for m in listed)
        loaded = {m.name for m in listed if m.loaded}
        if self.loading is not None:
            loaded.add(self.loading)
        return served, frozenset(loaded)


def build_backends(specs: Iterable[BackendSpec]) -> dict[str, Backend]:
    """Each entry's backend from its kind's factory; named as in the file."""
    built: dict[str, Backend] = {}
    for spec in specs:
        backend = backend_kinds.create(spec.kind, **spec.options)
        backend.name = spec.name
        if spec.capabilities is not None:
            backend.capabilities = frozenset(Capability(c) for c in spec.capabilities)
        if spec.executors is not None:
            backend.executors = frozenset(spec.executors)
        built[spec.name] = backend
    return built


class Fleet:
    def __init__(
        self,
        specs: Iterable[BackendSpec],
        backends: dict[str, Backend],
        routing: Routing | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        routing = routing or Routing()
        self.routing = routing
        self.policy = Policy(
            slack_seconds=routing.affinity_slack_seconds,
            ratio=routing.balance_ratio,
            steal_ratio=routing.steal_ratio,
        )
        self.clock = clock
        specs_by_name = {spec.name: spec for spec in specs}
        self.store: JobStore | None = None
        self.registry: WorkerRegistry | None = None
        self.remote = False
        self._workers: tuple[float, list[WorkerInfo]] = (-1e9, [])
        self._backlog: dict[str, float] = {}
        self.members: dict[str, Member] = {}
        for name, backend in backends.items():
            spec = specs_by_name.get(name) or BackendSpec(name=name, kind=_kind_of(backend))
            self.members[name] = Member(
                spec=spec,
                backend=backend,
                breaker=Breaker(
                    threshold=spec.breaker.failures, probe_seconds=spec.breaker.probe_seconds
                ),
            )

    @property
    def backends(self) -> dict[str, Backend]:
        return {name: member.backend for name, member in self.members.items()}

    # -- what the router sees -------------------------------------------------------------

    def _default_speed(self, relative: float | None) -> float:
        measured = [m.speed for m in self.members.values() if m.speed is not None]
        base = sum(measured) / len(measured) if measured else 1.0
        return base * (relative or 1.0)

    def local_views(self, backlog: dict[str, float]) -> dict[str, BackendView]:
        views = {}
        for name, member in self.members.items():
            served, loaded = member.models()
            speed = member.speed or self._default_speed(member.spec.speed)
            load_seconds = self._load_seconds(member)
            loading = load_seconds * speed if member.loading is not None else 0.0
            views[name] = BackendView(
                name=name,
                capabilities=member.capabilities | sampler_capabilities(member.backend),
                models=served,
                loaded=loaded,
                tags=frozenset(member.spec.tags),
                slots=member.spec.slots,
                outstanding=backlog.get(name, 0.0) + member.in_use * _RUNNING_COST + loading,
                speed=speed,
                load_seconds=load_seconds,
                up=member.breaker.up,
            )
        return views

    def _load_seconds(self, member: Member) -> float:
        return member.load_seconds or self.routing.load_seconds

    def remote_views(
        self, workers: Iterable[WorkerInfo], backlog: dict[str, float]
    ) -> dict[str, BackendView]:
        """Backends that only other processes' workers run, from what they advertise."""
        grouped: dict[str, list[WorkerInfo]] = {}
        for info in workers:
            if info.backend not in self.members:
                grouped.setdefault(info.backend, []).append(info)
        views = {}
        for name, infos in grouped.items():
            speeds = [i.speed for i in infos if i.speed]
            views[name] = BackendView(
                name=name,
                capabilities=frozenset(c for i in infos for c in i.capabilities),
                models=frozenset(m for i in infos for m in i.models),
                loaded=frozenset(m for i in infos for m in i.loaded),
                tags=frozenset(t for i in infos for t in i.tags),
                slots=len(infos),
                outstanding=backlog.get(name, 0.0)
                + sum(len(i.current_jobs) for i in infos) * _RUNNING_COST,
                speed=max(speeds) if speeds else self._default_speed(None),
                load_seconds=self.routing.load_seconds,
                up=any(i.state != BreakerState.open.value for i in infos),
            )
        return views

    def attach(self, store: JobStore, registry: WorkerRegistry, *, remote: bool) -> None:
        """Where backlogs and (``remote``: scaled out) other processes' workers are read."""
        self.store, self.registry, self.remote = store, registry, remote

    async def workers(self, max_age: float = 1.0) -> list[WorkerInfo]:
        """Live workers of other processes too (scaled out), read at most once a second."""
        if not self.remote or self.registry is None:
            return []
        at, listed = self._workers
        if self.clock() - at > max_age:
            listed = await self.registry.list()
            self._workers = (self.clock(), listed)
        return listed

    async def views(self, max_age: float = 1.0) -> dict[str, BackendView]:
        """Every backend of the deployment as the router sees it now (other processes'
        workers as read at most ``max_age`` seconds ago)."""
        backlog = await self.store.backlog() if self.store is not None else {}
        self._backlog = backlog
        views = self.remote_views(await self.workers(max_age), backlog)
        views.update(self.local_views(backlog))
        return views

    async def route(self, request: GenerationRequest) -> str:
        """Admission: the backend a new job goes to, or a 4xx (see ``route_request``).
        A refusal is only given after reading the live workers afresh."""
        checks = {name: member.backend.check for name, member in self.members.items()}
        try:
            views = await self.views()
            return route_request(request, list(views.values()), checks, self.policy)
        except EaselError:
            if not self.remote:
                raise
        views = await self.views(max_age=0.0)
        return route_request(request, list(views.values()), checks, self.policy)

    async def waiting_reason(self, backend: str) -> str | None:
        """Why a job queued for ``backend`` cannot start now, if it cannot."""
        member = self.members.get(backend)
        if member is not None:
            breaker = member.breaker.tick(self.clock())
            if breaker.up:
                return None
            return (
                f"backend {backend!r} is down ({breaker.last_error}); it is probed every "
                f"{member.spec.breaker.probe_seconds:g}s and the job runs once it is back"
            )
        views = await self.views()
        if backend not in views:
            return f"no live worker runs backend {backend!r}; the job runs once one starts"
        if not views[backend].up:
            return f"backend {backend!r} is down on every worker that runs it"
        return None

    async def relocate(self, job: Job, *, leaving: str) -> str | None:
        """Another backend for a job whose backend failed or is down, if it may move
        (it named no backend, or allows fallback) and one is up and capable."""
        request = job.request
        if request.backend is not None and request.fallback is False:
            return None
        views = await self.views()
        others = [view for name, view in views.items() if name != leaving]
        chosen = choose(want_of(request, moving=True), others, self.policy)
        return None if chosen is None else chosen.name

    async def rebalance(self, limit: int = 500) -> list[tuple[str, str]]:
        """Move queued jobs off down backends, and let idle local backends claim work
        (``routing.claim``): load a model that queued jobs want and nobody has loaded
        (model pressure), and take runs of jobs queued elsewhere. Returns the moves."""
        if self.store is None:
            return []
        views = await self.views()
        # a backend with work queued but no live worker (killed, scaled in) counts as down
        down = {name for name, view in views.items() if not view.up} | (
            set(self._backlog) - set(views)
        )
        idle = [
            name
            for name, member in self.members.items()
            if member.breaker.up
            and member.in_use == 0
            and member.loading is None
            and views[name].outstanding <= 0
        ]
        busy = any(view.outstanding > 0 for view in views.values())
        if not down and not (idle and busy):
            return []
        queued = list(reversed(await self.store.list_jobs(state=JobState.queued, limit=limit)))
        moves: list[tuple[str, str]] = []
        for job in queued:
            if job.backend in down:
                target = await self.relocate(job, leaving=job.backend)
                if target is not None and await self.store.reroute(job.id, target) is not None:
                    moves.append((job.id, target))
        moved = {job_id for job_id, _ in moves}
        for name in idle:
            movable = [
                job
                for job in queued
                if job.id not in moved
                and job.backend != name
                and job.backend in views
                and job.backend not in down
                and (job.request.backend is None or job.request.fallback is not False)
            ]
            wants = [(want_of(job.request, moving=True), job.backend) for job in movable]
            model, taken = claim(name, wants, list(views.values()), self.policy)
            if model is not None and taken:
                self.preload(name, model)
            for index in taken:
                job = movable[index]
                if await self.store.reroute(job.id, name) is not None:
                    moves.append((job.id, name))
                    moved.add(job.id)
            if taken:
                views[name] = self.local_views(self._backlog)[name]
        return moves

    # -- model pressure: a model loaded ahead of the jobs that want it -----------------------

    def preload(self, name: str, model: str) -> None:
        """Start loading ``model`` on the local backend ``name`` (model pressure); the
        worker waits for it (:meth:`settled`) before running that backend's next job."""
        member = self.members[name]
        if member.loading is not None or not member.backend.preloads:
            return
        member.loading = model
        log.info("backend %s loads model %s for the jobs waiting for it", name, model)
        member.load_task = asyncio.create_task(self._load(member, model))

    async def _load(self, member: Member, model: str) -> None:
        began = self.clock()
        try:
            await member.backend.load(model)
        except EaselError as exc:
            log.warning("backend %s could not load %s: %s", member.spec.name, model, exc.message)
            if exc.retryable:
                self.failed(member.spec.name, f"{exc.code}: {exc.message}")
        except Exception as exc:  # the job that wants it loads it again and says why
            log.warning("backend %s could not load %s: %s", member.spec.name, model, exc)
        else:
            member.loads += 1
            member.ready = model
            self.observe_load(member.spec.name, self.clock() - began)
        finally:
            member.loading = None

    async def settled(self, name: str) -> str | None:
        """Once the model the backend is loading ahead of its jobs is loaded (or failed):
        the model loaded ahead since the last run there, if any (that run is warm)."""
        member = self.members.get(name)
        if member is None:
            return None
        if (task := member.load_task) is not None and not task.done():
            await asyncio.wait([task])
        ready, member.ready = member.ready, None
        return ready

    def observe_load(self, name: str, seconds: float, alpha: float = 0.3) -> None:
        """A model load took ``seconds`` there: the load time routing counts, smoothed."""
        member = self.members.get(name)
        if member is None or seconds <= 0:
            return
        member.load_seconds = (
            seconds
            if member.load_seconds is None
            else member.load_seconds + alpha * (seconds - member.load_seconds)
        )

    # -- what happened --------------------------------------------------------------------

    def started(self, name: str, jobs: int = 1) -> None:
        if (member := self.members.get(name)) is not None:
            member.in_use += jobs

    def ended(self, name: str, jobs: int = 1) -> None:
        if (member := self.members.get(name)) is not None:
            member.in_use = max(member.in_use - jobs, 0)

    def observe_speed(
        self, name: str, cost: float, seconds: float, alpha: float = 0.3, *, cold: bool = False
    ) -> None:
        """A run of ``cost`` work units took ``seconds``: the backend's speed, smoothed.
        ``cold``: the run loaded its model first; what it took over a warm run at the
        measured speed is a load time sample instead."""
        member = self.members.get(name)
        if member is None or seconds <= 0 or cost <= 0:
            return
        if cold and member.speed is not None:
            self.observe_load(name, seconds - cost / member.speed, alpha)
            return
        sample = cost / seconds
        member.speed = (
            sample if member.speed is None else member.speed + alpha * (sample - member.speed)
        )

    def succeeded(self, name: str) -> None:
        member = self.members.get(name)
        if member is None:
            return
        before = member.breaker.state
        member.breaker = member.breaker.succeeded()
        if before is not BreakerState.closed:
            log.warning("backend %s is back up", name)

    def failed(self, name: str, error: str) -> bool:
        """A transient failure; True when it took the backend out of routing."""
        member = self.members.get(name)
        if member is None:
            return False
        before = member.breaker.state
        member.breaker = member.breaker.failed(self.clock(), error)
        opened = member.breaker.state is BreakerState.open and before is not BreakerState.open
        if opened:
            log.warning(
                "backend %s is down after %d transient failures (%s); probing again in %.1fs",
                name, member.breaker.failures, error, member.spec.breaker.probe_seconds,
            )  # fmt: skip
        return opened

    def is_up(self, name: str) -> bool:
        member = self.members.get(name)
        return member is None or member.breaker.up

    def down(self) -> list[str]:
        return [name for name, m in self.members.items() if not m.breaker.up]

    # -- health ---------------------------------------------------------------------------

    async def check(self, name: str) -> None:
        """One health check: a success closes the breaker, a failure counts."""
        member = self.members[name]
        if member.checking:
            return
        member.checking = True
        try:
            async with asyncio.timeout(member.spec.timeouts.health_seconds):
                await member.backend.health()
        except TimeoutError:
            self.failed(
                name, f"health check timed out after {member.spec.timeouts.health_seconds}s"
            )
        except EaselError as exc:
            if exc.retryable:
                self.failed(name, exc.message)
        except Exception as exc:  # a health check that crashes is a failed one
            self.failed(name, f"{type(exc).__name__}: {exc}")
        else:
            if member.breaker.state is not BreakerState.closed or member.breaker.failures:
                self.succeeded(name)
        finally:
            member.checking = False

    async def watch(self) -> None:
        """Health checks at each backend's interval; a down backend is probed when its
        breaker allows. Runs until cancelled."""
        due = {name: 0.0 for name in self.members}
        while True:
            now = self.clock()
            for name, member in self.members.items():
                member.breaker = member.breaker.tick(now)
                if now >= due[name] or member.breaker.state is BreakerState.half_open:
                    due[name] = now + member.spec.timeouts.health_interval_seconds
                    await self.check(name)
            await asyncio.sleep(_WATCH_SECONDS)

    async def tend(self, wake: Callable[[], None], every: float = 1.0) -> None:
        """The fleet's upkeep until cancelled: health checks of local backends, and once a
        second jobs moved off down backends or to idle ones (``wake`` rings the workers)."""
        watching = asyncio.create_task(self.watch()) if self.members else None
        try:
            while True:
                await asyncio.sleep(every)
                try:
                    if await self.rebalance():
                        wake()
                except EaselError as exc:
                    log.warning("fleet not rebalanced: %s", exc.message)
        finally:
            loads = [m.load_task for m in self.members.values() if m.load_task is not None]
            for task in [*loads, watching]:
                if task is not None:
                    task.cancel()
            await asyncio.gather(*loads, *([watching] if watching else []), return_exceptions=True)

    # -- what GET /v1/backends shows --------------------------------------------------------

    async def describe(self) -> list[BackendStatus]:
        """``GET /v1/backends``: every backend, read now."""
        backlog = await self.store.backlog() if self.store is not None else {}
        return self.status(backlog, await self.workers(max_age=0.0))

    def status(
        self, backlog: dict[str, float], workers: Collection[WorkerInfo]
    ) -> list[BackendStatus]:
        shown = []
        for name, member in self.members.items():
            served, loaded = member.models()
            breaker = member.breaker.tick(self.clock())
            shown.append(
                BackendStatus(
                    name=name,
                    kind=member.spec.kind,
                    state=breaker.state.value,
                    where="local",
                    slots=member.spec.slots,
                    slots_in_use=min(member.in_use, member.spec.slots),
                    capabilities=_skills(member.capabilities),
                    executors=_engines(member.capabilities),
                    models=sorted(served),
                    loaded_models=sorted(loaded),
                    loading=member.loading,
                    model_loads=member.loads,
                    load_seconds=None
                    if member.load_seconds is None
                    else round(member.load_seconds, 3),
                    tags=member.spec.tags,
                    queued_work=round(backlog.get(name, 0.0), 3),
                    speed=None if member.speed is None else round(member.speed, 3),
                    consecutive_failures=breaker.failures,
                    last_error=breaker.last_error,
                    workers=sorted(w.id for w in workers if w.backend == name),
                )
            )
        remote = self.remote_views(workers, backlog)
        for name, view in remote.items():
            infos = [w for w in workers if w.backend == name]
            states = {i.state for i in infos}
            state = "up" if "up" in states else "probing" if "probing" in states else "down"
            errors = [i.last_error for i in infos if i.last_error]
            shown.append(
                BackendStatus(
                    name=name,
                    kind=infos[0].kind,
                    state=state,
                    where="workers",
                    slots=view.slots,
                    slots_in_use=sum(1 for i in infos if i.current_jobs),
                    capabilities=_skills(view.capabilities),
                    executors=_engines(view.capabilities),
                    models=sorted(view.models),
                    loaded_models=sorted(view.loaded),
                    tags=sorted(view.tags),
                    queued_work=round(backlog.get(name, 0.0), 3),
                    speed=max((i.speed for i in infos if i.speed), default=None),
                    last_error=errors[0] if errors else None,
                    workers=sorted(i.id for i in infos),
                )
            )
        return sorted(shown, key=lambda status: status.name)


_RUNNING_COST = 5.0
"""Work units counted for a job running now (about 512x512 x 20 steps); its own cost is
not at hand where only the count is known."""
_WATCH_SECONDS = 0.5


def _skills(capabilities: Collection[str]) -> list[str]:
    return sorted(
        c
        for c in capabilities
        if not c.startswith(EXECUTOR_PREFIX) and not c.startswith(SAMPLER_PREFIX)
    )


def _engines(capabilities: Collection[str]) -> list[str]:
    """The engine payloads among the router's capabilities (``executor:kandinsky``)."""
    return sorted(
        c.removeprefix(EXECUTOR_PREFIX) for c in capabilities if c.startswith(EXECUTOR_PREFIX)
    )


def _kind_of(backend: Backend) -> str:
    for kind, target in backend_kinds.kinds().items():
        if target.endswith(":" + type(backend).__name__):
            return kind
    return type(backend).__name__
