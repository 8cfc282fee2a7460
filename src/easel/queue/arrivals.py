"""Who will still arrive, and how much of it goes ahead of a queued job. Pure: no I/O, no clock.

:func:`arrivals` reads each account's way of submitting from its recent submissions (a
steady client's next jobs are foreseen from its gaps; a burst is not a rate; an account
gone quiet is done); :func:`overtaken` lets them in ahead of each queued job as far as the
fair queue's own policy would (start-time fair queueing's room, higher tiers all of it)
and solves the wait that grows by what arrives while it waits. The runtime adds it to the
projection of what is queued already (:func:`easel.queue.estimates.project`).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from easel.queue.estimates import KEEP

WINDOW_SECONDS = 120.0
"""Submissions this recent tell each account's rate."""
MIN_SUBMISSIONS = 3
"""Submissions an account must have made in the window to be expected to make more."""
MIN_GAPS = 4
"""Gaps an account must have shown before its next submission is foreseen from them."""
QUIET_GAPS = 3.0
"""An account silent for this many times its longest recent gap..."""
QUIET_FLOOR = 0.2
"""...and at least this many seconds is expected to stay quiet: a batch that ended."""
RANDOM_SPREAD = 0.5
"""Gaps whose standard deviation is over this share of their mean come at random."""
MIN_SEEN = 3.0
"""Seconds an account must have been submitting for to be expected to go on: a burst is
not a rate."""
MIN_SPAN = 30.0
"""An account's rate is its submissions over at least this many seconds: a burst of them
is not a rate."""
EVERYONE = ""
"""The account of a tier's pooled arrivals (what goes ahead of every lower tier)."""


@dataclass(frozen=True, slots=True)
class Submitted:
    """One recent submission, as the arrival model needs it."""

    tier: int
    account: str
    at: float
    seconds: float
    """Its run as priced (with the model load it is expected to cause)."""
    cost: float
    """Its fair-share cost (``GenerationRequest.cost``)."""


@dataclass(frozen=True)  # no slots: its derived figures are cached on it
class Arrival:
    """How one account submits in one tier: the gaps between its recent submissions, the
    seconds since its last one, and per job the mean run seconds, the mean of their
    squares (the spread) and the mean fair-share cost."""

    gaps: tuple[float, ...]
    since: float
    seconds: float
    square: float
    cost: float
    count: int = 0
    """Its submissions in the window (``gaps`` holds the latest ``keep`` only)."""
    seen: float = 0.0
    """Seconds of the window the model has watched (since anyone's first submission in it)."""
    steady: bool = True
    """False: too new to have a rate (fewer than ``MIN_SUBMISSIONS``, or for less than
    ``MIN_SEEN``): none of its work is expected, but it may still send some (the range's
    high end counts what fair share would let in)."""

    @cached_property
    def gap(self) -> float:
        """The mean gap, but never shorter than the time since the first submission (the
        silence since the last one counts), or ``MIN_SPAN``, spread over them all. A
        :attr:`random` stream's rate is its submissions over all the time it was watched:
        its first one there came when chance had it, not when it began."""
        count = len(self.gaps) + 1
        mean = statistics.fmean(self.gaps) if self.gaps else 0.0
        gap = max(mean, (sum(self.gaps) + self.since) / count, MIN_SPAN / count)
        return max(gap, self.seen / self.count) if self.random and self.count else gap

    @property
    def quiet(self) -> bool:
        """Silent for ``QUIET_GAPS`` times its longest recent gap (and ``QUIET_FLOOR``):
        done submitting, as a batch that ended."""
        longest = max(self.gaps, default=0.0)
        return self.since > max(QUIET_GAPS * longest, QUIET_FLOOR)

    @cached_property
    def random(self) -> bool:
        """Its gaps spread like a Poisson stream's (their deviation over ``RANDOM_SPREAD``
        of their mean): users at random, or a tier pooled over many accounts. A bot or a
        script submits far more regularly than that."""
        if len(self.gaps) < MIN_GAPS:  # too few to tell
            return False
        return statistics.pstdev(self.gaps) > RANDOM_SPREAD * statistics.fmean(self.gaps)

    def expected(self, horizon: float) -> float:
        """Submissions likely in the next ``horizon`` seconds. A steady client as a
        renewal process: the next one comes once the median of the gaps seen that are
        longer than the time already waited has passed (none: within a mean gap), the ones
        after it a mean gap apart. A :attr:`random` stream: the median count of a Poisson
        stream at its mean rate (the count an ETA is least often off by; its mean would
        count a fraction of a job that mostly does not come). With fewer than ``MIN_GAPS``
        gaps seen, the mean rate is all there is."""
        if horizon <= 0:
            return 0.0
        if len(self.gaps) < MIN_GAPS:  # too few to tell a steady client: its mean rate
            return horizon / self.gap
        if self.random:
            return poisson_median(horizon / self.gap)
        first = self._next
        return 0.0 if first > horizon else 1.0 + (horizon - first) // self.gap

    @cached_property
    def _next(self) -> float:
        """Seconds until its next submission, as its gaps tell."""
        nexts = [g - self.since for g in self.gaps if g > self.since] or [self.gap]
        return statistics.median(nexts)


