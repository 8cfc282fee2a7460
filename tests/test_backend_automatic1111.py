"""The automatic1111 backend against a real engine: a second ``easel serve`` process
speaking its Automatic1111 API (``/sdapi/v1``, ``/internal/progress``) on loopback."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from easel.backends import registry
from easel.errors import BackendUnavailable, InvalidRequest
from easel.jobs import EventType, GenerationRequest, JobState
from tests.engines import cancel_on, eventually, progress_of, run_job, runtime_with
from tests.servers import Process, free_port


@pytest.fixture
def peer(engine_peer: tuple[Process, str]) -> Process:
    """The engine: the session's peer easel (tests/conftest.py), by its A1111 API."""
    return engine_peer[0]


def peer_jobs(peer: Process, user: str) -> list[dict[str, object]]:
    jobs: list[dict[str, object]] = httpx.get(
        f"{peer.url}/v1/jobs", params={"user_id": user}
    ).json()["jobs"]
    return jobs


async def test_a_job_goes_through_with_progress_and_previews(peer: Process, tmp_path: Path) -> None:
    backend = registry.create("automatic1111", name="a1111", url=peer.url, poll_seconds=0.05)
    async with runtime_with(tmp_path, backend) as runtime:
        assert [m.name for m in backend.models()] == ["mock"]
        assert backend.models()[0].loaded
        request = GenerationRequest(prompt="a fox", width=64, height=64, steps=30, user_id="ann")
        job, events = await run_job(runtime, request)
    assert job.state is JobState.succeeded, job.error
    assert job.backend == "a1111"
    progress = progress_of(events)
    assert progress and all(e.total == 30 for e in progress)
    assert [e.step for e in progress] == sorted(e.step or 0 for e in progress)
    assert any(e.preview for e in progress)
    assert (job.images[0].width, job.images[0].height) == (64, 64)
    [remote] = peer_jobs(peer, "ann")  # the engine ran it for the same user, same seed
    assert remote["request"]["seed"] == job.request.seed == job.images[0].seed  # type: ignore[index]


async def test_a_raw_payload_goes_unchanged_but_for_the_seed(peer: Process, tmp_path: Path) -> None:
    backend = registry.create("automatic1111", name="a1111", url=peer.url)
    payload = {
        "prompt": "a raw payload",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 72,
        "steps": 3,
        "seed": -1,
        "sampler_name": "Euler a",
        "batch_size": 2,
    }
    async with runtime_with(tmp_path, backend) as runtime:
        request = GenerationRequest.model_validate(
            {"executor": "automatic1111", "payload": payload, "user_id": "raw"}
        )
        assert (request.prompt, request.height, request.batch_size) == ("a raw payload", 72, 2)
        job, _ = await run_job(runtime, request)
        with pytest.raises(InvalidRequest, match="steps is 999"):
            await runtime.submit(
                GenerationRequest.model_validate(
                    {"executor": "automatic1111", "payload": {**payload, "steps": 999}}
                )
            )
    assert job.state is JobState.succeeded, job.error
    assert job.request.seed is not None and job.request.payload == payload
    [remote] = peer_jobs(peer, "raw")
    sent = remote["request"]
    assert sent["seed"] == job.request.seed  # type: ignore[index]
    assert sent["negative_prompt"] == "blurry" and sent["scheduler"] == "Euler a"  # type: ignore[index]
    assert [i.seed for i in job.images] == [job.request.seed, job.request.seed + 1]


async def test_cancelling_a_running_job_interrupts_the_engine(
    peer: Process, tmp_path: Path
) -> None:
    backend = registry.create("automatic1111", name="a1111", url=peer.url, poll_seconds=0.05)
    async with runtime_with(tmp_path, backend) as runtime:
        request = GenerationRequest(prompt="stop me", width=64, height=64, steps=150, user_id="bob")
        job, _ = await run_job(runtime, request, on_event=cancel_on(runtime))
    assert job.state is JobState.cancelled
    assert not job.images

    async def engine_cancelled() -> bool:
        return [j["state"] for j in peer_jobs(peer, "bob")] == ["cancelled"]

    await eventually(engine_cancelled)


async def test_a_dead_engine_is_backend_unavailable_after_retries(tmp_path: Path) -> None:
    backend = registry.create("automatic1111", name="gone", url=f"http://127.0.0.1:{free_port()}")
    async with runtime_with(tmp_path, backend) as runtime:
        job, events = await run_job(
            runtime, GenerationRequest(prompt="anyone?", width=64, height=64)
        )
    assert job.state is JobState.failed
    assert job.error is not None and job.error.code == "backend_unavailable"
    assert "unreachable" in job.error.message
    assert job.attempts == 2
    assert [e.type for e in events].count(EventType.started) == 2


async def test_the_engine_s_own_refusal_reaches_the_job(peer: Process, tmp_path: Path) -> None:
    backend = registry.create("automatic1111", name="a1111", url=peer.url, models=["elsewhere"])
    async with runtime_with(tmp_path, backend) as runtime:
        request = GenerationRequest(prompt="x", width=64, height=64, steps=2, model="elsewhere")
        job, _ = await run_job(runtime, request)
    assert job.state is JobState.failed and job.error is not None
    assert job.error.code == "engine_error"
    assert "not served here" in job.error.message and "elsewhere" in job.error.message


async def test_basic_auth_comes_from_the_env_and_health_checks_the_engine(
    peer: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """easel takes the Basic user name as the A1111 caller: the engine saw the credentials."""
    monkeypatch.setenv("A1111_PASSWORD", "s3cret-s3cret")
    backend = registry.create(
        "automatic1111", name="a1111", url=peer.url, username="webui",
        password_env="A1111_PASSWORD", user_header=False,
    )  # fmt: skip
    assert "s3cret" not in repr(backend)
    async with runtime_with(tmp_path, backend) as runtime:
        await backend.health()
        job, _ = await run_job(
            runtime, GenerationRequest(prompt="auth", width=64, height=64, steps=2)
        )
    assert job.state is JobState.succeeded, job.error
    assert len(peer_jobs(peer, "webui")) == 1
    dead = registry.create("automatic1111", url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackendUnavailable):
        await dead.health()


async def test_a_dead_engine_s_job_moves_to_another_backend_with_fallback(
    tmp_path: Path,
) -> None:
    dead = registry.create("automatic1111", name="gone", url=f"http://127.0.0.1:{free_port()}")
    alive = registry.create("mock", name="local")
    async with runtime_with(tmp_path, dead, alive, max_attempts=3) as runtime:
        request = GenerationRequest(
            prompt="anywhere", width=64, height=64, steps=2, backend="gone", fallback=True
        )
        job, _ = await run_job(runtime, request)
    assert job.state is JobState.succeeded, job.error
    assert job.backend == "local"
    first, *_, last = job.runs
    assert first.backend == "gone" and first.error is not None
    assert first.error.code == "backend_unavailable"
    assert last.backend == "local" and last.error is None
