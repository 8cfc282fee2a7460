"""The durable webhook queue's contract, over both implementations (SQLite, real Redis)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from easel.effects.deliveries import (
    Delivery,
    DeliveryQueue,
    Outcome,
    RedisDeliveries,
    SqliteDeliveries,
)
from easel.jobs import Event, EventType, GenerationRequest, Job
from easel.store.base import JobStore

URL = "http://127.0.0.1:9/hook"


@dataclass
class Setup:
    store: JobStore
    job: Job
    feed: Callable[[Event], Awaitable[None]]
    """Where an event comes from: the bus (Redis stream) or the dispatcher's add (SQLite)."""
    reopen: Callable[[], Awaitable[DeliveryQueue]]
    """The same queue in a new process's shoes (a restart, another replica)."""


@pytest.fixture(params=["sqlite", "redis"])
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    opened: list[DeliveryQueue] = []
    closers: list[Callable[[], Awaitable[None]]] = []
    store: JobStore
    if request.param == "redis":
        from easel.events.redis import RedisEventBus
        from easel.store.redis import RedisStore

        url = request.getfixturevalue("redis_url")
        prefix = f"deliveries:{tmp_path.name}:"
        store = RedisStore(url, prefix=prefix)
        bus = RedisEventBus(url, prefix=prefix)
        await bus.open()
        closers.append(bus.close)

        def make() -> DeliveryQueue:
            return RedisDeliveries(url, store, prefix=prefix, lease_seconds=60, block_ms=50)

        async def feed(event: Event) -> None:
            await bus.publish(event)
    else:
        from easel.store.sqlite import SqliteStore

        store = SqliteStore(tmp_path / "jobs.db")

        def make() -> DeliveryQueue:
            return SqliteDeliveries(tmp_path / "jobs.webhooks.db", store, poll_seconds=0.05)

        async def feed(event: Event) -> None:
            await opened[0].add(event)

    await store.open()

    async def reopen() -> DeliveryQueue:
        queue = make()
        await queue.open()
        opened.append(queue)
        return queue

    await reopen()  # Redis: the group exists before the first event
    made = Job(request=GenerationRequest(prompt="p", webhook_url=URL), backend="mock")
    job = await store.enqueue(made, user_cap=10)
    yield Setup(store, job, feed, reopen)
    for queue in reversed(opened):
        await queue.close()
    for close in closers:
        await close()
    await store.close()


async def _take(queue: DeliveryQueue) -> list[Delivery]:
    deadline = time.monotonic() + 10
    while not (found := await queue.take(10)) and time.monotonic() < deadline:
        pass
    return found


async def test_retry_then_dead_letter_then_delivery_on_the_job(setup: Setup) -> None:
    queue = await setup.reopen()
    await setup.feed(Event.of(setup.job, EventType.progress, step=1, total=2))
    await setup.feed(Event.of(setup.job, EventType.queued))
    (first,) = await _take(queue)  # progress is never a delivery
    assert first.event.type is EventType.queued and first.attempts == 0
    await queue.settle(first, URL, Outcome.retry, error="HTTP 500", retry_in=0)
    (again,) = await _take(queue)
    assert (again.id, again.attempts) == (first.id, 1)  # the same id: the receiver dedupes
    summary = await queue.settle(again, URL, Outcome.dead, error="HTTP 500")
    assert (summary.state, summary.attempts, summary.dead_letters) == ("dead", 2, 1)
    assert await queue.take(10) == []  # a dead letter is never handed out again
    await setup.feed(Event.of(setup.job, EventType.started))
    (started,) = await _take(queue)
    await queue.settle(started, URL, Outcome.delivered)
    webhook = (await setup.store.get(setup.job.id)).webhook
    assert webhook is not None and webhook.state == "delivered"
    assert (webhook.events, webhook.attempts, webhook.dead_letters) == (1, 3, 1)
    assert webhook.last_error == "HTTP 500"


async def test_a_released_delivery_is_taken_by_the_next_sender(setup: Setup) -> None:
    queue = await setup.reopen()
    await setup.feed(Event.of(setup.job, EventType.queued))
    (held,) = await _take(queue)
    await queue.release(held)  # shutting down: unsent
    await queue.close()
    successor = await setup.reopen()
    (taken,) = await _take(successor)
    assert (taken.id, taken.event.type, taken.attempts) == (held.id, EventType.queued, 0)
    await successor.settle(taken, URL, Outcome.delivered)
    assert await successor.take(10) == []
