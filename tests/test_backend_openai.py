"""The openai backend against a real engine: a second ``easel serve`` process speaking the
OpenAI images API (``/v1/images/generations``, ``/v1/images/edits``) on loopback."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from easel.backends import registry
from easel.errors import InvalidRequest
from easel.jobs import Event, EventType, GenerationRequest, JobState
from tests.engines import eventually, progress_of, run_job, runtime_with
from tests.servers import Process, free_port

KEY = "sk-test-never-logged-0123456789"


@pytest.fixture
def peer(engine_peer: tuple[Process, str]) -> Process:
    """The engine: the session's peer easel (tests/conftest.py), by its OpenAI API; it
    refuses prompts with "forbidden"."""
    return engine_peer[0]


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ENGINE_KEY", KEY)
    return "ENGINE_KEY"


def peer_jobs(peer: Process, user: str) -> list[dict[str, object]]:
    jobs: list[dict[str, object]] = httpx.get(
        f"{peer.url}/v1/jobs", params={"user_id": user}
    ).json()["jobs"]
    return jobs


def red() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_generations_and_edits_go_through(
    peer: Process, tmp_path: Path, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = registry.create(
        "openai", name="oai", url=f"{peer.url}/v1", api_key_env=key, extensions=True,
        model_map={"house": "mock"},
    )  # fmt: skip
    caplog.set_level("DEBUG")
    async with runtime_with(tmp_path, backend) as runtime:
        request = GenerationRequest(
            prompt="a fox", width=64, height=64, steps=4, batch_size=2, model="house", user_id="o"
        )
        job, events = await run_job(runtime, request)
        edit = GenerationRequest(prompt="bluer", init_image=red(), width=64, height=64, steps=2)
        edited, _ = await run_job(runtime, edit)
    assert job.state is JobState.succeeded, job.error
    assert len(job.images) == 2 and progress_of(events)
    [remote] = peer_jobs(peer, "o")
    assert remote["request"]["seed"] == job.request.seed  # type: ignore[index]
    assert remote["request"]["model"] == "mock"  # type: ignore[index]
    assert edited.state is JobState.succeeded, edited.error
    assert KEY not in caplog.text and KEY not in repr(backend)


async def test_a_safety_refusal_is_permanent_with_the_engine_s_text(
    peer: Process, tmp_path: Path
) -> None:
    backend = registry.create("openai", name="oai", url=f"{peer.url}/v1")
    async with runtime_with(tmp_path, backend) as runtime:
        job, _events = await run_job(runtime, GenerationRequest(prompt="a forbidden fox"))
    assert job.state is JobState.failed and job.error is not None
    assert job.error.code == "engine_refused"
    assert "forbidden" in job.error.message and job.attempts == 1


async def test_cancelling_closes_the_call_and_the_engine_cancels(
    peer: Process, tmp_path: Path
) -> None:
    backend = registry.create("openai", name="oai", url=f"{peer.url}/v1", poll_seconds=0.05)
    async with runtime_with(tmp_path, backend) as runtime:

        async def cancel_when_started(event: Event) -> None:
            if event.type is EventType.started:

                async def running() -> bool:
                    return [j["state"] for j in peer_jobs(peer, "carl")] == ["running"]

                await eventually(running)
                await runtime.cancel(event.job_id)

        request = GenerationRequest(prompt="slow", width=64, height=64, steps=150, user_id="carl")
        job, _ = await run_job(runtime, request, on_event=cancel_when_started)
    assert job.state is JobState.cancelled

    async def engine_cancelled() -> bool:
        return [j["state"] for j in peer_jobs(peer, "carl")] == ["cancelled"]

    await eventually(engine_cancelled)


async def test_a_dead_engine_is_backend_unavailable(tmp_path: Path) -> None:
    backend = registry.create("openai", name="oai", url=f"http://127.0.0.1:{free_port()}/v1")
    async with runtime_with(tmp_path, backend) as runtime:
        job, _ = await run_job(runtime, GenerationRequest(prompt="x", width=64, height=64))
    assert job.state is JobState.failed and job.error is not None
    assert job.error.code == "backend_unavailable" and job.attempts == 2


def test_a_key_env_var_that_is_not_set_is_refused_at_once() -> None:
    with pytest.raises(InvalidRequest, match="NO_SUCH_KEY"):
        registry.create("openai", url="http://127.0.0.1:1/v1", api_key_env="NO_SUCH_KEY")
