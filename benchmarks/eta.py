"""ETA at submit vs the time a job really took, easel's projection vs the naive estimate.

    python benchmarks/eta.py [--jobs 60] [--workers 1]

Starts ``easel serve`` with the realistic mock (seconds per step per megapixel, a fixed
overhead per call, a model load when the model changes) serving two models, warms it with
3 jobs of every shape, then submits a burst from 6 users (one heavy, 1 job in 15 premium)
of mixed sizes, step counts and models. For each job: the ETA in its 202 against the time
from the 202 to its ``succeeded`` event. Printed side by side: p50 / p90 / max relative
error of easel's ETA (the fair-queue projection over measured costs) and of the naive
"position x average run time" estimate (what the request-balancer clients show).
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
    url: str, bodies: list[dict[str, Any]], after: list[tuple[float, float]] | None = None
) -> list[tuple[dict[str, Any], float]]:
    """Submit every body at once; (202 view, seconds until succeeded) for each. With
    ``after``: also each job's ETA read once the whole burst is in, and its real time."""
    done: dict[str, float] = {}
    submitted: dict[str, float] = {}
    ws_url = url.replace("http", "ws") + "/v1/events"
    async with websockets.connect(ws_url, max_size=None) as ws, httpx.AsyncClient() as http:
        views = []
        for body in bodies:
            response = await http.post(f"{url}/v1/jobs", json={"prompt": "bench", **body})
            response.raise_for_status()
            view = response.json()
            submitted[view["id"]] = time.time()
            views.append(view)
        ids = {view["id"] for view in views}
        later: dict[str, tuple[float, float]] = {}
        if after is not None:
            for view in views:
                now = time.time()
                seen = (await http.get(f"{url}/v1/jobs/{view['id']}")).json()
                if seen["state"] == "queued" and seen.get("eta_seconds") is not None:
                    later[view["id"]] = (seen["eta_seconds"], now)
        while not ids <= done.keys():
            event = json.loads(await ws.recv())
            if event["type"] == "succeeded":
                done[event["job_id"]] = event["at"]
            elif event["type"] == "failed" and event["job_id"] in ids:
                raise RuntimeError(f"job failed: {event}")
    if after is not None:
        after.extend((eta, done[job_id] - at) for job_id, (eta, at) in later.items())
    return [(view, done[view["id"]] - submitted[view["id"]]) for view in views]


def _errors(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    errors = sorted(abs(eta - real) / real for eta, real in pairs)
    return (statistics.median(errors), statistics.quantiles(errors, n=10)[-1], errors[-1])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=60)
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
        warm = await _run(url, [{**shape, "user_id": "warm"} for shape in shapes * 3])
        # naive: one average run time for all, from the warm-up's throughput
        average = max(real for _, real in warm) / len(warm)

        users = ["heavy"] * 4 + ["u1", "u2", "u3", "u4", "u5"]
        bodies = []
        for i in range(args.jobs):
            body = {**_shape(rng), "user_id": rng.choice(users)}
            if i % 15 == 14:
                body["premium"] = True
            bodies.append(body)
        after_burst: list[tuple[float, float]] = []
        results = await _run(url, bodies, after_burst)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(data, ignore_errors=True)

    easel = [(view["eta_seconds"], real) for view, real in results if view["eta_seconds"]]
    naive = [((view["position"] + 1) * average / args.workers, real) for view, real in results]
    print(f"{args.jobs} jobs from 6 users (1 in 15 premium), sizes {SIZES}, steps {STEPS}, "
          f"models {MODELS}, {args.workers} worker(s); realistic mock "
          f"{COST['EASEL_MOCK_SECONDS_PER_MEGAPIXEL_STEP']} s/step/MP, "
          f"{COST['EASEL_MOCK_LOAD_SECONDS']} s per model load")  # fmt: skip
    print(f"{'ETA at submit':<34} {'p50 error':>9} {'p90 error':>9} {'max':>7}  jobs with ETA")
    for label, pairs in (("easel (fair-queue projection)", easel),
                         ("naive (position x average)", naive),
                         ("easel, read after the burst", after_burst)):  # fmt: skip
        p50, p90, worst = _errors(pairs)
        print(f"{label:<34} {p50:>9.1%} {p90:>9.1%} {worst:>7.0%}  {len(pairs)}/{len(results)}")
    ranged = [(view, real) for view, real in results if view.get("eta_low_seconds") is not None]
    within = sum(1 for view, real in ranged
                 if view["eta_low_seconds"] <= real <= view["eta_high_seconds"])  # fmt: skip
    loose = sum(1 for view, real in ranged
                if view["eta_low_seconds"] * 0.95 <= real
                <= view["eta_high_seconds"] * 1.05)  # fmt: skip
    bias = statistics.median((eta - real) / real for eta, real in after_burst)
    print(f"median signed error of easel's ETA read after the burst: {bias:+.1%}")
    below = sum(1 for view, real in ranged if real < view["eta_low_seconds"])
    print(f"actual time within easel's p10-p90 range at submit: {within}/{len(results)} "
          f"(below it {below}, above it {len(ranged) - within - below}; "
          f"within it +-5%: {loose}/{len(results)})")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
