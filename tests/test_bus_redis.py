"""RedisEventBus: two buses on one Redis stand for two API replicas (or a worker and an API)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from easel.events.bus import Subscription
from easel.events.redis import RedisEventBus
from easel.jobs import Event, EventType
from easel.runtime.registry import RedisRegistry, WorkerInfo


@pytest.fixture
async def buses(redis_url: str) -> AsyncIterator[tuple[RedisEventBus, RedisEventBus]]:
    prefix = f"bus:{uuid.uuid4().hex}:"
    pair = (RedisEventBus(redis_url, prefix=prefix), RedisEventBus(redis_url, prefix=prefix))
    for bus in pair:
        await bus.open()
    yield pair
    for bus in pair:
        await bus.close()


def event(job: str, type: EventType = EventType.progress, user: str = "u", step: int = 0) -> Event:
    return Event(type=type, job_id=job, user_id=user, step=step)


async def take(subscription: Subscription, count: int, timeout: float = 5) -> list[Event]:
    got: list[Event] = []
    async with asyncio.timeout(timeout):
        async for item in subscription:
            got.append(item)
            if len(got) == count:
                break
    return got


async def test_events_reach_the_other_process_in_order(
    buses: tuple[RedisEventBus, RedisEventBus],
) -> None:
    api, worker = buses
    live = api.subscribe()
    published = [await worker.publish(event("j", step=i)) for i in range(20)]
    ids = [e.id for e in published]
    assert ids == sorted(ids) and len(set(ids)) == 20 and max(ids) < 2**53  # exact in JS
    got = await take(live, 20)
    assert [(e.id, e.step) for e in got] == [(e.id, e.step) for e in published]
    live.close()


async def test_resume_after_an_id_misses_nothing_while_events_keep_coming(
    buses: tuple[RedisEventBus, RedisEventBus],
) -> None:
    """A client seen on replica A reconnects to replica B with its last id while a worker
    publishes: it gets every later event once, in order, history then live."""
    first, second = buses
    reference = first.subscribe(user_id="u")
    published: list[Event] = []

    async def worker() -> None:
        for i in range(300):
            published.append(await first.publish(event(f"j{i % 7}", step=i)))
            if i % 50 == 0:
                await asyncio.sleep(0.01)

    publishing = asyncio.create_task(worker())
    seen = await take(reference, 120)
    resumed = second.subscribe(user_id="u", after=seen[-1].id)
    rest = await take(resumed, 180)
    await publishing
    assert [e.id for e in seen + rest] == [e.id for e in published]
    reference.close()
    resumed.close()


async def test_a_jobs_events_replay_from_the_start(
    buses: tuple[RedisEventBus, RedisEventBus],
) -> None:
    first, second = buses
    for i in range(30):
        await first.publish(event("other", step=i))
        if i % 10 == 0:
            await first.publish(event("mine", step=i))
    replay = second.subscribe(job_id="mine", after=0)
    got = await take(replay, 3)
    assert [e.step for e in got] == [0, 10, 20]
    live = await first.publish(event("mine", type=EventType.succeeded))
    assert (await take(replay, 1))[0].id == live.id
    replay.close()


async def test_filters_and_a_cursor_ahead_of_this_replica(
    buses: tuple[RedisEventBus, RedisEventBus],
) -> None:
    first, second = buses
    cancels = second.subscribe(types={EventType.cancelled})
    await first.publish(event("a"))
    done = await first.publish(event("b", type=EventType.cancelled))
    assert [e.id for e in await take(cancels, 1)] == [done.id]
    # resuming after the newest id, even one this bus's reader may not have read yet
    ahead = second.subscribe(after=done.id)
    later = await first.publish(event("c"))
    assert [e.id for e in await take(ahead, 1)] == [later.id]
    cancels.close()
    ahead.close()


async def test_worker_registry_lists_live_workers_with_heartbeat_age(redis_url: str) -> None:
    registry = RedisRegistry(redis_url, prefix=f"reg:{uuid.uuid4().hex}:")
    await registry.open()
    try:
        info = WorkerInfo(
            id="w1", backend="mock", models=["mock"], capabilities=["txt2img"],
            current_jobs=["j1"], host="h", pid=1, started_at=0.0,
        )  # fmt: skip
        await registry.beat(info, ttl=0.3)
        await registry.beat(info.model_copy(update={"id": "w2", "current_jobs": []}), ttl=30)
        listed = await registry.list()
        assert [(w.id, w.current_jobs) for w in listed] == [("w1", ["j1"]), ("w2", [])]
        assert all(w.heartbeat_age_seconds is not None and w.heartbeat_age_seconds < 1
                   for w in listed)  # fmt: skip
        await asyncio.sleep(0.4)  # w1 missed its beats
        assert [w.id for w in await registry.list()] == ["w2"]
        await registry.remove("w2")
        assert await registry.list() == []
    finally:
        await registry.close()
