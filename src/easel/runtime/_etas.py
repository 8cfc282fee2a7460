"""ETAs for views and ``queued`` updates, from a projection of the queue's own policy.

The policy is pure (:mod:`easel.queue.estimates`, :mod:`easel.queue.arrivals`); this
module feeds it the moment's facts: the queued jobs in serving order (the store's fair
queue), the worker lanes (what each runs now, what it claimed ahead, what model it has
loaded), the measured costs and the recent submissions (read from the store every few
seconds, topped up with the queued and running jobs every projection reads). A background
loop projects the whole queue every ``interval`` seconds and announces a ``queued`` event
for each job whose position or expected end moved materially, at most once per
``GAP_INTERVALS`` intervals per job. Both stores tell their serving order
(``JobStore.serving_order``); one that could not would fall back to the position and the
cost ahead (``JobStore.place``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from easel.errors import EaselError
from easel.jobs import Event, EventType, Job, JobState, JobView
from easel.queue.arrivals import (
    NONE,
    WINDOW_SECONDS,
    Overtaking,
    Queued,
    Submitted,
    arrivals,
    overtaken,
)
from easel.queue.estimates import (
    ZERO,
    Announced,
    Estimate,
    Lane,
    Projection,
    Waiting,
    material,
    project,
)
from easel.queue.routing import BackendView, eligible
from easel.queue.scheduler import Entry, Policy, account
from easel.runtime.extensions import Extension

if TYPE_CHECKING:
    from easel.runtime.facade import Runtime

log = logging.getLogger("easel.runtime.etas")

PROJECT_LIMIT = 2000
"""Queued jobs simulated at most by the update loop (those further back get the fallback)."""
DIRECT_LIMIT = 200
"""A view projects the queue up to its job when it has at most this many jobs ahead (cheap
enough for every submit); further back it takes the update loop's latest projection."""


@dataclass
class Projected:
    """One projection of the queue, self-contained."""

    by_id: dict[str, Projection]
    unknown: set[str]
    """Jobs never measured (priced at 0 in the simulation, shown without an ETA)."""
    routes: dict[str, str]
    overtake: dict[str, Overtaking] = field(default_factory=dict)
    """Per job: what later arrivals will run before it (:func:`overtaken`)."""


@dataclass(frozen=True, slots=True)
class _Recent:
    """One recent submission, before its expected model load is priced."""

    backend: str
    model: str | None
    tier: int
    account: str
    at: float
    seconds: float
    cost: float


