"""Batched vs one-by-one: the same jobs through easel's queue, on the tiny pipeline.

    python benchmarks/batching.py [--jobs 16] [--steps 20] [--sizes 64 128 256]

Builds the tiny Stable-Diffusion pipeline (``easel.tiny``), then for each size queues the
same compatible jobs (same size, steps, scheduler; different prompts, users and seeds)
and runs them with one worker, first with ``batch_limit=1`` and then with
``batch_limit=4``: jobs per second each way and the ratio (target >= 1.3x). Every job
still gets its own events, seed and PNG; ``tests/test_diffusers_queue.py`` checks that a
batched image matches the same job run alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from easel.backends.diffusers.backend import DiffusersBackend
from easel.config import Settings
from easel.jobs import GenerationRequest, JobState
from easel.runtime.facade import Runtime
from easel.tiny import make_tiny_pipeline


async def run(
    backend: DiffusersBackend, data: Path, jobs: int, size: int, steps: int, batch_limit: int
) -> float:
    """Jobs per second, from the first claim to the last result on disk."""
    settings = Settings(data_dir=data, concurrency=0, batch_limit=batch_limit)
    runtime = Runtime(settings, backends={"diffusers": backend})
    await runtime.store.open()
    try:
        submitted = [
            await runtime.submit(
                GenerationRequest(
                    prompt=f"a red fox, take {i}",
                    width=size,
                    height=size,
                    steps=steps,
                    seed=i,
                    user_id=f"user{i % 8}",
                    max_user_queue_size=jobs,
                )
            )
            for i in range(jobs)
        ]
        worker = runtime.worker_for(backend)
        began = time.perf_counter()
        await worker.run(burst=True)
        seconds = time.perf_counter() - began
        for job in submitted:
            if (await runtime.store.get(job.id)).state is not JobState.succeeded:
                raise SystemExit(f"job {job.id} did not succeed")
        return jobs / seconds
    finally:
        await runtime.store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="easel-batching-"))
    model = make_tiny_pipeline(root / "tiny-sd")
    backend = DiffusersBackend(model=str(model), device="cpu")
    await backend.start()
    print(
        f"easel batching: {args.jobs} compatible jobs, {args.steps} steps, tiny SD pipeline, "
        f"one worker, {os.cpu_count()} CPUs"
    )
    try:
        for size in args.sizes:
            await run(backend, root / "warm", 4, size, 2, 4)  # warm the shapes up
            alone = await run(backend, root / f"a{size}", args.jobs, size, args.steps, 1)
            batched = await run(backend, root / f"b{size}", args.jobs, size, args.steps, 4)
            print(
                f"  {size}x{size}: one by one {alone:6.2f} jobs/s   batches of 4 "
                f"{batched:6.2f} jobs/s   ratio {batched / alone:.2f}x (target >= 1.3x)"
            )
    finally:
        await backend.close()


if __name__ == "__main__":
    asyncio.run(main())
