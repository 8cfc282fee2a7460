"""The event bus across processes: one Redis stream, read by every API replica and worker.

``publish`` appends to the stream (``XADD MAXLEN ~``) with an id from a counter in Redis,
so ids order all events of the deployment, survive restarts, and stay below 2**53 (exact
in JavaScript). Each process runs ONE reader (``XREAD BLOCK``) that hands events to its
local subscriptions; a subscription that resumes ``after`` an id first reads what it
missed with ``XRANGE`` (from a per-job stream when it follows one job), then joins the
live reader at exactly the id where its catch-up ended: no gap, no duplicate.

A worker process needs only cancellations and new-work notices: a bus built with
``topics`` reads the small per-type streams of those events instead of every event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from dataclasses import dataclass

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from easel import constants as keys
from easel.errors import StoreUnavailable
from easel.events.bus import EventBus, EventFilter, Subscription
from easel.jobs import Event, EventType
from easel.queue.backoff import retry_delay
from easel.store.redis import connect, raise_if_cancelled, unavailable

log = logging.getLogger("easel.events.bus")

_PUBLISH = f"""
local P = ARGV[1]
local counter = P .. '{keys.EVENT_COUNTER}'
local t = redis.call('TIME')
local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
local id = math.max(tonumber(redis.call('GET', counter) or '0') + 1, floor)
local sid = string.format('%d-0', id)
redis.call('SET', counter, string.format('%d', id))
redis.call('XADD', P .. '{keys.EVENTS}', 'MAXLEN', '~', ARGV[2], sid,
  't', ARGV[4], 'j', ARGV[5], 'u', ARGV[6], 'e', ARGV[7])
local jk = P .. '{keys.JOB_EVENTS}' .. ARGV[5]
redis.call('XADD', jk, sid, 't', ARGV[4], 'j', ARGV[5], 'u', ARGV[6], 'e', ARGV[7])
redis.call('PEXPIRE', jk, ARGV[3])
if ARGV[8] ~= '' then
  redis.call('XADD', ARGV[8], 'MAXLEN', '~', {keys.TOPIC_MAXLEN}, sid,
    't', ARGV[4], 'j', ARGV[5], 'u', ARGV[6], 'e', ARGV[7])
