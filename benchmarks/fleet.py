"""How well does the router keep a fleet busy? A simulation through the real routing policy.

    python benchmarks/fleet.py [--jobs 3000] [--seed 1]

A simulated fleet of 4 backends with speeds 1x, 1x, 2x and 0.5x, one job at a time each;
3 models that take 10 s to load, each backend holding one model at a time. 20 users
submit jobs at Zipf rates; each user works with one model (the heavy users' models are
the most wanted) and a job takes 2-8 s at 1x. Each arriving job is routed at once to a
backend, which runs its jobs in order (loading the model first when it holds another).

Three routers see the same arrivals:
- **easel**: ``easel.queue.routing.choose`` and ``claim``, the code the runtime runs
  (affinity with a balance threshold, then least work normalised by speed, load time
  counted; an idle backend takes runs of queued jobs at a lower threshold);
- **round robin**: backends in turn;
- **least-loaded**: least outstanding work / speed, no model affinity.

Two loads: saturated (arrivals at 1.5x the fleet's capacity: throughput, jobs/s, against
the bound total capacity / mean job work, i.e. no model load ever) and 70% of capacity
(p95 wait from arrival to start). Targets: easel >= 1.3x round robin's throughput and
>= 90% of the bound.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from easel.queue.routing import BackendView, Policy, Want, choose, claim

SPEEDS = (1.0, 1.0, 2.0, 0.5)
MODELS = ("sdxl", "flux", "sd15")
LOAD_SECONDS = 10.0
USERS = 20


@dataclass
class Job:
    arrival: float
    model: str
    work: float  # seconds at 1x
    start: float = 0.0
    end: float = 0.0


@dataclass
class Backend:
    name: str
    speed: float
    loaded: str | None = None
    queue: deque[Job] = field(default_factory=deque)
    busy_until: float = 0.0
    running: Job | None = None
    loads: int = 0

    def tail_model(self) -> str | None:
        return (
            self.queue[-1].model
            if self.queue
            else (self.running.model if self.running else self.loaded)
        )

    def outstanding(self, now: float) -> float:
        """Work units held: what is left of the running job, plus the queue."""
        left = max(self.busy_until - now, 0.0) * self.speed if self.running else 0.0
        return left + sum(job.work for job in self.queue)

    def view(self, now: float) -> BackendView:
        tail = self.tail_model()
        return BackendView(
            name=self.name,
            loaded=frozenset({tail}) if tail else frozenset(),
            outstanding=self.outstanding(now),
            speed=self.speed,
            load_seconds=LOAD_SECONDS,
        )


Router = Callable[[Job, list[Backend], float], Backend]


def easel_router(policy: Policy) -> Router:
    def route(job: Job, backends: list[Backend], now: float) -> Backend:
        views = [backend.view(now) for backend in backends]
        chosen = choose(Want(model=job.model, cost=job.work), views, policy)
        if chosen is None:
            raise RuntimeError("no eligible backend")
        return next(backend for backend in backends if backend.name == chosen.name)

    return route


def round_robin() -> Router:
    turn = [0]

    def route(job: Job, backends: list[Backend], now: float) -> Backend:
        turn[0] += 1
        return backends[(turn[0] - 1) % len(backends)]

    return route


def least_loaded() -> Router:
    def route(job: Job, backends: list[Backend], now: float) -> Backend:
        return min(backends, key=lambda b: (b.outstanding(now) / b.speed, -b.speed, b.name))

    return route


def workload(jobs: int, load: float, seed: int) -> list[Job]:
    """Arrivals at ``load`` x the fleet's capacity (in work, with no model load)."""
    rng = random.Random(seed)
    weights = [1 / (user + 1) for user in range(USERS)]  # Zipf
    favourite = [MODELS[user % len(MODELS)] for user in range(USERS)]
    mean_work = 5.0
    rate = load * sum(SPEEDS) / mean_work
    now, made = 0.0, []
    for _ in range(jobs):
        now += rng.expovariate(rate)
        user = rng.choices(range(USERS), weights)[0]
        made.append(Job(arrival=now, model=favourite[user], work=rng.uniform(2.0, 8.0)))
    return made


