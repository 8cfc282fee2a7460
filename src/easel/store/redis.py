"""The scale-out store: job records, the fair queue and leases in one Redis, many processes.

Every state change is one Lua script (``_redis_lua.py``), so API replicas and workers on
many hosts see one queue and no two workers ever hold the same job. The queue policy is
:class:`easel.queue.scheduler.FairQueue`'s, transcribed into the scripts with its state in
Redis; times (leases, retries, aging) are Redis server time, so hosts' clocks do not matter.

Durability: ``enqueue`` returns once Redis has the job on disk when Redis runs with AOF,
either because ``appendfsync always`` fsyncs before Redis replies, or by ``WAITAOF``
(Redis 7.2+) after the write. :attr:`RedisStore.durability` says which applies.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import TypeAdapter
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from easel import constants as keys
from easel.errors import (
    EaselError,
    JobFinished,
    JobNotFound,
    JobNotQueued,
    LeaseLost,
    QueueFull,
    StoreError,
    StoreUnavailable,
    UserQueueFull,
)
from easel.jobs import Attempt, AudioRef, ImageRef, Job, JobError, JobState
from easel.queue.scheduler import (
    Entry,
    Place,
    Policy,
    QueueStats,
    account,
    batch_key,
    entry_for,
    serving_order,
)
from easel.store import _redis_lua as lua
from easel.store.base import (
    TIMINGS_KEEP,
    WORKER_LOST,
    JobStore,
    Timing,
    Timings,
    annotation_json,
    with_annotations,
)

log = logging.getLogger("easel.store.redis")

Durability = Literal["auto", "waitaof", "off"]
_IMAGES = TypeAdapter(list[ImageRef])
_AUDIO = TypeAdapter(list[AudioRef])
_CHANGING = frozenset(
    {
        "state",
        "started_at",
        "finished_at",
        "attempts",
        "worker_id",
        "images",
        "audio",
        "error",
        "runs",
    }
)
"""Job fields the scripts change, each a hash field; the rest is stored once as JSON."""
_NOTE = keys.JOB_NOTE
_ENTRY_CACHE = 20_000
"""Queued jobs whose fixed facts a store remembers for ``serving_order`` (then it forgets
them all and reads again)."""
_UNAVAILABLE_REPLIES = ("MISCONF", "READONLY", "LOADING", "MASTERDOWN", "NOREPLICAS")


def connect(url: str, *, socket_timeout: float = keys.SOCKET_TIMEOUT_SECONDS) -> Redis:
    """A client that fails fast: a request never hangs on a Redis that is gone."""
    client: Redis = Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=keys.CONNECT_TIMEOUT_SECONDS,
    )
    return client


def raise_if_cancelled() -> None:
    """Re-raise a cancel that redis-py swallowed: on CPython < 3.12 one that lands as a
    reply arrives can be lost (gh-86296), and a loop around the call would never end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def unavailable(exc: Exception, url: str) -> EaselError:
    """Translate a Redis client error: connection trouble is a 503, the rest a bug."""
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError):
        return StoreUnavailable(f"Redis at {url} is unavailable ({exc}); try again shortly")
    if isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES):
        return StoreUnavailable(f"Redis at {url} cannot take writes now ({exc})")
    return StoreError(f"Redis answered an error: {exc}")


