"""How close can any ETA given at submit come on ``eta.py``'s workload? An oracle answers.

    python benchmarks/eta_bound.py [--poisson] [--seed 7] [--load 1] [--futures 200]

``eta.py`` measures easel's ETA at submit against a real server. This asks what the best
ETA at submit could reach on the same workload, so that easel's figure can be read against
it. The workload of ``eta.py`` (its users, rates, shapes, models, premium share and seed:
the same schedule) runs in a simulation: one worker that takes exactly the realistic
mock's time for each job (its model load, overhead, steps, plus ``--gap`` per job for the
claim and the events), served in the order of easel's own fair queue
(:class:`easel.queue.scheduler.FairQueue`), with no noise at all. At each scored job's
submit an oracle that knows everything known then (the queue with its fair-share tags, the
worker's current job and loaded model, when each user last submitted) and the workload's
generator itself (each user's rate and gap distribution, the shape and model mix, the
premium share, when submissions stop) plays ``--futures`` possible futures from there and
predicts the time that minimises the expected relative error (the median of the futures
weighted by one over their times). What is left of its error is what the future holds.

Printed side by side, against the simulated run's actual times: the oracle; a Monte Carlo
that knows only the past (each user's recent gaps and jobs, resampled: what a server could
draw futures from); easel's own arrival model (:mod:`easel.queue.arrivals`) fed the
simulated facts, on the exact projection of what is queued; that projection alone (nothing
arriving); the naive "position x average run time". Then the oracle and easel split as
``eta.py`` splits easel's ETA (by what, submitted later, ran first), how often the actual
time fell inside the oracle's p10-p90 of futures, and each user's mean time and the
worker's busy share, to compare with a real run of ``eta.py``. Deterministic for a seed:
the way to compare two arrival models.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from eta import (
    COST,
    MODELS,
    OVERTAKEN,
    RATES,
    SIZES,
    STEPS,
    TAIL,
    Outcome,
    overtaken_by,
    relative_errors,
    submissions,
    workload,
)

from easel.jobs import PREMIUM_PRIORITY
from easel.queue.arrivals import (
    QUIET_GAPS,
    WINDOW_SECONDS,
    Queued,
    Submitted,
    arrivals,
    overtaken,
)
from easel.queue.scheduler import Entry, FairQueue, Policy

PER_STEP_MEGAPIXEL = float(COST["EASEL_MOCK_SECONDS_PER_MEGAPIXEL_STEP"])
OVERHEAD = float(COST["EASEL_MOCK_OVERHEAD_SECONDS"])
LOAD = float(COST["EASEL_MOCK_LOAD_SECONDS"])
STEP = float(COST["EASEL_MOCK_STEP_DELAY"])


@dataclass(frozen=True, slots=True)
class Submission:
    job_id: str
    at: float
    user: str
    body: dict[str, Any]

    @property
    def entry(self) -> Entry:
        body = self.body
        return Entry(
            job_id=self.job_id,
            user_id=self.user,
            priority=PREMIUM_PRIORITY if body.get("premium") else 0,
            route="mock",
            cost=body["steps"] * body["width"] * body["height"] / 1e6,
            enqueued_at=self.at,
        )


def run_seconds(body: dict[str, Any], loaded: str | None, gap: float) -> float:
    """What the realistic mock takes for one job (``easel.backends.mock``), and the gap."""
    megapixels: float = body["width"] * body["height"] / 1e6
    load = LOAD if body["model"] != loaded else 0.0
    steps: int = body["steps"]
    return load + OVERHEAD + steps * (STEP + PER_STEP_MEGAPIXEL * megapixels) + gap


@dataclass
class World:
    """The simulated server: the fair queue and its one worker."""

    queue: FairQueue
    gap: float
    free_at: float = 0.0
    """When the worker is done with the job it runs."""
    loaded: str | None = MODELS[-1]
    """What the warm-up left loaded (``eta.py`` warms model by model)."""
    started: float = 0.0
    """When the job it runs started."""

    def submit(self, one: Submission) -> None:
        self.free_at = max(self.free_at, one.at)  # an idle worker starts it at once
        self.queue.push(one.entry)

    def serve(self, until: float, bodies: dict[str, dict[str, Any]]) -> Iterator[Entry]:
        """Start every job the worker takes up to ``until``; each one's start and end are
        ``started`` / ``self.free_at`` right after it is yielded."""
        while len(self.queue) and self.free_at <= until:
            entry = self.queue.pop()
            assert entry is not None
            body = bodies[entry.job_id]
            self.started = self.free_at
            self.free_at += run_seconds(body, self.loaded, self.gap)
            self.loaded = body["model"]
            yield entry


class Generator:
    """``eta.workload``'s process, continued from what was submitted up to a moment."""

    def __init__(self, poisson: bool, end: float, rng: random.Random, load: float) -> None:
        self.poisson, self.end, self.rng, self.load = poisson, end, rng, load

    def future(self, past: list[Submission], now: float) -> list[Submission]:
        """One possible future: every submission after ``now`` until the end, given when
        each user last submitted."""
        rng, out = self.rng, []
        last = {one.user: one.at for one in past}
        for user, rate in ((user, rate * self.load) for user, rate in RATES.items()):
            first = self._next(rate, last.get(user), now)
            for at, body in submissions(rng, user, rate, first, self.end, self.poisson):
                out.append(Submission(f"{user}@{at:.6f}", at, user, body))
        return sorted(out, key=lambda one: one.at)

    def _next(self, rate: float, last: float | None, now: float) -> float:
        """The next submission after ``now``, given the last one (memoryless when
        Poisson, or before the first)."""
        if self.poisson or last is None:
            return now + self.rng.expovariate(rate)
        low = max(0.8, (now - last) * rate)  # its gap is at least as long as the silence
        return last + self.rng.uniform(low, max(low, 1.2)) / rate


