"""The event bus: every state change of every job, in one ordered stream.

Every API surface (websocket, SSE, webhooks, gRPC streams) and every worker listens here.
Events carry increasing ids; a subscriber that lost its connection resumes ``after`` the
last id it saw and gets what it missed from the bus's recent history, then the live stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field

from easel.jobs import Event, EventType

HISTORY_SIZE = 10_000
SUBSCRIBER_BUFFER = 10_000
COALESCE_BACKLOG = 256
"""A subscriber this many events behind gets only the last progress event of each run
(``step == total``) until it catches up: the newest state, not a replay of every step."""
_ENCODED_SIZE = 4096


_encoded: OrderedDict[tuple[int, str, str], str] = OrderedDict()


def event_json(event: Event) -> str:
    """The event as JSON (no nulls), encoded once however many subscribers send it: with
    100 websockets following a job, encoding per subscriber was most of the loop's work."""
    key = (event.id, event.job_id, event.type)
    if (text := _encoded.get(key)) is None:
        text = _encoded[key] = event.model_dump_json(exclude_none=True)
        if len(_encoded) > _ENCODED_SIZE:
            _encoded.popitem(last=False)
    return text


@dataclass(frozen=True)
class EventFilter:
    job_id: str | None = None
    user_id: str | None = None
    types: frozenset[EventType] | None = None

    def matches(self, event: Event) -> bool:
        return (
            (self.job_id is None or event.job_id == self.job_id)
            and (self.user_id is None or event.user_id == self.user_id)
            and (self.types is None or event.type in self.types)
        )


class EventBus(ABC):
    topics: frozenset[EventType] | None = None
    """The only event types this bus carries in this process (None: all of them)."""

    @abstractmethod
    async def publish(self, event: Event) -> Event:
        """Give the event its id and deliver it; returns the event as delivered."""

    def subscribe(
        self,
        *,
        job_id: str | None = None,
        user_id: str | None = None,
        types: Collection[EventType] | None = None,
        after: int | None = None,
    ) -> Subscription:
        """Events matching the filter: those after ``after`` still in history, then live."""
        wanted = EventFilter(job_id, user_id, frozenset(types) if types is not None else None)
        return self._open(wanted, after)

    @abstractmethod
    def _open(self, wanted: EventFilter, after: int | None) -> Subscription:
        """A subscription to ``wanted``, replaying what follows ``after`` when given."""

    async def close(self) -> None:
        """Release connections; open subscriptions end."""


@dataclass(eq=False)
class Subscription:
    """An async iterator of events; ends when closed or when the subscriber falls behind."""

    filter: EventFilter
    queue: asyncio.Queue[Event | None] = field(
        default_factory=lambda: asyncio.Queue(SUBSCRIBER_BUFFER)
    )
    overflowed: bool = False
    _bus: InProcessEventBus | None = None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while (event := await self.queue.get()) is not None:
            yield event

    def offer(self, event: Event) -> None:
        if self.overflowed or not self.filter.matches(event):
            return
        if (
            event.type is EventType.progress
            and event.step != event.total
            and self.queue.qsize() >= COALESCE_BACKLOG
        ):
            return  # behind: a newer progress event (or the end) supersedes this one
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # Too slow to keep up: end the stream; the client resumes from its last id.
            self.overflowed = True
            self.queue.get_nowait()
            self.queue.put_nowait(None)

    def close(self) -> None:
        if self._bus is not None:
            self._bus.unsubscribe(self)
            self._bus = None
        if not self.overflowed:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class InProcessEventBus(EventBus):
    """The embedded bus: one process, ids from a counter, a bounded history for resume."""

    def __init__(self, history_size: int = HISTORY_SIZE) -> None:
        # Ids go on growing across restarts (microseconds at start), so a client resuming
        # with ``after=`` from before a restart does not skip the new process's events.
        self._next_id = time.time_ns() // 1000
        self._history: deque[Event] = deque(maxlen=history_size)
        self._subscriptions: set[Subscription] = set()

    async def publish(self, event: Event) -> Event:
        return self.publish_nowait(event)

    def publish_nowait(self, event: Event) -> Event:
        event = event.model_copy(update={"id": self._next_id})
        self._next_id += 1
        self._history.append(event)
        for subscription in list(self._subscriptions):
            subscription.offer(event)
        return event

    def _open(self, wanted: EventFilter, after: int | None) -> Subscription:
        subscription = Subscription(wanted, _bus=self)
        if after is not None:
            for event in self._history:
                if event.id > after:
                    subscription.offer(event)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            subscription.close()