class RedisStore(JobStore):
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = keys.DEFAULT_PREFIX,
        max_attempts: int = 3,
        policy: Policy | None = None,
        max_queue_size: int | None = None,
        retention_seconds: float = keys.RETENTION_SECONDS,
        durability: Durability = "auto",
        socket_timeout: float = keys.SOCKET_TIMEOUT_SECONDS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``clock`` replaces Redis server time (tests drive aging with it)."""
        self.url = url
        self.prefix = prefix
        self.max_attempts = max_attempts
        self.policy = policy or Policy()
        self.max_queue_size = max_queue_size
        self.retention_seconds = retention_seconds
        self.requested_durability: Durability = durability
        self.durability = "unknown until open"
        self.socket_timeout = socket_timeout
        self.clock = clock
        self._waitaof = False
        self._redis: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._entries: dict[str, Entry] = {}  # queued jobs' fixed facts, for serving_order

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        self._redis = connect(self.url, socket_timeout=self.socket_timeout)
        self._scripts["ANNOTATE"] = self._redis.register_script(lua.ANNOTATE)
        for name in ("TIMINGS_RECORD", "TIMINGS_READ"):  # keys passed in, no header
            self._scripts[name] = self._redis.register_script(getattr(lua, name))
        self._scripts["ORDER"] = self._redis.register_script(lua.ORDER)
        self._scripts["LEAD"] = self._redis.register_script(lua.LEAD)
        for name in ("ENQUEUE", "CLAIM", "HEARTBEAT", "COMPLETE", "FAIL", "REQUEUE", "CANCEL",
                     "EXPIRE", "PLACE", "STATS", "REROUTE", "REORDER"):  # fmt: skip
            self._scripts[name] = self._redis.register_script(getattr(lua, name))
        try:
            await self._detect_durability(self._redis)
        except redis_errors.RedisError as exc:
            await self.close()
            raise unavailable(exc, self.url) from exc

    async def _detect_durability(self, client: Redis) -> None:
        """What a 2xx promises: decided once, from the server's version and AOF settings."""
        info = await client.info("server")
        version = tuple(int(part) for part in str(info["redis_version"]).split(".")[:2])
        try:
            config = await client.config_get("append*")
        except redis_errors.ResponseError:  # CONFIG renamed away (managed Redis)
            config = {}
        aof = config.get("appendonly") == "yes"
        fsync = config.get("appendfsync")
        wanted = self.requested_durability
        if wanted == "waitaof" or (wanted == "auto" and aof and fsync != "always"):
            if version < (7, 2):
                log.warning("WAITAOF needs Redis 7.2+ (this is %s)", info["redis_version"])
            else:
                self._waitaof = True
                self.durability = "on disk before 2xx (WAITAOF 1 0 after each submission)"
                return
        if aof and fsync == "always":
            self.durability = "on disk before 2xx (AOF, appendfsync always)"
        elif not config:
            self.durability = "unknown (CONFIG GET is not allowed; check the AOF settings)"
        else:
            self.durability = (
                f"NOT on disk before 2xx (appendonly {config.get('appendonly')}, "
                f"appendfsync {fsync}): a Redis crash may lose recent submissions"
            )
            log.warning("redis store %s: %s", self.url, self.durability)
            return
        log.info("redis store %s: %s", self.url, self.durability)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    # -- calling scripts --------------------------------------------------------------

    def _header(self) -> list[str | int | float]:
        policy = self.policy
        aging = "" if policy.aging_seconds is None else repr(float(policy.aging_seconds))
        now = "" if self.clock is None else repr(self.clock())
        return [self.prefix, aging, policy.aged_every, policy.top_priority, now,
                self.max_attempts, repr(float(self.retention_seconds))]  # fmt: skip

    async def _run(self, name: str, *args: str | int | float) -> Any:
        if self._redis is None:
            raise StoreUnavailable("the job store is closed")
        try:
            reply = await self._scripts[name](args=[*self._header(), *args])
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc
        raise_if_cancelled()
        return reply

    async def _read(self, call: Callable[[Redis], Any]) -> Any:
        if self._redis is None:
            raise StoreUnavailable("the job store is closed")
        try:
            reply = await call(self._redis)
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc
        raise_if_cancelled()
        return reply

    def _key(self, name: str) -> str:
        return self.prefix + name

    # -- the interface ----------------------------------------------------------------

    async def enqueue(self, job: Job, *, user_cap: int, idempotency_key: str | None = None) -> Job:
        entry = entry_for(job)
        idem = ""
        if idempotency_key is not None:
            idem = self._idem_key(job.service, job.user_id, idempotency_key)
        args = (
            job.id, job.user_id, self.policy.tier(entry.priority), job.backend,
            repr(entry.cost), repr(job.created_at), entry.batch_key or "",
            job.model_dump_json(exclude=set(_CHANGING)), user_cap,
            "" if self.max_queue_size is None else self.max_queue_size,
            idem, keys.IDEMPOTENCY_TTL_SECONDS * 1000,
            repr(self.policy.weight(job.service, job.user_id)), job.service or "",
            account(job.service, job.user_id),
        )  # fmt: skip
        if self._waitaof:
            reply = await self._enqueue_waitaof(args)
        else:
            reply = await self._run("ENQUEUE", *args)
        outcome = reply[0]
        if outcome == "dup":
            return _job(reply[1])
        if outcome == "queue_full":
            raise QueueFull(
                f"the queue holds {reply[1]} jobs, its limit; try again later", count=reply[1]
            )
        if outcome == "user_full":
            raise UserQueueFull(
                f"user {job.user_id!r} already has {reply[1]} queued or running jobs (the cap "
                f"is {user_cap}); wait for one to finish or cancel one",
                count=reply[1],
            )
        return job

    async def _enqueue_waitaof(self, args: tuple[str | int | float, ...]) -> Any:
        """The script and WAITAOF on one connection: WAITAOF waits for that client's writes."""
        if self._redis is None:
            raise StoreUnavailable("the job store is closed")
        timeout_ms = int(self.socket_timeout * 1000 / 2)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                await self._scripts["ENQUEUE"](args=[*self._header(), *args], client=pipe)
                pipe.execute_command("WAITAOF", 1, 0, timeout_ms)
                reply, (local, _replicas) = await pipe.execute()
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc
        if reply[0] == "ok" and int(local) < 1:
            raise StoreUnavailable("Redis did not fsync the job in time; resend it (same key)")
        return reply

    def _idem_key(self, service: str | None, user_id: str, idempotency_key: str) -> str:
        """Scoped by (service, user): tenants never meet."""
        owner = f"{len(service or '')}:{service or ''}:{len(user_id)}:{user_id}"
        return self._key(f"{keys.IDEMPOTENCY}{owner}:{idempotency_key}")

    async def known(self, service: str | None, user_id: str, idempotency_key: str) -> Job | None:
        key = self._idem_key(service, user_id, idempotency_key)
        job_id = await self._read(lambda r: r.get(key))
        if job_id is None:
            return None
        try:
            return await self.get(job_id)
        except JobNotFound:
            return None

    async def claim_batch(
        self, worker_id: str, routes: Collection[str], *, lease_seconds: float, limit: int = 1
    ) -> list[Job]:
        if not routes:
            return []
        reply = await self._run("CLAIM", worker_id, repr(float(lease_seconds)), limit, *routes)
        return [_job(fields) for fields in reply]

    async def heartbeat(self, job_id: str, worker_id: str, *, lease_seconds: float) -> bool:
        return bool(await self._run("HEARTBEAT", job_id, worker_id, repr(float(lease_seconds))))

    async def complete(
        self,
        job_id: str,
        worker_id: str,
        images: list[ImageRef],
        *,
        audio: list[AudioRef] | None = None,
        run: Attempt | None = None,
    ) -> Job:
        payload = _IMAGES.dump_json(images).decode()
        clips = _AUDIO.dump_json(audio or []).decode()
        reply = await self._run("COMPLETE", job_id, worker_id, payload, clips, _run_json(run))
        return _outcome(reply, job_id, worker_id)

    async def fail(
        self,
        job_id: str,
        error: JobError,
        *,
        worker_id: str | None = None,
        run: Attempt | None = None,
    ) -> Job:
        reply = await self._run(
            "FAIL", job_id, error.model_dump_json(), worker_id or "", _run_json(run)
        )
        return _outcome(reply, job_id, worker_id)

    async def requeue(
        self,
        job_id: str,
        *,
        worker_id: str | None = None,
        spend_attempt: bool = True,
        reason: JobError = WORKER_LOST,
        delay: float = 0.0,
        run: Attempt | None = None,
    ) -> Job:
        reply = await self._run(
            "REQUEUE", job_id, worker_id or "", int(spend_attempt), reason.model_dump_json(),
            repr(float(delay)), _run_json(run),
        )  # fmt: skip
        return _outcome(reply, job_id, worker_id)

    async def cancel(self, job_id: str) -> Job:
        return _outcome(await self._run("CANCEL", job_id), job_id, None)

    async def annotate(self, job_id: str, **fields: Any) -> None:
        """HSET beside the record (only while it exists: an expired job stays gone)."""
        args = [
            part
            for key, value in fields.items()
            for part in (_NOTE + key, annotation_json(key, value))
        ]
        if not args:
            return
        if self._redis is None:
            raise StoreUnavailable("the job store is closed")
        key = self._key(keys.JOB + job_id)
        try:
            found = await self._scripts["ANNOTATE"](keys=[key], args=args)
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc
        raise_if_cancelled()
        if not found:
            raise JobNotFound(f"no job with id {job_id!r}")

    async def get_setting(self, scope: str, key: str) -> str | None:
        value = await self._read(lambda r: r.hget(self._key(keys.SETTINGS + scope), key))
        return None if value is None else str(value)

    async def put_setting(self, scope: str, key: str, value: str) -> None:
        await self._read(lambda r: r.hset(self._key(keys.SETTINGS + scope), key, value))

    async def get(self, job_id: str) -> Job:
        fields = await self._read(lambda r: r.hgetall(self._key(keys.JOB + job_id)))
        if not fields:
            raise JobNotFound(f"no job with id {job_id!r}")
        return _from_fields(fields)

    async def list_jobs(
        self,
        *,
        user_id: str | None = None,
        state: JobState | None = None,
        limit: int = 100,
        service: str | None = None,
        text: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: str | None = None,
    ) -> list[Job]:
        """Walks the narrowest index (user, service, state or all) newest first, a page
        at a time, keeping the jobs that match every filter, until ``limit`` are found:
        pages are never short while older matches exist."""
        index = (
            keys.USER + user_id if user_id is not None
            else keys.SERVICE + service if service is not None
            else keys.STATE + state if state is not None
            else keys.ALL
        )  # fmt: skip
        key = self._key(index)
        top: str = "+inf"
        if before is not None:
            seq = await self._read(lambda r: r.zscore(self._key(keys.ALL), before))
            if seq is None:
                return []
            top = f"({int(seq)}"
        needle = text.casefold() if text else None

        def wanted(job: Job) -> bool:
            return (
                (user_id is None or job.user_id == user_id)
                and (state is None or job.state is state)
                and (service is None or job.service == service)
                and (model is None or job.request.model == model)
                and (until is None or job.created_at < until)
                and (since is None or job.created_at >= since)
                and (needle is None or needle in job.request.prompt.casefold())
            )

        found: list[Job] = []
        page = max(limit, 50)
        while len(found) < limit:

            async def scan(r: Redis, bound: str = top) -> list[tuple[str, float]]:
                rows: list[tuple[str, float]] = await r.zrevrangebyscore(
                    key, bound, "-inf", start=0, num=page, withscores=True
                )
                return rows

            rows = await self._read(scan)
            if not rows:
                break
            jobs = await self._load_many([job_id for job_id, _ in rows])
            found.extend(job for job in jobs if wanted(job))
            # ids arrive in arrival order: past ``since`` nothing older can match
            if since is not None and jobs and min(j.created_at for j in jobs) < since:
                break
            top = f"({int(rows[-1][1])}"
        return found[:limit]

    async def move(self, job_id: str, *, front: bool) -> Job:
        reply = await self._run("REORDER", job_id, "front" if front else "back")
        if reply[0] == "missing":
            raise JobNotFound(f"no job with id {job_id!r}")
        if reply[0] == "not_queued":
            raise JobNotQueued(f"job {job_id} is {reply[1]}, not waiting in line")
        return _job(reply[1])

    async def _load_many(self, ids: list[str]) -> list[Job]:
        async def load(r: Redis) -> list[dict[str, str]]:
            async with r.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self._key(keys.JOB + job_id))
                rows: list[dict[str, str]] = await pipe.execute()
                return rows

        rows = await self._read(load) if ids else []
        return [_from_fields(row) for row in rows if row]  # expired records are skipped

    async def place(self, job_id: str) -> Place | None:
        reply = await self._run("PLACE", job_id)
        return None if reply is None else Place(int(reply[0]), float(reply[1]))

    async def expire_leases(self) -> list[Job]:
        reply = await self._run("EXPIRE", WORKER_LOST.model_dump_json(), keys.SWEEP_LIMIT)
        return [_job(fields) for fields in reply]

    async def active_count(self, user_id: str, service: str | None = None) -> int:
        name = account(service, user_id)
        count = await self._read(lambda r: r.hget(self._key(keys.ACTIVE), name))
        return int(count or 0)

    async def service_active_count(self, service: str) -> int:
        """Its jobs in the queued and running state indexes (ZINTERCARD, Redis 7)."""
        jobs = self._key(keys.SERVICE + service)

        async def count(r: Redis) -> int:
            async with r.pipeline(transaction=False) as pipe:
                for state in (JobState.queued, JobState.running):
                    pipe.execute_command("ZINTERCARD", 2, jobs, self._key(keys.STATE + state))
                counts: list[int] = await pipe.execute()
            return sum(int(c) for c in counts)

        return int(await self._read(count))

    async def stats(self) -> QueueStats:
        queued, running, tiers, users = await self._run("STATS")
        return QueueStats(
            queued=int(queued),
            running=int(running),
            tiers={int(tiers[i]): int(tiers[i + 1]) for i in range(0, len(tiers), 2)},
            users={users[i]: int(users[i + 1]) for i in range(0, len(users), 2)},
        )

    async def reroute(self, job_id: str, backend: str) -> Job | None:
        job = await self.get(job_id)
        if job.state is not JobState.queued:
            return None
        moved = job.model_copy(update={"backend": backend})
        if not await self._run("REROUTE", job_id, backend, batch_key(moved) or ""):
            return None
        return moved

    async def backlog(self) -> dict[str, float]:
        costs = await self._read(lambda r: r.hgetall(self._key(keys.ROUTE_COST)))
        return {route: float(cost) for route, cost in costs.items() if float(cost) > 1e-9}

    async def serving_order(self, limit: int) -> list[Entry] | None:
        reply = await self._run("ORDER", max(limit, 0))
        starving = int(reply[0]) if reply[0] != "" else None
        tiers: list[tuple[int, list[tuple[str, str, str]]]] = []
        for i in range(2, len(reply), 2):
            rows = reply[i + 1]
            tiers.append((int(reply[i]), [tuple(rows[j : j + 3]) for j in range(0, len(rows), 3)]))
        missing = [
            job_id for _, rows in tiers for job_id, *_ in rows if job_id not in self._entries
        ]
        if missing:
            await self._remember_entries(missing)
        ordered = [
            (tier, [replace(self._entries[job_id], route=route, batch_key=key or None)
                    for job_id, route, key in rows if job_id in self._entries])
            for tier, rows in tiers
        ]  # fmt: skip
        order = serving_order(ordered, starving, int(reply[1]), self.policy.aged_every)
        return list(itertools.islice(order, limit))

    async def _remember_entries(self, job_ids: list[str]) -> None:
        """What never changes of a queued job (user, tier, cost, shape, needs), read once."""
        if len(self._entries) > _ENTRY_CACHE:
            self._entries.clear()

        async def read(r: Redis) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hgetall(self._key(keys.JOB + job_id))
                return list(await pipe.execute())

        def parse(rows: list[Any]) -> list[Entry]:
            return [entry_for(_from_fields(flat)) for flat in rows if flat]

        # thousands of records: parsed off the event loop (heartbeats must not wait)
        for entry in await asyncio.to_thread(parse, await self._read(read)):
            self._entries[entry.job_id] = entry

    async def lead(self, duty: str, holder: str, seconds: float) -> bool:
        script = self._scripts["LEAD"]
        key = self._key(keys.LEADER + duty)
        ttl = max(int(seconds * 1000), 1)
        return bool(await self._read(lambda r: script(keys=[key], args=[holder, ttl], client=r)))

    def _timing_keys(self) -> list[str]:
        return [self._key(keys.TIMINGS), self._key(keys.TIMINGS_VERSION)]

    async def record_timings(self, samples: Sequence[Timing]) -> None:
        if not samples:
            return
        args: list[str | int | float] = [TIMINGS_KEEP]
        for sample in samples:
            args += [f"{sample.kind}|{sample.key}", repr(sample.seconds)]
        script = self._scripts["TIMINGS_RECORD"]
        await self._read(lambda r: script(keys=self._timing_keys(), args=args, client=r))

    async def timings(self, known: int | None = None) -> Timings | None:
        script = self._scripts["TIMINGS_READ"]
        since = "" if known is None else str(known)
        reply = await self._read(lambda r: script(keys=self._timing_keys(), args=[since], client=r))
        if len(reply) == 1:
            return None
        flat = reply[1]
        samples: dict[tuple[str, str], list[float]] = {}
        for field, listed in zip(flat[::2], flat[1::2], strict=True):
            kind, _, key = field.partition("|")
            samples[(kind, key)] = [float(x) for x in json.loads(listed)]
        return Timings(int(reply[0]), samples)


