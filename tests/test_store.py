"""The JobStore contract: every store must pass this suite unchanged.

A new store (e.g. Redis) is added to ``store_factory`` below and is done when it passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from easel.errors import (
    JobFinished,
    JobNotFound,
    JobNotQueued,
    LeaseLost,
    QueueFull,
    UserQueueFull,
)
from easel.jobs import (
    AudioFormat,
    AudioRef,
    GenerationRequest,
    ImageRef,
    Job,
    JobError,
    JobKind,
    JobState,
)
from easel.store.base import TIMINGS_KEEP, JobStore, Timing, Timings
from easel.store.sqlite import SqliteStore

StoreFactory = Callable[[], Awaitable[JobStore]]
LEASE = 30.0


class Clock:
    """Frozen time that a test moves forward: leases expire and backoffs end without a sleep."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "redis"])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[StoreFactory]:
    """Opens a store over the same durable location each call (a restart)."""
    opened: list[JobStore] = []
    prefix = f"test:{tmp_path.name}:"  # one Redis keyspace per test

    async def open_store() -> JobStore:
        store: JobStore
        if request.param == "redis":
            from easel.store.redis import RedisStore

            url = request.getfixturevalue("redis_url")
            store = RedisStore(url, prefix=prefix, max_attempts=2, max_queue_size=50, clock=clock)
        else:
            path = tmp_path / "jobs.db"
            store = SqliteStore(path, max_attempts=2, max_queue_size=50, clock=clock)
        await store.open()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> JobStore:
    return await store_factory()


def job(
    user: str = "alice",
    priority: int = 0,
    backend: str = "mock",
    prompt: str = "p",
    service: str | None = None,
) -> Job:
    request = GenerationRequest(prompt=prompt, user_id=user, priority=priority, seed=1)
    return Job(request=request, backend=backend, service=service)


async def drain(store: JobStore, routes: tuple[str, ...] = ("mock",)) -> list[Job]:
    claimed = []
    while (next_job := await store.claim("w", routes, lease_seconds=LEASE)) is not None:
        claimed.append(next_job)
    return claimed


async def test_enqueue_then_get_and_list(store: JobStore) -> None:
    first = await store.enqueue(job("alice"), user_cap=10)
    second = await store.enqueue(job("bob"), user_cap=10)
    assert (await store.get(first.id)).request == first.request
    assert [j.id for j in await store.list_jobs()] == [second.id, first.id]
    assert [j.id for j in await store.list_jobs(user_id="alice")] == [first.id]
    assert await store.list_jobs(state=JobState.running) == []


