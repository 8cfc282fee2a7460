"""The durable webhook queue: each event POSTed once per deployment, retried, then dead-lettered.

A :class:`Delivery` is one event for one job's webhook. The queue hands it to one sender,
keeps it through restarts until the sender settles it (delivered, retry later, or dead),
and records the job's :class:`~easel.jobs.WebhookDelivery` summary on its record as it
settles, one at a time per deployment, so every replica shows the same counters
(``tests/test_deliveries.py`` holds both implementations to one contract):

- :class:`SqliteDeliveries` (embedded): a table next to the job database; the dispatcher
  adds the events of the in-process bus; one job's events go out in order.
- :class:`RedisDeliveries` (scale-out): a consumer group on the deployment's event stream,
  so each event reaches ONE API replica (``XREADGROUP``) and is acknowledged (``XACK``)
  once settled; a replica that died mid-POST leaves it pending and another takes it over
  (``XAUTOCLAIM``); retries wait in a zset leased to one sender at a time. Order across
  replicas is not kept: receivers order by the event ``id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from easel import constants as keys
from easel.errors import EaselError
from easel.jobs import Event, EventType, WebhookDelivery, WebhookState
from easel.store.base import JobStore
from easel.store.redis import connect, unavailable

log = logging.getLogger("easel.effects.webhooks")

DELIVERED_TYPES = frozenset(EventType) - {EventType.progress}
"""No ``progress``: a tick per step is too many POSTs to be worth it (stream those)."""
DEAD_KEPT_SECONDS = 7 * 24 * 3600.0


class Outcome(StrEnum):
    delivered = "delivered"
    retry = "retry"
    dead = "dead"


@dataclass(frozen=True)
class Delivery:
    id: str
    """Stable across retries: the receiver's idempotency key (``X-Easel-Delivery``)."""
    event: Event
    attempts: int
    """POSTs already made for it."""
    from_stream: bool = False
    """Redis: still pending in the consumer group (not yet moved to the retry zset)."""


class DeliveryQueue(ABC):
    follows_bus: bool
    """True: the dispatcher adds the bus's events; False: the queue reads a shared stream."""

    async def open(self) -> None:
        """Connect (and create what is missing)."""

    async def close(self) -> None:
        """Disconnect; deliveries taken and not settled are taken again later."""

    async def add(self, event: Event) -> None:
        """Queue ``event`` for its job's webhook (only where ``follows_bus``)."""
        raise NotImplementedError

    @abstractmethod
    async def take(self, limit: int) -> list[Delivery]:
        """Up to ``limit`` deliveries due now, each to this sender only; waits briefly
        (about a second) when none is due, then returns what it has (maybe none)."""

    @abstractmethod
    async def skip(self, delivery: Delivery) -> None:
        """Drop a delivery that has no webhook to go to (its job has none, or is gone)."""

    @abstractmethod
    async def settle(
        self,
        delivery: Delivery,
        url: str,
        outcome: Outcome,
        *,
        error: str | None = None,
        retry_in: float = 0.0,
    ) -> WebhookDelivery:
        """Record one POST's outcome and the job's new summary (on its record too)."""

    @abstractmethod
    async def release(self, delivery: Delivery) -> None:
        """Give a taken delivery back unsent (shutting down): due again at once."""


# -- embedded: SQLite -------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    event TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_by_job ON deliveries(job_id, state, seq);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, due);
"""
_NEXT = """
SELECT d.id, d.event, d.attempts FROM deliveries d
WHERE d.state = 'pending' AND d.due <= ?
  AND d.seq = (SELECT MIN(seq) FROM deliveries WHERE job_id = d.job_id AND state = 'pending')
