"""The next claim, made while the backend still runs: no store round trip between calls.

Without it, the backend idles from the moment a call returns until the next job's claim
comes back from the store (a commit, queued behind the previous job's writes). The worker
claims its next job when the running call reports its last step (``step >= total - 1``:
what is left is one step and the decode), or at once if the call ends or fails first, so
the job is in hand when the backend is free. It claims no earlier: a job claimed ahead
cannot go to a peer that becomes idle meanwhile, it shows ``running`` in the store, and
the fair queue should decide as late as it can (a premium job submitted during a long
run still goes first). A backend that reports no progress gets no claim ahead.

A job claimed ahead is held like a running one (leased, heartbeats, cancel watched) but
not started: it is announced ``started`` only when the backend takes it. If it is
cancelled or its lease is lost meanwhile it never runs; if the worker stops, it goes back
to the queue without spending an attempt; if the process dies, its lease expires and it
runs again, like any job whose worker died.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

H = TypeVar("H")


class Ahead(Generic[H]):
    """At most one claim ahead at a time; ``claim`` returns what it holds (or None)."""

    def __init__(self, claim: Callable[[], Awaitable[H | None]]) -> None:
        self._claim = claim
        self._task: asyncio.Task[H | None] | None = None
        self._go = asyncio.Event()

    @property
    def pending(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Claim as soon as :meth:`now` or :meth:`take` asks (once per call)."""
        if self._task is not None:
            return
        self._go = go = asyncio.Event()

        async def claim_later() -> H | None:
            await go.wait()
            return await self._claim()

        self._task = asyncio.create_task(claim_later(), name="easel-claim-ahead")

    def now(self) -> None:
        """The running call is at its end (or over): claim at once if not done yet."""
        self._go.set()

    async def take(self) -> H | None:
        """What the claim ahead holds (claiming now if it had not yet), or None."""
        task, self._task = self._task, None
        if task is None:
            return None
        self._go.set()
        return await task

    def cancel(self) -> H | None:
        """Abandon it (the process is going down); returns what it holds if its claim had
        finished, for the caller to let go of (the jobs are left to their leases)."""
        task, self._task = self._task, None
        if task is None:
            return None
        if task.done():
            return None if task.cancelled() or task.exception() else task.result()
        task.cancel()
        return None
