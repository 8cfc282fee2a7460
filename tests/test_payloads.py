"""Engine payloads on requests: the easel fields read from them, and refusals at once."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from easel.errors import Unsupported
from easel.fleet import load_settings
from easel.jobs import GenerationRequest, JobKind, JobState
from easel.runtime.facade import Runtime


def png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def request(executor: str, payload: Mapping[str, object], **fields: object) -> GenerationRequest:
    return GenerationRequest.model_validate({"executor": executor, "payload": payload, **fields})


def test_an_a1111_payload_gives_the_easel_fields() -> None:
    got = request(
        "automatic1111",
        {"prompt": "p", "width": 515, "height": 300, "steps": 9, "seed": 2**40 + 5,
         "sampler_name": "DPM++ 2M", "scheduler": "karras", "batch_size": 2, "n_iter": 3,
         "override_settings": {"sd_model_checkpoint": "sdxl.safetensors [abc]"},
         "init_images": [png()], "denoising_strength": 0.4},
    )  # fmt: skip
    assert (got.kind, got.width, got.height, got.steps) == (JobKind.img2img, 512, 296, 9)
    assert (got.seed, got.batch_size, got.strength) == (5, 6, 0.4)
    assert got.scheduler == "DPM++ 2M Karras" and got.model == "sdxl.safetensors"


def test_kandinsky_payloads_text_image_and_mix() -> None:
    text = request("kandinsky", {"prompt": "cat", "steps": 30, "guidance_scale": 4, "w": 768})
    assert (text.prompt, text.steps, text.cfg_scale, text.width) == ("cat", 30, 4.0, 768)
    mix = request(
        "kandinsky", {"images_texts": ["a prompt", png()], "weights": [0.3, 0.7], "steps": 5}
    )
    assert mix.kind is JobKind.mix
    assert [(item.prompt is not None, item.weight) for item in mix.mix] == [
        (True, 0.3),
        (False, 0.7),
    ]


def test_a_comfyui_workflow_gives_prompt_size_and_seed() -> None:
    workflow = {
        "1": {"class_type": "CLIPTextEncode", "inputs": {"text": "fox"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "blur"}},
        "3": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64, "height": 128, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"seed": 9, "steps": 4, "cfg": 3.5,
              "positive": ["1", 0], "negative": ["2", 0]}},
    }  # fmt: skip
    got = request("comfyui", workflow)
    assert (got.prompt, got.negative_prompt, got.height, got.seed, got.steps) == (
        "fox", "blur", 128, 9, 4,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"payload": {"prompt": "x"}}, "a payload needs executor"),
        ({"executor": "midjourney", "payload": {"prompt": "x"}}, "executor"),
        ({"executor": "automatic1111", "payload": {"steps": 3}}, "payload.prompt"),
        (
            {"executor": "automatic1111", "payload": {"prompt": "x", "width": 64}, "width": 128},
            "given both",
        ),
        ({"executor": "comfyui", "payload": {"a": 1}}, "API-format workflow"),
        (  # the one sampler table (easel.samplers), whatever backend would run it
            {"executor": "automatic1111", "payload": {"prompt": "x", "sampler_name": "Foo"}},
            "unknown sampler 'Foo'",
        ),
        (
            {
                "executor": "automatic1111",
                "payload": {"prompt": "x", "sampler_name": "Euler", "scheduler": "wobbly"},
            },
            "unknown schedule 'wobbly'",
        ),
    ],
)
def test_bad_payloads_are_refused(body: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        GenerationRequest.model_validate(
            {"prompt": "x", **body} if "executor" not in body else body
        )


def test_payloads_no_backend_can_run_are_4xx_at_once(server: str) -> None:
    too_big = httpx.post(
        f"{server}/v1/jobs",
        json={"executor": "automatic1111", "payload": {"prompt": "x", "steps": 10_000}},
    )
    assert too_big.status_code == 422 and "steps" in too_big.json()["error"]["message"]
    workflow = httpx.post(
        f"{server}/v1/jobs",
        json={"executor": "comfyui",
              "payload": {"1": {"class_type": "SaveImage", "inputs": {}}}},
    )  # fmt: skip
    assert workflow.status_code == 422
    assert workflow.json()["error"]["code"] == "no_backend"
    assert "runs comfyui payloads" in workflow.json()["error"]["message"]
    for payload in ({"prompt": "a cat"}, {"images_texts": ["a", "b"], "weights": [1, 1]}):
        kandinsky = httpx.post(
            f"{server}/v1/jobs", json={"executor": "kandinsky", "payload": payload}
        )  # the mock is no Kandinsky: not translated to a plain txt2img, refused
        error = kandinsky.json()["error"]
        assert kandinsky.status_code == 422 and error["code"] == "no_backend"
        assert (
            "runs kandinsky payloads" in error["message"] and "Kandinsky 2.2/3" in error["message"]
        )


KANDINSKY_FLEET = """
[[backends]]
name = "plain"
kind = "mock"

[[backends]]
name = "kandinsky"
kind = "mock"
executors = ["automatic1111", "kandinsky"]
options = { step_delay = 0.02 }
"""


async def test_kandinsky_payloads_go_only_where_kandinsky_runs(tmp_path: Path) -> None:
    path = tmp_path / "easel.toml"
    path.write_text(KANDINSKY_FLEET)
    settings = load_settings(path, data_dir=tmp_path / "data")
    async with Runtime(settings) as runtime:
        ids = []
        for _ in range(4):  # "kandinsky" gets busier each time: a1111 ones would go elsewhere
            view = await runtime.submit(
                request("kandinsky", {"prompt": "cat", "steps": 3, "w": 64, "h": 64})
            )
            ids.append(view.id)
        a1111 = await runtime.submit(
            request("automatic1111", {"prompt": "x", "steps": 2, "width": 64, "height": 64})
        )
        for job_id in ids:
            done = await runtime.wait(job_id, timeout=60)
            assert done.state is JobState.succeeded and done.backend == "kandinsky"
        assert (await runtime.wait(a1111.id, timeout=60)).state is JobState.succeeded
        with pytest.raises(Unsupported, match="plain does not run kandinsky payloads"):
            await runtime.submit(request("kandinsky", {"prompt": "cat"}, backend="plain"))
        shown = {b.name: b for b in await runtime.fleet.describe()}
        assert shown["kandinsky"].executors == ["automatic1111", "kandinsky"]
        assert shown["plain"].executors == ["automatic1111"]