class Resampler:
    """Futures from the past alone, as a server could draw them: each user submits again
    after gaps drawn from its own recent ones (the first of them longer than its silence
    so far), jobs drawn from its own recent ones (shape, model, premium or not)."""

    def __init__(self, end: float, rng: random.Random) -> None:
        self.end, self.rng = end, rng

    def future(self, past: list[Submission], now: float) -> list[Submission]:
        rng, out = self.rng, []
        by_user: dict[str, list[Submission]] = {}
        for one in past:
            if one.at >= now - WINDOW_SECONDS:
                by_user.setdefault(one.user, []).append(one)
        for user, ones in by_user.items():
            gaps = [b.at - a.at for a, b in itertools.pairwise(ones)]
            since = now - ones[-1].at
            if not gaps or since > QUIET_GAPS * max(gaps):  # one job: no rate; silence: an end
                continue
            longer = [g - since for g in gaps if g > since]
            at = now + rng.choice(longer or gaps)
            while at < self.end:
                out.append(Submission(f"{user}@{at:.6f}", at, user, rng.choice(ones).body))
                at += rng.choice(gaps)
        return sorted(out, key=lambda one: one.at)


def best_guess(times: list[float]) -> float:
    """The ETA minimising the expected relative error over equally likely outcomes: their
    median weighted by one over each."""
    ordered = sorted(times)
    weights = [1.0 / t for t in ordered]
    half, total = sum(weights) / 2, 0.0
    for t, w in zip(ordered, weights, strict=True):
        total += w
        if total >= half:
            return t
    return ordered[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="as in eta.py")
    parser.add_argument("--lead-in", type=float, default=30.0, help="as in eta.py")
    parser.add_argument("--poisson", action="store_true", help="as in eta.py")
    parser.add_argument("--seed", type=int, default=7, help="as in eta.py")
    parser.add_argument("--load", type=float, default=1.0, help="as in eta.py")
    parser.add_argument("--futures", type=int, default=200, help="futures played per job")
    parser.add_argument(
        "--gap", type=float, default=0.005, help="seconds per job besides the mock's run"
    )
    args = parser.parse_args()
    end = args.seconds + TAIL
    schedule = [
        Submission(f"job{i}", at, body["user_id"], body)
        for i, (at, body) in enumerate(
            workload(random.Random(args.seed), end, args.poisson, args.load)
        )
    ]
    bodies = {one.job_id: one.body for one in schedule}
    world = World(FairQueue(Policy(aging_seconds=None)), args.gap)
    generator = Generator(args.poisson, end, random.Random(args.seed + 1), args.load)
    resampler = Resampler(end, random.Random(args.seed + 2))
    guesses: dict[str, dict[str, float]] = {name: {} for name in GUESSES}
    ranges: dict[str, tuple[float, float]] = {}  # the oracle's p10 and p90 of futures
    average = statistics.fmean(
        run_seconds({"width": s, "height": s, "steps": n, "model": m}, None, args.gap) - LOAD / 2
        for s, n, m in itertools.product(SIZES, STEPS, MODELS)
    )  # every shape once, half of them after a model load
    started: dict[str, float] = {}
    finished: dict[str, float] = {}

    def serve(until: float) -> None:
        for entry in world.serve(until, bodies):
            started[entry.job_id] = world.started
            finished[entry.job_id] = world.free_at

    for index, one in enumerate(schedule):
        serve(one.at)
        world.submit(one)
        if not args.lead_in <= one.at <= args.seconds:
            continue
        past = schedule[: index + 1]
        order = list(world.queue.order())
        ends = _ends(world, bodies)
        queued = ends[one.job_id][1] - one.at
        oracle = _futures(world, one, bodies, args.futures, generator.future, past)
        deciles = statistics.quantiles(oracle, n=10, method="inclusive")
        ranges[one.job_id] = (deciles[0], deciles[-1])
        for name, guess in {
            ORACLE: best_guess(oracle),
            "resampling the past": best_guess(
                _futures(world, one, bodies, args.futures, resampler.future, past)
            ),
            EASEL: queued + _overtaking(order, ends, one, past, args.gap),
            "queued only (nothing arriving)": queued,
            "naive (position x average)": ([e.job_id for e in order].index(one.job_id) + 1)
            * average,
        }.items():
            guesses[name][one.job_id] = guess
    serve(math.inf)
    outcomes = {
        one.job_id: Outcome({"id": one.job_id, "request": one.body, "user": one.user},
                            one.at, one.at, started[one.job_id], finished[one.job_id])
        for one in schedule
    }  # fmt: skip
    _report(args, schedule, outcomes, guesses, ranges)


