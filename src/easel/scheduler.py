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


@dataclass(frozen=True, slots=True, eq=False)  # identity: finding one in a FIFO stays cheap
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


class _Fifo:
    """One user's jobs in one tier, oldest first, with their summed cost."""

    __slots__ = ("cost", "entries")

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.cost = 0.0

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entry: Entry, *, front: bool = False) -> None:
        if front:
            self.entries.appendleft(entry)
        else:
            self.entries.append(entry)
        self.cost += entry.cost

    def remove(self, entry: Entry) -> None:
        self.entries.remove(entry)
        self.cost = self.cost - entry.cost if self.entries else 0.0


class _Tier:
    """One priority tier: per-user FIFOs and the round-robin order of their users."""

    __slots__ = ("cost", "size", "users")

    def __init__(self) -> None:
        # dict order is the rotation order: the next user to serve is first
        self.users: OrderedDict[str, _Fifo] = OrderedDict()
        self.size = 0
        self.cost = 0.0

    def rotation(self) -> Iterator[Entry]:
        """Entries in the order they would be served if nothing new arrived."""
        fifos = [iter(fifo.entries) for fifo in self.users.values()]
        while fifos:
            alive = []
            for fifo in fifos:
                entry = next(fifo, None)
                if entry is not None:
                    yield entry
                    alive.append(fifo)
            fifos = alive


@dataclass(frozen=True, slots=True)
class Place:
    """Where a queued job stands: jobs served before it and their summed cost."""

    position: int
    cost_ahead: float


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
        self._add(entry, front=False)

    def push_front(self, entry: Entry) -> None:
        """Put a job back at the head of its user's FIFO (a claim that could not be kept)."""
        if entry.job_id in self._entries:
            raise ValueError(f"job {entry.job_id} is already queued")
        self._add(entry, front=True)

    def _add(self, entry: Entry, *, front: bool) -> None:
        tier = self._tiers.setdefault(entry.priority, _Tier())
        fifo = tier.users.get(entry.user_id)
        if fifo is None:
            fifo = tier.users[entry.user_id] = _Fifo()
            if front:  # it was at the head before it left: it is next again
                tier.users.move_to_end(entry.user_id, last=False)
        fifo.append(entry, front=front)
        tier.size += 1
        tier.cost += entry.cost
        self._entries[entry.job_id] = entry
        self._per_user[entry.user_id] = self._per_user.get(entry.user_id, 0) + 1

    def pop(self, routes: Collection[str] | None = None) -> Entry | None:
        """Take the next job a worker serving ``routes`` can run (None: any route)."""
        for priority in sorted(self._tiers, reverse=True):
            tier = self._tiers[priority]
            for user_id, fifo in tier.users.items():
                entry = _first_routable(fifo.entries, routes)
                if entry is None:
                    continue
                self._take(tier, fifo, entry)
                if user_id in tier.users:
                    tier.users.move_to_end(user_id)
                return entry
        return None

    def remove(self, job_id: str) -> Entry | None:
        entry = self._entries.get(job_id)
        if entry is None:
            return None
        tier = self._tiers[entry.priority]
        self._take(tier, tier.users[entry.user_id], entry)
        return entry

    def _take(self, tier: _Tier, fifo: _Fifo, entry: Entry) -> None:
        fifo.remove(entry)
        if not fifo:
            del tier.users[entry.user_id]
        tier.size -= 1
        tier.cost = tier.cost - entry.cost if tier.size else 0.0
        if not tier.size:
            del self._tiers[entry.priority]
        del self._entries[entry.job_id]
        left = self._per_user[entry.user_id] - 1
        if left:
            self._per_user[entry.user_id] = left
        else:
            del self._per_user[entry.user_id]

    def order(self) -> Iterator[Entry]:
        """Every queued entry in the order it would be served if nothing new arrived."""
        for priority in sorted(self._tiers, reverse=True):
            yield from self._tiers[priority].rotation()

    def place(self, job_id: str) -> Place | None:
        """Where a job stands, without walking the queue: O(users in its tier + its index)."""
        entry = self._entries.get(job_id)
        if entry is None:
            return None
        position, cost = 0, 0.0
        for priority, tier in self._tiers.items():
            if priority > entry.priority:
                position += tier.size
                cost += tier.cost
        tier = self._tiers[entry.priority]
        own = tier.users[entry.user_id]
        index = own.entries.index(entry)
        position += index
        cost += (own.cost - entry.cost) * index / max(len(own.entries) - 1, 1)
        # Round-robin: in round ``index``, users ahead in the rotation are served first.
        # A partial FIFO is costed at its mean: O(1) per user; the ETA is an estimate.
        ahead = True
        for user_id, fifo in tier.users.items():
            if user_id == entry.user_id:
                ahead = False
                continue
            size = len(fifo.entries)
            served = index + 1 if ahead else index
            if served >= size:
                position += size
                cost += fifo.cost
            else:
                position += served
                cost += fifo.cost * served / size
        return Place(position, cost)

    def position(self, job_id: str) -> int | None:
        """How many queued jobs run before this one (0: it is next); None if not queued."""
        place = self.place(job_id)
        return None if place is None else place.position


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

    def eta(self, route: str, cost_ahead: float, cost: float, workers: int) -> float | None:
        """Seconds until a job is done: the work ahead shared by the workers, then its own."""
        per_unit = self._per_unit.get(route)
        if per_unit is None:
            return None
        return per_unit * (cost_ahead / max(workers, 1) + cost)

    def snapshot(self) -> dict[str, float]:
        return dict(self._per_unit)
