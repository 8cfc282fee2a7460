"""ETA at submit vs the time a job really took, easel's projection vs the naive estimate.

    python benchmarks/eta.py [--poisson | --burst] [--seconds 120] [--workers 1]

Starts ``easel serve`` with the realistic mock (seconds per step per megapixel, a fixed
overhead per call, a model load when the model changes) serving two models, warms it with
3 jobs of every shape, then five users submit at their own rates (``RATES``: one heavy,
one medium, three light; about 90% of the worker's capacity; 1 job in 15 premium) mixed
sizes, step counts and models: steadily (each gap its mean +-20%, a bot or a script), or
as Poisson streams (``--poisson``), or all at once (``--burst``). The jobs submitted in the
first 30 s (while rates are learnt: ``MIN_SPAN``) are not scored; arrivals go on 30 s past the
scored ones. For each job: the ETA in its 202 against the time from the 202 to its
``succeeded`` event. Printed side by side: p50 / p90 / max relative error of easel's ETA
(the fair-queue projection over measured costs, with the arrivals the fair queue will let
ahead) and of the naive "position x average run time" estimate (what the
request-balancer clients show); then the end a client counting down easel's latest
``queued`` event expects halfway through the job's time; then the ETAs at submit split by
what nobody could know at submit (whether jobs submitted later ran first, and whether one
of them was premium); then per user.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets

SIZES = (64, 128, 256)
STEPS = (5, 10, 20)
MODELS = ("mock", "second")
RATES = {"heavy": 1.0, "medium": 0.4, "u1": 0.15, "u2": 0.15, "u3": 0.15}
"""Jobs per second each user submits (about 90% of one worker's capacity in all)."""
UPDATE_SECONDS = 0.1
"""How often the server re-projects the queue (each job's updates at least 3 of these
apart): 1 s by default, scaled like the runs, which are about 10 times shorter here than
a GPU's (0.2-1.3 s: 2-13 s)."""
TAIL = 30.0
"""Seconds of arrivals after the scored ones."""
COST = {  # the realistic mock
    "EASEL_MOCK_SECONDS_PER_MEGAPIXEL_STEP": "0.4",
    "EASEL_MOCK_OVERHEAD_SECONDS": "0.1",
    "EASEL_MOCK_LOAD_SECONDS": "0.4",
    "EASEL_MOCK_STEP_DELAY": "0.01",
    "EASEL_MOCK_MODELS": json.dumps(list(MODELS)),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _easel() -> str:
    return shutil.which("easel") or str(Path(sys.executable).with_name("easel"))


def shape(rng: random.Random) -> dict[str, Any]:
    side = rng.choice(SIZES)
    return {"width": side, "height": side, "steps": rng.choice(STEPS),
            "model": rng.choice(MODELS)}  # fmt: skip


@dataclass
class Outcome:
    """One job of a run, as its client saw it."""

    view: dict[str, Any]
    """The 202."""
    offset: float
    """Seconds from the start of the run to its submission."""
    submitted: float
    """When its 202 came back: the moment the ETA in it counts from."""
    started: float = 0.0
    finished: float = 0.0
    announced: list[tuple[float, float]] = field(default_factory=list)
    """(at, eta_seconds) of each ``queued`` event: the 202's ETA and every update."""

    @property
    def real(self) -> float:
        return self.finished - self.submitted

    @property
    def premium(self) -> bool:
        return bool(self.view["request"].get("premium"))


async def _run(
    url: str,
    schedule: list[tuple[float, dict[str, Any]]],
    after: list[tuple[float, float]] | None = None,
) -> list[Outcome]:
    """Submit each body at its offset (seconds from now) and follow every job's events
    until it succeeds. With ``after``: also each job's ETA read once every job is in, and
    its real time."""
    jobs: dict[str, Outcome] = {}
    early: dict[str, list[dict[str, Any]]] = {}  # events that came before their 202
    ws_url = url.replace("http", "ws") + "/v1/events"
    async with websockets.connect(ws_url, max_size=None) as ws, httpx.AsyncClient() as http:

        def record(job: Outcome, event: dict[str, Any]) -> None:
            if event["type"] == "queued" and event.get("eta_seconds") is not None:
                job.announced.append((event["at"], event["eta_seconds"]))
            elif event["type"] == "started" and not job.started:
                job.started = event["at"]
            elif event["type"] == "succeeded":
                job.finished = event["at"]
            elif event["type"] == "failed":
                raise RuntimeError(f"job failed: {event}")

        async def listen() -> None:
            while True:
                event = json.loads(await ws.recv())
                job = jobs.get(event["job_id"])
                if job is None:
                    early.setdefault(event["job_id"], []).append(event)
                else:
                    record(job, event)

        listener = asyncio.create_task(listen())
        began = time.monotonic()
        for offset, body in schedule:
            await asyncio.sleep(max(began + offset - time.monotonic(), 0.0))
            response = await http.post(f"{url}/v1/jobs", json={"prompt": "bench", **body})
            response.raise_for_status()
            submitted = time.time()  # the 202 is in: its ETA counts from now
            view = {**response.json(), "user": body["user_id"]}
            job = jobs[view["id"]] = Outcome(view, offset, submitted)
            for event in early.pop(view["id"], []):
                record(job, event)
        later: dict[str, tuple[float, float]] = {}
        if after is not None:
            for job_id in jobs:
                now = time.time()
                seen = (await http.get(f"{url}/v1/jobs/{job_id}")).json()
                if seen["state"] == "queued" and seen.get("eta_seconds") is not None:
                    later[job_id] = (seen["eta_seconds"], now)
        while not all(job.finished for job in jobs.values()):
            if listener.done():
                listener.result()
            await asyncio.sleep(0.05)
        listener.cancel()
    if after is not None:
        after.extend((eta, jobs[job_id].finished - at) for job_id, (eta, at) in later.items())
    return list(jobs.values())


def relative_errors(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    errors = sorted(abs(eta - real) / real for eta, real in pairs)
    return (
        statistics.median(errors),
        statistics.quantiles(errors, n=10, method="inclusive")[-1],
        errors[-1],
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=120.0, help="jobs submitted until then are scored"
    )
    parser.add_argument(
        "--poisson",
        action="store_true",
        help="Poisson arrivals (default: each user at its own steady rate, gaps +-20%%)",
    )
    parser.add_argument(
        "--lead-in",
        type=float,
        default=30.0,
        help="jobs submitted earlier are not scored (rates being learnt)",
    )
    parser.add_argument(
        "--load", type=float, default=1.0, help="every user's rate times this (1: ~90%% busy)"
    )
    parser.add_argument("--burst", action="store_true", help="every job at once instead")
    parser.add_argument("--jobs", type=int, default=60, help="jobs in the burst")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    data = Path(tempfile.mkdtemp(prefix="easel-eta-"))
    port = _free_port()
    env = {**os.environ, **COST, "EASEL_MAX_USER_QUEUE_SIZE": "1000",
           "EASEL_ETA_UPDATE_SECONDS": str(UPDATE_SECONDS)}  # fmt: skip
    server = subprocess.Popen(
        [_easel(), "serve", "--port", str(port), "--data-dir", str(data),
         "--concurrency", str(args.workers)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
        # model by model, as a deployment sees them: each model's first run loads it (a
        # cold run), the others are warm, so loads and runs can be told apart
        shapes = [{"width": s, "height": s, "steps": n, "model": m}
                  for m in MODELS for s in SIZES for n in STEPS]  # fmt: skip
        warm = await _run(url, [(0.0, {**shape, "user_id": "warm"}) for shape in shapes * 3])
        # naive: one average run time for all, from the warm-up's throughput
        average = max(job.real for job in warm) / len(warm)
        # arrivals go on past the scored ones, so that nothing scored waits in a queue
        # that suddenly stops filling
        end = args.seconds + TAIL
        schedule = (
            burst(rng, args.jobs) if args.burst else workload(rng, end, args.poisson, args.load)
        )
        after: list[tuple[float, float]] = []
        results = await _run(url, schedule, after if args.burst else None)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(data, ignore_errors=True)

    lead_in = 0.0 if args.burst else args.lead_in
    scored = [job for job in results if lead_in <= job.offset <= args.seconds]
    if args.burst:
        print(f"a burst of {args.jobs} jobs from 6 users (one heavy, 1 in 15 premium), "
              f"{args.workers} worker(s)")  # fmt: skip
    else:
        rates = ", ".join(f"{user} {round(rate * args.load, 4)}/s" for user, rate in RATES.items())
        kind = "Poisson arrivals" if args.poisson else "steady rates (gaps +-20%)"
        print(f"{len(results)} jobs, {kind} per user ({rates}; 1 in 15 premium); scored: "
              f"the {len(scored)} submitted from {args.lead_in:.0f} s to {args.seconds:.0f} s; "
              f"{args.workers} worker(s)")  # fmt: skip
    print(f"sizes {SIZES}, steps {STEPS}, models {MODELS}; realistic mock "
          f"{COST['EASEL_MOCK_SECONDS_PER_MEGAPIXEL_STEP']} s/step/MP, "
          f"{COST['EASEL_MOCK_OVERHEAD_SECONDS']} s per call, "
          f"{COST['EASEL_MOCK_LOAD_SECONDS']} s per model load")  # fmt: skip
    with_eta = [job for job in scored if job.view.get("eta_seconds")]
    overtaken = {job.view["id"]: overtaken_by(job, results) for job in with_eta}

    def easel(jobs: list[Outcome]) -> list[tuple[float, float]]:
        return [(job.view["eta_seconds"], job.real) for job in jobs]

    naive = [(((job.view["position"] or 0) + 1) * average / args.workers, job.real)
             for job in scored]  # fmt: skip
    rows: list[tuple[str, list[tuple[float, float]] | None]] = [
        ("easel (fair-queue projection)", easel(with_eta)),
        ("naive (position x average)", naive),
    ]
    if args.burst:
        rows.append(("easel, read after the burst", after))
    rows += [
        ("easel, counting down, at half-time", [_halfway(job) for job in with_eta]),
        ("easel at submit, by what came later:", None),
        *((f"  {label}", easel([job for job in with_eta if overtaken[job.view["id"]] == kind]))
          for kind, label in OVERTAKEN.items()),
    ]  # fmt: skip
    print(f"{'ETA':<36} {'p50 error':>9} {'p90 error':>9} {'max':>7}  jobs")
    for label, pairs in rows:
        if pairs is None or len(pairs) < 2:
            print(label if pairs is None else f"{label:<36} {len(pairs)}/{len(scored)}")
            continue
        p50, p90, worst = relative_errors(pairs)
        print(f"{label:<36} {p50:>9.1%} {p90:>9.1%} {worst:>7.0%}  {len(pairs)}/{len(scored)}")
    bias = statistics.median((job.view["eta_seconds"] - job.real) / job.real for job in with_eta)
    print(f"median signed error of easel's ETA at submit: {bias:+.1%}")
    for user in sorted({job.view["user"] for job in scored}):
        mine = [job for job in with_eta if job.view["user"] == user]
        if len(mine) >= 2:
            p50, p90, _ = relative_errors(easel(mine))
            mean = statistics.mean(job.real for job in mine)
            print(f"  {user:<8} {len(mine):>3} jobs, mean {mean:5.2f} s: "
                  f"p50 {p50:.1%}, p90 {p90:.1%}")  # fmt: skip
    ranged = [job for job in scored if job.view.get("eta_low_seconds") is not None]
    within = sum(
        1
        for job in ranged
        if job.view["eta_low_seconds"] <= job.real <= job.view["eta_high_seconds"]
    )
    below = sum(1 for job in ranged if job.real < job.view["eta_low_seconds"])
    print(f"actual time within easel's p10-p90 range at submit: {within}/{len(scored)} "
          f"(below it {below}, above it {len(ranged) - within - below})")  # fmt: skip


OVERTAKEN = {
    "": "nothing submitted later ran first",
    "standard": "later standard jobs ran first",
    "premium": "a later premium job ran first",
}


def overtaken_by(job: Outcome, jobs: list[Outcome]) -> str:
    """What, submitted after ``job``, started before it (a key of ``OVERTAKEN``): what
    no ETA at submit can know of (whether and when such jobs come, their shapes and
    models, whether they are premium)."""
    later = [o for o in jobs if o.submitted > job.submitted and o.started < job.started]
    return "premium" if any(o.premium for o in later) else "standard" if later else ""


def _halfway(job: Outcome) -> tuple[float, float]:
    """(ETA, real) as a client counting down the latest ``queued`` event it had halfway
    through the job's time sees them: that event said the job ends at ``at + eta``; both
    counted from the submission, so the error is a share of the job's time, as at submit."""
    halfway = job.submitted + job.real / 2
    said = [(at, eta) for at, eta in job.announced if at <= halfway] or job.announced[:1]
    at, eta = said[-1]
    return at + eta - job.submitted, job.real


def burst(rng: random.Random, jobs: int) -> list[tuple[float, dict[str, Any]]]:
    """Every job at once, from one heavy user and five light ones."""
    users = ["heavy"] * 4 + ["u1", "u2", "u3", "u4", "u5"]
    schedule = []
    for i in range(jobs):
        body = {**shape(rng), "user_id": rng.choice(users)}
        if i % 15 == 14:
            body["premium"] = True
        schedule.append((0.0, body))
    return schedule


def workload(
    rng: random.Random, seconds: float, poisson: bool, load: float = 1.0
) -> list[tuple[float, dict[str, Any]]]:
    """Each user submits at its own rate (``RATES`` times ``load``), 1 job in 15 premium:
    steadily (a bot, a batch script: each gap its mean +-20%) or as a Poisson stream."""
    schedule = []
    for user, rate in RATES.items():
        first = rng.expovariate(rate * load)
        schedule += submissions(rng, user, rate * load, first, seconds, poisson)
    return sorted(schedule, key=lambda item: item[0])


def submissions(
    rng: random.Random, user: str, rate: float, first: float, until: float, poisson: bool
) -> list[tuple[float, dict[str, Any]]]:
    """One user's submissions from ``first`` until ``until``: each job a random shape,
    premium 1 time in 15, the next one a gap later (``workload``'s law, and the one
    ``eta_bound.py``'s oracle continues)."""
    out, at = [], first
    while at < until:
        body = {**shape(rng), "user_id": user}
        if rng.random() < 1 / 15:
            body["premium"] = True
        out.append((at, body))
        at += rng.expovariate(rate) if poisson else rng.uniform(0.8, 1.2) / rate
    return out


if __name__ == "__main__":
    asyncio.run(main())