ORACLE = "oracle (knows the generator)"
EASEL = "easel's arrival model"
GUESSES = (ORACLE, "resampling the past", EASEL, "queued only (nothing arriving)",
           "naive (position x average)")  # fmt: skip


def _report(
    args: argparse.Namespace,
    schedule: list[Submission],
    outcomes: dict[str, Outcome],
    guesses: dict[str, dict[str, float]],
    ranges: dict[str, tuple[float, float]],
) -> None:
    scored = list(ranges)
    kind = "Poisson arrivals" if args.poisson else "steady rates (gaps +-20%)"
    kind += f", every rate x {args.load}" if args.load != 1 else ""
    print(f"simulated: {len(schedule)} jobs, {kind}, seed {args.seed}; scored: the "
          f"{len(scored)} submitted from {args.lead_in:.0f} s to {args.seconds:.0f} s; "
          f"one worker, {args.gap} s per job besides the mock's run; "
          f"{args.futures} futures per job")  # fmt: skip

    def pairs(name: str, ids: list[str]) -> list[tuple[float, float]]:
        return [(guesses[name][i], outcomes[i].real) for i in ids]

    by_kind = {i: overtaken_by(outcomes[i], list(outcomes.values())) for i in scored}
    rows = [
        *((name, pairs(name, scored)) for name in GUESSES),
        *((f"  {short}, {label}", pairs(name, [i for i in scored if by_kind[i] == k]))
          for name, short in ((ORACLE, "oracle"), (EASEL, "easel"))
          for k, label in OVERTAKEN.items()),
    ]  # fmt: skip
    print(f"{'ETA at submit':<44} {'p50 error':>9} {'p90 error':>9} {'max':>7}  jobs")
    for label, scored_pairs in rows:
        if len(scored_pairs) < 2:
            print(f"{label:<44} {len(scored_pairs)}/{len(scored)}")
            continue
        p50, p90, worst = relative_errors(scored_pairs)
        print(f"{label:<44} {p50:>9.1%} {p90:>9.1%} {worst:>7.0%}  "
              f"{len(scored_pairs)}/{len(scored)}")  # fmt: skip
    within = sum(1 for i in scored if ranges[i][0] <= outcomes[i].real <= ranges[i][1])
    print(f"actual time within the oracle's p10-p90 of futures: {within}/{len(scored)}")
    means = ", ".join(
        f"{user} {statistics.fmean(o.real for o in mine):.2f} s"
        for user in RATES
        if (mine := [outcomes[i] for i in scored if outcomes[i].view["user"] == user])
    )
    busy = sum(o.finished - o.started for o in outcomes.values())
    span = max(o.finished for o in outcomes.values()) - schedule[0].at
    print(f"mean time per user (compare eta.py's): {means}; worker busy {busy / span:.0%}")


