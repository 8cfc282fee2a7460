"""Duty cycle of a simulated GPU behind easel's worker, event-loop lag, memory held.

    python benchmarks/duty_cycle.py [--jobs 20] [--quick]

A "GPU" that computes for T seconds (a sleep in a thread: a CUDA call releases the GIL
the same way) and returns a photo-like image (gradients plus noise, which compresses like
a photo, not like a flat placeholder). With N jobs queued, the duty cycle is N x T over the
wall time from the first ``started`` to the last ``succeeded``: 100% means the GPU never
waited for easel. Printed side by side: results finished in line (``results_depth = 0``,
easel before pipelining) and pipelined (the default, 2), for 512 and 1024 px, T = 0.3 s
and 1.0 s, PNG / WebP / JPEG; with each run's event-loop lag p99 (a 5 ms ticker on the
loop: how late it wakes) and the peak resident memory above the run's start.

Then the loop under load: ``easel``'s ASGI app served by uvicorn on this loop, 4 workers
finishing 1024x1024 PNGs, 100 websocket subscribers (in another process, at nice 10: they
stand for clients elsewhere) following every event; the loop lag p99 and the events each
subscriber received. The load average is printed with the figures: on a shared machine
the lag is mostly other processes' CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from easel.backends.base import Backend, Capability, GenerationResult, ModelInfo, RunContext
from easel.config import OutputSettings, Settings
from easel.jobs import EventType, GenerationRequest, JobState
from easel.runtime.facade import Runtime


def photo_like(size: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus sensor-like noise: PNG/WebP work as hard as on a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack(
        [
            128 + 100 * np.sin(6 * x + 2 * y),
            128 + 90 * np.cos(5 * y - 3 * x * y),
            128 + 80 * np.sin(4 * (x + y)),
        ],
        axis=-1,
    )
    noisy = base + rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


class SimulatedGPU(Backend):
    """``compute`` seconds per call, off the loop and without the GIL; one image back."""

    name = "sim"
    capabilities = frozenset({Capability.txt2img, Capability.seed})

    def __init__(self, compute: float, size: int) -> None:
        self.compute = compute
        self.image = photo_like(size)
        self.busy = 0.0  # seconds spent "computing"

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name="sim", backend=self.name, family="sim", loaded=True)]

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        return await asyncio.to_thread(self._run, request, context)

    def _run(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        began = time.perf_counter()
        for step in range(1, request.steps + 1):
            time.sleep(self.compute / request.steps)
            context.progress(step, request.steps, None)
        image = self.image.copy()  # a fresh array per job, as a VAE decode makes one
        self.busy += time.perf_counter() - began
        return GenerationResult(images=[image], seeds=request.seeds, model="sim")


class LagMeter:
    """How late a 5 ms ticker wakes on this loop: the loop's responsiveness."""

    def __init__(self, tick: float = 0.005) -> None:
        self.tick = tick
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.tick)
            self.lags.append(time.perf_counter() - before - self.tick)

    def __enter__(self) -> LagMeter:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def p99_ms(self) -> float:
        if len(self.lags) < 2:
            return 0.0
        return statistics.quantiles(self.lags, n=100)[98] * 1000


class PeakMemory:
    """Peak resident memory above the level at start, sampled every 5 ms in a thread."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _settings(data: Path, depth: int, format: str, workers: int = 1) -> Settings:
    return Settings(
        data_dir=data,
        backend="mock",
        concurrency=workers,
        results_depth=depth,
        max_user_queue_size=1000,
        output=OutputSettings(format=format),  # type: ignore[arg-type]
    )


async def duty_cycle(
    size: int, compute: float, format: str, depth: int, jobs: int
) -> tuple[float, float, float]:
    """(duty cycle, loop lag p99 ms, peak extra MB) of one run."""
    with tempfile.TemporaryDirectory(prefix="easel-duty-") as tmp:
        gpu = SimulatedGPU(compute, size)
        runtime = Runtime(_settings(Path(tmp), depth, format), backends={"sim": gpu})
        await runtime.start(workers=False)
        request = GenerationRequest(
            prompt="a photo", width=size, height=size, steps=4, seed=1, user_id="bench"
        )
        ids = [(await runtime.submit(request.model_copy())).id for _ in range(jobs)]
        gc.collect()
        first_start: float | None = None
        with PeakMemory() as memory, LagMeter() as lag:
            async with runtime.bus.subscribe(types={EventType.started, EventType.succeeded}) as ev:
                runtime.start_workers()
                left = set(ids)
                async for event in ev:
                    if event.type is EventType.started and first_start is None:
                        first_start = time.perf_counter()
                    if event.type is EventType.succeeded:
                        left.discard(event.job_id)
                        if not left:
                            break
            wall = time.perf_counter() - (first_start or 0)
        jobs_done = [await runtime.store.get(job_id) for job_id in ids]
        await runtime.stop()
        if any(job.state is not JobState.succeeded for job in jobs_done):
            raise RuntimeError("a benchmark job did not succeed")
        return jobs * compute / wall, lag.p99_ms(), memory.extra_mb


CLIENT_NICE = 10
"""The subscribers stand for clients on other machines: here they share the server's two
cores, so they run at a lower priority, and their CPU is not taken from the server."""

SUBSCRIBERS = r"""
import asyncio, json, sys, websockets
async def follow(url, counts, i, ready):
    async with websockets.connect(url, max_size=None) as ws:
        ready.append(i)
        async for message in ws:
            counts[i] += 1
