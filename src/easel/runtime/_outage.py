"""Riding out a store (or bus) outage in a worker: a run's outcome is never lost to it.

A worker whose backend produced results cannot finish the job while the store is down
(Redis killed and restarting on its AOF, a SQLite file that cannot be written). Failing
the job would throw away work that was done, and ``store_unavailable`` is no fault of the
job. So every final write (``complete``, ``requeue``, ``fail``) and every final event is
tried again with backoff (:func:`easel.queue.backoff.retry_delay`) until the store
answers; the files stay on disk meanwhile and the heartbeats go on. The one way out is a
lost lease (a heartbeat or the write itself says another run owns the job now): then the
job runs again elsewhere and this run's results are void.

A write whose reply was lost (the store applied it, then went away) is recognised on the
retry by its run record (``Attempt``) already on the job.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

from easel.errors import EaselError, JobFinished, LeaseLost, StoreUnavailable
from easel.events.bus import EventBus
from easel.jobs import Attempt, Event, Job
from easel.queue.backoff import retry_delay
from easel.store.base import JobStore

log = logging.getLogger("easel.runtime.worker")

RETRY_BASE_SECONDS = 0.1
RETRY_CAP_SECONDS = 5.0
"""Longest wait between two tries: a store back from an outage is used within this."""


async def until_stored(
    write: Callable[[], Awaitable[Job]],
    *,
    store: JobStore,
    job_id: str,
    run: Attempt,
    lost: threading.Event,
) -> Job:
    """``write()`` (shielded: a cancel cannot half-write it), tried again through store
    outages until it lands. ``LeaseLost``/``JobFinished`` when the job is no longer this
    run's (``lost`` set by a heartbeat, or the store says so), unless the store shows that
    an earlier try of this very write landed (``run`` on the job): then that record."""
    failures = 0
    while True:
        try:
            return await asyncio.shield(write())
        except (LeaseLost, JobFinished):
            if failures and (landed := await _landed(store, job_id, run)) is not None:
                return landed
            raise
        except StoreUnavailable as exc:
            failures += 1
            if lost.is_set():
                raise LeaseLost(f"job {job_id}: lease lost while the store was away") from exc
            delay = retry_delay(failures, base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS)
            log.warning(
                "job %s: the store is unavailable (%s); its outcome is kept, trying again "
                "in %.1fs (try %d)", job_id, exc.message, delay, failures,
            )  # fmt: skip
            await asyncio.sleep(delay)


async def until_noted(write: Callable[[], Awaitable[object]], *, job_id: str, what: str) -> None:
    """A note on a job's record (its upload error) tried again through store outages until
    it lands. Unbounded here: the caller bounds it (a task it cancels when it ends). Any
    other refusal (the job expired meanwhile) ends it, logged."""
    failures = 0
    while True:
        try:
            await write()
            return
        except StoreUnavailable as exc:
            failures += 1
            delay = retry_delay(failures, base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS)
            log.warning(
                "job %s: the store is unavailable (%s); %s is recorded once it is back, "
                "trying again in %.1fs (try %d)", job_id, exc.message, what, delay, failures,
            )  # fmt: skip
            await asyncio.sleep(delay)
        except EaselError as exc:
            log.error("job %s: %s was not recorded: %s", job_id, what, exc.message)
            return


async def _landed(store: JobStore, job_id: str, run: Attempt) -> Job | None:
    try:
        job = await store.get(job_id)
    except EaselError:
        return None
    return job if run in job.runs else None


async def announce(bus: EventBus, event: Event) -> None:
    """Publish a final event (``succeeded``, ``failed``, ``queued`` again): its outcome is
    in the store already, and subscribers wait for it, so it is tried until it goes out."""
    failures = 0
    while True:
        try:
            await bus.publish(event)
            return
        except StoreUnavailable as exc:
            failures += 1
            delay = retry_delay(failures, base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS)
            log.warning(
                "job %s: could not announce %s (%s); trying again in %.1fs",
                event.job_id, event.type, exc.message, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)


async def try_announce(bus: EventBus, event: Event) -> None:
    """Publish a passing event (``started``, ``progress``): during an outage it is
    dropped (the next one, or the final event, supersedes it), never the run."""
    try:
        await bus.publish(event)
    except StoreUnavailable as exc:
        log.info("job %s: %s not announced: %s", event.job_id, event.type, exc.message)