def arrivals(
    submitted: Iterable[Submitted], now: float, *, window: float = WINDOW_SECONDS, keep: int = KEEP
) -> dict[tuple[int, str], Arrival]:
    """Each (tier, account)'s way of submitting, from its submissions in the last
    ``window`` seconds (the latest ``keep`` gaps; one at random also counts them all over
    the time since anyone's first submission there), and each tier's, pooled over every
    account (``(tier, EVERYONE)``). An account :attr:`~Arrival.quiet` is left out; one with
    fewer than ``MIN_SUBMISSIONS`` there, or submitting for less than ``MIN_SEEN`` seconds,
    is not :attr:`~Arrival.steady`."""
    grouped: dict[tuple[int, str], list[Submitted]] = {}
    first = now  # anyone's first submission in the window: since then it was watched
    for one in submitted:
        if now - window <= one.at <= now:
            grouped.setdefault((one.tier, one.account), []).append(one)
            grouped.setdefault((one.tier, EVERYONE), []).append(one)
            first = min(first, one.at)
    out = {}
    for key, ones in grouped.items():
        times = sorted(o.at for o in ones)
        gaps = tuple(b - a for a, b in itertools.pairwise(times))[-keep:]
        arrival = Arrival(
            gaps=gaps,
            count=len(times),
            seen=now - first,
            since=now - times[-1],
            seconds=statistics.fmean(o.seconds for o in ones),
            square=statistics.fmean(o.seconds * o.seconds for o in ones),
            cost=statistics.fmean(o.cost for o in ones),
        )
        if not arrival.quiet:
            steady = len(ones) >= MIN_SUBMISSIONS and now - times[0] >= MIN_SEEN
            out[key] = replace(arrival, steady=steady)
    return out


@dataclass(frozen=True, slots=True)
class Queued:
    """A queued job in serving order, as :func:`overtaken` needs it."""

    job_id: str
    tier: int
    account: str
    cost: float
    wait: float
    """Its projected wait (nothing new arriving)."""
    lanes: int = 1
    """Workers that serve its route: arrivals' work is shared among them."""


@dataclass(frozen=True, slots=True)
class Overtaking:
    """What later arrivals will run before a queued job starts, in seconds."""

    expected: float
    variance: float
    bound: float = 0.0
    """What accounts too new to have a rate may still get in (fair share's room)."""


NONE = Overtaking(0.0, 0.0)


