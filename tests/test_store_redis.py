"""RedisStore beyond the contract suite: the same serving order as the policy, retention,
durability and failing fast. A real redis-server (``redis_url``), one key prefix per case."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from easel.errors import StoreUnavailable
from easel.jobs import GenerationRequest, Job, JobState
from easel.queue.scheduler import FairQueue, Policy, entry_for
from easel.store.base import JobStore
from easel.store.redis import RedisStore
from easel.store.sqlite import SqliteStore
from tests.servers import free_port

LEASE = 1000.0
SIZES = [(64, 64, 1), (128, 64, 2), (64, 64, 5), (256, 256, 1)]  # different costs
ROUTES = [("mock",), ("other",), ("mock", "other")]
AGING = 6.0
_ids = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def make_job(
    user: str, priority: int, route: str, size: int, at: float, service: str | None = None
) -> Job:
    width, height, steps = SIZES[size]
    request = GenerationRequest(
        prompt="p", user_id=user, priority=priority, width=width, height=height, steps=steps,
        seed=1,
    )  # fmt: skip
    return Job(
        id=f"j{next(_ids):08d}", request=request, backend=route, created_at=at, service=service
    )


enqueue = st.tuples(
    st.just("enqueue"),
    st.sampled_from("abcd"),
    st.sampled_from([-1, 0, 0, 5, 10]),
    st.sampled_from(["mock", "mock", "other"]),
    st.integers(0, len(SIZES) - 1),
    st.sampled_from([None, None, "s", "t"]),  # one user id in several services: accounts
)
operation = st.one_of(
    enqueue,
    enqueue,
    enqueue,  # queues build up, so aging and routes matter
    st.tuples(st.just("claim"), st.integers(0, len(ROUTES) - 1), st.integers(1, 3)),
    st.tuples(st.just("requeue"), st.integers(0, 30)),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("complete"), st.integers(0, 30)),
    st.tuples(st.just("tick"), st.integers(1, 4)),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(operation, min_size=10, max_size=80))
# a job served past an earlier one of another route, then put back: it goes first again
@example(
    [
        ("enqueue", "a", 0, "mock", 0, None),
        ("enqueue", "a", 0, "other", 0, None),
        ("claim", 1, 1),
        ("requeue", 0),
        ("claim", 2, 3),
    ]
)
# aging: a standard job waits past the bound while premium work keeps arriving
@example([("enqueue", "a", 0, "mock", 0, None), *[("enqueue", "b", 10, "mock", 1, "s")] * 6,
          ("tick", 4), ("tick", 4), *[("claim", 0, 1)] * 5])  # fmt: skip
async def test_serving_order_and_places_match_the_fair_queue(
    redis_url: str, ops: list[tuple[object, ...]]
) -> None:
    """Random arrivals, claims (routes, batches), put-backs, cancels and time: RedisStore
    serves in exactly FairQueue's order, tells it (``serving_order``, for ETAs) and gives
    the same places (positions and cost ahead), aging, tiers, weights, routes and accounts
    (service, user) included. FairQueue is what SqliteStore runs."""
    policy = Policy(aging_seconds=AGING, weights={"a": 2.0, "s/b": 3.0}, aged_every=3)
    clock = Clock()
    store = RedisStore(redis_url, prefix=f"diff:{uuid.uuid4().hex}:", policy=policy, clock=clock)
    await store.open()
    model = FairQueue(policy)
    jobs: dict[str, Job] = {}
    running: list[str] = []
    try:
        for op in ops:
            kind = op[0]
            clock.now += 0.5
            if kind == "enqueue":
                _, user, priority, route, size, service = op
                new = make_job(str(user), int(priority), str(route), int(size), clock.now,  # type: ignore[call-overload]
                               None if service is None else str(service))  # fmt: skip
                await store.enqueue(new, user_cap=1000)
                model.push(entry_for(new))
                jobs[new.id] = new
            elif kind == "claim":
                routes, limit = ROUTES[int(op[1])], int(op[2])  # type: ignore[call-overload]
                got = await store.claim_batch("w", routes, lease_seconds=LEASE, limit=limit)
                expected = model.pop_batch(routes, limit, now=clock.now)
                assert [j.id for j in got] == [e.job_id for e in expected]
                running.extend(j.id for j in got)
            elif kind in {"requeue", "complete"} and running:
                job_id = running.pop(int(op[1]) % len(running))  # type: ignore[call-overload]
                if kind == "requeue":
                    back = await store.requeue(job_id, worker_id="w", spend_attempt=False)
                    assert back.state is JobState.queued
                    model.push_front(entry_for(jobs[job_id]))
                else:
                    await store.complete(job_id, "w", [])
            elif kind == "cancel" and jobs:
                job_id = list(jobs)[int(op[1]) % len(jobs)]  # type: ignore[call-overload]
                if (await store.get(job_id)).state.is_final:
                    continue
                await store.cancel(job_id)
                model.remove(job_id)
                if job_id in running:
                    running.remove(job_id)
            elif kind == "tick":
                clock.now += float(op[1])  # type: ignore[arg-type]
            await _same_places(store, model)
        model.age(clock.now)  # the store's serving order ages the queue at its clock
        served = await store.serving_order(len(model) + 1)
        assert served is not None
        assert [(e.job_id, e.route) for e in served] == [(e.job_id, e.route) for e in model.order()]
        stats = await store.stats()
        assert stats.tiers == model.tier_counts() and stats.users == model.user_counts()
    finally:
        await store.close()


async def _same_places(store: RedisStore, model: FairQueue) -> None:
    order = [entry.job_id for entry in model.order()]
    for index, job_id in enumerate(order):
        expected = model.place(job_id)
        got = await store.place(job_id)
        assert got is not None and expected is not None
        assert got.position == expected.position == index
        assert got.cost_ahead == pytest.approx(expected.cost_ahead, rel=1e-9, abs=1e-12)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.sampled_from([0, 0, 10]), st.booleans()),
        max_size=40,
    )
)
async def test_same_serving_order_as_sqlite(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, bool]]
) -> None:
    """The two stores side by side (no aging: SqliteStore reads the wall clock)."""
    policy = Policy(aging_seconds=None)
    redis_store = RedisStore(redis_url, prefix=f"pair:{uuid.uuid4().hex}:", policy=policy)
    sqlite_store = SqliteStore(tmp_path_factory.mktemp("pair") / "jobs.db", policy=policy)
    stores: list[JobStore] = [redis_store, sqlite_store]
    for store in stores:
        await store.open()
    try:
        for i, (user, priority, claim) in enumerate(ops):
            if claim:
                got = [await s.claim_batch("w", ["mock"], lease_seconds=LEASE, limit=2)
                       for s in stores]  # fmt: skip
                assert [j.id for j in got[0]] == [j.id for j in got[1]]
            else:
                new = make_job(user, priority, "mock", i % len(SIZES), time.time())
                for store in stores:
                    await store.enqueue(new, user_cap=1000)
        drained = [[j.id for j in await _drain(s)] for s in stores]
        assert drained[0] == drained[1]
    finally:
        for store in stores:
            await store.close()


async def _drain(store: JobStore) -> list[Job]:
    out = []
    while batch := await store.claim_batch("w", ["mock"], lease_seconds=LEASE, limit=1):
        out.extend(batch)
    return out


async def test_finished_records_expire_after_the_retention(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix=f"ret:{uuid.uuid4().hex}:", retention_seconds=0.2)
    await store.open()
    try:
        done = await store.enqueue(make_job("a", 0, "mock", 0, time.time()), user_cap=10)
        kept = await store.enqueue(make_job("a", 0, "mock", 0, time.time()), user_cap=10)
        await store.claim("w", ["mock"], lease_seconds=LEASE)
        await store.complete(done.id, "w", [])
        await store.expire_leases()
        assert (await store.get(done.id)).state is JobState.succeeded  # not yet
        await asyncio.sleep(0.3)
        await store.expire_leases()  # the sweep runs with the lease reaper
        assert [j.id for j in await store.list_jobs()] == [kept.id]
        assert await store.list_jobs(user_id="a", state=JobState.succeeded) == []
        with pytest.raises(Exception, match="no job"):
            await store.get(done.id)
        assert (await store.get(kept.id)).state is JobState.queued  # unfinished jobs stay
    finally:
        await store.close()


async def test_durability_is_detected_from_the_aof_settings(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="dur:")
    await store.open()
    try:
        assert store.durability.startswith("on disk before 2xx (AOF, appendfsync always)")
    finally:
        await store.close()


async def test_an_unreachable_redis_fails_fast_with_store_unavailable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    began = time.monotonic()
    with pytest.raises(StoreUnavailable) as refused:
        await store.open()
    assert refused.value.status == 503 and refused.value.code == "store_unavailable"
    assert time.monotonic() - began < 3


async def test_a_stopped_redis_times_out_instead_of_hanging(tmp_path: Path) -> None:
    """SIGSTOP'd Redis: connected sockets get no answer; the socket timeout bounds the wait."""
    import os
    import signal

    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis", aof=False).start()
    store = RedisStore(server.url, prefix="stop:", socket_timeout=0.5)
    await store.open()
    assert server.process is not None
    try:
        os.kill(server.process.pid, signal.SIGSTOP)
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get("x")
        assert time.monotonic() - began < 2
        os.kill(server.process.pid, signal.SIGCONT)
        with pytest.raises(Exception, match="no job"):  # and it recovers
            await store.get("x")
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        await store.close()
        server.stop()


