"""The results stage of a worker: finish what a backend returned while the backend runs on.

A backend call is the expensive, scarce part (a GPU); encoding the images, writing and
fsyncing them, committing the record and announcing ``succeeded`` are CPU and disk work
that can overlap the next call. The worker hands each returned call to a :class:`Finisher`
and claims its next job at once; the finisher runs the finishing coroutine as a task and
holds at most ``depth`` calls' results in memory (the worker waits for room before
claiming more, so a slow disk slows claiming instead of filling memory).

Nothing changes for a job's promises: its lease is kept (heartbeats go on until it is
finished), its record is committed only after its files are durable, ``succeeded`` is
announced only after the commit, and a crash while results are in flight leaves the job
``running`` under a lease that expires: it is run again, or its committed result stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from easel.jobs import Job

log = logging.getLogger("easel.runtime.worker")
T = TypeVar("T")

_priority = {"nice": 10}


def set_results_priority(nice: int) -> None:
    """How much less CPU priority the results threads get than the rest of the process
    (``results_nice``); applies to threads started from now on."""
    _priority["nice"] = nice


def _lower_priority() -> None:
    """Results work is background work: under CPU contention (4 workers' PNGs need more
    than 2 cores) the event loop and the threads that feed the backends go first. Linux
    keeps a nice value per thread; elsewhere the threads keep the process's."""
    if _priority["nice"] and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            os.setpriority(
                os.PRIO_PROCESS, threading.get_native_id(), min(19, own + _priority["nice"])
            )
        except OSError:  # not permitted here: run at the process's priority
            log.debug("results threads keep the process's priority")


_encoders = ThreadPoolExecutor(
    max_workers=os.cpu_count() or 2,
    thread_name_prefix="easel-results",
    initializer=_lower_priority,
)  # one pool for every worker: encodes never outnumber the cores, and never take the
#    default executor's threads from backends that run there (asyncio.to_thread)


async def in_results_thread(function: Callable[..., T], *args: Any) -> T:
    """Run blocking results work (encode, write, fsync) on the shared results pool."""
    return await asyncio.get_running_loop().run_in_executor(_encoders, function, *args)


def in_results_future(function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Start blocking work on the results pool now; await the future for its result."""
    return asyncio.get_running_loop().run_in_executor(_encoders, function, *args)


class Finisher:
    """Finishing tasks of one worker, at most ``depth`` backend calls' results at a time.

    ``depth`` 0 finishes in line: the worker awaits each call's results before claiming.
    """

    def __init__(self, depth: int) -> None:
        if depth < 0:
            raise ValueError("the results depth must be 0 or more")
        self.depth = depth
        self._tasks: dict[asyncio.Task[None], list[Job]] = {}
        self._changed = asyncio.Event()

    @property
    def jobs(self) -> list[Job]:
        """Jobs whose results are being finished (still leased by this worker)."""
        return [job for jobs in self._tasks.values() for job in jobs]

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait_for_room(self) -> None:
        """Until fewer than ``depth`` calls are being finished (at once when depth is 0)."""
        while len(self._tasks) >= max(self.depth, 1):
            self._changed.clear()
            await self._changed.wait()

    async def finish(self, jobs: list[Job], finishing: Coroutine[Any, Any, None]) -> None:
        """Run ``finishing`` (the results of one backend call): in line when depth is 0,
        else as a task, returning at once."""
        if self.depth == 0:
            await finishing
            return
        task = asyncio.create_task(finishing, name=f"easel-finish-{jobs[0].id}")
        self._tasks[task] = jobs
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("finishing results failed unexpectedly", exc_info=exc)
        self._changed.set()

    async def drain(self) -> None:
        """Until every result in flight is finished."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def cancel(self) -> None:
        """Abandon finishing (the jobs stay leased; their leases expire and they run again,
        unless their record was already committed: final writes are shielded)."""
        for task in self._tasks:
            task.cancel()
