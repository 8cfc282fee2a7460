"""ETAs for views and ``queued`` updates, from a projection of the queue's own policy.

The policy is pure (:mod:`easel.queue.estimates`); this module feeds it the moment's
facts: the queued jobs in serving order (the store's fair queue), the worker lanes (what
each runs now, what model it has loaded) and the measured costs. A background loop
projects the whole queue every ``interval`` seconds and announces a ``queued`` event for
each job whose position or ETA moved materially, at most once per ``min_gap`` seconds
per job. Both stores tell their serving order (``JobStore.serving_order``); one that
could not would fall back to the position and the cost ahead (``JobStore.place``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from easel.errors import EaselError
from easel.jobs import Event, EventType, Job, JobState, JobView
from easel.queue.estimates import (
    ZERO,
    Estimate,
    Lane,
    Projection,
    Waiting,
    material,
    overtaking,
    project,
)
from easel.queue.routing import BackendView, eligible
from easel.queue.scheduler import Entry
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
    users: dict[str, str] = field(default_factory=dict)
    overtake: dict[str, float] = field(default_factory=dict)
    """Per job: seconds other users' later jobs may take before it (``overtaking``)."""


@dataclass
class _Said:
    projection: Projection
    at: float


class Etas(Extension):
    """ETAs of a runtime's jobs; as an extension, it announces their updates."""

    name = "etas"

    def __init__(self, runtime: Runtime, *, interval: float = 1.0, min_gap: float = 3.0) -> None:
        self.runtime = runtime
        self._task: asyncio.Task[None] | None = None
        self.interval = interval
        self.min_gap = min_gap
        self._said: dict[str, _Said] = {}
        self._latest: Projected | None = None
        self._pushed: dict[str, float] = {}
        """Per user: seconds its waiting jobs were pushed back per second waited, lately
        (smoothed): later arrivals that overtook them."""
        self._last: tuple[float, Projected] | None = None
        self._recent: tuple[float, set[str]] = (0.0, set())
        self._holder = uuid.uuid4().hex
        self.announcing = True
        """False in a process that only runs jobs (``easel worker``): nobody reads views
        there, and the API replicas announce the updates."""

    # -- the facts --------------------------------------------------------------------

    async def lanes(self, now: float) -> list[Lane]:
        """One lane per worker of the deployment: this process's, busy for what their
        current runs have left, and (scaled out) the ones other processes advertise."""
        lanes = []
        mine = set()
        for worker in self.runtime.workers:
            mine.add(worker.id)
            busy = ZERO
            for job in worker.running:
                busy = self._left(job, now)
            lanes.append(Lane(route=worker.backend.name, free_in=busy, model=worker.model))
        others = [info for info in await self.runtime.fleet.workers() if info.id not in mine]
        running: dict[str | None, list[Job]] = {}
        if others:  # what they run, from the store (their advertisements lag a beat)
            for job in await self.runtime.store.list_jobs(state=JobState.running, limit=1000):
                running.setdefault(job.worker_id, []).append(job)
        for info in others:
            if info.state == "down":
                continue
            busy = ZERO
            for job in running.get(info.id, []):
                busy = self._left(job, now)
            model = info.loaded[0] if len(info.loaded) == 1 else None
            lanes.append(Lane(route=info.backend, free_in=busy, model=model))
        if not lanes:  # nothing works yet: assume one free lane per local backend
            lanes = [Lane(route=name) for name in self.runtime.backends]
        return lanes

    def _left(self, job: Job, now: float) -> Estimate:
        """What a running job's run has left."""
        price = self.runtime.run_times.price(job.backend, job.request)
        if price is None or job.state is not JobState.running:
            return ZERO
        elapsed = now - (job.started_at or now)
        return Estimate(*(max(price.at(i) - elapsed, 0.0) for i in range(3)))

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
        gap = self.runtime.run_times.gap(route)
        return Estimate(gap, gap, gap)

    async def _recent_users(self) -> set[str]:
        """Users who submitted lately (``RECENT_SECONDS``): who may well submit again
        while a job waits. Read from the store at most once per ``interval``."""
        now = time.time()
        at, users = self._recent
        if now - at > max(self.interval, RECENT_EVERY):
            jobs = await self.runtime.store.list_jobs(since=now - RECENT_SECONDS, limit=500)
            users = {job.user_id for job in jobs}
            self._recent = (now, users)
        return users

    async def projections(self, limit: int = PROJECT_LIMIT) -> Projected | None:
        """The first ``limit`` queued jobs' projections; None: the store cannot tell."""
        await self._synced()
        entries = await self.runtime.store.serving_order(limit)
        if entries is None:
            return None
        unknown: set[str] = set()
        views = list((await self.runtime.fleet.views()).values())
        waiting = self._waiting(entries, unknown, views)
        lanes = await self.lanes(time.time())
        projected = project(waiting, lanes, self.runtime.run_times.book.load)
        active = set((await self.runtime.store.stats()).users) | await self._recent_users()
        runs = [(w.job_id, e.user_id, w.run.mid) for w, e in zip(waiting, entries, strict=True)]
        lanes_of: dict[str, int] = {}
        for lane in lanes:
            lanes_of[lane.route] = lanes_of.get(lane.route, 0) + 1
        overtake = {
            job_id: seconds / max(lanes_of.get(route, 1), 1)
            for (job_id, seconds), route in zip(
                overtaking(runs, active).items(), (e.route for e in entries), strict=True
            )
        }
        result = Projected(
            {p.job_id: p for p in projected},
            unknown,
            {e.job_id: e.route for e in entries},
            {e.job_id: e.user_id for e in entries},
            overtake,
        )
        if limit == PROJECT_LIMIT:
            self._latest = result
        return result

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
            finish = self.runtime.run_times.finish(job.backend)
            return _eta_fields(ZERO, left + Estimate(finish, finish, finish))
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
        if view.position is None:
            return
        wait = view.wait_eta_seconds or 0.0
        run = view.run_eta_seconds or 0.0
        said = Projection(view.id, view.position, Estimate(wait, wait, wait),
                          Estimate(run, run, run))  # fmt: skip
        self._said[view.id] = _Said(said, time.monotonic())

    def fields_of(self, projected: Projected, projection: Projection) -> dict[str, float]:
        """The ETA fields of one job of a projection (empty: it was never measured)."""
        if projection.job_id in projected.unknown:
            return {}
        own = self._own(projected, projection)
        total = replace(projection, run=own).total
        # who arrives: a user whose waiting jobs kept being overtaken lately (other users'
        # fair share, premium work) can expect more of it while this one waits
        user = projected.users.get(projection.job_id)
        pushed = self._pushed.get(user, 0.0) * projection.wait.mid if user is not None else 0.0
        may = projected.overtake.get(projection.job_id, 0.0)
        total = Estimate(total.low, total.mid, total.high + max(pushed, may))
        return _eta_fields(projection.wait, own, total)

    def _own(self, projected: Projected, projection: Projection) -> Estimate:
        """A job's own run, ending when its results are committed."""
        route = projected.routes.get(projection.job_id)
        finish = self.runtime.run_times.finish(route) if route is not None else 0.0
        return projection.run + Estimate(finish, finish, finish)

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
            **_eta_fields(Estimate(eta - own, eta - own, eta - own), Estimate(own, own, own)),
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

    def _measure_pushes(self, projected: Projected, now: float) -> None:
        """How far each user's waiting jobs were pushed back since the last round, per
        second: a job's wait should have shrunk by the time that passed; what it did not
        is work that arrived and went ahead of it."""
        last, self._last = self._last, (now, projected)
        if last is None or now - last[0] <= 0:
            return
        before, elapsed = last[1], now - last[0]
        pushes: dict[str, list[float]] = {}
        for job_id, projection in projected.by_id.items():
            old = before.by_id.get(job_id)
            user = projected.users.get(job_id)
            if old is None or user is None or job_id in projected.unknown:
                continue
            grown = projection.wait.mid - max(old.wait.mid - elapsed, 0.0)
            pushes.setdefault(user, []).append(min(max(grown / elapsed, 0.0), 10.0))
        for user in pushes.keys() | self._pushed.keys():
            rates = pushes.get(user, [0.0])
            rate = sum(rates) / len(rates)
            smoothed = self._pushed.get(user, rate) + PUSH_ALPHA * (
                rate - self._pushed.get(user, rate)
            )
            if smoothed < 1e-3 and user not in pushes:
                self._pushed.pop(user, None)
            else:
                self._pushed[user] = smoothed

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
        self._measure_pushes(projected, now)
        for gone in self._said.keys() - projected.by_id.keys():
            del self._said[gone]
        published = 0
        for job_id, projection in projected.by_id.items():
            said = self._said.get(job_id)
            if job_id in projected.unknown:
                continue
            if said is None:  # a job queued before this process (or from another one)
                self._said[job_id] = _Said(projection, now)
                continue
            if now - said.at < self.min_gap:
                continue
            if not material(said.projection, projection):
                continue
            with contextlib.suppress(EaselError):
                job = await self.runtime.store.get(job_id)
                if job.state is not JobState.queued:
                    continue
                fields = self.fields_of(projected, projection)
                await self.runtime.bus.publish(
                    Event.of(job, EventType.queued, position=projection.position, **fields)
                )
                published += 1
            self._said[job_id] = _Said(projection, now)
        return published


RECENT_SECONDS = 600.0
"""Users who submitted within this many seconds count as ones who may submit again."""
RECENT_EVERY = 5.0
"""Seconds between two reads of the recent users (the last 500 jobs' users)."""
PUSH_ALPHA = 0.3
"""Smoothing of the per-user push-back rate, per update round."""


def _eta_fields(wait: Estimate, run: Estimate, total: Estimate | None = None) -> dict[str, float]:
    total = total or wait + run
    return {
        "eta_seconds": round(total.mid, 3),
        "wait_eta_seconds": round(wait.mid, 3),
        "run_eta_seconds": round(run.mid, 3),
        "eta_low_seconds": round(total.low, 3),
        "eta_high_seconds": round(total.high, 3),
    }
