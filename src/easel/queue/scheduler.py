"""Pure queue policy: who runs next, who may enqueue, how long the wait is.

No I/O and no clock here: callers pass ``now``. Stores keep a :class:`FairQueue` in step
with their durable records and ask it what to claim; tests drive it directly.

Policy, in order:
1. **Aging**: when a job below the top tier has waited ``aging_seconds``, its tier is
   starving and gets one decision in ``aged_every`` whatever waits above it (served in
   its own fair order), so nothing starves forever, yet premium work keeps most of the
   worker under sustained overload and fairness between users is not bent.
2. **Priority tiers**: a higher ``priority`` tier is served first.
3. **Fair share inside a tier**, weighted by cost, between *accounts*: a user of one
   service (:func:`account`; two services' own ``carol`` are two accounts, each with its
   own share and cap). It is start-time fair queueing, the virtual-clock form of deficit
   round robin. Each job gets a start tag ``max(tier clock, its account's last finish
   tag)`` and a finish tag ``start + cost/weight``; the smallest start tag runs next. Over
   time every backlogged account gets service in proportion to its weight whatever the
   size of its jobs (50 large jobs cannot starve one small one), jobs of one account stay
   FIFO, and equal-cost jobs alternate between accounts exactly like round robin. Tags
   never change once given, so the serving order is a sorted list and a queue position is
   a rank lookup, O(log n).
4. **Routing**: a job is only handed to a worker serving its ``route`` (the backend it was
   admitted for); compatible jobs next in line may be handed out together as a batch.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from sortedcontainers import SortedKeyList

from easel.errors import QueueFull, UserQueueFull
from easel.jobs import PREMIUM_PRIORITY, Job
from easel.queue.admission import want_of
from easel.queue.estimates import Shape
from easel.queue.routing import Want


def account(service: str | None, user_id: str) -> str:
    """Whose share and cap a job counts against: user ids are per service, so the account is
    ``service/user`` (just the user id when no service tokens are configured). Service names
    hold no ``/``, so the first one splits it back."""
    return user_id if service is None else f"{service}/{user_id}"


@dataclass(frozen=True, slots=True, eq=False)  # identity: lookups stay cheap
class Entry:
    job_id: str
    user_id: str
    priority: int
    route: str
    cost: float = 1.0
    enqueued_at: float = 0.0
    batch_key: str | None = None
    shape: Shape | None = None
    """What prices its run, for ETAs."""
    want: Want | None = None
    """What it needs of a backend, should another one take it (ETAs count every backend
    that may run it)."""
    service: str | None = None

    @property
    def account(self) -> str:
        return account(self.service, self.user_id)


def entry_for(job: Job) -> Entry:
    request = job.request
    return Entry(
        job_id=job.id,
        user_id=job.user_id,
        priority=request.priority,
        route=job.backend,
        cost=request.cost,
        enqueued_at=job.created_at,
        batch_key=batch_key(job),
        shape=Shape.of(job.backend, request),
        want=want_of(request, moving=True),
        service=job.service,
    )


def batch_key(job: Job) -> str | None:
    """Jobs with the same key can run as one pipeline call (prompts and seeds may differ)."""
    r = job.request
    if r.init_image or r.mask_image or r.loras or r.controlnet or r.upscale or r.mix:
        return None
    if r.kind.is_audio:  # clips differ in length: one call cannot make them together
        return None
    parts = (
        job.backend, r.model, r.kind, r.width, r.height, r.steps, r.scheduler, r.cfg_scale,
        r.clip_skip,
    )  # fmt: skip
    return "|".join(map(str, parts))


@dataclass(frozen=True)
class Policy:
    aging_seconds: float | None = 600.0
    """A job below the top tier waiting this long makes its tier starving (None: never)."""
    weights: Mapping[str, float] = field(default_factory=dict)
    """Per-account share of service inside a tier (default 1.0): ``service/user`` for one
    service's user, a bare user id for that user id in every service."""
    aged_every: int = 4
    """A starving tier gets one scheduling decision in this many."""
    top_priority: int = PREMIUM_PRIORITY

    def tier(self, priority: int) -> int:
        """The tier a job of this priority queues in (none above ``top_priority``)."""
        return min(priority, self.top_priority)

    def weight(self, service: str | None, user_id: str) -> float:
        """The weight of one service's user: its own entry, else the bare user id's."""
        if service is not None and (own := self.weights.get(account(service, user_id))):
            return own
        return self.weights.get(user_id, 1.0)


