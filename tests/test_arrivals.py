"""Arrivals (queue/arrivals.py): how each account submits, and what of it the fair queue
lets ahead of a queued job. Pure policy, property-tested; ``tests/test_estimates.py``
checks it in a real runtime (a steady client's next jobs, counted at submit, are the ones
the fair queue puts ahead)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from easel.queue.arrivals import (
    EVERYONE,
    MIN_SPAN,
    QUIET_FLOOR,
    Arrival,
    Overtaking,
    Queued,
    Submitted,
    arrivals,
    overtaken,
    poisson_median,
)


def _steady(gap: float, count: int, since: float, seconds: float = 1.0) -> list[Submitted]:
    """``count`` submissions ``gap`` apart, the last ``since`` seconds before now (100)."""
    last = 100.0 - since
    return [Submitted(0, "bot", last - i * gap, seconds, 1.0) for i in range(count)]


def test_a_steady_clients_next_submissions_are_foreseen() -> None:
    bot = arrivals(_steady(gap=2.0, count=20, since=0.5), now=100.0)[(0, "bot")]
    assert bot.gap == pytest.approx(2.0)
    assert bot.expected(1.0) == 0  # its next one comes 1.5 s from now
    assert bot.expected(1.6) == 1 and bot.expected(3.6) == 2 and bot.expected(5.4) == 2


def test_a_random_streams_count_is_the_median_of_a_poisson_streams() -> None:
    # gaps as scattered as a Poisson stream's (mean 2 s): users at random, a pooled tier
    gaps = (0.3, 4.1, 1.2, 0.6, 3.8, 0.2, 2.9, 1.5, 0.4, 5.0) * 2
    at = list(itertools.accumulate(gaps, initial=90.0))
    stream = arrivals([Submitted(0, "anyone", t, 1.0, 1.0) for t in at], now=at[-1])
    anyone = stream[(0, "anyone")]
    assert anyone.random and anyone.gap == pytest.approx(2.0)
    # its mean count would be 0.5 of a job in 1 s: the median says none comes...
    assert anyone.expected(1.0) == 0
    assert anyone.expected(2.0) == 1 and anyone.expected(4.0) == 2  # P(N <= 1) = 0.41
    # ...while a steady client's next job is foreseen from its gaps, as before
    bot = arrivals(_steady(gap=2.0, count=20, since=1.5), now=100.0)[(0, "bot")]
    assert not bot.random and bot.expected(1.0) == 1
    # watched since someone else's submission 70 s ago: the stream's 21 submissions
    # spread over all 70 s (chance put its first one late), the steady client's do not
    now = at[-1]
    steady = [Submitted(0, "bot", now - 1.5 - 2.0 * i, 1.0, 1.0) for i in range(20)]
    both = [Submitted(0, "other", now - 70.0, 1.0, 1.0), *steady,
            *(Submitted(0, "anyone", t, 1.0, 1.0) for t in at)]  # fmt: skip
    watched = arrivals(both, now=now)
    assert watched[(0, "anyone")].gap == pytest.approx(70.0 / 21)
    assert watched[(0, "bot")].gap == pytest.approx(2.0)


@given(st.floats(0.0, 300.0), st.floats(0.0, 300.0))
def test_the_poisson_median_is_within_its_known_bounds_and_grows_with_the_mean(
    mean: float, other: float
) -> None:
    median = poisson_median(mean)
    assert median == int(median)
    assert mean - math.log(2) <= median <= mean + 1 / 3  # Choi (1994)
    low, high = sorted((mean, other))
    assert poisson_median(low) <= poisson_median(high)


def test_bursts_lone_submissions_and_silence_are_not_rates() -> None:
    burst = [Submitted(0, "batch", 99.9 + i * 1e-3, 1.0, 1.0) for i in range(30)]
    new = arrivals(burst, now=100.0)[(0, "batch")]  # 30 at once: not 1,000 a second...
    assert not new.steady
    # ...so nothing of it is expected, but the range's high end counts what it may get in
    # ahead of ann's second job: as much cost as ann has ahead (one job: one of its jobs)
    order = [Queued("a1", 0, "ann", 1.0, wait=1.0), Queued("a2", 0, "ann", 1.0, wait=2.0)]
    later = overtaken(order, arrivals(burst, now=100.0))
    assert later["a1"] == Overtaking(0.0, 0.0, 0.0)
    assert later["a2"] == Overtaking(0.0, 0.0, bound=1.0)
    # a client that keeps bursting, 10 every 10 s: a rate, but spread over MIN_SPAN
    bursts = [Submitted(0, "batch", 90.0 + i * 1e-3 + 10 * (i // 10), 1.0, 1.0)
              for i in range(30)]  # fmt: skip
    batch = arrivals(bursts, now=110.1)[(0, "batch")]
    assert batch.gap >= MIN_SPAN / 30
    assert arrivals(bursts, now=110.1 + 3 * 10 + QUIET_FLOOR) == {}  # it stopped
    two = arrivals(_steady(gap=2.0, count=2, since=0.5), now=100.0)
    assert not two[(0, "bot")].steady  # two: no rate
    assert arrivals(_steady(gap=2.0, count=20, since=30.0), now=100.0) == {}  # gone quiet


_ORDERS = st.lists(
    st.tuples(st.sampled_from("abc"), st.sampled_from([0, 0, 0, 10]), st.floats(0.1, 2)),
    min_size=1, max_size=12,
)  # fmt: skip
_RATES = st.dictionaries(
    st.tuples(st.sampled_from([0, 10]), st.sampled_from(["a", "b", "c", "d", EVERYONE])),
    st.tuples(st.floats(0.2, 5), st.floats(0, 3), st.floats(0.05, 2), st.floats(0.1, 2)),
    max_size=5,
)  # fmt: skip


def _order(jobs: list[tuple[str, int, float]]) -> list[Queued]:
    """Queued jobs in serving order (higher tier first), each waiting for those before."""
    ranked = sorted(jobs, key=lambda job: -job[1])
    return [Queued(str(i), tier, user, cost, wait=float(i)) for i, (user, tier, cost)
            in enumerate(ranked)]  # fmt: skip


def _rates(raw: dict[tuple[int, str], tuple[float, ...]]) -> dict[tuple[int, str], Arrival]:
    return {key: Arrival(gaps=(gap,) * 5, since=since, seconds=seconds, square=seconds**2,
                         cost=cost)
            for key, (gap, since, seconds, cost) in raw.items()}  # fmt: skip


@given(_ORDERS, _RATES)
def test_only_arrivals_the_fair_queue_lets_ahead_are_counted(
    jobs: list[tuple[str, int, float]], raw: dict[tuple[int, str], tuple[float, ...]]
) -> None:
    order, rates = _order(jobs), _rates(raw)
    extra = overtaken(order, rates)
    for index, job in enumerate(order):
        seconds, var = extra[job.job_id].expected, extra[job.job_id].variance
        assert seconds >= 0 and var >= 0
        behind = {(q.tier, q.account) for q in order[index + 1 :]}
        # what may overtake: a higher tier, or another account of its tier with room
        # (something of its own tier ahead of it) and nothing queued behind it
        mine = any(q.account == job.account and q.tier == job.tier for q in order[:index])
        may = {key for key in rates if (key[0] > job.tier and key[1] == EVERYONE)
               or (key[0] == job.tier and key[1] not in (job.account, EVERYONE) and mine
                   and key not in behind)}  # fmt: skip
        alone = overtaken(order, {key: rates[key] for key in rates.keys() - may})
        assert alone[job.job_id].expected == alone[job.job_id].variance == 0.0
        # its wait is a fixed point: what arrives while it waits is what it is told
        total = job.wait + seconds
        arriving = sum(
            min(rates[key].expected(total), math.inf) * rates[key].seconds for key in may
        )
        assert seconds <= arriving + 1e-6


@given(_ORDERS, _RATES, st.floats(1.0, 4.0))
def test_more_arrivals_never_make_a_wait_shorter(
    jobs: list[tuple[str, int, float]], raw: dict[tuple[int, str], tuple[float, ...]], faster: float
) -> None:
    order, rates = _order(jobs), _rates(raw)
    quicker = {key: replace(a, gaps=tuple(g / faster for g in a.gaps), since=a.since / faster)
               for key, a in rates.items()}  # fmt: skip
    before, after = overtaken(order, rates), overtaken(order, quicker)
    for job in order:
        assert after[job.job_id].expected >= before[job.job_id].expected - 1e-9
