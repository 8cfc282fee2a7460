"""Fan-out pacing: many subscribers' sends spread over event-loop iterations.

When one event reaches 100 websocket subscribers, 100 sender tasks wake in the same loop
iteration, and asyncio runs every ready task before it looks at timers or sockets again:
100 sends of ~0.1 ms each hold the loop for 10 ms or more, and every request, heartbeat
and claim waits behind them. A :class:`Pacer` hands out ``per_turn`` sends per iteration;
the other senders wait in FIFO order for a later iteration, so the loop's other work
runs between slices. Nothing is dropped or reordered within a subscriber: a sender only
waits for its turn. (Subscribers that fall far behind get progress coalesced by the bus:
``events/bus.py``.)
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque

PER_TURN = 16
"""Sends per loop iteration: ~1-2 ms of websocket frames on a small machine."""


class Pacer:
    """At most ``per_turn`` grants per event-loop iteration, first come first served."""

    def __init__(self, per_turn: int = PER_TURN) -> None:
        if per_turn < 1:
            raise ValueError("per_turn must be 1 or more")
        self.per_turn = per_turn
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._refill_scheduled = False

    async def turn(self) -> None:
        """Return when this caller may send: at once while the iteration has room."""
        if self._used < self.per_turn and not self._waiters:
            self._used += 1
            self._schedule_refill()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._schedule_refill()
        try:
            await waiter  # granted: the refill counted this send in its iteration
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._used = max(0, self._used - 1)  # granted as we left: the slot is free
            elif waiter in self._waiters:  # (a refill may have dropped it already)
                self._waiters.remove(waiter)
            raise

    def _schedule_refill(self) -> None:
        if not self._refill_scheduled:
            self._refill_scheduled = True
            asyncio.get_running_loop().call_soon(self._refill)

    def _refill(self) -> None:
        """Runs in the next iteration: a fresh allowance, first to those waiting."""
        self._refill_scheduled = False
        self._used = 0
        while self._waiters and self._used < self.per_turn:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._used += 1
        if self._used:
            self._schedule_refill()


_pacers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pacer] = weakref.WeakKeyDictionary()


def pacer() -> Pacer:
    """The pacer of the running loop (one per loop: its iterations are what it shares)."""
    loop = asyncio.get_running_loop()
    if (found := _pacers.get(loop)) is None:
        found = _pacers[loop] = Pacer()
    return found