def simulate(
    jobs: list[Job], route: Router, *, rebalance: bool, policy: Policy | None = None
) -> tuple[list[Job], int]:
    """Returns the jobs (with start and end) and the number of model loads.

    ``rebalance``: a backend that runs out of work asks the router (``claim``, what the
    runtime's fleet upkeep does for an idle backend) which of the jobs queued elsewhere
    (oldest first) it should take now; round robin and least-loaded never move a job.
    """
    backends = [Backend(f"b{i}", speed) for i, speed in enumerate(SPEEDS)]
    jobs = [Job(job.arrival, job.model, job.work) for job in jobs]
    events: list[tuple[float, int, int]] = []  # (time, 0: done / 1: arrival, index)
    for index, job in enumerate(jobs):
        heapq.heappush(events, (job.arrival, 1, index))

    def start(backend: Backend, now: float) -> None:
        job = backend.queue.popleft()
        begin = now
        if backend.loaded != job.model:
            backend.loaded = job.model
            backend.loads += 1
            begin += LOAD_SECONDS
        job.start = begin
        backend.busy_until = begin + job.work / backend.speed
        backend.running = job
        heapq.heappush(events, (backend.busy_until, 0, backends.index(backend)))

    def steal(idle: Backend, now: float) -> None:
        queued = sorted(
            ((job, owner) for owner in backends if owner is not idle for job in owner.queue),
            key=lambda pair: pair[0].arrival,
        )
        views = [backend.view(now) for backend in backends]
        wants = [(Want(model=job.model, cost=job.work), owner.name) for job, owner in queued]
        _, taken = claim(idle.name, wants, views, policy)  # a model to load comes with
        for index in taken:  # its jobs: the backend loads it as it starts the first
            job, owner = queued[index]
            owner.queue.remove(job)
            idle.queue.append(job)

    while events:
        now, kind, index = heapq.heappop(events)
        if kind == 1:
            job = jobs[index]
            chosen = route(job, backends, now)
            chosen.queue.append(job)
            if chosen.running is None:
                start(chosen, now)
            continue
        backend = backends[index]
        if backend.running is not None:
            backend.running.end = now
            backend.running = None
        if not backend.queue and rebalance:
            steal(backend, now)
        if backend.queue:
            start(backend, now)
    return jobs, sum(backend.loads for backend in backends)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=5, help="Runs with seeds 1..N.")
    args = parser.parse_args()

    routers: dict[str, Callable[[], Router]] = {
        "easel": lambda: easel_router(Policy()),
        "round robin": round_robin,
        "least-loaded": least_loaded,
    }
    print(
        f"fleet: speeds {', '.join(f'{s:g}x' for s in SPEEDS)}; {len(MODELS)} models, "
        f"{LOAD_SECONDS:g} s load, one loaded per backend; {USERS} users (Zipf); "
        f"{args.jobs} jobs of 2-8 s at 1x; mean (worst) of seeds 1..{args.seeds}"
    )
    print(
        f"{'router':<14}{'jobs/s saturated':>22}{'x round robin':>15}{'% of bound':>18}"
        f"{'loads':>7}{'p95 wait at 70%':>20}"
    )
    rows: dict[str, list[tuple[float, float, float, int, float]]] = {name: [] for name in routers}
    bounds = []
    for seed in range(1, args.seeds + 1):
        saturated = workload(args.jobs, 1.5, seed)
        steady = workload(args.jobs, 0.7, seed)
        bound = sum(SPEEDS) / statistics.mean(job.work for job in saturated)
        bounds.append(bound)
        measured = {}
        for name, make in routers.items():
            rebalance = name == "easel"
            done, loads = simulate(saturated, make(), rebalance=rebalance)
            makespan = max(job.end for job in done) - min(job.arrival for job in done)
            waited, _ = simulate(steady, make(), rebalance=rebalance)
            wait = p95([job.start - job.arrival for job in waited])
            measured[name] = (len(done) / makespan, loads, wait)
        base = measured["round robin"][0]
        for name, (throughput, loads, wait) in measured.items():
            rows[name].append((throughput, throughput / base, throughput / bound, loads, wait))
    for name, runs in rows.items():
        throughput, ratio, share, loads, wait = zip(*runs, strict=True)
        print(
            f"{name:<14}{statistics.mean(throughput):>13.3f} ({min(throughput):.3f})"
            f"{statistics.mean(ratio):>8.2f}x ({min(ratio):.2f})"
            f"{100 * statistics.mean(share):>9.1f}% ({100 * min(share):.1f})"
            f"{statistics.mean(loads):>7.0f}{statistics.mean(wait):>10.1f} s ({max(wait):.1f})"
        )
    print(
        f"{'bound':<14}{statistics.mean(bounds):>13.3f}  "
        "jobs/s: total capacity / mean job work (no model load ever)"
    )


if __name__ == "__main__":
    main()