ORDER BY d.seq LIMIT ?
"""


class SqliteDeliveries(DeliveryQueue):
    """A table in its own file beside the job database (one process owns the data dir)."""

    follows_bus = True

    def __init__(self, path: Path, store: JobStore, *, poll_seconds: float = 0.5) -> None:
        self.path = path
        self.store = store
        self.poll_seconds = poll_seconds
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._settling = asyncio.Lock()
        self._taken: set[str] = set()
        self._added: asyncio.Event | None = None

    async def open(self) -> None:
        self._added = asyncio.Event()
        await asyncio.to_thread(self._connect)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        conn.execute(
            "DELETE FROM deliveries WHERE state = 'dead' AND due < ?",
            (time.time() - DEAD_KEPT_SECONDS,),
        )
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.to_thread(self._locked, conn.close)

    def _locked(self, call: Any, *args: Any) -> Any:
        with self._lock:
            return call(*args)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the webhook queue is closed")
        return self._conn

    async def add(self, event: Event) -> None:
        if event.type not in DELIVERED_TYPES:
            return
        conn = self._db()
        row = (uuid.uuid4().hex, event.job_id, event.model_dump_json(), time.time())
        await asyncio.to_thread(
            self._locked,
            conn.execute,
            "INSERT INTO deliveries (id, job_id, event, due) VALUES (?, ?, ?, ?)",
            row,
        )
        if self._added is not None:
            self._added.set()

    async def take(self, limit: int) -> list[Delivery]:
        conn = self._db()
        wanted = limit + len(self._taken)
        rows = await asyncio.to_thread(
            self._locked, lambda: conn.execute(_NEXT, (time.time(), wanted)).fetchall()
        )
        found = [
            Delivery(id, Event.model_validate_json(event), attempts)
            for id, event, attempts in rows
            if id not in self._taken
        ][:limit]
        if not found and self._added is not None:
            self._added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._added.wait(), self.poll_seconds)
        self._taken.update(delivery.id for delivery in found)
        return found

    async def skip(self, delivery: Delivery) -> None:
        conn = self._db()
        await asyncio.to_thread(
            self._locked, conn.execute, "DELETE FROM deliveries WHERE id = ?", (delivery.id,)
        )
        self._taken.discard(delivery.id)

    async def settle(
        self,
        delivery: Delivery,
        url: str,
        outcome: Outcome,
        *,
        error: str | None = None,
        retry_in: float = 0.0,
    ) -> WebhookDelivery:
        conn = self._db()
        job_id = delivery.event.job_id
        async with self._settling:  # one summary update at a time: counters never regress
            await asyncio.to_thread(
                self._locked, self._settle, conn, delivery, outcome, error, retry_in
            )
            self._taken.discard(delivery.id)
            if self._added is not None:
                self._added.set()  # the job's next event may go now
            try:  # the summary lives on the job's record (this process owns the store)
                before = (await self.store.get(job_id)).webhook or WebhookDelivery(url=url)
                summary = _next_summary(before, url, outcome, error)
                await self.store.annotate(job_id, webhook=summary)
            except EaselError as exc:
                log.warning("webhook of job %s: state not recorded on the job: %s",
                            job_id, exc)  # fmt: skip
                summary = _next_summary(WebhookDelivery(url=url), url, outcome, error)
        return summary

    @staticmethod
    def _settle(
        conn: sqlite3.Connection,
        delivery: Delivery,
        outcome: Outcome,
        error: str | None,
        retry_in: float,
    ) -> None:
        """Delivered rows go; a retry is due later; a dead letter stays (pruned after
        ``DEAD_KEPT_SECONDS``)."""
        if outcome is Outcome.delivered:
            conn.execute("DELETE FROM deliveries WHERE id = ?", (delivery.id,))
            return
        state = "pending" if outcome is Outcome.retry else "dead"
        conn.execute(
            "UPDATE deliveries SET attempts = attempts + 1, due = ?, state = ?, "
            "last_error = ? WHERE id = ?",
            (time.time() + retry_in, state, error, delivery.id),
        )

    async def release(self, delivery: Delivery) -> None:
        self._taken.discard(delivery.id)  # the row is still pending: taken again later


_STATES = {
    Outcome.delivered: WebhookState.delivered,
    Outcome.retry: WebhookState.retrying,
    Outcome.dead: WebhookState.dead,
}


def _next_summary(
    before: WebhookDelivery, url: str, outcome: Outcome, error: str | None
) -> WebhookDelivery:
    return WebhookDelivery(
        url=url,
        state=_STATES[outcome],
        delivered=outcome is Outcome.delivered,
        events=before.events + (outcome is Outcome.delivered),
        attempts=before.attempts + 1,
        dead_letters=before.dead_letters + (outcome is Outcome.dead),
        last_error=error if error is not None else before.last_error,
    )


# -- scale-out: Redis -------------------------------------------------------------------

_CLAIM_RETRIES = """
-- 1 retry zset, 2 data hash, 3 lease seconds, 4 limit: due retries, leased to the caller
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ids = redis.call('ZRANGEBYSCORE', ARGV[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, id in ipairs(ids) do
  local data = redis.call('HGET', ARGV[2], id)
  if data then
    redis.call('ZADD', ARGV[1], now + tonumber(ARGV[3]), id)
    table.insert(out, id)
    table.insert(out, data)
  else
    redis.call('ZREM', ARGV[1], id)
  end
end
return out
"""

_SETTLE = """
-- 1 stream, 2 group, 3 retry zset, 4 data hash, 5 job's counters, 6 job's hash,
-- 7 delivery id, 8 '1' if pending in the group, 9 url, 10 outcome, 11 error ('' none),
-- 12 retry in seconds, 13 the retry's data, 14 counters ttl seconds, 15 note field
local id, outcome, err = ARGV[7], ARGV[10], ARGV[11]
if ARGV[8] == '1' then redis.call('XACK', ARGV[1], ARGV[2], id) end
if outcome == 'retry' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  redis.call('HSET', ARGV[4], id, ARGV[13])
  redis.call('ZADD', ARGV[3], now + tonumber(ARGV[12]), id)
else
  redis.call('ZREM', ARGV[3], id)
  redis.call('HDEL', ARGV[4], id)
end
local sk = ARGV[5]
redis.call('HINCRBY', sk, 'attempts', 1)
if outcome == 'delivered' then redis.call('HINCRBY', sk, 'events', 1) end
if outcome == 'dead' then redis.call('HINCRBY', sk, 'dead_letters', 1) end
if err ~= '' then redis.call('HSET', sk, 'last_error', err) end
redis.call('EXPIRE', sk, tonumber(ARGV[14]))
local f = redis.call('HMGET', sk, 'events', 'attempts', 'dead_letters', 'last_error')
local state = outcome
if outcome == 'retry' then state = 'retrying' end
local note = cjson.encode({
  url = ARGV[9], state = state, delivered = (outcome == 'delivered'),
  events = tonumber(f[1] or '0'), attempts = tonumber(f[2] or '0'),
  dead_letters = tonumber(f[3] or '0'), last_error = f[4] or cjson.null})
if redis.call('EXISTS', ARGV[6]) == 1 then redis.call('HSET', ARGV[6], ARGV[15], note) end
return note
"""

_RELEASE = """
-- 1 stream, 2 group, 3 retry zset, 4 data hash, 5 delivery id, 6 '1' if pending in the
-- group, 7 its data: due again at once, for any replica
if ARGV[6] == '1' then
  redis.call('XACK', ARGV[1], ARGV[2], ARGV[5])
  redis.call('HSET', ARGV[4], ARGV[5], ARGV[7])
end
local t = redis.call('TIME')
redis.call('ZADD', ARGV[3], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[5])
return 1
"""


class RedisDeliveries(DeliveryQueue):
    """A consumer group on the event stream, a retry zset, per-job counters."""

    follows_bus = False

    def __init__(
        self,
        url: str,
        store: JobStore,
        *,
        prefix: str = keys.DEFAULT_PREFIX,
        lease_seconds: float = 30.0,
        block_ms: int = keys.READ_BLOCK_MS,
        retention_seconds: float = keys.RETENTION_SECONDS,
    ) -> None:
        """``lease_seconds``: how long a delivery stays with a sender that went silent
        (more than one POST's timeout) before another replica takes it over."""
        self.url = url
        self.store = store
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self.block_ms = block_ms
        self.retention_seconds = retention_seconds
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._redis: Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._claimed_at = 0.0

    def _key(self, name: str) -> str:
        return self.prefix + name

    async def open(self) -> None:
        # its own connection: a blocking XREADGROUP must not hold up the store's calls
        self._redis = connect(self.url, socket_timeout=self.block_ms / 1000 + 5)
        for name, body in (("claim", _CLAIM_RETRIES), ("settle", _SETTLE),
                           ("release", _RELEASE)):  # fmt: skip
            self._scripts[name] = self._redis.register_script(body)
        try:
            await self._redis.xgroup_create(
                self._key(keys.EVENTS), keys.WEBHOOK_GROUP, id="$", mkstream=True
            )
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # another replica made it first: fine
                raise unavailable(exc, self.url) from exc
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc

    async def close(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            stream = self._key(keys.EVENTS)
            with contextlib.suppress(redis_errors.RedisError):  # leave the group if it holds
                held = await client.xpending_range(  # nothing (else another claims it later)
                    stream, keys.WEBHOOK_GROUP, "-", "+", 1, consumername=self.consumer
                )
                if not held:
                    await client.xgroup_delconsumer(stream, keys.WEBHOOK_GROUP, self.consumer)
            await client.aclose()

    def _client(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("the webhook queue is closed")
        return self._redis

    async def take(self, limit: int) -> list[Delivery]:
        try:
            return await self._take(self._client(), limit)
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc

    async def _take(self, client: Redis, limit: int) -> list[Delivery]:
        found: list[Delivery] = []
        reply = await self._scripts["claim"](
            args=[
                self._key(keys.WEBHOOK_RETRY),
                self._key(keys.WEBHOOK_DATA),
                repr(self.lease_seconds),
                limit,
            ],
            client=client,
        )
        for id, data in zip(reply[::2], reply[1::2], strict=True):
            parsed = json.loads(data)
            found.append(Delivery(id, Event.model_validate(parsed["event"]), parsed["attempts"]))
        stream = self._key(keys.EVENTS)
        entries: list[tuple[str, dict[str, str]]] = []
        if len(found) < limit and time.monotonic() - self._claimed_at > self.lease_seconds / 4:
            self._claimed_at = time.monotonic()  # a replica that died mid-POST: take its own
            claimed = await client.xautoclaim(
                stream, keys.WEBHOOK_GROUP, self.consumer, int(self.lease_seconds * 1000),
                "0-0", count=limit - len(found),
            )  # fmt: skip
            entries.extend(claimed[1])
        if len(found) + len(entries) < limit:
            read = await client.xreadgroup(
                keys.WEBHOOK_GROUP, self.consumer, {stream: ">"},
                count=limit - len(found) - len(entries),
                block=None if found or entries else self.block_ms,
            )  # fmt: skip
            for _, rows in read or []:
                entries.extend(rows)
        ignored: list[str] = []
        for entry_id, fields in entries:
            if not fields or fields.get("t") not in DELIVERED_TYPES:
                ignored.append(entry_id)
                continue
            event = Event.model_validate_json(fields["e"])
            event.id = int(entry_id.partition("-")[0])
            found.append(Delivery(entry_id, event, 0, from_stream=True))
        if ignored:
            await client.xack(stream, keys.WEBHOOK_GROUP, *ignored)
        return found

    async def skip(self, delivery: Delivery) -> None:
        client = self._client()
        try:
            if delivery.from_stream:
                await client.xack(self._key(keys.EVENTS), keys.WEBHOOK_GROUP, delivery.id)
            else:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.zrem(self._key(keys.WEBHOOK_RETRY), delivery.id)
                    pipe.hdel(self._key(keys.WEBHOOK_DATA), delivery.id)
                    await pipe.execute()
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc

    async def settle(
        self,
        delivery: Delivery,
        url: str,
        outcome: Outcome,
        *,
        error: str | None = None,
        retry_in: float = 0.0,
    ) -> WebhookDelivery:
        job_id = delivery.event.job_id
        args = [
            self._key(keys.EVENTS), keys.WEBHOOK_GROUP, self._key(keys.WEBHOOK_RETRY),
            self._key(keys.WEBHOOK_DATA), self._key(keys.WEBHOOK_STATE + job_id),
            self._key(keys.JOB + job_id), delivery.id, "1" if delivery.from_stream else "0",
            url, outcome.value, error or "", repr(float(retry_in)),
            _data(delivery, delivery.attempts + 1), int(self.retention_seconds),
            keys.JOB_NOTE + "webhook",
        ]  # fmt: skip
        try:
            note = await self._scripts["settle"](args=args, client=self._client())
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc
        return WebhookDelivery.model_validate_json(note)

    async def release(self, delivery: Delivery) -> None:
        args = [
            self._key(keys.EVENTS), keys.WEBHOOK_GROUP, self._key(keys.WEBHOOK_RETRY),
            self._key(keys.WEBHOOK_DATA), delivery.id, "1" if delivery.from_stream else "0",
            _data(delivery, delivery.attempts),
        ]  # fmt: skip
        try:
            await self._scripts["release"](args=args, client=self._client())
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc


def _data(delivery: Delivery, attempts: int) -> str:
    return json.dumps({"event": delivery.event.model_dump(mode="json"), "attempts": attempts})
