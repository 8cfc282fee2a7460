"""The in-process bus: slow subscribers get progress coalesced; events are encoded once."""

from __future__ import annotations

from easel.events.bus import COALESCE_BACKLOG, InProcessEventBus, event_json
from easel.jobs import Event, EventType


def _progress(step: int, total: int, job_id: str = "j") -> Event:
    return Event(type=EventType.progress, job_id=job_id, user_id="u", step=step, total=total)


async def test_a_subscriber_behind_gets_the_last_step_and_the_end_not_every_step() -> None:
    bus = InProcessEventBus()
    async with bus.subscribe() as slow:
        total = COALESCE_BACKLOG + 100
        for step in range(1, total + 1):
            await bus.publish(_progress(step, total))
        await bus.publish(Event(type=EventType.succeeded, job_id="j", user_id="u"))
        received = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
    assert not slow.overflowed
    steps = [event.step for event in received if event is not None and event.step]
    assert steps == [*range(1, COALESCE_BACKLOG + 1), total]  # in order, the end kept
    assert received[-1] is not None and received[-1].type is EventType.succeeded
    ids = [event.id for event in received if event is not None]
    assert ids == sorted(ids)


async def test_a_subscriber_keeping_up_gets_every_step() -> None:
    bus = InProcessEventBus()
    async with bus.subscribe() as fast:
        for step in range(1, COALESCE_BACKLOG * 2):
            await bus.publish(_progress(step, COALESCE_BACKLOG * 2))
            assert fast.queue.get_nowait() is not None


async def test_event_json_is_the_event_without_nulls_and_cached() -> None:
    bus = InProcessEventBus()
    event = await bus.publish(_progress(1, 2))
    text = event_json(event)
    assert Event.model_validate_json(text) == event
    assert "null" not in text
    assert event_json(event) is text
