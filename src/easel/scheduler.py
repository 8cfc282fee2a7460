"""Pure queue policy: who runs next, who may enqueue, how long the wait is.

No I/O here. Stores keep a :class:`FairQueue` in step with their durable records and ask
it what to claim; the tests drive it directly with random arrival sequences.

Policy:
- higher ``priority`` tier first;
- inside a tier, one FIFO per user, and round-robin between the users that have work, so a
  user with 50 queued jobs and a user with one alternate;
- a job is only handed to a worker whose backend it was admitted for (``route``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from easel.errors import UserQueueFull
from easel.jobs import Job


@dataclass(frozen=True, slots=True)
class Entry:
    job_id: str
    user_id: str
    priority: int
    route: str
    cost: float = 1.0


def entry_for(job: Job) -> Entry:
    return Entry(
        job_id=job.id,
        user_id=job.user_id,
        priority=job.request.priority,
        route=job.backend,
        cost=job.request.cost,
    )


class _Tier:
    """One priority tier: per-user FIFOs and the round-robin order of their users."""

    __slots__ = ("users",)

    def __init__(self) -> None:
        # user -> FIFO; dict order is the rotation order (the next user to serve is first)
        self.users: OrderedDict[str, deque[Entry]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(fifo) for fifo in self.users.values())

    def rotation(self) -> Iterator[Entry]:
        """Entries in the order they would be served if nothing new arrived."""
        fifos = [iter(fifo) for fifo in self.users.values()]
        while fifos:
            alive = []
            for fifo in fifos:
                entry = next(fifo, None)
                if entry is not None:
                    yield entry
                    alive.append(fifo)
            fifos = alive


class FairQueue:
    """The queued jobs of one store, ordered by tier, then round-robin over users."""

    def __init__(self) -> None:
        self._tiers: dict[int, _Tier] = {}
        self._entries: dict[str, Entry] = {}
        self._per_user: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def queued_for(self, user_id: str) -> int:
        return self._per_user.get(user_id, 0)

    def push(self, entry: Entry) -> None:
        """Add at the back of its user's FIFO; a new user joins the back of the rotation."""
        if entry.job_id in self._entries:
            raise ValueError(f"job {entry.job_id} is already queued")
        tier = self._tiers.setdefault(entry.priority, _Tier())
        tier.users.setdefault(entry.user_id, deque()).append(entry)
        self._entries[entry.job_id] = entry
        self._per_user[entry.user_id] = self._per_user.get(entry.user_id, 0) + 1

    def push_front(self, entry: Entry) -> None:
        """Put a job back at the head of its user's FIFO (a claim that could not be kept)."""
        tier = self._tiers.setdefault(entry.priority, _Tier())
        fifo = tier.users.get(entry.user_id)
        if fifo is None:
            fifo = tier.users[entry.user_id] = deque()
            tier.users.move_to_end(entry.user_id, last=False)
        fifo.appendleft(entry)
        self._entries[entry.job_id] = entry
        self._per_user[entry.user_id] = self._per_user.get(entry.user_id, 0) + 1

    def pop(self, routes: Collection[str] | None = None) -> Entry | None:
        """Take the next job a worker serving ``routes`` can run (None: any route)."""
        for priority in sorted(self._tiers, reverse=True):
            tier = self._tiers[priority]
            for user_id, fifo in tier.users.items():
                entry = _first_routable(fifo, routes)
                if entry is None:
                    continue
                fifo.remove(entry)
                if fifo:
                    tier.users.move_to_end(user_id)
                else:
                    del tier.users[user_id]
                if not tier.users:
                    del self._tiers[priority]
                self._forget(entry)
                return entry
        return None

    def remove(self, job_id: str) -> Entry | None:
        entry = self._entries.get(job_id)
        if entry is None:
            return None
        tier = self._tiers[entry.priority]
        fifo = tier.users[entry.user_id]
        fifo.remove(entry)
        if not fifo:
            del tier.users[entry.user_id]
        if not tier.users:
            del self._tiers[entry.priority]
        self._forget(entry)
        return entry

    def order(self) -> Iterator[Entry]:
        """Every queued entry in the order it would be served if nothing new arrived."""
        for priority in sorted(self._tiers, reverse=True):
            yield from self._tiers[priority].rotation()

    def position(self, job_id: str) -> int | None:
        """How many queued jobs run before this one (0: it is next); None if not queued."""
        if job_id not in self._entries:
            return None
        for index, entry in enumerate(self.order()):
            if entry.job_id == job_id:
                return index
        raise AssertionError("unreachable: an indexed entry is always in the order")

    def ahead(self, job_id: str) -> list[Entry]:
        """The queued entries served before this one."""
        ahead: list[Entry] = []
        for entry in self.order():
            if entry.job_id == job_id:
                return ahead
            ahead.append(entry)
        return []

    def _forget(self, entry: Entry) -> None:
        del self._entries[entry.job_id]
        left = self._per_user[entry.user_id] - 1
        if left:
            self._per_user[entry.user_id] = left
        else:
            del self._per_user[entry.user_id]


def _first_routable(fifo: deque[Entry], routes: Collection[str] | None) -> Entry | None:
    if routes is None:
        return fifo[0] if fifo else None
    return next((entry for entry in fifo if entry.route in routes), None)


def user_cap(requested: int | None, default: int, limit: int) -> int:
    """The cap that applies: the request's own, else the server default, never over the limit."""
    return min(requested if requested is not None else default, limit)


def check_user_cap(user_id: str, active: int, cap: int) -> None:
    """Admission: refuse a job that would give a user more than ``cap`` queued+running jobs."""
    if active >= cap:
        raise UserQueueFull(
            f"user {user_id!r} already has {active} queued or running jobs (the cap is {cap}); "
            "wait for one to finish or cancel one"
        )


class RunTimes:
    """Measured seconds per work unit (see ``GenerationRequest.cost``) per route: an EWMA."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._per_unit: dict[str, float] = {}

    def observe(self, key: str, cost: float, seconds: float) -> None:
        if cost <= 0 or seconds <= 0:
            return
        sample = seconds / cost
        old = self._per_unit.get(key)
        self._per_unit[key] = sample if old is None else old + self.alpha * (sample - old)

    def estimate(self, key: str, cost: float) -> float | None:
        per_unit = self._per_unit.get(key)
        return None if per_unit is None else per_unit * cost

    def eta(self, ahead: list[Entry], own: Entry, workers: int) -> float | None:
        """Seconds until ``own`` is done: the queue ahead shared by the workers, then its run."""
        own_time = self.estimate(own.route, own.cost)
        if own_time is None:
            return None
        wait = sum(self.estimate(entry.route, entry.cost) or own_time for entry in ahead)
        return wait / max(workers, 1) + own_time

    def snapshot(self) -> dict[str, float]:
        return dict(self._per_unit)
