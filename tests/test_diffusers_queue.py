"""The queue with a real (tiny) diffusers pipeline: cancelling mid-run, batching."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from easel.backends.diffusers.backend import DiffusersBackend
from easel.backends.diffusers.backend import create as diffusers_backend
from easel.config import Settings
from easel.jobs import EventType, GenerationRequest, JobState
from easel.runtime.facade import Runtime


@pytest.fixture(scope="module")
async def backend(tiny_model_dir: Path) -> AsyncIterator[DiffusersBackend]:
    loaded = diffusers_backend(model=str(tiny_model_dir), device="cpu")
    await loaded.start()
    yield loaded
    await loaded.close()


def runtime(tmp_path: Path, backend: DiffusersBackend, batch_limit: int = 1) -> Runtime:
    """A runtime whose store the test opens; the shared backend is never closed by it."""
    settings = Settings(data_dir=tmp_path / "data", concurrency=0, batch_limit=batch_limit)
    return Runtime(settings, backends={"diffusers": backend})


def request(prompt: str, seed: int, steps: int = 4) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, width=64, height=64, steps=steps, seed=seed)


def pixels(rt: Runtime, path: str) -> np.ndarray:
    return np.asarray(Image.open(rt.storage.root / path), dtype=np.float64) / 255


async def test_cancelling_a_running_job_stops_within_one_step(
    tmp_path: Path, backend: DiffusersBackend
) -> None:
    rt = runtime(tmp_path, backend)
    await rt.store.open()
    try:
        job = await rt.submit(request("cancel me", seed=1, steps=30))
        worker = rt.worker_for(backend)
        steps: list[int] = []
        async with rt.bus.subscribe(job_id=job.id, after=0) as events:

            async def watch() -> None:
                async for event in events:
                    if event.type is EventType.progress:
                        steps.append(event.step or 0)
                        if event.step == 3:
                            await rt.cancel(job.id)
                    if event.type in {EventType.cancelled, EventType.succeeded}:
                        return

            watcher = asyncio.create_task(watch())
            await worker.run(burst=True)
            await asyncio.wait_for(watcher, 10)
        assert steps[:3] == [1, 2, 3] and max(steps) <= 4  # stopped at the next step
        final = await rt.store.get(job.id)
        assert final.state is JobState.cancelled and final.images == []
    finally:
        await rt.store.close()


async def test_a_batch_of_compatible_jobs_matches_the_jobs_run_alone(
    tmp_path: Path, backend: DiffusersBackend
) -> None:
    alone = runtime(tmp_path / "alone", backend, batch_limit=1)
    batched = runtime(tmp_path / "batched", backend, batch_limit=4)
    results = {}
    for name, rt in (("alone", alone), ("batched", batched)):
        await rt.store.open()
        try:
            jobs = [
                await rt.submit(
                    request(f"prompt {i}", seed=10 + i).model_copy(update={"user_id": f"u{i}"})
                )
                for i in range(4)
            ]
            worker = rt.worker_for(backend)
            await worker.run(burst=True)
            finals = [await rt.store.get(job.id) for job in jobs]
            assert all(f.state is JobState.succeeded for f in finals)
            results[name] = [pixels(rt, f.images[0].path) for f in finals]
        finally:
            await rt.store.close()
    for one, together in zip(results["alone"], results["batched"], strict=True):
        assert np.abs(one - together).mean() < 1 / 255
    assert np.abs(results["batched"][0] - results["batched"][1]).mean() > 4 / 255
