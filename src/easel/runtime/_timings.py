"""Measured times kept in the store, so every replica of a deployment gives the same ETA.

Workers measure runs, model loads, gaps and result commits into the process's
:class:`~easel.queue.scheduler.RunTimes`; each measurement is also queued as a
:class:`~easel.queue.estimates.Timing`. :class:`SharedTimings` writes them to the store
(SQLite table embedded, one Redis hash scaled out) soon after they are made, and before
any ETA is computed it reloads the tables from the store when anyone's samples changed
(one cheap version check otherwise). An API-only replica, which runs nothing, thus prices
jobs with what the worker processes measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from easel.errors import EaselError
from easel.queue.run_times import RunTimes
from easel.runtime.extensions import Extension
from easel.store.base import JobStore

log = logging.getLogger("easel.runtime.timings")

FLUSH_GAP = 0.1
"""Seconds the flush waits after a measurement, so a burst's samples go in one write."""


class SharedTimings(Extension):
    """Keeps a runtime's measurements in the store and its tables in step with it."""

    name = "timings"

    def __init__(self, store: JobStore, run_times: RunTimes, *, interval: float = 1.0) -> None:
        self.store = store
        self.run_times = run_times
        self.interval = interval
        self._version: int | None = None
        self._loaded = -1e9
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._task: asyncio.Task[None] | None = None
        run_times.on_pending = self._pending

    def _pending(self) -> None:
        self._flushed.clear()
        self._wake.set()

    async def sync(self, *, flush: bool = True, reload_after: float = 0.0) -> None:
        """Write what was measured here (``flush``), then reload if any process recorded
        since (what is not written yet stays counted here), unless the last reload is
        less than ``reload_after`` seconds old."""
        async with self._lock:
            if flush:
                pending, self.run_times.pending = self.run_times.pending, []
                try:
                    await self.store.record_timings(pending)
                except BaseException:
                    self.run_times.pending[:0] = pending  # kept for the next try
                    raise
                if not self.run_times.pending:
                    self._flushed.set()
            if time.monotonic() - self._loaded < reload_after:
                return
            read = await self.store.timings(self._version)
            self._loaded = time.monotonic()
            if read is not None:
                self.run_times.load(read)
                self._version = read.version

    async def flushed(self) -> None:
        """Until every measurement made so far is in the store."""
        await self._flushed.wait()

    async def start(self) -> None:
        with contextlib.suppress(EaselError):  # a store that is down now: the loop retries
            await self.sync()
        self._task = asyncio.create_task(self._follow(), name="easel-timings")

    async def stop(self, grace: float) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        with contextlib.suppress(EaselError):
            await self.sync()  # the last measurements are not lost with the process

    async def _follow(self) -> None:
        """Flush soon after a measurement (a burst's together: one write per
        ``FLUSH_GAP``); reload at least every ``interval`` seconds."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            await asyncio.sleep(FLUSH_GAP)
            self._wake.clear()
            try:  # views reload when they need to; the loop at most once per interval
                await self.sync(reload_after=self.interval)
            except EaselError as exc:
                log.warning("measured times not shared yet: %s", exc.message)
                await asyncio.sleep(self.interval)
            except Exception:
                log.exception("measured times not shared")
                await asyncio.sleep(self.interval)
