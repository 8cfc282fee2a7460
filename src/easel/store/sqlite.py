"""The embedded store: SQLite (WAL, ``synchronous=FULL``) on one writer thread.

Every call becomes one operation on a dedicated thread that owns the connection, committed
in groups (:mod:`easel.store._sqlite_writer`). The fair queue itself lives in memory, on
the event loop, rebuilt from the table on ``open``; one process owns the file (use Redis to
scale out).
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import IO, Any

from easel.errors import (
    EaselError,
    JobFinished,
    JobNotFound,
    JobNotQueued,
    LeaseLost,
    StoreInUse,
)
from easel.jobs import Attempt, AudioRef, ImageRef, Job, JobError, JobState
from easel.queue.scheduler import (
    Entry,
    FairQueue,
    Place,
    Policy,
    QueueStats,
    account,
    batch_key,
    check_queue_cap,
    check_user_cap,
    entry_for,
)
from easel.store._sqlite_writer import Writer
from easel.store.base import (
    TIMINGS_KEEP,
    WORKER_LOST,
    JobStore,
    Timing,
    Timings,
    annotation_json,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    state TEXT NOT NULL,
    worker_id TEXT,
    lease_expires_at REAL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs(user_id, seq);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs(json_extract(data, '$.created_at'));
CREATE TABLE IF NOT EXISTS timings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    seconds REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS timings_by_key ON timings(kind, key, id);
CREATE TABLE IF NOT EXISTS settings (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""
IDEMPOTENCY_RETENTION_SECONDS = 24 * 3600


def _setup(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(_SCHEMA)
    conn.create_function("casefold", 1, _casefold, deterministic=True)


def _casefold(value: str | None) -> str | None:
    """Prompt search ignores case the way Python does (SQLite's lower() is ASCII only)."""
    return value.casefold() if value is not None else None


def _load(conn: sqlite3.Connection, job_id: str) -> Job:
    row = conn.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFound(f"no job with id {job_id!r}")
    return Job.model_validate_json(row[0])


def _save(conn: sqlite3.Connection, job: Job, lease_expires_at: float | None = None) -> Job:
    conn.execute(
        "UPDATE jobs SET state = ?, worker_id = ?, lease_expires_at = ?, data = ? WHERE id = ?",
        (job.state, job.worker_id, lease_expires_at, job.model_dump_json(), job.id),
    )
    return job


_OWNED: dict[Path, tuple[IO[str], int]] = {}
"""Lock files this process holds, with how many of its stores use each (tests reopen a
store over the same file to play a restart; the lock is between processes)."""


def own(path: Path) -> Path:
    """One owner per job store: an exclusive lock on ``<db>.lock`` (released when the
    owning process ends, however it ends), holding its pid for the refusal message."""
    path = path.resolve()
    if (held := _OWNED.get(path)) is not None:
        _OWNED[path] = (held[0], held[1] + 1)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = (path.parent / (path.name + ".lock")).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise StoreInUse(
            f"the job store {path} is in use by another easel process (pid {owner}); stop "
            "it, or give this one another data dir (share one queue with --redis)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _OWNED[path] = (handle, 1)
    return path


def _disown(path: Path) -> None:
    handle, users = _OWNED[path]
    if users > 1:
        _OWNED[path] = (handle, users - 1)
    else:
        del _OWNED[path]
        handle.close()  # the lock goes with the descriptor


def _known(conn: sqlite3.Connection, key: str, now: float) -> Job | None:
    """The job an idempotency key made (within the retention), if any."""
    row = conn.execute(
        "SELECT job_id FROM idempotency WHERE key = ? AND created_at >= ?",
        (key, now - IDEMPOTENCY_RETENTION_SECONDS),
    ).fetchone()
    return None if row is None else _load(conn, row[0])


def _with_run(job: Job, run: Attempt | None) -> Job:
    return job if run is None else job.model_copy(update={"runs": [*job.runs, run]})


def _requeue(
    conn: sqlite3.Connection,
    job: Job,
    *,
    spend_attempt: bool,
    reason: JobError,
    max_attempts: int,
    now: float,
) -> Job:
    """Running -> queued, or failed with ``reason`` when the attempts are spent."""
    attempts = job.attempts if spend_attempt else max(job.attempts - 1, 0)
    if spend_attempt and attempts >= max_attempts:
        update = {"state": JobState.failed, "error": reason, "finished_at": now}
    else:
        update = {"state": JobState.queued, "started_at": None}
    job = job.model_copy(update={**update, "attempts": attempts, "worker_id": None})
    return _save(conn, job)


class SqliteStore(JobStore):
    def __init__(
        self,
        path: Path | str,
        *,
        max_attempts: int = 3,
        policy: Policy | None = None,
        max_queue_size: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: the time leases, retries, aging and records are measured by (tests
        move a frozen one forward instead of sleeping)."""
        self.path = Path(path)
        self.clock = clock
        self.max_attempts = max_attempts
        self.max_queue_size = max_queue_size
        self._writer = Writer(self.path, _setup)
        self._queue = FairQueue(policy)
        self._active: dict[str, str] = {}  # job id -> account, queued or running
        self._active_per_user: dict[str, int] = {}  # per account (service, user)
        self._running: set[str] = set()
        self._lock: Path | None = None
        self._sending: dict[str, asyncio.Event] = {}  # idempotency keys being sent
        self._delayed: dict[str, tuple[float, Job]] = {}  # requeued with a backoff: ready at
        self._timings_version: int | None = None

    async def open(self) -> None:
        self._lock = own(self.path)  # before anything is read or repaired
        self._writer.start()
        rows = await self._writer.run(self._recover)
        for job in rows:
            self._track(job)
            if job.state is JobState.queued:
                self._queue.push(entry_for(job))
            else:
                self._running.add(job.id)

    def _recover(self, conn: sqlite3.Connection) -> list[Job]:
        """Jobs left running by a crashed process go back to the queue (or fail)."""
        orphans = conn.execute("SELECT data FROM jobs WHERE state = 'running'").fetchall()
        for (data,) in orphans:
            self._put_back(conn, Job.model_validate_json(data))
        rows = conn.execute(
            "SELECT data FROM jobs WHERE state IN ('queued', 'running') ORDER BY seq"
        ).fetchall()
        return [Job.model_validate_json(data) for (data,) in rows]

    async def close(self) -> None:
        self._delayed.clear()
        await asyncio.to_thread(self._writer.stop)
        if self._lock is not None:
            _disown(self._lock)
            self._lock = None

    # -- bookkeeping on the event loop ------------------------------------------------

    def _track(self, job: Job) -> None:
        if job.id not in self._active:
            name = self._active[job.id] = account(job.service, job.user_id)
            self._active_per_user[name] = self._active_per_user.get(name, 0) + 1

    def _untrack(self, job_id: str) -> None:
        name = self._active.pop(job_id, None)
        if name is None:
            return
        left = self._active_per_user[name] - 1
        if left:
            self._active_per_user[name] = left
        else:
            del self._active_per_user[name]

    def _settled(self, job: Job, *, delay: float = 0.0) -> Job:
        """Bring the in-memory queue in line with a job's new durable state."""
        self._running.discard(job.id)
        if job.state.is_final:
            self._queue.remove(job.id)
            self._delayed.pop(job.id, None)
            self._untrack(job.id)
        elif job.state is JobState.queued and job.id not in self._queue:
            if delay > 0:
                self._delayed[job.id] = (self.clock() + delay, job)
            else:
                self._queue.push_front(entry_for(job))
        return job

    def _release_due(self, now: float) -> None:
        """Retries whose backoff is over are back in line (checked whenever work is asked)."""
        for job_id, (ready_at, job) in list(self._delayed.items()):
            if ready_at <= now:
                del self._delayed[job_id]
                self._queue.push_front(entry_for(job))

    # -- the interface ----------------------------------------------------------------

    async def enqueue(self, job: Job, *, user_cap: int, idempotency_key: str | None = None) -> Job:
        """Idempotency first, then caps (as the Redis store's script): a resend with a
        known key returns its job whatever the caps, and concurrent sends of one key wait
        for the first (this process owns the file), so exactly one job is made."""
        if idempotency_key is None:
            return await self._enqueue(job, user_cap, None)
        key = f"{job.service or ''}\0{job.user_id}\0{idempotency_key}"
        while (first := self._sending.get(key)) is not None:
            await first.wait()  # the first send of this key ends (made its job, or failed)
        self._sending[key] = sent = asyncio.Event()
        try:
            now = self.clock()
            known = await self._writer.run(lambda conn: _known(conn, key, now))
            if known is not None:
                return known
            return await self._enqueue(job, user_cap, idempotency_key)
        finally:
            del self._sending[key]
            sent.set()

    async def _enqueue(self, job: Job, user_cap: int, idempotency_key: str | None) -> Job:
        check_queue_cap(len(self._queue) + len(self._delayed), self.max_queue_size)
        active = self._active_per_user.get(account(job.service, job.user_id), 0)
        check_user_cap(job.user_id, active, user_cap)
        self._track(job)  # reserve the slot before awaiting, so concurrent submits count
        try:
            now = self.clock()
            stored = await self._writer.run(
                lambda conn: self._insert(conn, job, idempotency_key, now)
            )
        except BaseException:
            self._untrack(job.id)
            raise
        if stored.id != job.id:  # the same idempotency key: the job accepted before
            self._untrack(job.id)
            return stored
        self._queue.push(entry_for(job))
        return job

    @staticmethod
    def _insert(conn: sqlite3.Connection, job: Job, idempotency_key: str | None, now: float) -> Job:
        if idempotency_key is not None:
            key = f"{job.service or ''}\0{job.user_id}\0{idempotency_key}"  # (service, user)
            conn.execute(
                "DELETE FROM idempotency WHERE created_at < ?",
                (now - IDEMPOTENCY_RETENTION_SECONDS,),
            )
            row = conn.execute("SELECT job_id FROM idempotency WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return _load(conn, row[0])
            conn.execute(
                "INSERT INTO idempotency (key, job_id, created_at) VALUES (?, ?, ?)",
                (key, job.id, now),
            )
        conn.execute(
            "INSERT INTO jobs (id, user_id, state, data) VALUES (?, ?, ?, ?)",
            (job.id, job.user_id, job.state, job.model_dump_json()),
        )
        return job

    async def known(self, service: str | None, user_id: str, idempotency_key: str) -> Job | None:
        key = f"{service or ''}\0{user_id}\0{idempotency_key}"
        now = self.clock()
        return await self._writer.run(lambda conn: _known(conn, key, now))

    async def claim_batch(
        self, worker_id: str, routes: Collection[str], *, lease_seconds: float, limit: int = 1
    ) -> list[Job]:
        now = self.clock()
        self._release_due(now)
        entries = self._queue.pop_batch(routes, limit, now=now)
        if not entries:
            return []
        ids = [entry.job_id for entry in entries]
        try:
            jobs = await self._writer.run(
                lambda conn: [self._claim(conn, i, worker_id, lease_seconds, now) for i in ids]
            )
        except BaseException:
            for entry in reversed(entries):
                self._queue.push_front(entry)
            raise
        claimed = [job for job in jobs if job is not None]
        self._running.update(job.id for job in claimed)
        return claimed

    @staticmethod
    def _claim(
        conn: sqlite3.Connection, job_id: str, worker_id: str, lease_seconds: float, now: float
    ) -> Job | None:
        job = _load(conn, job_id)
        if job.state is not JobState.queued:
            return None
        job = job.model_copy(
            update={
                "state": JobState.running,
                "worker_id": worker_id,
                "started_at": now,
                "attempts": job.attempts + 1,
            }
        )
        return _save(conn, job, now + lease_seconds)

    async def heartbeat(self, job_id: str, worker_id: str, *, lease_seconds: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE jobs SET lease_expires_at = ? "
                "WHERE id = ? AND state = 'running' AND worker_id = ?",
                (self.clock() + lease_seconds, job_id, worker_id),
            )
            return cursor.rowcount == 1

        return await self._writer.run(op)

    async def complete(
        self,
        job_id: str,
        worker_id: str,
        images: list[ImageRef],
        *,
        audio: list[AudioRef] | None = None,
        run: Attempt | None = None,
    ) -> Job:
        def op(conn: sqlite3.Connection) -> Job:
            job = _with_run(self._held(conn, job_id, worker_id), run)
            update = {
                "state": JobState.succeeded,
                "images": images,
                "audio": audio or [],
                "finished_at": self.clock(),
            }
            return _save(conn, job.model_copy(update=update))

        return self._settled(await self._writer.run(op))

    async def fail(
        self,
        job_id: str,
        error: JobError,
        *,
        worker_id: str | None = None,
        run: Attempt | None = None,
    ) -> Job:
        def op(conn: sqlite3.Connection) -> Job:
            if worker_id is not None:
                job = self._held(conn, job_id, worker_id)
            else:
                job = _load(conn, job_id)
                _ensure_open(job)
            job = _with_run(job, run)
            update = {"state": JobState.failed, "error": error, "finished_at": self.clock()}
            return _save(conn, job.model_copy(update=update))

        return self._settled(await self._writer.run(op))

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
        def op(conn: sqlite3.Connection) -> Job:
            if worker_id is not None:
                job = self._held(conn, job_id, worker_id)
            else:
                job = _load(conn, job_id)
                if job.state is not JobState.running:
                    raise JobFinished(f"job {job_id} is {job.state}, not running")
            return _requeue(
                conn,
                _with_run(job, run),
                spend_attempt=spend_attempt,
                reason=reason,
                max_attempts=self.max_attempts,
                now=self.clock(),
            )

        return self._settled(await self._writer.run(op), delay=delay)

    async def cancel(self, job_id: str) -> Job:
        entry = self._queue.remove(job_id)

        def op(conn: sqlite3.Connection) -> Job:
            job = _load(conn, job_id)
            _ensure_open(job)
            update = {"state": JobState.cancelled, "finished_at": self.clock()}
            return _save(conn, job.model_copy(update=update))

        try:
            job = await self._writer.run(op)
        except EaselError:
            raise
        except BaseException:
            if entry is not None:
                self._queue.push_front(entry)
            raise
        return self._settled(job)

    async def annotate(self, job_id: str, **fields: Any) -> None:
        """Set in the record itself, one statement: later writes load it with the rest."""
        paths = [(f"$.{key}", annotation_json(key, value)) for key, value in fields.items()]
        if not paths:
            return
        sets = ", ".join("?, json(?)" for _ in paths)
        params = [part for pair in paths for part in pair]

        def op(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                f"UPDATE jobs SET data = json_set(data, {sets}) WHERE id = ?", (*params, job_id)
            )
            if cursor.rowcount != 1:
                raise JobNotFound(f"no job with id {job_id!r}")

        await self._writer.run(op)

    async def get(self, job_id: str) -> Job:
        return await self._writer.run(lambda conn: _load(conn, job_id))

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
        clauses: list[str] = []
        params: list[object] = []
        for clause, value in (
            ("user_id = ?", user_id),
            ("state = ?", None if state is None else str(state)),
            ("json_extract(data, '$.service') = ?", service),
            ("json_extract(data, '$.request.model') = ?", model),
            ("json_extract(data, '$.created_at') < ?", until),
            ("seq < (SELECT seq FROM jobs WHERE id = ?)", before),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if since is not None:
            # the oldest job created since then bounds the walk (newest first, it would
            # read the whole table when fewer than ``limit`` match): found by the index
            clauses.append(
                "json_extract(data, '$.created_at') >= ? AND seq >= (SELECT min(seq) FROM "
                "jobs INDEXED BY jobs_by_created WHERE json_extract(data, '$.created_at') >= ?)"
            )
            params += [since, since]
        if text:
            clauses.append("instr(casefold(json_extract(data, '$.request.prompt')), ?) > 0")
            params.append(text.casefold())
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT data FROM jobs {where} ORDER BY seq DESC LIMIT ?"

        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(sql, (*params, limit)).fetchall()
            return [Job.model_validate_json(data) for (data,) in rows]

        return await self._writer.run(op)

    async def move(self, job_id: str, *, front: bool) -> Job:
        job = await self.get(job_id)
        if not self._queue.move(job_id, front=front):
            where = "held back for a retry" if job_id in self._delayed else str(job.state)
            raise JobNotQueued(f"job {job_id} is {where}, not waiting in line")
        return job

    async def place(self, job_id: str) -> Place | None:
        return self._queue.place(job_id)

    async def serving_order(self, limit: int) -> list[Entry] | None:
        self._queue.age(time.time())
        return list(itertools.islice(self._queue.order(), limit))

    async def expire_leases(self) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                "SELECT data FROM jobs WHERE state = 'running' AND lease_expires_at < ?",
                (self.clock(),),
            ).fetchall()
            return [self._put_back(conn, Job.model_validate_json(data)) for (data,) in rows]

        return [self._settled(job) for job in await self._writer.run(op)]

    async def active_count(self, user_id: str, service: str | None = None) -> int:
        return self._active_per_user.get(account(service, user_id), 0)

    async def service_active_count(self, service: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') "
                "AND json_extract(data, '$.service') = ?",
                (service,),
            ).fetchone()
            return int(row[0])

        return await self._writer.run(op)

    async def stats(self) -> QueueStats:
        return QueueStats(
            queued=len(self._queue) + len(self._delayed),
            running=len(self._running),
            tiers=self._queue.tier_counts(),
            users=self._queue.user_counts(),
        )

    async def reroute(self, job_id: str, backend: str) -> Job | None:
        if job_id not in self._queue:
            return None
        job = await self.get(job_id)
        moved = job.model_copy(update={"backend": backend})
        # in memory first, on the loop: a claim either took it before or sees the new route
        if job.state is not JobState.queued or not self._queue.reroute(
            job_id, backend, batch_key(moved)
        ):
            return None

        def op(conn: sqlite3.Connection) -> None:
            current = _load(conn, job_id)
            lease = conn.execute(
                "SELECT lease_expires_at FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()[0]
            _save(conn, current.model_copy(update={"backend": backend}), lease)

        await self._writer.run(op)
        return moved

    async def backlog(self) -> dict[str, float]:
        return self._queue.route_costs()

    async def record_timings(self, samples: Sequence[Timing]) -> None:
        def op(conn: sqlite3.Connection) -> int:
            for sample in samples:
                conn.execute(
                    "INSERT INTO timings (kind, key, seconds) VALUES (?, ?, ?)",
                    (sample.kind, sample.key, sample.seconds),
                )
            for kind, key in {(sample.kind, sample.key) for sample in samples}:
                conn.execute(
                    "DELETE FROM timings WHERE kind = ? AND key = ? AND id <= ("
                    " SELECT id FROM timings WHERE kind = ? AND key = ?"
                    " ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (kind, key, kind, key, TIMINGS_KEEP),
                )
            return int(conn.execute("SELECT max(id) FROM timings").fetchone()[0])

        if samples:
            self._timings_version = await self._writer.run(op)

    async def timings(self, known: int | None = None) -> Timings | None:
        if known is not None and known == self._timings_version:
            return None  # one owner per data dir: nobody else records here

        def op(conn: sqlite3.Connection) -> Timings | None:
            version = conn.execute("SELECT coalesce(max(id), 0) FROM timings").fetchone()[0]
            if version == known:
                return None
            samples: dict[tuple[str, str], list[float]] = {}
            rows = conn.execute("SELECT kind, key, seconds FROM timings ORDER BY id")
            for kind, key, seconds in rows:
                samples.setdefault((kind, key), []).append(seconds)
            return Timings(int(version), samples)

        read = await self._writer.run(op)
        if read is not None:
            self._timings_version = read.version
        return read

    async def get_setting(self, scope: str, key: str) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT value FROM settings WHERE scope = ? AND key = ?", (scope, key)
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._writer.run(op)

    async def put_setting(self, scope: str, key: str, value: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO settings (scope, key, value) VALUES (?, ?, ?)"
                " ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
                (scope, key, value),
            )

        await self._writer.run(op)

    def _put_back(self, conn: sqlite3.Connection, job: Job) -> Job:
        return _requeue(
            conn,
            job,
            spend_attempt=True,
            reason=WORKER_LOST,
            max_attempts=self.max_attempts,
            now=self.clock(),
        )

    @staticmethod
    def _held(conn: sqlite3.Connection, job_id: str, worker_id: str) -> Job:
        job = _load(conn, job_id)
        if job.state is not JobState.running or job.worker_id != worker_id:
            raise LeaseLost(f"worker {worker_id} no longer holds job {job_id} ({job.state})")
        return job


def _ensure_open(job: Job) -> None:
    if job.state.is_final:
        raise JobFinished(f"job {job.id} already ended: {job.state}")