def _ends(world: World, bodies: dict[str, dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each queued job's start and end if nothing more arrives."""
    world = copy.deepcopy(world)
    return {e.job_id: (world.started, world.free_at) for e in world.serve(math.inf, bodies)}


def _futures(
    world: World,
    job: Submission,
    bodies: dict[str, dict[str, Any]],
    count: int,
    future: Callable[[list[Submission], float], list[Submission]],
    past: list[Submission],
) -> list[float]:
    """``job``'s time in each of ``count`` futures drawn from ``future``."""
    times = []
    for _ in range(count):
        coming = future(past, job.at)
        played = {**bodies, **{one.job_id: one.body for one in coming}}
        times.append(_played(world, coming, job, played) - job.at)
    return times


def _played(
    world: World, future: list[Submission], job: Submission, bodies: dict[str, dict[str, Any]]
) -> float:
    """When ``job`` ends if ``future`` is what comes next (on a copy of ``world``)."""
    world = copy.deepcopy(world)
    for one in [*future, None]:
        for entry in world.serve(math.inf if one is None else one.at, bodies):
            if entry.job_id == job.job_id:
                return world.free_at
        if one is not None:
            world.submit(one)
    raise AssertionError(f"{job.job_id} never ran")


def _overtaking(
    order: list[Entry],
    ends: dict[str, tuple[float, float]],
    job: Submission,
    past: list[Submission],
    gap: float,
) -> float:
    """What easel's arrival model (:mod:`easel.queue.arrivals`) expects later arrivals to
    run before ``job``, fed the simulated facts as the runtime feeds it the real ones
    (each submission priced with the share of a model load it causes)."""
    recent = [(one, one.entry) for one in past if one.at >= job.at - WINDOW_SECONDS]
    models = [one.body["model"] for one, _ in recent]
    submitted = [
        Submitted(
            tier=entry.priority, account=one.user, at=one.at, cost=entry.cost,
            seconds=run_seconds(one.body, one.body["model"], gap)
            + (1 - models.count(one.body["model"]) / len(models)) * LOAD,
        )
        for one, entry in recent
    ]  # fmt: skip
    queued = [Queued(e.job_id, e.priority, e.account, e.cost, ends[e.job_id][0] - job.at)
              for e in order]  # fmt: skip
    return overtaken(queued, arrivals(submitted, job.at))[job.job_id].expected


if __name__ == "__main__":
    main()