def overtaken(
    order: Sequence[Queued],
    rates: Mapping[tuple[int, str], Arrival],
    weight: Callable[[str], float] = lambda account: 1.0,
) -> dict[str, Overtaking]:
    """Per queued job: the seconds later arrivals will run before it starts, under the
    fair queue's own policy (expected, their variance, and a bound for new accounts).

    Work arriving in a higher tier goes first, all of it, whoever sends it (the tier's
    pooled stream, ``EVERYONE``). In the job's own tier, start-time
    fair queueing lets another account's new jobs in ahead of it only while that account's
    start tags stay below the job's: as much cost (over its weight) as the job's own account
    has queued ahead of it, less what the other already has ahead of it (a job that starts
    inside that room gets in whatever its size). An account with queued jobs behind it gets
    none in (its new ones queue behind those); the job's own account never overtakes it.
    The wait grows by what arrives while it waits: the least ``W`` with ``W = wait +
    arriving(W)``, found by iterating from the projected wait.
    """
    last: dict[tuple[int, str], int] = {}
    for index, job in enumerate(order):
        last[(job.tier, job.account)] = index
    tiers = {job.tier for job in order}
    higher = {  # what goes ahead of a tier, all of it: the higher tiers' pooled streams
        t: [(a, math.inf) for (tier, name), a in rates.items()
            if tier > t and name == EVERYONE and a.steady]
        for t in tiers
    }  # fmt: skip
    peers = {  # the other accounts of a tier: (name, arrival, weight, its last queued job)
        t: [(name, a, weight(name), last.get((t, name), -1)) for (tier, name), a in rates.items()
            if tier == t and name != EVERYONE]
        for t in tiers
    }  # fmt: skip
    ahead: dict[tuple[int, str], float] = {}
    solved: dict[tuple[int, str, int], tuple[float, float]] = {}  # its last job's W0 and W
    out = {}
    for index, job in enumerate(order):
        own = ahead.get((job.tier, job.account), 0.0) / weight(job.account)
        streams = list(higher[job.tier])  # (arrival, jobs it may get in)
        may = 0.0
        for name, arrival, share, latest in peers[job.tier] if own > 0 else ():
            if name == job.account or latest > index:
                continue  # its own, or one whose next jobs queue behind its queued ones
            room = (own - ahead.get((job.tier, name), 0.0) / share) * share
            if room <= 1e-12:
                continue
            allowed = math.ceil(room / arrival.cost) if arrival.cost > 0 else math.inf
            if arrival.steady:
                streams.append((arrival, allowed))
            elif allowed < math.inf:
                may += allowed * arrival.seconds
        lanes = max(job.lanes, 1)

        def arriving(
            horizon: float, streams: list[tuple[Arrival, float]] = streams, lanes: int = lanes
        ) -> float:
            return sum(a.seconds * min(a.expected(horizon), n) for a, n in streams) / lanes

        # a later job of the same account waits at least as much longer as its projected
        # wait is: the climb starts there (it never passes the least fixed point)
        mine = (job.tier, job.account, lanes)
        before = solved.get(mine)
        start = job.wait if before is None else max(job.wait, before[1] + job.wait - before[0])
        wait = _least_fixed_point(job.wait, arriving, start)
        solved[mine] = (job.wait, wait)
        # the spread: as if each came as a Poisson stream at its mean rate (a count
        # foreseen from steady gaps may still be off by one)
        var = sum(a.square * min(wait / a.gap, n) for a, n in streams) / (lanes * lanes)
        out[job.job_id] = Overtaking(wait - job.wait, var, may / lanes)
        key = (job.tier, job.account)
        ahead[key] = ahead.get(key, 0.0) + job.cost
    return out


OVERLOAD = 10.0
"""Arrivals at or over the lanes' capacity never let a job start in this model: its wait is
taken as at most this many times its projected one (plus a minute)."""


def _least_fixed_point(
    wait: float, arriving: Callable[[float], float], start: float | None = None
) -> float:
    """The least ``W >= wait`` with ``W = wait + arriving(W)`` (``arriving`` grows with W):
    iterating from ``wait``, or from any ``start`` known not to pass it, climbs to it."""
    bound = OVERLOAD * wait + 60.0
    current = min(wait if start is None else start, bound)
    for _ in range(200):
        after = min(wait + arriving(current), bound)
        if after - current < 1e-6:
            return after
        current = after
    return current


def poisson_median(mean: float) -> float:
    """The median count of a Poisson stream expected to bring ``mean``: the least ``k``
    with P(N <= k) >= 1/2 (past ``mean`` 50, ``floor(mean + 1/3)``, which is within one)."""
    if mean >= 50.0:
        return float(math.floor(mean + 1 / 3))
    k, term = 0, math.exp(-mean)
    total = term
    while total < 0.5:
        k += 1
        term *= mean / k
        total += term
    return float(k)