@dataclass(frozen=True, slots=True)
class Place:
    """Where a queued job stands: jobs served before it and (about) their summed cost."""

    position: int
    cost_ahead: float


@dataclass(frozen=True)
class QueueStats:
    queued: int
    running: int
    tiers: dict[int, int]
    users: dict[str, int]


@dataclass(slots=True)
class _Tagged:
    start: float
    seq: int
    entry: Entry
    tier: int


class _Tier:
    """One priority tier: entries sorted by start tag, a virtual clock, accounts' finish tags."""

    __slots__ = ("clock", "cost", "finish", "order")

    def __init__(self) -> None:
        self.order: SortedKeyList = SortedKeyList(key=lambda t: (t.start, t.seq))
        self.clock = 0.0
        self.finish: dict[str, float] = {}  # per account
        self.cost = 0.0


class FairQueue:
    """The queued jobs of one store, in the order they will be served."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self._tiers: dict[int, _Tier] = {}
        self._priorities: list[int] = []  # highest first
        self._tagged: dict[str, _Tagged] = {}
        self._per_user: dict[str, int] = {}  # queued jobs per account
        self._per_route: dict[str, float] = {}  # queued work per route, for routing
        self._seq = itertools.count()
        self._waiting: list[tuple[float, int, str]] = []  # (enqueued_at, seq, id) below top
        self._starving: int | None = None  # the tier of a job waiting past the bound
        self._since_boost = 0  # decisions since the starving tier was last served

    def __len__(self) -> int:
        return len(self._tagged)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._tagged

    def queued_for(self, user_id: str, service: str | None = None) -> int:
        return self._per_user.get(account(service, user_id), 0)

    def tier_counts(self) -> dict[int, int]:
        return {priority: len(tier.order) for priority, tier in sorted(self._tiers.items())}

    def user_counts(self) -> dict[str, int]:
        """Queued jobs per account (:func:`account`)."""
        return dict(self._per_user)

    def route_costs(self) -> dict[str, float]:
        """Queued work (cost units) per route: what the router counts as outstanding."""
        return {route: cost for route, cost in self._per_route.items() if cost > 1e-9}

    def reroute(self, job_id: str, route: str, batch_key: str | None) -> bool:
        """Move a queued job to another route, keeping its place in the fair order."""
        tagged = self._tagged.get(job_id)
        if tagged is None:
            return False
        old = tagged.entry
        self._route_cost(old.route, -old.cost)
        tagged.entry = replace(old, route=route, batch_key=batch_key)
        self._route_cost(route, old.cost)
        return True

    def _route_cost(self, route: str, delta: float) -> None:
        left = self._per_route.get(route, 0.0) + delta
        if left > 1e-9:
            self._per_route[route] = left
        else:
            self._per_route.pop(route, None)

    # -- changes ----------------------------------------------------------------------

    def push(self, entry: Entry) -> None:
        """Queue behind the user's own jobs, at the tier's current virtual time."""
        self._add(entry, front=False)

    def push_front(self, entry: Entry) -> None:
        """Put a job back first in line of its tier (a claim that could not be kept)."""
        self._add(entry, front=True)

    def _add(self, entry: Entry, *, front: bool) -> None:
        if entry.job_id in self._tagged:
            raise ValueError(f"job {entry.job_id} is already queued")
        priority = self.policy.tier(entry.priority)
        tier = self._tiers.get(priority)
        if tier is None:
            tier = self._tiers[priority] = _Tier()
            self._priorities = sorted(self._tiers, reverse=True)
        name = entry.account
        if front:
            first = tier.order[0].start if tier.order else tier.clock
            start = min(first, tier.clock)
            seq = -next(self._seq)  # before everything with the same tag
        else:
            start = max(tier.clock, tier.finish.get(name, 0.0))
            weight = self.policy.weight(entry.service, entry.user_id)
            tier.finish[name] = start + entry.cost / weight
            seq = next(self._seq)
        tagged = _Tagged(start, seq, entry, priority)
        tier.order.add(tagged)
        tier.cost += entry.cost
        self._tagged[entry.job_id] = tagged
        self._per_user[name] = self._per_user.get(name, 0) + 1
        self._route_cost(entry.route, entry.cost)
        if priority < self.policy.top_priority and self.policy.aging_seconds is not None:
            heapq.heappush(self._waiting, (entry.enqueued_at, seq, entry.job_id))

    def age(self, now: float) -> int | None:
        """Find the tier of the oldest job waiting past the aging bound, if any."""
        self._starving = None
        if self.policy.aging_seconds is None:
            return None
        while self._waiting:
            enqueued_at, seq, job_id = self._waiting[0]
            tagged = self._tagged.get(job_id)
            if tagged is None or tagged.seq != seq:
                heapq.heappop(self._waiting)  # served, cancelled or queued again since
                continue
            if enqueued_at <= now - self.policy.aging_seconds:
                self._starving = tagged.tier
            break
        return self._starving

    def pop(
        self, routes: Collection[str] | None = None, *, now: float | None = None
    ) -> Entry | None:
        """Take the next job a worker serving ``routes`` can run (None: any route)."""
        if now is not None:
            self.age(now)
        tagged = self._next(routes)
        return None if tagged is None else self._serve(tagged)

    def pop_batch(
        self, routes: Collection[str] | None, limit: int, *, now: float | None = None
    ) -> list[Entry]:
        """The next job and, up to ``limit``, the compatible jobs right behind it in line."""
        first = self.pop(routes, now=now)
        if first is None:
            return []
        batch = [first]
        while first.batch_key is not None and len(batch) < limit:
            following = self._next(routes)
            if following is None or following.entry.batch_key != first.batch_key:
                break
            batch.append(self._serve(following))
        return batch

    def move(self, job_id: str, *, front: bool) -> bool:
        """An operator's reorder: first or last in line of the job's own tier.

        Front takes the tag a put-back job gets; back takes the tier's last start tag and a
        later sequence. Other users' tags are untouched, so fair share resumes from there
        (a job moved back may still be passed by a later arrival of a lighter user).
        False when the job is not in line.
        """
        tagged = self._tagged.get(job_id)
        if tagged is None:
            return False
        tier = self._tiers[tagged.tier]
        tier.order.remove(tagged)
        if front:
            first = tier.order[0].start if tier.order else tier.clock
            tagged.start, tagged.seq = min(first, tier.clock), -next(self._seq)
        else:
            last = tier.order[-1].start if tier.order else tagged.start
            tagged.start, tagged.seq = max(last, tagged.start), next(self._seq)
        tier.order.add(tagged)
        if tagged.tier < self.policy.top_priority and self.policy.aging_seconds is not None:
            heapq.heappush(self._waiting, (tagged.entry.enqueued_at, tagged.seq, job_id))
        return True

    def remove(self, job_id: str) -> Entry | None:
        tagged = self._tagged.get(job_id)
        if tagged is None:
            return None
        self._detach(tagged)
        return tagged.entry

    def _next(self, routes: Collection[str] | None) -> _Tagged | None:
        """Highest tier first, but a starving tier gets one decision in ``aged_every``."""
        starving = self._starving
        if (
            starving is not None
            and starving in self._tiers
            and self._since_boost >= self.policy.aged_every - 1
            and (tagged := _first(self._tiers[starving], routes)) is not None
        ):
            return tagged
        for priority in self._priorities:
            if (tagged := _first(self._tiers[priority], routes)) is not None:
                return tagged
        return None

    def _serve(self, tagged: _Tagged) -> Entry:
        if tagged.tier == self._starving:
            self._since_boost = 0
        else:
            self._since_boost = min(self._since_boost + 1, self.policy.aged_every - 1)
        tier = self._tiers[tagged.tier]
        tier.clock = max(tier.clock, tagged.start)
        if len(tier.finish) > 2 * len(tier.order) + 64:
            # accounts whose finish tag is behind the clock start afresh anyway: forget them
            tier.finish = {u: f for u, f in tier.finish.items() if f > tier.clock}
        self._detach(tagged)
        return tagged.entry

    def _detach(self, tagged: _Tagged) -> None:
        tier = self._tiers[tagged.tier]
        tier.order.remove(tagged)
        tier.cost = tier.cost - tagged.entry.cost if tier.order else 0.0
        del self._tagged[tagged.entry.job_id]
        self._route_cost(tagged.entry.route, -tagged.entry.cost)
        if not tier.order:  # no backlog left: nobody is owed anything
            del self._tiers[tagged.tier]
            self._priorities.remove(tagged.tier)
        name = tagged.entry.account
        left = self._per_user[name] - 1
        if left:
            self._per_user[name] = left
        else:
            del self._per_user[name]

    # -- reading ----------------------------------------------------------------------

    def _split(self) -> tuple[list[int], _Tier | None, list[int]]:
        """Tiers above the starving one, the starving tier, and the tiers below it."""
        starving = self._starving
        if starving is None or starving not in self._tiers:
            return self._priorities, None, []
        above = [p for p in self._priorities if p > starving]
        below = [p for p in self._priorities if p < starving]
        return above, self._tiers[starving], below

    def order(self) -> Iterator[Entry]:
        """Every queued entry in the order it would be served if nothing new arrived (and
        a starving tier stayed starving)."""
        tiers = [(p, (t.entry for t in self._tiers[p].order)) for p in self._priorities]
        return serving_order(tiers, self._starving, self._since_boost, self.policy.aged_every)

    def place(self, job_id: str) -> Place | None:
        """Where a job stands, without walking the queue: O(tiers + log n)."""
        tagged = self._tagged.get(job_id)
        if tagged is None:
            return None
        above, starving, below = self._split()
        boosted = len(starving.order) if starving is not None else 0
        ahead = sum(len(self._tiers[p].order) for p in above)
        ahead_cost = sum(self._tiers[p].cost for p in above)
        gap = self.policy.aged_every - 1  # decisions for the tiers above per boost
        first_gap = gap - self._since_boost
        tier = self._tiers[tagged.tier]
        rank = tier.order.index(tagged)
        cost = _cost_before(tier, tagged, rank)
        if tagged.tier in below or starving is None:
            position = rank
            for priority in self._priorities:
                if priority > tagged.tier:
                    position += len(self._tiers[priority].order)
                    cost += self._tiers[priority].cost
            return Place(position, cost)
        if starving is tier:  # boosted: served after the tiers above let it through
            passed = ahead if gap == 0 else min(ahead, first_gap + rank * gap)
            return Place(rank + passed, cost + ahead_cost * passed / max(ahead, 1))
        # in a tier above the starving one: boosts slip in before it
        position = rank + sum(len(self._tiers[p].order) for p in above if p > tagged.tier)
        cost += sum(self._tiers[p].cost for p in above if p > tagged.tier)
        if gap == 0:
            boosts = boosted
        elif position < first_gap:
            boosts = 0
        else:
            boosts = 1 + (position - first_gap) // gap
        boosts = min(boosted, boosts)
        cost += starving.cost * boosts / boosted if boosted else 0.0
        return Place(position + boosts, cost)

    def position(self, job_id: str) -> int | None:
        """How many queued jobs run before this one (0: it is next); None if not queued."""
        place = self.place(job_id)
        return None if place is None else place.position


def serving_order(
    tiers: Sequence[tuple[int, Iterable[Entry]]], starving: int | None, since: int, every: int
) -> Iterator[Entry]:
    """The order the fair queue serves in, from its state: each tier's entries in start
    order (highest tier first), the starving tier if any, and the decisions ``since`` it
    was last served; a starving tier gets one decision in ``every``. Stores whose queue
    state lives elsewhere (Redis) rebuild the order with it."""
    by_tier = dict(tiers)
    if starving is None or starving not in by_tier:
        for _, entries in tiers:
            yield from entries
        return
    ahead = (entry for p, entries in tiers if p > starving for entry in entries)
    boosted = iter(by_tier[starving])
    for head in ahead:
        if since >= every - 1 and (entry := next(boosted, None)) is not None:
            yield entry
            since = 0
        yield head
        since = min(since + 1, every - 1)
    yield from boosted
    for p, entries in tiers:
        if p < starving:
            yield from entries


def _first(tier: _Tier, routes: Collection[str] | None) -> _Tagged | None:
    if routes is None:
        first: _Tagged = tier.order[0]
        return first
    tagged: _Tagged
    for tagged in tier.order:
        if tagged.entry.route in routes:
            return tagged
    return None


def _cost_before(tier: _Tier, tagged: _Tagged, rank: int) -> float:
    """The cost of the jobs ahead in a tier, taken at the tier's mean: an ETA estimate."""
    others = len(tier.order) - 1
    return (tier.cost - tagged.entry.cost) * rank / others if others else 0.0


def user_cap(requested: int | None, default: int, limit: int) -> int:
    """The cap that applies: the request's own, else the server default, never over the limit."""
    return min(requested if requested is not None else default, limit)


def check_user_cap(user_id: str, active: int, cap: int) -> None:
    """Admission: refuse a job that would give a user more than ``cap`` queued+running jobs."""
    if active >= cap:
        raise UserQueueFull(
            f"user {user_id!r} already has {active} queued or running jobs (the cap is {cap}); "
            "wait for one to finish or cancel one",
            count=active,
        )


def check_queue_cap(queued: int, cap: int | None) -> None:
    """Admission: refuse any job past the server's global queue size."""
    if cap is not None and queued >= cap:
        raise QueueFull(f"the queue holds {queued} jobs, its limit; try again later", count=queued)