class Etas(Extension):
    """ETAs of a runtime's jobs; as an extension, it announces their updates."""

    name = "etas"

    def __init__(self, runtime: Runtime, *, interval: float = 1.0) -> None:
        self.runtime = runtime
        self._task: asyncio.Task[None] | None = None
        self.interval = interval
        self.min_gap = GAP_INTERVALS * interval
        self._said: dict[str, Announced] = {}
        self._latest: Projected | None = None
        self._seen: dict[str, _Recent] = {}
        """Submissions in the arrival model's window, by job id."""
        self._read_at = -RECENT_EVERY
        self._policy = Policy(weights=runtime.settings.user_weights)
        self._holder = uuid.uuid4().hex
        self.announcing = True
        """False in a process that only runs jobs (``easel worker``): nobody reads views
        there, and the API replicas announce the updates."""

    # -- the facts --------------------------------------------------------------------

    async def lanes(self, now: float, running: Sequence[Job] = ()) -> list[Lane]:
        """One lane per worker of the deployment: this process's, busy for what their
        current runs have left and the jobs they claimed ahead, and (scaled out) the ones
        other processes advertise. ``running``: the store's running jobs (a claim this
        process's worker has not taken in hand yet counts as claimed ahead)."""
        by_worker: dict[str | None, list[Job]] = {}
        for job in running:
            by_worker.setdefault(job.worker_id, []).append(job)
        lanes = []
        mine = set()
        for worker in self.runtime.workers:
            mine.add(worker.id)
            held = {job.id for job in worker.current}
            claiming = [job for job in by_worker.get(worker.id, []) if job.id not in held]
            lane = self._lane(worker.backend.name, worker.running, [*worker.ahead, *claiming],
                              worker.model, now, cold=worker.cold)  # fmt: skip
            lanes.append(lane)
        for info in await self.runtime.fleet.workers():
            if info.id in mine or info.state == "down":
                continue
            # what it holds ran back to back since the first was claimed (one finishing,
            # one running, one claimed ahead): their runs less the time since
            claimed = by_worker.get(info.id, [])
            model = info.loaded[0] if len(info.loaded) == 1 else None
            lanes.append(self._lane(info.backend, claimed, [], model, now))
        if not lanes:  # nothing works yet: assume one free lane per local backend
            lanes = [Lane(route=name) for name in self.runtime.backends]
        return lanes

    def _lane(
        self,
        route: str,
        running: Sequence[Job],
        ahead: Sequence[Job],
        model: str | None,
        now: float,
        *,
        cold: bool = False,
    ) -> Lane:
        """A worker's lane: free once the call on its backend ends (what its jobs' runs
        have left, and the model's load when the call loads it) and the jobs it claimed
        ahead ran, with the model the last of them leaves loaded."""
        book = self.runtime.run_times.book
        busy = ZERO
        for job in running:
            if (price := self.runtime.run_times.price(job.backend, job.request)) is not None:
                busy = busy + price
        if running:
            if cold:
                busy = busy + _fixed(book.load(route, running[0].request.model))
            elapsed = now - min(job.started_at or now for job in running)
            busy = Estimate(*(max(busy.at(i) - elapsed, 0.0) for i in range(3)))
        for job in ahead:
            price = self.runtime.run_times.price(job.backend, job.request) or ZERO
            wants = job.request.model
            switch = wants is not None and model not in (None, wants)
            busy = busy + price + _fixed(book.load(route, wants) if switch else 0.0)
            busy, model = busy + self._gap(route), wants or model
        return Lane(route=route, free_in=busy, model=model)

    def _waiting(
        self, entries: list[Entry], unknown: set[str], views: Sequence[BackendView]
    ) -> list[Waiting]:
        book = self.runtime.run_times.book
        speeds = {view.name: view.speed for view in views}
        waiting = []
        for entry in entries:
            run: Estimate | None = None
            elsewhere: dict[str, Estimate] = {}
            if entry.shape is not None:
                shape = replace(entry.shape, backend=entry.route)
                run = book.prices(shape, [entry.route], speeds).get(entry.route)
                if entry.want is not None:
                    others = [v.name for v in eligible(entry.want, views) if v.name != entry.route]
                    elsewhere = {
                        route: price + self._gap(route)
                        for route, price in book.prices(shape, others, speeds).items()
                    }
            if run is None:
                unknown.add(entry.job_id)
                run = ZERO
            model = entry.shape.model if entry.shape is not None else None
            waiting.append(
                Waiting(entry.job_id, entry.route, model, run + self._gap(entry.route), elsewhere)
            )
        return waiting

    def _gap(self, route: str) -> Estimate:
        """Claim and events, per job."""
        return self.runtime.run_times.gap(route)

    async def _recent(self) -> list[Job]:
        """The jobs submitted in the arrival model's window (the latest 500), read from
        the store at most once per ``RECENT_EVERY`` seconds (each projection adds the
        queued and running jobs it reads anyway, so the latest submissions are never
        missed)."""
        now = time.monotonic()
        if now - self._read_at < RECENT_EVERY:
            return []
        self._read_at = now
        return await self.runtime.store.list_jobs(since=time.time() - WINDOW_SECONDS, limit=500)

    def _submitted(
        self, jobs: Iterable[Job], entries: Sequence[Entry], waiting: Sequence[Waiting]
    ) -> list[Submitted]:
        """Recent submissions, each priced as the work it brings: its run with its gap,
        and the model load it is expected to cause (a load in proportion to the share of
        jobs on its backend that want another model)."""
        run_times, seen = self.runtime.run_times, self._seen
        for job in jobs:
            if (price := run_times.price(job.backend, job.request)) is not None:
                seen[job.id] = _Recent(
                    job.backend, job.request.model, self._policy.tier(job.request.priority),
                    account(job.service, job.user_id), job.created_at,
                    price.mid + run_times.gap(job.backend).mid, job.request.cost,
                )  # fmt: skip
        for entry, wait in zip(entries, waiting, strict=True):
            if wait.run.mid > 0:
                seen[entry.job_id] = _Recent(
                    entry.route, wait.model, self._policy.tier(entry.priority),
                    entry.account, entry.enqueued_at, wait.run.mid, entry.cost,
                )  # fmt: skip
        horizon = time.time() - WINDOW_SECONDS
        for old in [job_id for job_id, one in seen.items() if one.at < horizon]:
            del seen[old]
        models: dict[str, dict[str | None, int]] = {}
        for one in seen.values():
            per = models.setdefault(one.backend, {})
            per[one.model] = per.get(one.model, 0) + 1
        out = []
        for one in seen.values():
            per = models[one.backend]
            others = 1.0 - per[one.model] / sum(per.values())
            load = others * self.runtime.run_times.book.load(one.backend, one.model)
            out.append(Submitted(one.tier, one.account, one.at, one.seconds + load, one.cost))
        return out

    async def projections(self, limit: int = PROJECT_LIMIT) -> Projected | None:
        """The first ``limit`` queued jobs' projections; None: the store cannot tell."""
        await self._synced()
        entries = await self.runtime.store.serving_order(limit)
        if entries is None:
            return None
        unknown: set[str] = set()
        views = list((await self.runtime.fleet.views()).values())
        waiting = self._waiting(entries, unknown, views)
        running = await self.runtime.store.list_jobs(state=JobState.running, limit=1000)
        lanes = await self.lanes(time.time(), running)
        projected = project(waiting, lanes, self.runtime.run_times.book.load)
        lanes_of: dict[str, int] = {}
        for lane in lanes:
            lanes_of[lane.route] = lanes_of.get(lane.route, 0) + 1
        order = [
            Queued(e.job_id, self._policy.tier(e.priority), e.account, e.cost, p.wait.mid,
                   lanes_of.get(e.route, 1))
            for e, p in zip(entries, projected, strict=False)
        ]  # fmt: skip
        recent = [*await self._recent(), *running]
        rates = arrivals(self._submitted(recent, entries, waiting), time.time())
        if len(order) > INLINE_LIMIT:  # tenths of a second for thousands: not loop work
            overtake = await asyncio.to_thread(overtaken, order, rates, self._weight)
        else:
            overtake = overtaken(order, rates, self._weight)
        result = Projected(
            {p.job_id: p for p in projected},
            unknown,
            {e.job_id: e.route for e in entries},
            overtake,
        )
        if limit == PROJECT_LIMIT:
            self._latest = result
        return result

    def _weight(self, name: str) -> float:
        """An account's fair-share weight (``service/user``, or a bare user id)."""
        service, _, user = name.partition("/") if "/" in name else ("", "", name)
        return self._policy.weight(service or None, user)

    # -- views ------------------------------------------------------------------------

    async def _synced(self) -> None:
        """Measured times as every process of the deployment kept them in the store."""
        with contextlib.suppress(EaselError):  # a store that is down: the last ones known
            await self.runtime.timings.sync(flush=False)  # writes are the loop's

    async def fields(self, job: Job) -> dict[str, Any]:
        """``position`` and the ETA fields of a job's view (empty when unknown)."""
        await self._synced()
        if job.state is JobState.running:
            price = self.runtime.run_times.price(job.backend, job.request)
            if price is None:
                return {}
            elapsed = time.time() - (job.started_at or time.time())
            left = Estimate(*(max(price.at(i) - elapsed, 0.0) for i in range(3)))
            return _eta_fields(ZERO, left + self.runtime.run_times.finish(job.backend))
        if job.state is not JobState.queued:
            return {}
        place = await self.runtime.store.place(job.id)
        if place is None:
            return {}
        if place.position < DIRECT_LIMIT:
            projected = await self.projections(limit=place.position + 1)
        else:
            projected = self._latest
        if projected is None or job.id not in projected.by_id:
            return await self._fallback(job)
        projection = projected.by_id[job.id]
        if projected.unknown and place.position < DIRECT_LIMIT:
            return {"position": place.position}  # something ahead was never measured
        return {"position": place.position, **self.fields_of(projected, projection)}

    def announced(self, view: JobView) -> None:
        """What the ``queued`` event at submit said: later updates compare with it."""
        if view.position is None or view.eta_seconds is None:
            return
        now = time.monotonic()
        self._said[view.id] = Announced(view.position, now, now + view.eta_seconds)

    def fields_of(self, projected: Projected, projection: Projection) -> dict[str, float]:
        """The ETA fields of one job of a projection (empty: it was never measured): its
        wait as projected plus what later arrivals are expected to run before it."""
        if projection.job_id in projected.unknown:
            return {}
        later = projected.overtake.get(projection.job_id, NONE)
        wait = projection.wait + _fixed(later.expected)
        whole = replace(projection, wait=wait, run=self._own(projected, projection),
                        wait_var=projection.wait_var + later.variance)  # fmt: skip
        total = whole.total
        total = replace(total, high=max(total.high, total.mid + later.bound))
        return _eta_fields(wait, whole.run, total)

    def _own(self, projected: Projected, projection: Projection) -> Estimate:
        """A job's own run, ending when its results are committed."""
        route = projected.routes.get(projection.job_id)
        return projection.run + (ZERO if route is None else self.runtime.run_times.finish(route))

    async def _fallback(self, job: Job) -> dict[str, Any]:
        place = await self.runtime.store.place(job.id)
        if place is None:
            return {}
        workers = sum(1 for w in self.runtime.workers if w.backend.name == job.backend)
        run_times = self.runtime.run_times
        eta = run_times.eta(job.backend, job.request, place.cost_ahead, workers)
        own = run_times.estimate(job.backend, job.request)
        if eta is None or own is None:
            return {"position": place.position}
        return {
            "position": place.position,
            **_eta_fields(_fixed(eta - own), _fixed(own)),
        }

    # -- updates ----------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self.follow(), name="easel-etas")

    async def stop(self, grace: float) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def follow(self) -> None:
        """Announce materially changed positions and ETAs of waiting jobs, forever."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.announce()
            except EaselError as exc:
                log.warning("could not update ETAs: %s", exc.message)
            except Exception:
                log.exception("could not update ETAs")

    async def announce(self) -> int:
        """One round of updates; returns the events published. One process of a
        deployment announces (the store's ``lead``), so no update is sent twice."""
        lease = max(3 * self.interval, 2.0)
        if not self.announcing or not await self.runtime.store.lead("etas", self._holder, lease):
            return 0
        projected = await self.projections()
        if projected is None:
            return 0
        now = time.monotonic()
        for gone in self._said.keys() - projected.by_id.keys():
            del self._said[gone]
        published = 0
        for job_id, projection in projected.by_id.items():
            fields = self.fields_of(projected, projection)
            if not fields:  # never measured
                continue
            said = self._said.get(job_id)
            now_said = Announced(projection.position, now, now + fields["eta_seconds"])
            if said is None:  # a job queued before this process (or from another one)
                self._said[job_id] = now_said
                continue
            if now - said.at < self.min_gap or not material(said, now_said):
                continue
            with contextlib.suppress(EaselError):
                job = await self.runtime.store.get(job_id)
                if job.state is not JobState.queued:
                    continue
                await self.runtime.bus.publish(
                    Event.of(job, EventType.queued, position=projection.position, **fields)
                )
                published += 1
            self._said[job_id] = now_said
        return published


GAP_INTERVALS = 3
"""A job's ETA updates are at least this many update intervals apart."""
RECENT_EVERY = 5.0
"""Seconds between two reads of the recent submissions from the store."""
INLINE_LIMIT = 50
"""Queued jobs whose arrivals are counted on the event loop (a few milliseconds); longer
queues are counted on a thread."""


def _fixed(seconds: float) -> Estimate:
    """A time known exactly (p10 = p50 = p90)."""
    return Estimate(seconds, seconds, seconds)


def _eta_fields(wait: Estimate, run: Estimate, total: Estimate | None = None) -> dict[str, float]:
    total = total or wait + run
    return {
        "eta_seconds": round(total.mid, 3),
        "wait_eta_seconds": round(wait.mid, 3),
        "run_eta_seconds": round(run.mid, 3),
        "eta_low_seconds": round(total.low, 3),
        "eta_high_seconds": round(total.high, 3),
    }
