"""The drawthings backend against a real engine: a second ``easel serve`` process serving
Draw Things' gRPC ``ImageGenerationService`` on loopback (``--grpc-port``)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from easel.backends import registry
from easel.errors import Unsupported
from easel.jobs import GenerationRequest, JobState
from tests.engines import cancel_on, eventually, progress_of, run_job, runtime_with
from tests.servers import Process, free_port


@pytest.fixture
def peer(engine_peer: tuple[Process, str]) -> tuple[Process, str]:
    """The engine: the session's peer easel (tests/conftest.py), by its gRPC port."""
    return engine_peer


def peer_jobs(peer: Process, user: str) -> list[dict[str, object]]:
    jobs: list[dict[str, object]] = httpx.get(
        f"{peer.url}/v1/jobs", params={"user_id": user}
    ).json()["jobs"]
    return jobs


async def test_a_job_goes_through_with_progress_and_previews(
    peer: tuple[Process, str], tmp_path: Path
) -> None:
    process, address = peer
    backend = registry.create("drawthings", name="dt", address=address)
    async with runtime_with(tmp_path, backend) as runtime:
        assert [m.name for m in backend.models()] == ["mock"]  # from Echo
        request = GenerationRequest(
            prompt="a fox", width=128, height=64, steps=12, scheduler="UniPC ays", user_id="dana"
        )
        job, events = await run_job(runtime, request)
    assert job.state is JobState.succeeded, job.error
    progress = progress_of(events)
    assert [e.step for e in progress][-1] == 12 and all(e.total == 12 for e in progress)
    assert any(e.preview for e in progress)
    assert (job.images[0].width, job.images[0].height) == (128, 64)
    [remote] = peer_jobs(process, "dana")
    assert remote["request"]["seed"] == job.request.seed  # type: ignore[index]
    assert remote["request"]["scheduler"] == "UniPC AYS"  # type: ignore[index]


async def test_cancelling_cancels_the_call_and_the_engine_s_job(
    peer: tuple[Process, str], tmp_path: Path
) -> None:
    process, address = peer
    backend = registry.create("drawthings", name="dt", address=address)
    async with runtime_with(tmp_path, backend) as runtime:
        request = GenerationRequest(prompt="stop", width=64, height=64, steps=150, user_id="eve")
        job, _ = await run_job(runtime, request, on_event=cancel_on(runtime))
    assert job.state is JobState.cancelled

    async def engine_cancelled() -> bool:
        return [j["state"] for j in peer_jobs(process, "eve")] == ["cancelled"]

    await eventually(engine_cancelled)


async def test_sizes_and_samplers_draw_things_cannot_run_are_refused_at_admission(
    peer: tuple[Process, str], tmp_path: Path
) -> None:
    backend = registry.create("drawthings", name="dt", address=peer[1])
    async with runtime_with(tmp_path, backend) as runtime:
        with pytest.raises(Unsupported, match="multiple of 64"):
            await runtime.submit(GenerationRequest(prompt="x", width=72, height=64))
        with pytest.raises(Unsupported, match="no sampler 'Heun'"):
            await runtime.submit(
                GenerationRequest(prompt="x", width=64, height=64, scheduler="Heun")
            )


async def test_a_dead_server_is_backend_unavailable(tmp_path: Path) -> None:
    backend = registry.create("drawthings", name="dt", address=f"127.0.0.1:{free_port()}")
    async with runtime_with(tmp_path, backend) as runtime:
        job, _ = await run_job(runtime, GenerationRequest(prompt="x", width=64, height=64))
    assert job.state is JobState.failed and job.error is not None
    assert job.error.code == "backend_unavailable" and job.attempts == 2
