"""The hosted backend (fal, Replicate, FusionBrain queue APIs) against loopback stand-ins
that follow their published protocols (tests/hosted_servers.py says what each follows)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from easel.backends import registry
from easel.backends.base import Backend
from easel.jobs import EventType, GenerationRequest, JobState
from tests import hosted_servers
from tests.engines import cancel_on, eventually, progress_of, run_job, runtime_with
from tests.servers import free_port, serve

KEY, SECRET = "hosted-key-0123456789", "hosted-secret-0123456789"
OPTIONS: dict[str, dict[str, Any]] = {
    "fal": {"app": "fal-ai/fast-sdxl"},
    "replicate": {"app": "stability-ai/sdxl"},
    "fusionbrain": {"pipeline_id": "kandinsky-3", "secret_env": "HOSTED_SECRET"},
}
AUTH = {
    "fal": {"authorization": f"Key {KEY}"},
    "replicate": {"authorization": f"Bearer {KEY}"},
    "fusionbrain": {"x-key": f"Key {KEY}", "x-secret": f"Secret {SECRET}"},
}


@pytest.fixture(params=["fal", "replicate", "fusionbrain"])
def service(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str, hosted_servers.Hosted]]:
    monkeypatch.setenv("HOSTED_KEY", KEY)
    monkeypatch.setenv("HOSTED_SECRET", SECRET)
    app = hosted_servers.create_app(request.param)
    with serve(app) as url:
        yield request.param, url, app.state.hosted


def hosted(service: str, url: str, **options: Any) -> Backend:
    return registry.create(
        "hosted", service=service, url=url, api_key_env="HOSTED_KEY", poll_seconds=0.02,
        poll_max_seconds=0.05, **OPTIONS[service], **options,
    )  # fmt: skip


async def test_a_job_goes_through(
    service: tuple[str, str, hosted_servers.Hosted], tmp_path: Path
) -> None:
    name, url, standin = service
    async with runtime_with(tmp_path, hosted(name, url)) as runtime:
        request = GenerationRequest(prompt="a fox", width=64, height=96, steps=8, batch_size=2)
        job, events = await run_job(runtime, request)
    assert job.state is JobState.succeeded, job.error
    assert [(i.width, i.height) for i in job.images] == [(64, 96), (64, 96)]
    steps = [e.step for e in progress_of(events)]
    assert steps[-1] == 8
    if name != "fusionbrain":  # fal and Replicate report steps in their logs
        assert len(steps) > 1
        [run] = standin.runs.values()
        assert run.seed == job.request.seed
    assert all(seen == AUTH[name] for seen in standin.auth)


async def test_cancelling_reaches_the_service(
    service: tuple[str, str, hosted_servers.Hosted], tmp_path: Path
) -> None:
    name, url, standin = service
    async with runtime_with(tmp_path, hosted(name, url)) as runtime:
        request = GenerationRequest(prompt="stop", width=64, height=64, steps=150)
        job, _ = await run_job(runtime, request, on_event=cancel_on(runtime, EventType.started))
    assert job.state is JobState.cancelled
    if name == "fusionbrain":  # no cancel in its API: easel stops polling
        assert standin.cancels == []
        return
    [run] = standin.runs.values()

    async def cancelled() -> bool:
        return standin.cancels == [run.id] and run.state == "cancelled"

    await eventually(cancelled)


async def test_refusals_and_failures_carry_the_service_s_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTED_KEY", KEY)
    monkeypatch.setenv("HOSTED_SECRET", SECRET)
    for name, prompt, code, words in (
        ("fusionbrain", "please censor me", "engine_refused", "censored"),
        ("replicate", "fail please", "engine_error", "CUDA out of memory"),
    ):
        with serve(hosted_servers.create_app(name)) as url:
            async with runtime_with(tmp_path / name, hosted(name, url, name="h")) as runtime:
                job, _ = await run_job(
                    runtime, GenerationRequest(prompt=prompt, width=64, height=64)
                )
        assert job.state is JobState.failed and job.error is not None
        assert (job.error.code, job.attempts) == (code, 1)
        assert words in job.error.message


async def test_results_only_from_allowed_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTED_KEY", KEY)
    files = hosted_servers.create_app("fal")
    app = hosted_servers.create_app("fal")
    with serve(files) as files_url, serve(app) as url:
        app.state.hosted.file_host = files_url.replace("127.0.0.1", "localhost")
        refused = hosted("fal", url, name="strict")
        allowed = hosted("fal", url, name="open", allowed_hosts=["localhost"])
        files.state.hosted.runs = app.state.hosted.runs  # the CDN serves the same runs
        async with runtime_with(tmp_path, refused, allowed) as runtime:
            request = GenerationRequest(prompt="x", width=64, height=64, steps=2)
            bad, _ = await run_job(runtime, request.model_copy(update={"backend": "strict"}))
            good, _ = await run_job(runtime, request.model_copy(update={"backend": "open"}))
    assert bad.error is not None and "not an allowed host" in bad.error.message
    assert good.state is JobState.succeeded, good.error
    assert all("authorization" not in seen for seen in files.state.hosted.auth)


async def test_a_dead_service_is_backend_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTED_KEY", KEY)
    async with runtime_with(tmp_path, hosted("fal", f"http://127.0.0.1:{free_port()}")) as runtime:
        job, _ = await run_job(runtime, GenerationRequest(prompt="x", width=64, height=64))
    assert job.error is not None and job.error.code == "backend_unavailable"
    assert job.attempts == 2
