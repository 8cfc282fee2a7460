"""The comfyui backend against a loopback server speaking ComfyUI's protocol (a stand-in:
ComfyUI cannot run here; see tests/comfyui_server.py for what it follows)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from easel.backends import registry
from easel.backends.comfyui import ComfyUIBackend, comfy_sampler, fill
from easel.errors import Unsupported
from easel.jobs import GenerationRequest, JobState
from tests import comfyui_server
from tests.engines import cancel_on, eventually, progress_of, run_job, runtime_with
from tests.servers import free_port, serve

WORKFLOWS = Path(__file__).parent.parent / "docs" / "workflows"


@pytest.fixture
def comfy(tmp_path: Path) -> Iterator[tuple[str, comfyui_server.StandIn]]:
    app = comfyui_server.create_app(tmp_path / "comfy", step_delay=0.01, preview_every=2)
    with serve(app) as url:
        yield url, app.state.comfy


def backend(url: str, **options: Any) -> ComfyUIBackend:
    built = registry.create(
        "comfyui", name="comfy", url=url, workflow=WORKFLOWS / "txt2img.json",
        img2img_workflow=WORKFLOWS / "img2img.json", checkpoint="tiny.safetensors",
        poll_seconds=0.05, **options,
    )  # fmt: skip
    assert isinstance(built, ComfyUIBackend)
    return built


def blue() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_a_template_job_goes_through_with_progress_and_previews(
    comfy: tuple[str, comfyui_server.StandIn], tmp_path: Path
) -> None:
    url, standin = comfy
    engine = backend(url)
    async with runtime_with(tmp_path, engine) as runtime:
        assert "tiny.safetensors" in [m.name for m in engine.models()]
        request = GenerationRequest(
            prompt="a fox", negative_prompt="blur", width=64, height=96, steps=8, batch_size=2,
            scheduler="DPM++ 2M Karras",
        )  # fmt: skip
        job, events = await run_job(runtime, request)
        edit = GenerationRequest(prompt="bluer", init_image=blue(), width=64, height=64, steps=4)
        edited, _ = await run_job(runtime, edit)
    assert job.state is JobState.succeeded, job.error
    progress = progress_of(events)
    assert [e.step for e in progress if e.preview is None] == list(range(1, 9))
    assert any(e.preview for e in progress)
    assert [(i.width, i.height) for i in job.images] == [(64, 96), (64, 96)]
    graph = standin.prompts[0]["prompt"]
    assert graph["3"]["inputs"]["seed"] == job.request.seed
    assert (graph["3"]["inputs"]["sampler_name"], graph["3"]["inputs"]["scheduler"]) == (
        "dpmpp_2m", "karras",
    )  # fmt: skip
    assert graph["6"]["inputs"]["text"] == "a fox" and graph["7"]["inputs"]["text"] == "blur"
    assert (
        graph["5"]["inputs"]["width"] == 64
        and graph["4"]["inputs"]["ckpt_name"] == "tiny.safetensors"
    )
    assert standin.prompts[0]["client_id"]
    assert edited.state is JobState.succeeded, edited.error
    uploaded = standin.prompts[1]["prompt"]["10"]["inputs"]["image"]
    assert (tmp_path / "comfy" / "input" / uploaded).is_file()


async def test_a_raw_workflow_runs_with_the_recorded_seed(
    comfy: tuple[str, comfyui_server.StandIn], tmp_path: Path
) -> None:
    url, standin = comfy
    workflow = fill(
        json.loads((WORKFLOWS / "txt2img.json").read_text()),
        {"checkpoint": "tiny.safetensors", "prompt": "raw fox", "negative_prompt": "",
         "seed": 5, "steps": 3, "cfg": 6.0, "width": 64, "height": 64, "batch_size": 1,
         "sampler": "euler", "scheduler": "normal"},
    )  # fmt: skip
    async with runtime_with(tmp_path, backend(url)) as runtime:
        request = GenerationRequest.model_validate(
            {"executor": "comfyui", "payload": workflow, "seed": 77}
        )
        assert (request.prompt, request.steps, request.width) == ("raw fox", 3, 64)
        job, _ = await run_job(runtime, request)
    assert job.state is JobState.succeeded, job.error
    sent = standin.prompts[0]["prompt"]
    assert sent["3"]["inputs"]["seed"] == 77
    assert {k: v for k, v in sent.items() if k != "3"} == {
        k: v for k, v in workflow.items() if k != "3"
    }


async def test_cancelling_a_running_job_interrupts_that_prompt(
    comfy: tuple[str, comfyui_server.StandIn], tmp_path: Path
) -> None:
    url, standin = comfy
    async with runtime_with(tmp_path, backend(url)) as runtime:
        request = GenerationRequest(prompt="stop", width=64, height=64, steps=150)
        job, _ = await run_job(runtime, request, on_event=cancel_on(runtime))
    assert job.state is JobState.cancelled
    prompt_id = next(iter(standin.history), None)

    async def interrupted() -> bool:
        return (
            bool(standin.history)
            and not next(iter(standin.history.values()))["status"]["completed"]
        )

    await eventually(interrupted)
    prompt_id = next(iter(standin.history))
    assert standin.interrupts == [prompt_id]


async def test_the_engine_s_error_reaches_the_job(
    comfy: tuple[str, comfyui_server.StandIn], tmp_path: Path
) -> None:
    url, _ = comfy
    async with runtime_with(tmp_path, backend(url)) as runtime:
        request = GenerationRequest(
            prompt="x", width=64, height=64, steps=2, model="missing.safetensors"
        )
        job, _ = await run_job(runtime, request)
        bad = GenerationRequest.model_validate(
            {"executor": "comfyui", "payload": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}
        )
        refused, _ = await run_job(runtime, bad)
    assert job.state is JobState.failed and job.error is not None
    assert job.error.code == "engine_error" and "FileNotFoundError" in job.error.message
    assert refused.error is not None and refused.error.code == "engine_refused"
    assert "NoSuchNode does not exist" in refused.error.message and refused.attempts == 1


async def test_a_dead_server_is_backend_unavailable(tmp_path: Path) -> None:
    engine = backend(f"http://127.0.0.1:{free_port()}")
    async with runtime_with(tmp_path, engine) as runtime:
        job, _ = await run_job(runtime, GenerationRequest(prompt="x", width=64, height=64))
    assert job.state is JobState.failed and job.error is not None
    assert job.error.code == "backend_unavailable" and job.attempts == 2


def test_sampler_names_and_placeholders() -> None:
    assert comfy_sampler("Euler a") == ("euler_ancestral", "normal")
    assert comfy_sampler("dpmpp_2m_sde_karras") == ("dpmpp_2m_sde", "karras")
    with pytest.raises(Unsupported, match="cannot run sampler"):
        comfy_sampler("Mystery sampler")
    assert fill({"a": "{{seed}}", "b": "seed={{seed}}"}, {"seed": 3}) == {"a": 3, "b": "seed=3"}
