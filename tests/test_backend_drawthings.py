"""The drawthings backend against a real engine: a second ``easel serve`` process serving
Draw Things' gRPC ``ImageGenerationService`` on loopback (``--grpc-port``)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from easel.backends import registry
from easel.errors import Unsupported
from easel.jobs import ControlNetSpec, GenerationRequest, JobState, LoraSpec
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
        with pytest.raises(Unsupported, match=r"dt does not run sampler Heun .*UniPC AYS"):
            await runtime.submit(
                GenerationRequest(prompt="x", width=64, height=64, scheduler="Heun")
            )


async def test_a_dead_server_is_backend_unavailable(tmp_path: Path) -> None:
    backend = registry.create("drawthings", name="dt", address=f"127.0.0.1:{free_port()}")
    async with runtime_with(tmp_path, backend) as runtime:
        job, _ = await run_job(runtime, GenerationRequest(prompt="x", width=64, height=64))
    assert job.state is JobState.failed and job.error is not None
    assert job.error.code == "backend_unavailable" and job.attempts == 2


PEER_WITH_LORAS = """
[[backends]]
name = "mock"
kind = "mock"
capabilities = ["txt2img", "img2img", "negative_prompt", "seed", "scheduler", "lora", "controlnet"]
"""


async def test_loras_and_a_controlnet_go_on_the_wire(tmp_path: Path) -> None:
    """The LoRAs (configuration ``loras``) and the ControlNet (``controls`` plus its image
    as a ``hints`` tensor) reach the engine: a peer easel whose mock declares both reads
    them back into its own job."""
    import base64
    import io

    from PIL import Image

    from easel.api import create_app
    from easel.fleet import load_settings
    from tests.servers import serve

    config = tmp_path / "peer.toml"
    config.write_text(PEER_WITH_LORAS)
    app = create_app(load_settings(config, data_dir=tmp_path / "peer"), grpc_port=0)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (250, 10, 10)).save(buffer, "PNG")
    control = ControlNetSpec.model_validate({
        "name": "sd15-depth", "image": base64.b64encode(buffer.getvalue()).decode(),
        "scale": 0.8, "start": 0.1, "end": 0.9,
    })  # fmt: skip
    with serve(app) as url:
        backend = registry.create("drawthings", address=f"127.0.0.1:{app.state.grpc_port}")
        async with runtime_with(tmp_path, backend) as runtime:
            request = GenerationRequest(
                prompt="inked", width=64, height=64, steps=2, user_id="lora-user",
                loras=[LoraSpec(name="ink-style", weight=0.7), LoraSpec(name="grain", weight=-0.5)],
                controlnet=control,
            )  # fmt: skip
            job, _ = await run_job(runtime, request)
        assert job.state is JobState.succeeded, job.error
        [remote] = httpx.get(f"{url}/v1/jobs", params={"user_id": "lora-user"}).json()["jobs"]
    sent = remote["request"]
    assert sent["loras"] == [
        {"name": "ink-style", "weight": 0.7},
        {"name": "grain", "weight": -0.5},
    ]
    got = sent["controlnet"]
    assert (got["name"], got["scale"], got["start"], got["end"]) == ("sd15-depth", 0.8, 0.1, 0.9)
    with Image.open(io.BytesIO(base64.b64decode(got["image"]))) as image:
        assert image.size == (64, 64)  # at the request's size, as Draw Things takes hints
        red, green, _ = image.convert("RGB").getpixel((10, 10))  # type: ignore[misc]
        assert red > 240 and green < 20


def test_hint_types_follow_the_control_s_name() -> None:
    from easel.backends.drawthings import hint_type

    assert hint_type("sd15-depth") == "depth" and hint_type("xl_openpose") == "pose"
    assert hint_type("control_v11p_sd15_scribble") == "scribble"
    assert hint_type("xl-canny") == "custom"  # Draw Things makes canny maps itself