def _outcome(reply: list[Any], job_id: str, worker_id: str | None) -> Job:
    """A script's verdict as the store interface's result or error."""
    match reply[0]:
        case "ok":
            return _job(reply[1])
        case "missing":
            raise JobNotFound(f"no job with id {job_id!r}")
        case "lost":
            raise LeaseLost(f"worker {worker_id} no longer holds job {job_id} ({reply[1]})")
        case _:
            raise JobFinished(f"job {job_id} already ended: {reply[1]}")


def _run_json(run: Attempt | None) -> str:
    return "" if run is None else run.model_dump_json()


def _job(flat: list[str]) -> Job:
    return _from_fields(dict(zip(flat[::2], flat[1::2], strict=True)))


def _from_fields(fields: dict[str, str]) -> Job:
    """A job hash as the one vocabulary's :class:`Job`: what it was made with, then what
    changed since (so fields added to Job later round-trip without a script change)."""
    error = fields.get("error")
    runs = fields.get("runs")
    base = Job.model_validate_json(fields["base"])
    notes = {key[len(_NOTE) :]: value for key, value in fields.items() if key.startswith(_NOTE)}
    job = base.model_copy(
        update={
            "state": JobState(fields["state"]),
            "started_at": _float(fields.get("started_at")),
            "finished_at": _float(fields.get("finished_at")),
            "attempts": int(fields.get("attempts") or 0),
            "worker_id": fields.get("worker_id") or None,
            "images": _IMAGES.validate_json(fields.get("images") or "[]"),
            "audio": _AUDIO.validate_json(fields.get("audio") or "[]"),
            "error": JobError.model_validate_json(error) if error else None,
            "backend": fields.get("backend") or base.backend,
            "runs": [Attempt.model_validate_json(line) for line in runs.splitlines()]
            if runs
            else [],
        }
    )
    return with_annotations(job, notes)


def _float(value: str | None) -> float | None:
    return float(value) if value else None