async def test_get_unknown_job(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        await store.get("nope")


async def test_enqueued_job_survives_a_restart(
    store: JobStore, store_factory: StoreFactory
) -> None:
    accepted = await store.enqueue(job(), user_cap=10)
    await store.close()
    reopened = await store_factory()
    assert (await reopened.get(accepted.id)).state is JobState.queued
    assert [j.id for j in await drain(reopened)] == [accepted.id]


async def test_a_setting_is_per_scope_replaced_and_survives_a_restart(
    store: JobStore, store_factory: StoreFactory
) -> None:
    """A1111's /options model per service: another scope never sees it, a second put
    replaces it, and a second process (or a restart) reads what the first wrote."""
    assert await store.get_setting("alpha", "a1111:model") is None
    await store.put_setting("alpha", "a1111:model", "first")
    await store.put_setting("alpha", "a1111:model", "mock-xl")
    await store.put_setting("bravo", "a1111:model", "mock")
    other = await store_factory()  # a second process on the same store
    assert await other.get_setting("alpha", "a1111:model") == "mock-xl"
    assert await other.get_setting("bravo", "a1111:model") == "mock"
    assert await other.get_setting("", "a1111:model") is None
    assert await other.get_setting("alpha", "another") is None


async def test_claim_leases_in_priority_then_round_robin_order(store: JobStore) -> None:
    a1 = await store.enqueue(job("alice"), user_cap=10)
    a2 = await store.enqueue(job("alice"), user_cap=10)
    a3 = await store.enqueue(job("alice"), user_cap=10)
    b1 = await store.enqueue(job("bob"), user_cap=10)
    premium = await store.enqueue(job("carol", priority=10), user_cap=10)
    order = [j.id for j in await drain(store)]
    assert order == [premium.id, a1.id, b1.id, a2.id, a3.id]


async def test_claim_marks_running_with_an_attempt(store: JobStore) -> None:
    queued = await store.enqueue(job(), user_cap=10)
    claimed = await store.claim("w1", ["mock"], lease_seconds=LEASE)
    assert claimed is not None and claimed.id == queued.id
    assert claimed.state is JobState.running
    assert claimed.worker_id == "w1" and claimed.attempts == 1 and claimed.started_at
    assert (await store.get(queued.id)).state is JobState.running


async def test_claim_only_routes_the_worker_serves(store: JobStore) -> None:
    other = await store.enqueue(job(backend="diffusers"), user_cap=10)
    mine = await store.enqueue(job(backend="mock"), user_cap=10)
    assert [j.id for j in await drain(store, ("mock",))] == [mine.id]
    assert [j.id for j in await drain(store, ("diffusers",))] == [other.id]


async def test_concurrent_claims_never_share_a_job(store: JobStore) -> None:
    ids = {(await store.enqueue(job(f"u{i}"), user_cap=10)).id for i in range(5)}
    results = await asyncio.gather(
        *(store.claim(f"w{i}", ["mock"], lease_seconds=LEASE) for i in range(10))
    )
    claimed = [r.id for r in results if r is not None]
    assert sorted(claimed) == sorted(ids)


async def test_heartbeat_only_for_the_holder(store: JobStore) -> None:
    queued = await store.enqueue(job(), user_cap=10)
    await store.claim("w1", ["mock"], lease_seconds=LEASE)
    assert await store.heartbeat(queued.id, "w1", lease_seconds=LEASE)
    assert not await store.heartbeat(queued.id, "w2", lease_seconds=LEASE)
    await store.cancel(queued.id)
    assert not await store.heartbeat(queued.id, "w1", lease_seconds=LEASE)


async def test_complete_records_images_once(store: JobStore) -> None:
    queued = await store.enqueue(job(), user_cap=10)
    await store.claim("w1", ["mock"], lease_seconds=LEASE)
    image = ImageRef(index=0, seed=1, width=8, height=8, path="x.png", url="/x")
    with pytest.raises(LeaseLost):
        await store.complete(queued.id, "w2", [image])
    done = await store.complete(queued.id, "w1", [image])
    assert done.state is JobState.succeeded and done.images == [image] and done.finished_at
    with pytest.raises((LeaseLost, JobFinished)):
        await store.complete(queued.id, "w1", [image])


async def test_complete_records_audio(store_factory: StoreFactory) -> None:
    store = await store_factory()
    request = GenerationRequest(kind=JobKind.txt2speech, prompt="hello", seed=1)
    queued = await store.enqueue(Job(request=request, backend="hibari"), user_cap=10)
    await store.claim("w1", ["hibari"], lease_seconds=LEASE)
    clip = AudioRef(
        index=0, seed=1, duration_seconds=1.5, sample_rate=24_000, channels=1,
        format=AudioFormat.flac, media_type="audio/flac", path="x.flac", url="/x",
    )  # fmt: skip
    done = await store.complete(queued.id, "w1", [], audio=[clip])
    assert done.state is JobState.succeeded and done.audio == [clip] and done.images == []
    again = await (await store_factory()).get(queued.id)  # after a restart too
    assert again.audio == [clip] and again.request.kind == "txt2speech"


async def test_fail_records_the_reason(store: JobStore) -> None:
    queued = await store.enqueue(job(), user_cap=10)
    await store.claim("w1", ["mock"], lease_seconds=LEASE)
    error = JobError(code="boom", message="it broke")
    failed = await store.fail(queued.id, error, worker_id="w1")
    assert failed.state is JobState.failed and failed.error == error
    assert (await store.get(queued.id)).error == error


async def test_cancel_queued_job_is_never_claimed(store: JobStore) -> None:
    queued = await store.enqueue(job(), user_cap=10)
    cancelled = await store.cancel(queued.id)
    assert cancelled.state is JobState.cancelled
    assert await drain(store) == []
    with pytest.raises(JobFinished):
        await store.cancel(queued.id)
    with pytest.raises(JobNotFound):
        await store.cancel("nope")


async def test_cancel_running_job_takes_the_lease_away(store: JobStore) -> None:
    queued = await store.enqueue(job(), user_cap=10)
    await store.claim("w1", ["mock"], lease_seconds=LEASE)
    assert (await store.cancel(queued.id)).state is JobState.cancelled
    with pytest.raises(LeaseLost):
        await store.complete(queued.id, "w1", [])


async def test_requeue_then_fail_when_attempts_are_spent(store: JobStore) -> None:
    queued = await store.enqueue(job(), user_cap=10)
    await store.claim("w1", ["mock"], lease_seconds=LEASE)
    again = await store.requeue(queued.id, worker_id="w1")
    assert again.state is JobState.queued and again.attempts == 1
    second = await store.claim("w2", ["mock"], lease_seconds=LEASE)
    assert second is not None and second.id == queued.id and second.attempts == 2
    lost = await store.requeue(queued.id, worker_id="w2")  # max_attempts is 2
    assert lost.state is JobState.failed
    assert lost.error is not None and lost.error.code == "worker_lost"
    assert await drain(store) == []


async def test_requeue_without_spending_an_attempt(store: JobStore) -> None:
    queued = await store.enqueue(job(), user_cap=10)
    for _ in range(3):
        await store.claim("w1", ["mock"], lease_seconds=LEASE)
        back = await store.requeue(queued.id, worker_id="w1", spend_attempt=False)
        assert back.state is JobState.queued and back.attempts == 0


async def test_expired_lease_puts_the_job_back(store: JobStore, clock: Clock) -> None:
    queued = await store.enqueue(job(), user_cap=10)
    await store.claim("w1", ["mock"], lease_seconds=5)
    clock.now += 4
    await store.expire_leases()
    assert (await store.get(queued.id)).state is JobState.running  # not yet
    clock.now += 2
    await store.expire_leases()
    assert (await store.get(queued.id)).state is JobState.queued
    reclaimed = await store.claim("w2", ["mock"], lease_seconds=LEASE)
    assert reclaimed is not None and reclaimed.id == queued.id


async def test_user_cap_counts_queued_and_running(store: JobStore) -> None:
    first = await store.enqueue(job("alice"), user_cap=2)
    await store.enqueue(job("alice"), user_cap=2)
    with pytest.raises(UserQueueFull):
        await store.enqueue(job("alice"), user_cap=2)
    await store.enqueue(job("bob"), user_cap=2)  # another user is not affected
    await store.claim("w", ["mock"], lease_seconds=LEASE)  # alice's first now runs
    with pytest.raises(UserQueueFull):
        await store.enqueue(job("alice"), user_cap=2)
    assert await store.active_count("alice") == 2
    await store.complete(first.id, "w", [])
    await store.enqueue(job("alice"), user_cap=2)


async def test_two_services_users_of_one_name_are_two_accounts(store: JobStore) -> None:
    """Caps and fair share count per (service, user): alpha's carol and bravo's carol each
    get their own cap of 1, and bravo's one job is served second, not behind alpha's
    backlog; the counts are per account."""
    first = await store.enqueue(job("carol", service="alpha"), user_cap=1)
    with pytest.raises(UserQueueFull):
        await store.enqueue(job("carol", service="alpha"), user_cap=1)
    backlog = [await store.enqueue(job("carol", service="alpha"), user_cap=10) for _ in range(2)]
    other = await store.enqueue(job("carol", service="bravo"), user_cap=1)  # alpha's 3 not counted
    assert await store.active_count("carol", "alpha") == 3
    assert await store.active_count("carol", "bravo") == 1
    assert await store.active_count("carol") == 0  # no service: a third account
    assert (await store.stats()).users == {"alpha/carol": 3, "bravo/carol": 1}
    served = [j.id for j in await drain(store)]
    assert served == [first.id, other.id, *(j.id for j in backlog)]  # bravo's is not last
    assert await store.active_count("carol", "alpha") == 3  # running still counts


async def test_the_global_queue_cap(store: JobStore) -> None:
    for i in range(50):  # the fixture's stores hold at most 50 queued jobs
        await store.enqueue(job(f"u{i}"), user_cap=10)
    with pytest.raises(QueueFull) as full:
        await store.enqueue(job("late"), user_cap=10)
    assert full.value.code == "queue_full" and full.value.to_dict()["count"] == 50


async def test_concurrent_enqueues_respect_the_cap(store: JobStore) -> None:
    results = await asyncio.gather(
        *(store.enqueue(job("alice"), user_cap=3) for _ in range(10)), return_exceptions=True
    )
    accepted = [r for r in results if isinstance(r, Job)]
    assert len(accepted) == 3
    assert all(isinstance(r, UserQueueFull) for r in results if not isinstance(r, Job))


async def test_place_gives_queue_positions(store: JobStore) -> None:
    a1 = await store.enqueue(job("alice"), user_cap=10)
    a2 = await store.enqueue(job("alice"), user_cap=10)
    b1 = await store.enqueue(job("bob"), user_cap=10)
    places = [await store.place(j.id) for j in (a1, b1, a2)]
    assert [p.position for p in places if p] == [0, 1, 2]
    cost = a1.request.cost
    assert [p.cost_ahead for p in places if p] == pytest.approx([0, cost, 2 * cost])
    await store.claim("w", ["mock"], lease_seconds=LEASE)
    assert await store.place(a1.id) is None


async def test_sqlite_crash_recovery_requeues_running_jobs(tmp_path: Path) -> None:
    """A job left running by a dead process is queued again on start, then fails when spent."""
    path = tmp_path / "crash.db"
    store = SqliteStore(path, max_attempts=2)
    await store.open()
    accepted = await store.enqueue(job(), user_cap=10)
    await store.claim("w1", ["mock"], lease_seconds=LEASE)
    await store.close()  # the process "dies" with the job running

    restarted = SqliteStore(path, max_attempts=2)
    await restarted.open()
    recovered = await restarted.get(accepted.id)
    assert recovered.state is JobState.queued and recovered.attempts == 1
    await restarted.claim("w2", ["mock"], lease_seconds=LEASE)
    await restarted.close()

    again = SqliteStore(path, max_attempts=2)
    await again.open()
    final = await again.get(accepted.id)
    assert final.state is JobState.failed
    assert final.error is not None and final.error.code == "worker_lost"
    await again.close()


async def test_claim_batch_takes_compatible_jobs_next_in_line(store: JobStore) -> None:
    first = await store.enqueue(job("alice"), user_cap=10)
    second = await store.enqueue(job("bob"), user_cap=10)
    other = Job(request=GenerationRequest(prompt="p", user_id="carol", width=256, seed=1),
                backend="mock")  # fmt: skip
    await store.enqueue(other, user_cap=10)
    batch = await store.claim_batch("w", ["mock"], lease_seconds=LEASE, limit=4)
    assert [j.id for j in batch] == [first.id, second.id]  # a different size ends the run
    assert all(j.state is JobState.running and j.worker_id == "w" for j in batch)
    rest = await store.claim_batch("w", ["mock"], lease_seconds=LEASE, limit=4)
    assert [j.id for j in rest] == [other.id]


async def test_requeue_with_a_delay_holds_the_job_back(store: JobStore, clock: Clock) -> None:
    queued = await store.enqueue(job(), user_cap=10)
    await store.claim("w1", ["mock"], lease_seconds=LEASE)
    error = JobError(code="backend_unavailable", message="try later")
    back = await store.requeue(queued.id, worker_id="w1", reason=error, delay=20)
    assert back.state is JobState.queued
    assert await store.claim("w2", ["mock"], lease_seconds=LEASE) is None  # not yet
    clock.now += 19
    assert await store.claim("w2", ["mock"], lease_seconds=LEASE) is None
    clock.now += 2
    again = await store.claim("w2", ["mock"], lease_seconds=LEASE)
    assert again is not None and again.id == queued.id and again.attempts == 2


async def test_a_delayed_job_can_be_cancelled(store: JobStore, clock: Clock) -> None:
    queued = await store.enqueue(job(), user_cap=10)
    await store.claim("w1", ["mock"], lease_seconds=LEASE)
    await store.requeue(queued.id, worker_id="w1", delay=10)
    assert (await store.cancel(queued.id)).state is JobState.cancelled
    clock.now += 20
    assert await store.claim("w2", ["mock"], lease_seconds=LEASE) is None


async def test_idempotency_key_returns_the_first_job(store: JobStore) -> None:
    first = await store.enqueue(job("alice"), user_cap=10, idempotency_key="k1")
    again = await store.enqueue(job("alice"), user_cap=10, idempotency_key="k1")
    assert again.id == first.id
    other_user = await store.enqueue(job("bob"), user_cap=10, idempotency_key="k1")
    assert other_user.id != first.id
    assert len(await store.list_jobs()) == 2
    assert await store.active_count("alice") == 1
    assert len(await drain(store)) == 2


async def test_stats_count_tiers_users_and_running(store: JobStore) -> None:
    await store.enqueue(job("alice"), user_cap=10)
    await store.enqueue(job("alice", priority=10), user_cap=10)
    await store.enqueue(job("bob"), user_cap=10)
    await store.claim("w", ["mock"], lease_seconds=LEASE)  # the premium one
    stats = await store.stats()
    assert (stats.queued, stats.running) == (2, 1)
    assert stats.tiers == {0: 2} and stats.users == {"alice": 1, "bob": 1}


async def test_reroute_moves_a_queued_job_keeping_its_place(store_factory: StoreFactory) -> None:
    store = await store_factory()
    first = await store.enqueue(job("alice", backend="a"), user_cap=10)
    second = await store.enqueue(job("bob", backend="a"), user_cap=10)
    assert await store.backlog() == pytest.approx({"a": 2 * first.request.cost})
    moved = await store.reroute(second.id, "b")
    assert moved is not None and moved.backend == "b"
    assert (await store.get(second.id)).backend == "b"
    cost = first.request.cost
    assert await store.backlog() == pytest.approx({"a": cost, "b": cost})
    place = await store.place(second.id)
    assert place is not None and place.position == 1  # still behind alice's job
    assert [claimed.id for claimed in await drain(store, ("a",))] == [first.id]
    [claimed] = await drain(store, ("b",))
    assert claimed.id == second.id and claimed.backend == "b"
    assert await store.reroute(second.id, "a") is None  # running: no longer movable
    assert await store.backlog() == {}
    # the route change is durable
    reopened = await store_factory()
    assert (await reopened.get(second.id)).backend == "b"


async def test_runs_are_recorded_with_each_outcome(store_factory: StoreFactory) -> None:
    from easel.jobs import Attempt

    store = await store_factory()
    queued = await store.enqueue(job(), user_cap=10)
    claimed = await store.claim("w1", ["mock"], lease_seconds=LEASE)
    assert claimed is not None
    error = JobError(code="backend_unavailable", message="down")
    first = Attempt(backend="mock", worker="w1", started_at=1, ended_at=2, error=error)
    await store.requeue(queued.id, worker_id="w1", reason=error, run=first)
    await store.claim("w2", ["mock"], lease_seconds=LEASE)
    second = Attempt(backend="mock", worker="w2", started_at=3, ended_at=4)
    done = await store.complete(queued.id, "w2", [], run=second)
    assert done.runs == [first, second]
    other = await store.enqueue(job(), user_cap=10)
    await store.claim("w3", ["mock"], lease_seconds=LEASE)
    failed = await store.fail(other.id, error, worker_id="w3", run=first)
    assert failed.runs == [first]
    reopened = await store_factory()
    assert (await reopened.get(queued.id)).runs == [first, second]


async def test_list_filters_inside_the_query(store: JobStore) -> None:
    """Service, prompt text, model and dates filter in the store; pages are never short."""
    owned = []
    for i in range(30):
        made = job("alice", prompt=f"A Red fox {i}" if i % 3 == 0 else f"blue bird {i}")
        made = made.model_copy(
            update={
                "service": "bot" if i % 2 == 0 else "web",
                "created_at": 1000.0 + i,
                "request": made.request.model_copy(update={"model": "m1" if i < 15 else "m2"}),
            }
        )
        owned.append(await store.enqueue(made, user_cap=100))
    newest_first = owned[::-1]
    bot = [j.id for j in newest_first if j.service == "bot"]
    assert [j.id for j in await store.list_jobs(service="bot", limit=5)] == bot[:5]
    page2 = await store.list_jobs(service="bot", limit=5, before=bot[4])
    assert [j.id for j in page2] == bot[5:10]
    foxes = await store.list_jobs(text="red FOX", limit=100)
    assert [j.id for j in foxes] == [j.id for j in newest_first if "Red fox" in j.request.prompt]
    both = await store.list_jobs(text="fox", service="web", model="m1", user_id="alice")
    assert [j.request.prompt for j in both] == ["A Red fox 9", "A Red fox 3"]
    dated = await store.list_jobs(since=1010.0, until=1013.0)
    assert [j.created_at for j in dated] == [1012.0, 1011.0, 1010.0]
    recent = await store.list_jobs(since=1010.0, service="bot", before=bot[0], limit=3)
    assert [j.created_at for j in recent] == [1026.0, 1024.0, 1022.0]
    assert await store.list_jobs(since=2000.0) == []
    assert await store.list_jobs(service="nobody") == []


async def test_move_a_queued_job_to_the_front_or_back(store: JobStore) -> None:
    a = await store.enqueue(job("alice"), user_cap=10)
    b = await store.enqueue(job("bob"), user_cap=10)
    c = await store.enqueue(job("carol"), user_cap=10)
    top = await store.enqueue(job("dave", priority=5), user_cap=10)
    moved = await store.move(c.id, front=True)
    assert moved.id == c.id and moved.state is JobState.queued
    assert [(await store.place(j.id)).position for j in (top, c, a, b)] == [0, 1, 2, 3]  # type: ignore[union-attr]
    await store.move(c.id, front=False)
    await store.move(a.id, front=False)
    assert [j.id for j in await drain(store)] == [top.id, b.id, c.id, a.id]


async def test_only_a_job_in_line_moves(store: JobStore) -> None:
    a = await store.enqueue(job("alice"), user_cap=10)
    await store.claim("w", ["mock"], lease_seconds=LEASE)
    with pytest.raises(JobNotQueued):
        await store.move(a.id, front=True)
    with pytest.raises(JobNotFound):
        await store.move("nope", front=False)
    b = await store.enqueue(job("bob"), user_cap=10)
    await store.cancel(b.id)
    with pytest.raises(JobNotQueued):
        await store.move(b.id, front=True)


async def test_idempotency_comes_before_the_caps(store: JobStore) -> None:
    """A resend with a known key returns its job at the cap; concurrent sends of one key
    make exactly one job, whatever the cap (the same on every store)."""
    first = await store.enqueue(job("alice"), user_cap=1, idempotency_key="k1")
    again = await store.enqueue(job("alice"), user_cap=1, idempotency_key="k1")
    assert again.id == first.id  # at the cap, yet not refused
    with pytest.raises(UserQueueFull):
        await store.enqueue(job("alice"), user_cap=1, idempotency_key="k2")
    sent = await asyncio.gather(
        *(store.enqueue(job("bob"), user_cap=2, idempotency_key="same") for _ in range(10))
    )
    assert len({made.id for made in sent}) == 1
    assert await store.active_count("bob") == 1


def test_a_second_process_refuses_a_sqlite_store_in_use(tmp_path: Path) -> None:
    """One owner per data dir: another process is refused with the owner's pid before it
    touches any job (the owner's running job stays running)."""
    import os
    import subprocess
    import sys

    async def hold() -> tuple[SqliteStore, Job]:
        store = SqliteStore(tmp_path / "jobs.db")
        await store.open()
        queued = await store.enqueue(job(), user_cap=10)
        running = await store.claim("w", ["mock"], lease_seconds=LEASE)
        assert running is not None and running.id == queued.id
        return store, running

    loop = asyncio.new_event_loop()
    try:
        store, running = loop.run_until_complete(hold())
        second = subprocess.run(
            [sys.executable, "-c",
             "import asyncio, sys; from easel.store.sqlite import SqliteStore\n"
             f"asyncio.run(SqliteStore({str(tmp_path / 'jobs.db')!r}).open())"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode != 0
        assert f"in use by another easel process (pid {os.getpid()})" in second.stderr
        assert loop.run_until_complete(store.get(running.id)).state is JobState.running
        loop.run_until_complete(store.close())
    finally:
        loop.close()


async def test_annotations_are_durable_and_never_change_the_state(
    store: JobStore, store_factory: StoreFactory
) -> None:
    """Upload and webhook state written after a job ended: on the record for every later
    read, after a restart too; the state stays final."""
    from easel.jobs import WebhookDelivery

    made = await store.enqueue(job(), user_cap=10)
    await store.annotate(made.id, webhook={"url": "http://h/x", "attempts": 1})
    claimed = await store.claim("w", ["mock"], lease_seconds=LEASE)
    assert claimed is not None and claimed.webhook is not None
    image = ImageRef(index=0, seed=1, width=8, height=8, path="a.png", url="/files/a.png")
    await store.complete(made.id, "w", [image])
    uploaded = image.model_copy(update={"remote_url": "http://s3/a.png"})
    await store.annotate(made.id, images=[uploaded], upload_error="boom")
    await store.annotate(
        made.id, webhook=WebhookDelivery(url="http://h/x", attempts=2, events=2, delivered=True)
    )
    await store.close()
    reopened = await store_factory()
    seen = await reopened.get(made.id)
    assert seen.state is JobState.succeeded
    assert seen.images == [uploaded] and seen.upload_error == "boom"
    assert seen.webhook == WebhookDelivery(url="http://h/x", attempts=2, events=2, delivered=True)
    assert (await reopened.list_jobs())[0].webhook == seen.webhook
    with pytest.raises(JobNotFound):
        await reopened.annotate("nope", upload_error="x")
    with pytest.raises(ValueError):
        await reopened.annotate(made.id, state="queued")


async def test_known_keys_and_service_counts_are_the_stores(store: JobStore) -> None:
    """What admission asks before its own caps: the job a key made for (service, user),
    and a service's queued + running jobs (the same number on every replica)."""
    mine = job("alice").model_copy(update={"service": "bot"})
    made = await store.enqueue(mine, user_cap=10, idempotency_key="k")
    assert (await store.known("bot", "alice", "k")) == made
    assert await store.known("other", "alice", "k") is None  # tenants never meet
    assert await store.known("bot", "alice", "unknown") is None
    await store.enqueue(job("bob").model_copy(update={"service": "bot"}), user_cap=10)
    await store.enqueue(job("carol"), user_cap=10)
    assert await store.service_active_count("bot") == 2
    running = await store.claim("w", ["mock"], lease_seconds=LEASE)
    assert running is not None and await store.service_active_count("bot") == 2
    await store.cancel(made.id)
    assert await store.service_active_count("bot") == 1
    assert await store.service_active_count("nobody") == 0


async def test_timings_are_kept_per_key_and_survive_a_restart(
    store_factory: StoreFactory,
) -> None:
    """Measured times for ETAs: the last TIMINGS_KEEP per (kind, key), oldest first, read
    back by the next store over the same location (on Redis: by every process); a reader
    that is up to date gets None."""
    first = await store_factory()
    assert (await first.timings()) in (None, Timings(0, {}))
    run = '["mock", null, 64]'
    await first.record_timings([Timing("run", run, float(i)) for i in range(TIMINGS_KEEP + 5)])
    await first.record_timings([Timing("load", '["mock", "flux"]', 2.5)])
    read = await first.timings()
    assert read is not None and await first.timings(read.version) is None  # nothing new
    await first.close()
    second = await store_factory()
    again = await second.timings(read.version)
    assert again is None  # the same samples, the same version after a restart
    await second.record_timings([Timing("gap", '"mock"', 0.01)])
    after = await second.timings(read.version)
    assert after is not None and after.version != read.version
    assert after.samples == {
        ("run", run): [float(i) for i in range(5, TIMINGS_KEEP + 5)],
        ("load", '["mock", "flux"]'): [2.5],
        ("gap", '"mock"'): [0.01],
    }


async def test_serving_order_is_the_order_jobs_are_claimed(store: JobStore) -> None:
    """For ETA projections: the queued jobs in the order the store will hand them out
    (tiers, fair share between users), each with what prices it and what it needs."""
    jobs = [job("alice"), job("alice"), job("bob"), job("carol", priority=10), job("bob")]
    for new in jobs:
        await store.enqueue(new, user_cap=10)
    order = await store.serving_order(100)
    assert order is not None
    assert [e.job_id for e in order] == [jobs[i].id for i in (3, 0, 2, 1, 4)]
    assert order[0].user_id == "carol" and order[0].priority == 10
    assert all(e.shape is not None and e.want is not None and e.route == "mock" for e in order)
    assert [e.job_id for e in await store.serving_order(2) or []] == [e.job_id for e in order[:2]]
    assert await store.reroute(jobs[2].id, "other") is not None
    moved = await store.serving_order(100)
    assert moved is not None and [e.job_id for e in moved] == [e.job_id for e in order]
    assert next(e.route for e in moved if e.job_id == jobs[2].id) == "other"
    claimed = [*await drain(store, ("mock", "other"))]
    assert [j.id for j in claimed] == [e.job_id for e in order]
    assert await store.serving_order(100) == []
