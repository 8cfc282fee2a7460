"""A real mixed fleet in one process: two mock backends with different capabilities and
speeds plus the tiny diffusers pipeline, behind one queue and the HTTP API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from easel.api import create_app
from easel.backends.mock import MockBackend
from easel.errors import InvalidRequest, ModelNotFound, Unsupported
from easel.fleet import load_settings
from easel.jobs import GenerationRequest, JobState
from easel.runtime.facade import Runtime
from tests.servers import serve

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 2}

FLEET = """
[[backends]]
name = "fast"
kind = "mock"
tags = ["gpu"]
capabilities = ["txt2img", "negative_prompt", "seed"]
options = {{ step_delay = 0.001, models = ["flux", "sdxl"], load_seconds = 0.05 }}
timeouts = {{ health_interval_seconds = 0.1 }}
breaker = {{ failures = 2, probe_seconds = 0.3 }}

[[backends]]
name = "edit"
kind = "mock"
tags = ["cheap"]
options = {{ step_delay = 0.01, models = ["sdxl", "flux"], load_seconds = 0.05 }}

[[backends]]
name = "tiny"
kind = "diffusers"
options = {{ model = "{model}", device = "cpu" }}
"""


@pytest.fixture
async def fleet(tmp_path: Path, tiny_model_dir: Path) -> AsyncIterator[Runtime]:
    path = tmp_path / "easel.toml"
    path.write_text(FLEET.format(model=tiny_model_dir))
    settings = load_settings(path, data_dir=tmp_path / "data")
    async with Runtime(settings) as runtime:
        yield runtime


def mock(runtime: Runtime, name: str) -> MockBackend:
    backend = runtime.backends[name]
    assert isinstance(backend, MockBackend)
    return backend


async def run(runtime: Runtime, **fields: Any) -> Any:
    view = await runtime.submit(GenerationRequest(prompt="p", **{**SMALL, **fields}))
    return await runtime.wait(view.id, timeout=60)


async def test_jobs_go_where_their_capability_model_and_tag_are(fleet: Runtime) -> None:
    tiny = fleet.backends["tiny"].default_model
    edit = await run(fleet, model="sdxl", init_image=_png(), strength=0.5)
    assert edit.backend == "edit"  # fast serves sdxl but cannot img2img; tiny has no sdxl
    assert (await run(fleet, model=tiny)).backend == "tiny"
    assert (await run(fleet, tags=["cheap"])).backend == "edit"
    assert (await run(fleet, tags=["gpu"], model="sdxl")).backend == "fast"
    assert (await run(fleet, backend="fast", model="sdxl")).backend == "fast"
    for done in [edit]:
        assert done.state is JobState.succeeded
        assert [(r.backend, r.error) for r in done.runs] == [("edit", None)]
    with pytest.raises(Unsupported, match="fast cannot do img2img"):
        await fleet.submit(GenerationRequest(prompt="p", tags=["gpu"], init_image=_png()))
    with pytest.raises(InvalidRequest, match="no backend carries the tags tpu"):
        await fleet.submit(GenerationRequest(prompt="p", tags=["tpu"]))
    with pytest.raises(ModelNotFound, match="'flux' is not served by backend 'tiny'"):
        await fleet.submit(GenerationRequest(prompt="p", backend="tiny", model="flux"))


async def test_affinity_avoids_a_model_reload(fleet: Runtime) -> None:
    fast, edit = mock(fleet, "fast"), mock(fleet, "edit")
    await run(fleet, backend="fast", model="flux")  # each loads a model once...
    await run(fleet, backend="edit", model="sdxl")
    assert (fast.loaded, edit.loaded, fast.loads, edit.loads) == ("flux", "sdxl", 1, 1)
    for _ in range(3):  # one at a time: each backend stays idle between them
        assert (await run(fleet, model="sdxl")).backend == "edit"  # slower, but loaded
        assert (await run(fleet, model="flux")).backend == "fast"
    assert (fast.loads, edit.loads) == (1, 1)  # ...and never again


async def test_a_failing_backend_trips_its_breaker_and_jobs_go_elsewhere(fleet: Runtime) -> None:
    fast = mock(fleet, "fast")
    fast.unavailable = True
    moved = await run(fleet, backend="fast", fallback=True, model="flux")
    assert moved.state is JobState.succeeded and moved.backend == "edit"
    assert [(r.backend, r.error.code if r.error else None) for r in moved.runs] == [
        ("fast", "backend_unavailable"),
        ("edit", None),
    ]
    # the health checks count too: two failures in a row take it out of routing
    await _until(lambda: not fleet.fleet.is_up("fast"))
    assert (await run(fleet, model="flux")).backend == "edit"
    status = {b.name: b for b in await fleet.fleet.describe()}
    assert status["fast"].state == "down" and "switched off" in (status["fast"].last_error or "")
    assert status["edit"].state == "up" and status["tiny"].kind == "diffusers"

    fast.unavailable = False  # back: the next probe closes the breaker
    await _until(lambda: fleet.fleet.is_up("fast"))
    back = await run(fleet, backend="fast", model="flux")
    assert back.state is JobState.succeeded and back.backend == "fast"
    assert {b.name: b.state for b in await fleet.fleet.describe()}["fast"] == "up"


PRESSURE = """
[routing]
load_seconds = 5

[[backends]]
name = "a"
kind = "mock"
options = { step_delay = 0.05, models = ["x", "y"], load_seconds = 0.3 }

