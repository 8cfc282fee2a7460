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
request-balancer clients show), then per user.
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
from pathlib import Path
from typing import Any

import httpx
import websockets

SIZES = (64, 128, 256)
STEPS = (5, 10, 20)
MODELS = ("mock", "second")
RATES = {"heavy": 1.0, "medium": 0.4, "u1": 0.15, "u2": 0.15, "u3": 0.15}
"""Jobs per second each user submits (about 90% of one worker's capacity in all)."""
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


def _shape(rng: random.Random) -> dict[str, Any]:
    side = rng.choice(SIZES)
    return {"width": side, "height": side, "steps": rng.choice(STEPS),
            "model": rng.choice(MODELS)}  # fmt: skip


async def _run(
    url: str,
    schedule: list[tuple[float, dict[str, Any]]],
    after: list[tuple[float, float]] | None = None,
) -> list[tuple[dict[str, Any], float, float]]:
    """Submit each body at its offset (seconds from now); (202 view, seconds until
    succeeded, offset) for each. With ``after``: also each job's ETA read once every job
    is in, and its real time."""
    done: dict[str, float] = {}
    submitted: dict[str, float] = {}
    ws_url = url.replace("http", "ws") + "/v1/events"
    views: list[tuple[dict[str, Any], float]] = []
    async with websockets.connect(ws_url, max_size=None) as ws, httpx.AsyncClient() as http:

        async def listen() -> None:
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "succeeded":
                    done[event["job_id"]] = event["at"]
                elif event["type"] == "failed":
                    raise RuntimeError(f"job failed: {event}")

        listener = asyncio.create_task(listen())
        began = time.monotonic()
        for offset, body in schedule:
            await asyncio.sleep(max(began + offset - time.monotonic(), 0.0))
            response = await http.post(f"{url}/v1/jobs", json={"prompt": "bench", **body})
            response.raise_for_status()
            view = {**response.json(), "user": body["user_id"]}
            submitted[view["id"]] = time.time()
            views.append((view, offset))
        ids = {view["id"] for view, _ in views}
        later: dict[str, tuple[float, float]] = {}
        if after is not None:
            for view, _ in views:
                now = time.time()
                seen = (await http.get(f"{url}/v1/jobs/{view['id']}")).json()
                if seen["state"] == "queued" and seen.get("eta_seconds") is not None:
                    later[view["id"]] = (seen["eta_seconds"], now)
        while not ids <= done.keys():
            if listener.done():
                listener.result()
            await asyncio.sleep(0.05)
        listener.cancel()
    if after is not None:
        after.extend((eta, done[job_id] - at) for job_id, (eta, at) in later.items())
    return [(view, done[view["id"]] - submitted[view["id"]], offset) for view, offset in views]


