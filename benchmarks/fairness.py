"""How fair is the queue? A simulation of easel's scheduler policy, plus its raw speed.

    python benchmarks/fairness.py [--jobs 10000] [--users 100] [--seed 1]

One worker serves 10,000 jobs submitted by 100 users at skewed rates (Zipf: a few users
submit most of the work), 5% of them premium, with mixed sizes and step counts (a job's
cost is steps x pixels). Arrivals outpace the worker by 60%, so the heavy users are
backlogged. It prints:

- for the users backlogged through the middle of the run, each one's service in the
  standard tier (in work units) against the fair share among them, and the largest
  deviation (target: +-5%);
- p50/p99 wait per priority tier (aging promotes standard jobs after ``--aging`` s);
- scheduling decisions per second of ``FairQueue`` in this process (target >= 100,000/s).

The policy under test is ``easel.queue.scheduler.FairQueue``, the code the stores run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

from easel.queue.scheduler import Entry, FairQueue, Policy

SIZES = [(512, 512), (768, 768), (1024, 1024)]
STEPS = [20, 30, 40]


@dataclass
class Job:
    entry: Entry
    arrival: float
    start: float = 0.0
    end: float = 0.0


def arrivals(jobs: int, users: int, seed: int, overload: float) -> list[Job]:
    rng = random.Random(seed)
    weights = [1 / (u + 1) ** 0.8 for u in range(users)]
    mean_cost = statistics.mean(s * w * h / 1e6 for s in STEPS for w, h in SIZES)
    rate = overload / mean_cost  # jobs per second; the worker does 1 work unit per second
    now, made = 0.0, []
    for i in range(jobs):
        now += rng.expovariate(rate)
        user = rng.choices(range(users), weights)[0]
        steps, (width, height) = rng.choice(STEPS), rng.choice(SIZES)
        priority = 10 if rng.random() < 0.05 else 0
        entry = Entry(f"j{i}", f"user{user}", priority, "mock", steps * width * height / 1e6,
                      enqueued_at=now)  # fmt: skip
        made.append(Job(entry, now))
    return made


def simulate(jobs: list[Job], policy: Policy) -> list[Job]:
    """One worker, service time = cost: returns the jobs with start and end times."""
    queue = FairQueue(policy)
    by_id = {job.entry.job_id: job for job in jobs}
    pending = iter(jobs)
    upcoming = next(pending, None)
    now, done = 0.0, []
    while upcoming is not None or len(queue):
        while upcoming is not None and upcoming.arrival <= now:
            queue.push(upcoming.entry)
            upcoming = next(pending, None)
        entry = queue.pop(now=now)
        if entry is None:  # idle until the next arrival
            now = upcoming.arrival if upcoming is not None else now
            continue
        job = by_id[entry.job_id]
        job.start, job.end = now, now + entry.cost
        now = job.end
        done.append(job)
    return done


def fairness(done: list[Job]) -> tuple[int, float, float]:
    """Users whose standard jobs were backlogged through the middle 80% of arrivals, and
    their largest deviation from the fair share of the standard tier's service they got
    together, in work units (premium work is on top of a fair share, by design)."""
    last_arrival = max(job.arrival for job in done)
    t0, t1 = 0.1 * last_arrival, 0.9 * last_arrival
    per_user: dict[str, list[Job]] = defaultdict(list)
    for job in done:
        if job.entry.priority == 0:
            per_user[job.entry.user_id].append(job)

    def backlogged(jobs: list[Job]) -> bool:
        """Some job of the user was waiting or running at every moment of [t0, t1]."""
        covered = t0
        for job in sorted(jobs, key=lambda j: j.arrival):
            if job.arrival > covered:
                return False
            covered = max(covered, job.end)
            if covered >= t1:
                return True
        return False

    def service(jobs: list[Job]) -> float:
        return sum(max(0.0, min(j.end, t1) - max(j.start, t0)) for j in jobs)

    heavy = {user: service(jobs) for user, jobs in per_user.items() if backlogged(jobs)}
    fair = statistics.mean(heavy.values())
    deviation = max(abs(s / fair - 1) for s in heavy.values())
    return len(heavy), fair, deviation


def decisions_per_second(users: int, size: int = 10_000, seed: int = 2) -> tuple[float, float]:
    """Pushes per second, then pops (decisions) per second with at least ``size`` queued."""
    rng = random.Random(seed)
    queue = FairQueue(Policy(aging_seconds=600.0))
    entries = [
        Entry(f"j{i}", f"user{rng.randrange(users)}", rng.choice([0, 0, 10]), "mock", cost)
        for i, cost in enumerate(rng.uniform(5, 40) for _ in range(2 * size))
    ]
    began = time.perf_counter()
    for entry in entries:
        queue.push(entry)
    pushes = len(entries) / (time.perf_counter() - began)
    began = time.perf_counter()
    for _ in range(size):
        queue.pop(["mock"], now=1.0)
    return pushes, size / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--aging", type=float, default=600.0)
    args = parser.parse_args()

    done = simulate(arrivals(args.jobs, args.users, args.seed, 1.6), Policy(args.aging))
    count, fair, deviation = fairness(done)
    print(
        f"easel fair queue: {args.jobs} jobs, {args.users} users (Zipf rates), one worker, "
        f"arrivals 1.6x its capacity, aging {args.aging:g} s"
    )
    print(
        f"  backlogged users through the middle 80%: {count}, fair share {fair:.0f} units "
        f"each; largest deviation {deviation:+.1%} (target within +-5%)"
    )
    for tier, name in ((10, "premium"), (0, "standard")):
        waits = sorted(j.start - j.arrival for j in done if j.entry.priority == tier)
        p99 = waits[min(int(len(waits) * 0.99), len(waits) - 1)]
        print(
            f"  wait, {name:8s} ({len(waits):5d} jobs): p50 {statistics.median(waits):8.0f} s"
            f"   p99 {p99:8.0f} s"
        )
    pushes, pops = decisions_per_second(args.users)
    print(
        f"  scheduler: {pops:,.0f} decisions/s with >= 10,000 queued (target >= 100,000); "
        f"{pushes:,.0f} admissions/s"
    )


if __name__ == "__main__":
    main()