async def main(url, n):
    counts, ready = [0] * n, []
    tasks = [asyncio.create_task(follow(url, counts, i, ready)) for i in range(n)]
    while len(ready) < n:
        await asyncio.sleep(0.05)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.sleep(0.5)
    print(json.dumps(counts), flush=True)
    for task in tasks:
        task.cancel()
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def loop_under_load(
    depth: int, jobs: int, subscribers: int = 100
) -> tuple[float, float, float]:
    """(loop lag p99 ms, events per subscriber, the loop thread's CPU share) with 4
    workers and ``subscribers`` sockets. The CPU share tells the loop's own work apart
    from waiting for a core: lag with a small share is the machine's, not the loop's."""
    import uvicorn

    from easel.api import create_app
    from easel.api.limits import WebSocketProtocol

    with tempfile.TemporaryDirectory(prefix="easel-lag-") as tmp:
        gpu = SimulatedGPU(0.3, 1024)
        runtime = Runtime(_settings(Path(tmp), depth, "png", workers=4), backends={"sim": gpu})
        app = create_app(runtime=runtime)
        port = _free_port()
        config = uvicorn.Config(  # as ``easel serve`` runs it
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            ws=WebSocketProtocol,
            ws_per_message_deflate=False,
            access_log=False,
        )
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        followers = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SUBSCRIBERS,
                f"ws://127.0.0.1:{port}/v1/events",
                str(subscribers),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.nice(CLIENT_NICE),
        )
        assert followers.stdout is not None and followers.stdin is not None
        await asyncio.to_thread(followers.stdout.readline)  # "ready"
        request = GenerationRequest(
            prompt="a photo", width=1024, height=1024, steps=10, seed=1, user_id="bench"
        )
        cpu, wall = time.thread_time(), time.perf_counter()
        with LagMeter() as lag:
            async with runtime.bus.subscribe(types={EventType.succeeded}) as done:
                ids = {(await runtime.submit(request.model_copy())).id for _ in range(jobs)}
                async for event in done:
                    ids.discard(event.job_id)
                    if not ids:
                        break
        share = (time.thread_time() - cpu) / (time.perf_counter() - wall)
        followers.stdin.write("\n")
        followers.stdin.flush()
        counts = json.loads(await asyncio.to_thread(followers.stdout.readline))
        followers.wait()
        server.should_exit = True
        await serving
        return lag.p99_ms(), statistics.mean(counts), share


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="1024 px, T = 0.3 s, PNG only")
    parser.add_argument("--only", choices=("duty", "lag"), help="one of the two tables")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    print(f"load average at start: {_load()}")
    if args.only != "lag":
        await duty_table(args)
    if args.only != "duty":
        await lag_table(args)
    print(f"load average at end: {_load()}")


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


async def duty_table(args: argparse.Namespace) -> None:

    shapes = [(1024, 0.3)] if args.quick else [(512, 0.3), (1024, 0.3), (512, 1.0), (1024, 1.0)]
    formats = ["png"] if args.quick else ["png", "webp", "jpeg"]
    print(f"{args.jobs} jobs per run, 1 worker; duty cycle = jobs x T / wall time")
    print(
        f"{'image':>9} {'T':>5} {'format':>6}   {'in line':>8} {'pipelined':>9}"
        f"   {'not overlapped ms':>17} {'(in line)':>9}"
        f"   {'lag p99 ms':>10} {'(in line)':>9}   {'peak extra MB':>13} {'(in line)':>9}"
    )
    for size, compute in shapes:
        for format in formats:
            inline = await duty_cycle(size, compute, format, 0, args.jobs)
            piped = await duty_cycle(size, compute, format, 2, args.jobs)
            print(
                f"{size:>4}x{size:<4} {compute:>5.1f} {format:>6}   {inline[0]:>8.1%} "
                f"{piped[0]:>9.1%}   {_gap(compute, piped[0]):>17.0f} "
                f"{_gap(compute, inline[0]):>9.0f}   {piped[1]:>10.1f} {inline[1]:>9.1f}   "
                f"{piped[2]:>13.0f} {inline[2]:>9.0f}"
            )
    print()


def _gap(compute: float, duty: float) -> float:
    """Per-job time not overlapped with the backend, in ms: wall / jobs - T."""
    return (compute / duty - compute) * 1000


async def lag_table(args: argparse.Namespace) -> None:
    print("the loop under load: 4 workers, 1024x1024 PNG, T = 0.3 s, 100 websocket subscribers")
    print(
        f"{'results':>10}   {'lag p99 ms':>10}   {'events per subscriber':>21}"
        f"   {'loop thread CPU':>15}"
    )
    for depth, label in ((0, "in line"), (2, "pipelined")):
        p99, events, share = await loop_under_load(depth, jobs=max(args.jobs, 20))
        print(f"{label:>10}   {p99:>10.1f}   {events:>21.0f}   {share:>15.0%}")


if __name__ == "__main__":
    asyncio.run(main())