async def test_every_field_of_a_job_round_trips(redis_url: str) -> None:
    """What the scripts do not touch is kept as the job's own JSON: fields added to Job
    later survive the store without a change to it."""
    store = RedisStore(redis_url, prefix=f"rt:{uuid.uuid4().hex}:")
    await store.open()
    try:
        request = GenerationRequest(
            prompt="p", user_id="a", seed=7, metadata={"chat": 42, "tags": ["x"]}, priority=3
        )
        made = Job(request=request, backend="mock")
        await store.enqueue(made, user_cap=10)
        assert await store.get(made.id) == made
        claimed = await store.claim("w", ["mock"], lease_seconds=LEASE)
        assert claimed is not None
        assert claimed.model_dump(exclude={"state", "started_at", "attempts", "worker_id"}) == (
            made.model_dump(exclude={"state", "started_at", "attempts", "worker_id"})
        )
    finally:
        await store.close()


async def test_one_process_leads_a_duty_until_its_lease_ends(redis_url: str) -> None:
    """ETA updates are announced by one process of a deployment: the store's ``lead``."""
    prefix = f"lead:{uuid.uuid4().hex}:"
    one, two = RedisStore(redis_url, prefix=prefix), RedisStore(redis_url, prefix=prefix)
    await one.open()
    await two.open()
    try:
        assert await one.lead("etas", "a", 0.3)
        assert not await two.lead("etas", "b", 0.3)
        assert await one.lead("etas", "a", 0.05)  # renewed by its holder
        async with asyncio.timeout(5):
            while not await two.lead("etas", "b", 5.0):  # taken once the lease ran out
                await asyncio.sleep(0.05)
        assert not await one.lead("etas", "a", 5.0)
    finally:
        await one.close()
        await two.close()