end
return string.format('%d', id)
"""
_PAGE = 500
_READ_COUNT = 1000


@dataclass(eq=False)
class RedisSubscription(Subscription):
    cursor: int = 0
    """The last id this subscription has covered."""
    live: bool = False
    """Fed by the reader; before that, catching up from history."""
    _redis_bus: RedisEventBus | None = None

    def close(self) -> None:
        if self._redis_bus is not None:
            self._redis_bus.unsubscribe(self)
            self._redis_bus = None
        super().close()


def _matches(wanted: EventFilter, fields: dict[str, str]) -> bool:
    """The filter on the stream entry's own fields: no JSON parsed for others' events."""
    return (
        (wanted.job_id is None or fields.get("j") == wanted.job_id)
        and (wanted.user_id is None or fields.get("u") == wanted.user_id)
        and (wanted.types is None or fields.get("t") in wanted.types)
    )


def _event(event_id: int, fields: dict[str, str]) -> Event:
    event = Event.model_validate_json(fields["e"])
    event.id = event_id
    return event


def _id(stream_id: str) -> int:
    return int(stream_id.partition("-")[0])


class RedisEventBus(EventBus):
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = keys.DEFAULT_PREFIX,
        maxlen: int = keys.EVENT_STREAM_MAXLEN,
        socket_timeout: float = keys.SOCKET_TIMEOUT_SECONDS,
        topics: Collection[EventType] | None = None,
    ) -> None:
        """``topics``: this process only subscribes to these types (a subset of TOPICS)."""
        self.url = url
        self.prefix = prefix
        self.maxlen = maxlen
        self.socket_timeout = socket_timeout
        self.topics = frozenset(topics) if topics is not None else None
        if self.topics is not None and not self.topics <= set(keys.TOPICS):
            raise ValueError(f"topics must be among {keys.TOPICS}")
        self._stream = prefix + keys.EVENTS
        self._streams = (
            [self._stream] if self.topics is None
            else [prefix + keys.TOPIC_EVENTS + topic for topic in sorted(self.topics)]
        )  # fmt: skip
        self._redis: Redis | None = None
        self._reader_redis: Redis | None = None
        self._reader: asyncio.Task[None] | None = None
        self._positions = dict.fromkeys(self._streams, 0)  # last id handed out, per stream
        self._ready = asyncio.Event()
        self._subscriptions: set[RedisSubscription] = set()
        self._catch_ups: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def _position(self) -> int:
        return max(self._positions.values())

    async def open(self) -> None:
        """Connect and start the reader at the stream's current end."""
        self._redis = connect(self.url, socket_timeout=self.socket_timeout)
        self._publish = self._redis.register_script(_PUBLISH)
        block = keys.READ_BLOCK_MS / 1000
        self._reader_redis = connect(self.url, socket_timeout=block + self.socket_timeout)
        try:
            last = int(await self._redis.get(self.prefix + keys.EVENT_COUNTER) or 0)
        except redis_errors.RedisError as exc:
            await self.close()
            raise unavailable(exc, self.url) from exc
        self._positions = dict.fromkeys(self._streams, last)
        self._closing = False
        self._ready.set()
        self._reader = asyncio.create_task(self._read(), name="easel-events-reader")

    async def publish(self, event: Event) -> Event:
        if self._redis is None:
            raise StoreUnavailable("the event bus is closed")
        data = event.model_dump_json(exclude={"id"}, exclude_none=True)
        topic = self.prefix + keys.TOPIC_EVENTS + event.type if event.type in keys.TOPICS else ""
        args: list[str | int] = [
            self.prefix, self.maxlen, keys.JOB_EVENTS_TTL_SECONDS * 1000, str(event.type),
            event.job_id, event.user_id, data, topic,
        ]  # fmt: skip
        try:
            event_id = await self._publish(args=args)
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc
        raise_if_cancelled()
        return event.model_copy(update={"id": int(event_id)})

    def _open(self, wanted: EventFilter, after: int | None) -> Subscription:
        if self.topics is not None and (
            wanted.types is None or not wanted.types <= self.topics or after is not None
        ):
            raise ValueError(f"this bus carries only live {sorted(self.topics)} events")
        subscription = RedisSubscription(wanted, _redis_bus=self)
        self._subscriptions.add(subscription)
        if after is None:
            subscription.cursor, subscription.live = self._position, True
        else:
            subscription.cursor = after
            task = asyncio.create_task(self._catch_up(subscription))
            self._catch_ups.add(task)
            task.add_done_callback(self._catch_ups.discard)
        return subscription

    def unsubscribe(self, subscription: RedisSubscription) -> None:
        self._subscriptions.discard(subscription)

    async def close(self) -> None:
        # On CPython < 3.12 a cancel that lands as a blocking read returns can be swallowed
        # (gh-86296): the loops also watch ``_closing``, and a stuck read is cut off.
        self._closing = True
        tasks = {t for t in (self._reader, *self._catch_ups) if t is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=0.05)
            if pending and self._reader_redis is not None:
                await self._reader_redis.connection_pool.disconnect()
                await asyncio.wait(pending, timeout=keys.READ_BLOCK_MS / 1000 + 1)
        self._reader = None
        for subscription in list(self._subscriptions):
            subscription.close()
        for client in (self._redis, self._reader_redis):
            if client is not None:
                await client.aclose()
        self._redis = self._reader_redis = None

    # -- reading ----------------------------------------------------------------------

    async def _read(self) -> None:
        """The one live reader of this process; reconnects with backoff."""
        failures = 0
        while self._reader_redis is not None and not self._closing:
            try:
                reply = await self._reader_redis.xread(
                    {stream: f"{position}-0" for stream, position in self._positions.items()},
                    count=_READ_COUNT,
                    block=keys.READ_BLOCK_MS,
                )
            except redis_errors.RedisError as exc:
                if self._closing:
                    return
                failures += 1
                delay = retry_delay(failures, base=0.1, cap=5.0)
                log.warning("event stream unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            self._deliver(reply or [])

    def _deliver(self, reply: list[tuple[str, list[tuple[str, dict[str, str]]]]]) -> None:
        """Entries of all streams read, in id order. A stream cut at COUNT bounds what is
        delivered now; the others' later entries are read again next time."""
        bound = min(
            (_id(entries[-1][0]) for _, entries in reply if len(entries) >= _READ_COUNT),
            default=None,
        )
        merged = sorted(
            (_id(stream_id), stream, fields)
            for stream, entries in reply
            for stream_id, fields in entries
        )
        for event_id, stream, fields in merged:
            if bound is not None and event_id > bound:
                break
            self._dispatch(event_id, fields)
            self._positions[stream] = event_id

    def _dispatch(self, event_id: int, fields: dict[str, str]) -> None:
        parsed: Event | None = None
        for subscription in list(self._subscriptions):
            if not subscription.live or event_id <= subscription.cursor:
                continue
            subscription.cursor = event_id
            if _matches(subscription.filter, fields):
                parsed = parsed or _event(event_id, fields)
                subscription.offer(parsed)

    async def _catch_up(self, subscription: RedisSubscription) -> None:
        """History after the cursor, up to where the reader is, then live from there."""
        await self._ready.wait()
        job_id = subscription.filter.job_id
        key = self.prefix + keys.JOB_EVENTS + job_id if job_id else self._stream
        try:
            while subscription._redis_bus is not None and not self._closing:
                target = self._position
                await self._replay(subscription, key, target)
                if self._position == target:  # nothing read meanwhile: hand over, no await
                    # (a client may resume here after an id that another replica's reader
                    # has handed out and ours has not yet: keep the larger cursor)
                    subscription.cursor = max(subscription.cursor, target)
                    subscription.live = True
                    return
        except (redis_errors.RedisError, StoreUnavailable) as exc:
            log.warning("could not replay events (%s); the client resumes later", exc)
            with contextlib.suppress(asyncio.QueueFull):
                subscription.queue.put_nowait(None)  # ends the stream: resume with after=

    async def _replay(self, subscription: RedisSubscription, key: str, target: int) -> None:
        if self._redis is None:
            raise StoreUnavailable("the event bus is closed")
        while subscription.cursor < target:
            entries = await self._redis.xrange(
                key, min=f"{subscription.cursor}-1", max=f"{target}-0", count=_PAGE
            )
            for stream_id, fields in entries:
                event_id = _id(stream_id)
                if _matches(subscription.filter, fields):
                    subscription.offer(_event(event_id, fields))
            if len(entries) < _PAGE:
                subscription.cursor = target
            else:
                subscription.cursor = _id(entries[-1][0])