[[backends]]
name = "b"
kind = "mock"
options = { models = ["x", "y"], load_seconds = 0.3 }

[[backends]]
name = "c"
kind = "mock"
options = { models = ["x", "y"], load_seconds = 0.3 }
"""


async def test_an_idle_backend_loads_a_model_queued_jobs_want(tmp_path: Path) -> None:
    """Model pressure: jobs for a model loaded nowhere wait behind a busy backend; the
    least busy capable one loads it ahead of them and takes them, and while it loads,
    the router sends that model's new jobs there rather than load it a second time."""
    path = tmp_path / "easel.toml"
    path.write_text(PRESSURE)
    settings = load_settings(path, data_dir=tmp_path / "data")
    async with Runtime(settings) as runtime:
        a, b, c = (mock(runtime, name) for name in "abc")
        long = await runtime.submit(
            GenerationRequest(prompt="p", backend="a", model="x", width=64, height=64, steps=100)
        )
        await _until(lambda: a.loaded == "x")  # busy with x for seconds
        first = await runtime.submit(
            GenerationRequest(prompt="p", backend="a", fallback=True, model="y", **SMALL)
        )
        member = runtime.fleet.members["b"]
        await _until(lambda: member.loading == "y")  # b: least busy capable (c ties; name)
        shown = {s.name: s for s in await runtime.fleet.describe()}
        assert shown["b"].loading == "y" and "y" in shown["b"].loaded_models
        more = [await run_later(runtime, model="y") for _ in range(2)]  # while b loads y
        for view in [first, *more]:
            done = await runtime.wait(view.id, timeout=60)
            assert done.state is JobState.succeeded and done.backend == "b"
        assert (b.preloads_done, b.loads, c.loads) == (1, 1, 0)  # one load, ahead of the jobs
        shown = {s.name: s for s in await runtime.fleet.describe()}
        assert shown["b"].model_loads == 1 and shown["b"].loading is None
        assert shown["b"].load_seconds is not None and shown["b"].load_seconds >= 0.3
        await runtime.cancel(long.id)


async def run_later(runtime: Runtime, **fields: Any) -> Any:
    return await runtime.submit(GenerationRequest(prompt="p", **{**SMALL, **fields}))


async def test_a_named_backend_without_fallback_waits_for_it(fleet: Runtime) -> None:
    fast = mock(fleet, "fast")
    fast.unavailable = True
    view = await fleet.submit(GenerationRequest(prompt="p", backend="fast", **SMALL))
    await _until(lambda: not fleet.fleet.is_up("fast"))
    job = await fleet.get(view.id)
    assert job.backend == "fast" and job.state in {JobState.queued, JobState.running}
    while (job := await fleet.get(view.id)).state is not JobState.queued:
        await asyncio.sleep(0.02)
    assert job.waiting_reason is not None and "backend 'fast' is down" in job.waiting_reason
    assert job.runs and all(run.backend == "fast" for run in job.runs)
    fast.unavailable = False
    done = await fleet.wait(view.id, timeout=60)
    assert done.state is JobState.succeeded and done.backend == "fast"


def test_backends_endpoint_shows_the_fleet(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tmp_path / "easel.toml"
    path.write_text(FLEET.format(model=tiny_model_dir))
    settings = load_settings(path, data_dir=tmp_path / "data")
    with serve(create_app(settings)) as url:
        body = {"prompt": "p", "model": "flux", "tags": ["gpu"], **SMALL}
        job = httpx.post(f"{url}/v1/jobs", json=body)
        assert job.status_code == 202 and job.json()["backend"] == "fast"
        _wait_http(url, job.json()["id"])
        listing = httpx.get(f"{url}/v1/backends").json()["backends"]
        metrics = httpx.get(f"{url}/metrics").text
        no_s3 = httpx.post(f"{url}/v1/jobs", json={"prompt": "p", "sync_with_s3": True})
        refused = httpx.post(f"{url}/v1/jobs", json={"prompt": "p", "backend": "gpu9"})
    by_name = {b["name"]: b for b in listing}
    assert set(by_name) == {"edit", "fast", "tiny"}
    fast = by_name["fast"]
    assert (fast["kind"], fast["state"], fast["where"], fast["slots"]) == ("mock", "up", "local", 1)
    assert fast["loaded_models"] == ["flux"] and fast["models"] == ["flux", "mock", "sdxl"]
    assert fast["capabilities"] == ["negative_prompt", "seed", "txt2img"]
    assert fast["speed"] is not None and fast["speed"] > 0  # measured by the run
    assert by_name["edit"]["speed"] is None and by_name["edit"]["tags"] == ["cheap"]
    assert refused.status_code == 422 and "edit, fast, tiny" in refused.json()["error"]["message"]
    assert 'easel_backend_state{backend="fast",kind="mock",state="up"} 1.0' in metrics
    assert 'easel_backend_slots{backend="tiny"} 1.0' in metrics
    assert no_s3.status_code == 422 and "sync_with_s3 needs S3" in no_s3.text


async def _until(condition: Any, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def _wait_http(url: str, job_id: str) -> None:
    with httpx.Client() as client:
        for _ in range(600):
            if client.get(f"{url}/v1/jobs/{job_id}").json()["state"] == "succeeded":
                return
            import time

            time.sleep(0.05)
    raise AssertionError("the job did not finish")


def _png() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()