def _errors(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    errors = sorted(abs(eta - real) / real for eta, real in pairs)
    return (statistics.median(errors), statistics.quantiles(errors, n=10)[-1], errors[-1])


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
    parser.add_argument("--burst", action="store_true", help="every job at once instead")
    parser.add_argument("--jobs", type=int, default=60, help="jobs in the burst")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    data = Path(tempfile.mkdtemp(prefix="easel-eta-"))
    port = _free_port()
    env = {**os.environ, **COST, "EASEL_MAX_USER_QUEUE_SIZE": "1000"}
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
        average = max(real for _, real, _ in warm) / len(warm)
        # arrivals go on past the scored ones, so that nothing scored waits in a queue
        # that suddenly stops filling
        end = args.seconds + TAIL
        schedule = _burst(rng, args.jobs) if args.burst else _arrivals(rng, end, args.poisson)
        after: list[tuple[float, float]] = []
        results = await _run(url, schedule, after if args.burst else None)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(data, ignore_errors=True)

    lead_in = 0.0 if args.burst else args.lead_in
    scored = [(view, real) for view, real, offset in results
              if lead_in <= offset <= args.seconds]  # fmt: skip
    if args.burst:
        print(f"a burst of {args.jobs} jobs from 6 users (one heavy, 1 in 15 premium), "
              f"{args.workers} worker(s)")  # fmt: skip
    else:
        rates = ", ".join(f"{user} {rate}/s" for user, rate in RATES.items())
        kind = "Poisson arrivals" if args.poisson else "steady rates (gaps +-20%)"
        print(f"{len(results)} jobs, {kind} per user ({rates}; 1 in 15 premium); scored: "
              f"the {len(scored)} submitted from {args.lead_in:.0f} s to {args.seconds:.0f} s; "
              f"{args.workers} worker(s)")  # fmt: skip
    print(f"sizes {SIZES}, steps {STEPS}, models {MODELS}; realistic mock "
          f"{COST['EASEL_MOCK_SECONDS_PER_MEGAPIXEL_STEP']} s/step/MP, "
          f"{COST['EASEL_MOCK_OVERHEAD_SECONDS']} s per call, "
          f"{COST['EASEL_MOCK_LOAD_SECONDS']} s per model load")  # fmt: skip
    easel = [(view["eta_seconds"], real) for view, real in scored if view.get("eta_seconds")]
    naive = [(((view["position"] or 0) + 1) * average / args.workers, real)
             for view, real in scored]  # fmt: skip
    rows = [("easel (fair-queue projection)", easel), ("naive (position x average)", naive)]
    if args.burst:
        rows.append(("easel, read after the burst", after))
    print(f"{'ETA at submit':<34} {'p50 error':>9} {'p90 error':>9} {'max':>7}  jobs with ETA")
    for label, pairs in rows:
        p50, p90, worst = _errors(pairs)
        print(f"{label:<34} {p50:>9.1%} {p90:>9.1%} {worst:>7.0%}  {len(pairs)}/{len(scored)}")
    bias = statistics.median((eta - real) / real for eta, real in easel)
    print(f"median signed error of easel's ETA at submit: {bias:+.1%}")
    for user in sorted({view["user"] for view, _ in scored}):
        mine = [(view["eta_seconds"], real) for view, real in scored
                if view["user"] == user and view.get("eta_seconds")]  # fmt: skip
        if len(mine) >= 2:
            p50, p90, _ = _errors(mine)
            mean = statistics.mean(real for _, real in mine)
            print(f"  {user:<8} {len(mine):>3} jobs, mean {mean:5.2f} s: "
                  f"p50 {p50:.1%}, p90 {p90:.1%}")  # fmt: skip
    ranged = [(view, real) for view, real in scored if view.get("eta_low_seconds") is not None]
    within = sum(1 for view, real in ranged
                 if view["eta_low_seconds"] <= real <= view["eta_high_seconds"])  # fmt: skip
    below = sum(1 for view, real in ranged if real < view["eta_low_seconds"])
    print(f"actual time within easel's p10-p90 range at submit: {within}/{len(scored)} "
          f"(below it {below}, above it {len(ranged) - within - below})")  # fmt: skip


def _burst(rng: random.Random, jobs: int) -> list[tuple[float, dict[str, Any]]]:
    """Every job at once, from one heavy user and five light ones."""
    users = ["heavy"] * 4 + ["u1", "u2", "u3", "u4", "u5"]
    schedule = []
    for i in range(jobs):
        body = {**_shape(rng), "user_id": rng.choice(users)}
        if i % 15 == 14:
            body["premium"] = True
        schedule.append((0.0, body))
    return schedule


def _arrivals(
    rng: random.Random, seconds: float, poisson: bool
) -> list[tuple[float, dict[str, Any]]]:
    """Each user submits at its own rate, 1 job in 15 premium: steadily (a bot, a batch
    script: each gap its mean +-20%) or as a Poisson stream."""
    schedule = []
    for user, rate in RATES.items():
        at = rng.expovariate(rate)
        while at < seconds:
            body = {**_shape(rng), "user_id": user}
            if rng.random() < 1 / 15:
                body["premium"] = True
            schedule.append((at, body))
            at += rng.expovariate(rate) if poisson else rng.uniform(0.8, 1.2) / rate
    return sorted(schedule, key=lambda item: item[0])


if __name__ == "__main__":
    asyncio.run(main())
