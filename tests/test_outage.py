"""A store outage never fails a job that ran, over both stores (``runtime/_outage.py``).

The store is real (SQLite, or the session's redis-server) behind :class:`Outage`, which a
test takes down and brings back: while down, every call raises ``StoreUnavailable``, as a
killed redis-server or an unwritable database file makes the real stores do. (The real
thing, redis-server SIGKILLed under 200 jobs, is in ``test_scale_out.py``.) Saves are held
at a gate, so the outage starts exactly between "the backend produced the images" and
"the record is committed": no sleeps, no timing.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from easel.config import S3Settings, Settings
from easel.errors import StoreUnavailable
from easel.events.bus import Subscription
from easel.jobs import EventType, JobState
from easel.runtime.facade import Runtime
from easel.store.base import JobStore
from easel.store.sqlite import SqliteStore
from tests.test_worker import GatedStorage, _drain, _request


class Outage:
    """A real store that a test can take down (``down``) and bring back. ``lose_reply``
    makes the next call of that name land, then fail as if the reply was lost with the
    connection; ``down_after``: the store goes down once a call of that name landed.
    ``refused`` and ``served`` count the calls refused and answered, per method
    (:meth:`until` and :meth:`until_served` await a count)."""

    def __init__(self, inner: JobStore) -> None:
        self.inner = inner
        self.down = False
        self.lose_reply: str | None = None
        self.down_after: str | None = None
        self.refused: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self._refusing = asyncio.Event()
        self._serving = asyncio.Event()

    async def until(self, **counts: int) -> None:
        """Until each named method was refused at least that many times."""
        while any(self.refused[name] < count for name, count in counts.items()):
            self._refusing.clear()
            await self._refusing.wait()

    async def until_served(self, **counts: int) -> None:
        """Until each named method was answered at least that many times."""
        while any(self.served[name] < count for name, count in counts.items()):
            self._serving.clear()
            await self._serving.wait()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name in {"open", "close"} or not asyncio.iscoroutinefunction(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                self.refused[name] += 1
                self._refusing.set()
                raise StoreUnavailable(f"the store is down (test outage, {name})")
            result = await attribute(*args, **kwargs)
            self.served[name] += 1
            self._serving.set()
            if self.down_after == name:
                self.down_after, self.down = None, True
            if self.lose_reply == name:
                self.lose_reply = None
                raise StoreUnavailable(f"the connection dropped before the reply ({name})")
            return result

        return call


@pytest.fixture(params=["sqlite", "redis"])
async def inner_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    store: JobStore
    if request.param == "redis":
        from easel.store.redis import RedisStore

        url = request.getfixturevalue("redis_url")
        store = RedisStore(url, prefix=f"outage:{tmp_path.name}:")
    else:
        store = SqliteStore(tmp_path / "jobs.db")
    yield store


@pytest.fixture
async def outage(inner_store: JobStore) -> Outage:
    return Outage(inner_store)


@pytest.fixture
async def runtime(tmp_path: Path, outage: Outage, gated: GatedStorage) -> AsyncIterator[Runtime]:
    settings = Settings(
        data_dir=tmp_path / "data", backend="mock", results_depth=1, retry_base_seconds=0.05
    )
    runtime = Runtime(settings, store=outage, storage=gated)  # type: ignore[arg-type]
    await runtime.start()
    try:
        yield runtime
    finally:
        gated.release_all()
        outage.down = False
        await runtime.stop()


@pytest.fixture
async def gated(tmp_path: Path) -> GatedStorage:
    return GatedStorage(tmp_path / "out")


async def _final(runtime: Runtime, job_id: str) -> Any:
    return await runtime.wait(job_id, timeout=60)


def _types(events: Subscription, job_id: str) -> list[EventType]:
    return [event.type for event in _drain(events) if event.job_id == job_id]


async def _down_while_committing(
    runtime: Runtime, outage: Outage, gated: GatedStorage, prompt: str
) -> str:
    """Submit, let the backend run, take the store down, then let the results be written:
    the commit meets the outage. Returns once the worker was refused twice (it retries)."""
    job_id = (await runtime.submit(_request(prompt))).id
    assert await gated.saving.get() == job_id  # the backend produced its image
    outage.down = True
    gated.release(job_id)
    await outage.until(complete=2)
    return job_id


async def test_a_job_whose_commit_meets_an_outage_succeeds_once_the_store_is_back(
    runtime: Runtime, outage: Outage, gated: GatedStorage
) -> None:
    events = runtime.bus.subscribe()
    job_id = await _down_while_committing(runtime, outage, gated, "through the outage")
    with pytest.raises(StoreUnavailable):  # the API answers 503 meanwhile
        await runtime.get(job_id)
    outage.down = False
    done = await _final(runtime, job_id)
    assert done.state is JobState.succeeded and done.attempts == 1 and done.error is None
    assert runtime.storage.path(done.images[0]).is_file()
    types = _types(events, job_id)
    assert types.count(EventType.succeeded) == 1 and EventType.failed not in types


async def test_leases_that_ran_out_during_the_outage_are_not_reaped_from_live_workers(
    tmp_path: Path, outage: Outage, gated: GatedStorage
) -> None:
    """The outage lasts several leases: every lease looks run out when the store is back.
    The reaper gives the workers a lease first; this one renews and commits: one run."""
    settings = Settings(  # as easel worker's: beats every 1/1.2 lease, reaps every 1/2 lease
        data_dir=tmp_path / "data", backend="mock", lease_seconds=1.0, heartbeat_seconds=0.8
    )
    runtime = Runtime(settings, store=outage, storage=gated)  # type: ignore[arg-type]
    await runtime.start()
    try:
        events = runtime.bus.subscribe()
        job_id = await _down_while_committing(runtime, outage, gated, "outlives its lease")
        await outage.until(heartbeat=3, expire_leases=1)  # 3 beats: over 2 leases long
        outage.down = False
        done = await _final(runtime, job_id)
    finally:
        outage.down = False
        await runtime.stop()
    assert done.state is JobState.succeeded and done.attempts == 1 and len(done.runs) == 1
    assert _types(events, job_id).count(EventType.started) == 1  # it never ran again


async def test_a_lease_lost_during_the_outage_runs_the_job_again(
    runtime: Runtime, outage: Outage, gated: GatedStorage
) -> None:
    """Another process's reaper put the job back as the store returned: this run's
    results are void, the job runs again and succeeds once; never ``failed``."""
    events = runtime.bus.subscribe()
    job_id = await _down_while_committing(runtime, outage, gated, "lease lost")
    worker = runtime.workers[0]
    await outage.inner.requeue(job_id, worker_id=worker.id)  # as expire_leases would
    gated.release_all()
    outage.down = False
    runtime._wakeup.set()
    done = await _final(runtime, job_id)
    await worker.finisher.drain()
    assert done.state is JobState.succeeded and done.attempts == 2
    types = _types(events, job_id)
    assert types.count(EventType.succeeded) == 1 and EventType.failed not in types


async def test_a_commit_whose_reply_was_lost_is_recognised_on_the_retry(
    runtime: Runtime, outage: Outage, gated: GatedStorage
) -> None:
    """The store applied the commit and the connection dropped before the reply: the
    retry finds the job no longer running, sees its own run on it, and announces it."""
    events = runtime.bus.subscribe()
    outage.lose_reply = "complete"
    job_id = (await runtime.submit(_request("reply lost"))).id
    gated.release_all()
    done = await _final(runtime, job_id)
    assert done.state is JobState.succeeded and done.attempts == 1 and len(done.runs) == 1
    assert _types(events, job_id).count(EventType.succeeded) == 1


class _FailOnce:
    """Makes the mock backend fail transiently once, while the store is down."""

    def __init__(self, outage: Outage) -> None:
        self.outage = outage
        self.failed = False

    def wrap(self, generate: Callable[..., Any]) -> Callable[..., Any]:
        async def once(*args: Any, **kwargs: Any) -> Any:
            if not self.failed:
                self.failed = True
                self.outage.down = True
                from easel.errors import BackendUnavailable

                raise BackendUnavailable("the engine hiccuped (test)")
            return await generate(*args, **kwargs)

        return once


async def test_a_retry_recorded_during_an_outage_lands_when_the_store_is_back(
    runtime: Runtime, outage: Outage, gated: GatedStorage
) -> None:
    """A transient backend failure while the store is down: the requeue is kept and tried
    until it lands; the job runs again and succeeds (no ``failed``, nothing stranded)."""
    backend = runtime.workers[0].backend
    backend.generate = _FailOnce(outage).wrap(backend.generate)  # type: ignore[method-assign]
    gated.release_all()
    events = runtime.bus.subscribe()
    job_id = (await runtime.submit(_request("requeue through the outage"))).id
    await outage.until(requeue=2)
    outage.down = False
    done = await _final(runtime, job_id)
    assert done.state is JobState.succeeded and done.attempts == 2
    codes = [run.error.code if run.error else None for run in done.runs]
    assert codes == ["backend_unavailable", None]
    types = _types(events, job_id)
    assert EventType.failed not in types and types.count(EventType.succeeded) == 1


async def test_an_upload_error_noted_during_an_outage_lands_when_the_store_is_back(
    tmp_path: Path, outage: Outage
) -> None:
    """``sync_with_s3`` with S3 unreachable (a closed port: boto3 is refused), and the store
    goes down right after the commit: the job succeeded, its event carries the upload error
    at once, and the note on its record is tried again until the store is back, then lands
    (every replica and a restart see it)."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    s3 = S3Settings.model_validate(
        {"bucket": "results", "endpoint_url": f"http://127.0.0.1:{closed}", "region": "us-east-1",
         "access_key_id": "testing", "secret_access_key": "testing", "max_attempts": 1}
    )  # fmt: skip
    settings = Settings(data_dir=tmp_path / "data", backend="mock", mock_step_delay=0.0, s3=s3)
    runtime = Runtime(settings, store=outage)  # type: ignore[arg-type]
    await runtime.start()
    try:
        events = runtime.bus.subscribe(types={EventType.succeeded})
        outage.down_after = "complete"
        request = _request("upload error").model_copy(update={"sync_with_s3": True})
        job_id = (await runtime.submit(request)).id
        succeeded = await asyncio.wait_for(events.queue.get(), 60)  # not held for the note
        assert succeeded is not None and succeeded.job_id == job_id and succeeded.upload_error
        await asyncio.wait_for(outage.until(annotate=2), 60)  # refused, and tried again
        assert (await outage.inner.get(job_id)).upload_error is None
        outage.down = False
        await asyncio.wait_for(outage.until_served(annotate=1), 60)
        record = await outage.inner.get(job_id)
    finally:
        outage.down = False
        await runtime.stop()
    assert record.state is JobState.succeeded and record.upload_error == succeeded.upload_error
