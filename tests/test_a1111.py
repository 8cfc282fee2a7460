"""The Automatic1111-compatible API, driven by the real ``webuiapi`` client library."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image

from easel.api import create_app
from easel.config import Settings
from easel.results.metadata import parse_infotext
from easel.runtime.facade import Runtime
from tests._backends import PreviewMock
from tests.servers import serve


def _api(url: str, **auth: str) -> webuiapi.WebUIApi:
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), **auth)


@pytest.fixture
def preview_server(tmp_path: Path) -> Iterator[str]:
    """Steps of 30 ms with a preview each: a job runs long enough to watch and interrupt."""
    settings = Settings(data_dir=tmp_path / "data", backend="mock")
    runtime = Runtime(settings, backends={"mock": PreviewMock(step_delay=0.03)})
    with serve(create_app(runtime=runtime)) as url:
        yield url


def test_txt2img_returns_pngs_info_and_parameters(server: str) -> None:
    api = _api(server)
    result = api.txt2img(
        prompt="a red fox",
        negative_prompt="blurry",
        width=100,  # A1111 rounds down to a multiple of 8
        height=64,
        steps=3,
        seed=7,
        batch_size=2,
        cfg_scale=5.5,
        sampler_name="DPM++ 2M",
        scheduler="karras",
    )
    assert [image.size for image in result.images] == [(96, 64), (96, 64)]
    assert all(image.format == "PNG" for image in result.images)
    info = result.info
    assert info["all_seeds"] == [7, 8]
    assert info["sampler_name"] == "DPM++ 2M Karras"
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (96, 64, 3, 5.5)
    # info's infotexts are the PNGs' own parameters, in A1111's format
    for image, text, seed in zip(result.images, info["infotexts"], [7, 8], strict=True):
        assert image.info["parameters"] == text
        fields = parse_infotext(text)
        assert fields["prompt"] == "a red fox"
        assert fields["negative_prompt"] == "blurry"
        assert fields["Seed"] == str(seed)
        assert fields["Size"] == "96x64"
        assert fields["CFG scale"] == "5.5"
    assert result.parameters["steps"] == 3
    assert result.parameters["prompt"] == "a red fox"
    assert result.parameters["restore_faces"] is False  # unused fields are echoed as sent

    job = httpx.get(f"{server}/v1/jobs/{info['job_id']}").json()
    assert job["request"]["user_id"] == "ip:127.0.0.1"
    assert job["request"]["batch_size"] == 2
    assert job["request"]["metadata"] == {"api": "a1111"}


def test_img2img_uses_the_init_image(server: str) -> None:
    api = _api(server)
    source = Image.new("RGB", (64, 64), (255, 0, 0))
    result = api.img2img(
        images=[source], prompt="bluer", width=64, height=64, steps=2, denoising_strength=0.25
    )
    [image] = result.images
    assert image.size == (64, 64)
    assert result.info["denoising_strength"] == 0.25
    assert parse_infotext(result.info["infotexts"][0])["Denoising strength"] == "0.25"
    assert result.parameters["init_images"] is None  # as A1111 answers by default
    red = image.convert("RGB").getpixel((60, 60))
    assert isinstance(red, tuple) and red[0] > 150  # mostly the init image at strength 0.25


def test_progress_preview_and_interrupt_of_the_callers_own_job(preview_server: str) -> None:
    api = _api(preview_server, username="ann", password="x")
    other = _api(preview_server, username="bob", password="x")
    done, thread = _slow_txt2img(api)
    deadline = time.monotonic() + 10
    while True:
        progress = api.get_progress()
        if progress["progress"] > 0 and progress["current_image"]:
            break
        assert thread.is_alive() and time.monotonic() < deadline, (progress, done)
        time.sleep(0.02)
    state = progress["state"]
    assert state["job_count"] == 1 and state["sampling_steps"] == 100
    assert 0 < state["sampling_step"] < 100
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size == (32, 24)

    # another caller sees its own (idle) progress and cannot interrupt ann's job
    assert other.get_progress()["progress"] == 0
    assert other.get_progress()["state"]["job_count"] == 0
    other.interrupt()
    assert api.get_progress()["progress"] > 0

    api.interrupt()
    thread.join(10)
    assert "error" not in done, done
    result = done["result"]
    assert result.images == []
    assert result.info["interrupted"] is True
    job = httpx.get(f"{preview_server}/v1/jobs/{result.info['job_id']}").json()
    assert (job["state"], job["request"]["user_id"]) == ("cancelled", "ann")
    idle = api.get_progress()
    assert (idle["progress"], idle["state"]["job_count"]) == (0, 0)


def test_models_samplers_and_the_model_switch(server: str) -> None:
    api = _api(server)
    assert [m["title"] for m in api.get_sd_models()] == ["mock"]
    samplers = api.util_get_sampler_names()
    # A1111 1.9+ lists samplers without their schedule type ("Karras" is a scheduler)
    assert {"Euler a", "DPM++ 2M", "UniPC", "DPM fast"} <= set(samplers)
    assert "karras" in api.util_get_scheduler_names()
    assert api.util_get_current_model() == "mock"
    assert (
        api.set_options({"sd_model_checkpoint": "MOCK [abc123]"})["sd_model_checkpoint"] == "mock"
    )
    result = api.txt2img(prompt="fox", width=64, height=64, steps=1)
    assert result.info["sd_model_name"] == "mock"
    job = httpx.get(f"{server}/v1/jobs/{result.info['job_id']}").json()
    assert job["request"]["model"] == "mock"

    missing = httpx.post(f"{server}/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_bad_requests_are_4xx(server: str) -> None:
    empty = httpx.post(f"{server}/sdapi/v1/txt2img", json={"prompt": " "})
    assert (empty.status_code, empty.json()["error"]["code"]) == (422, "invalid_request")
    mask = httpx.post(
        f"{server}/sdapi/v1/img2img",
        json={"prompt": "x", "init_images": ["aGVsbG8="], "mask": "aGVsbG8="},
    )
    assert (mask.status_code, mask.json()["error"]["code"]) == (422, "unsupported")
    scheduler = httpx.post(
        f"{server}/sdapi/v1/txt2img",
        json={"prompt": "x", "sampler_name": "Euler", "scheduler": "wobbly", "steps": 1},
    )
    assert scheduler.status_code == 422 and "karras" in scheduler.json()["error"]["message"]
    failed = httpx.post(
        f"{server}/sdapi/v1/txt2img", json={"prompt": "[mock:fail]", "steps": 1}, timeout=10
    )
    assert (failed.status_code, failed.json()["error"]["code"]) == (500, "mock_failure")
    assert json.loads(httpx.get(f"{server}/sdapi/v1/scripts").text) == {
        "txt2img": [],
        "img2img": [],
    }


def test_an_unknown_sampler_is_refused_as_a1111_does(server: str) -> None:
    """The mock would run any name; A1111 answers 404 "Sampler not found" in its own shape."""
    for route, extra in (("txt2img", {}), ("img2img", {"init_images": ["aGVsbG8="]})):
        answer = httpx.post(
            f"{server}/sdapi/v1/{route}",
            json={"prompt": "x", "sampler_name": "Wobbly 3M", "steps": 1, **extra},
        )
        assert answer.status_code == 404
        assert answer.json() == {
            "error": "HTTPException", "detail": "Sampler not found", "body": "",
            "errors": "404: Sampler not found",
        }  # fmt: skip
    api = _api(server)
    with pytest.raises(RuntimeError, match="Sampler not found"):
        api.txt2img(prompt="x", sampler_name="Wobbly 3M", steps=1)
    known = api.txt2img(prompt="x", sampler_name="UniPC", scheduler="karras", steps=1)
    assert len(known.images) == 1


def test_another_replica_shows_and_interrupts_the_callers_job(
    tmp_path: Path, redis_url: str
) -> None:
    """The current job is read from the store: an API-only replica that did not take the
    txt2img call shows its caller's job and interrupts it."""
    import uuid

    common = {"redis_url": redis_url, "redis_prefix": f"a1111:{uuid.uuid4().hex[:8]}:",
              "backend": "mock"}  # fmt: skip
    first = Settings.model_validate({"data_dir": tmp_path / "a", "concurrency": 1, **common})
    runtime = Runtime(first, backends={"mock": PreviewMock(step_delay=0.03)})
    second = Settings.model_validate({"data_dir": tmp_path / "b", "concurrency": 0, **common})
    with serve(create_app(runtime=runtime)) as a, serve(create_app(second)) as b:
        api = _api(a, username="ann", password="x")
        elsewhere = _api(b, username="ann", password="x")
        done, thread = _slow_txt2img(api)
        deadline = time.monotonic() + 20
        while (progress := elsewhere.get_progress())["state"]["job_count"] != 1:
            assert thread.is_alive() and time.monotonic() < deadline, (progress, done)
            time.sleep(0.02)
        assert progress["state"]["sampling_steps"] == 100
        assert progress["state"]["job"].startswith("task(")
        assert _api(b, username="bob", password="x").get_progress()["state"]["job_count"] == 0
        elsewhere.interrupt()
        thread.join(20)
    assert "error" not in done, done
    assert done["result"].images == [] and done["result"].info["interrupted"] is True
    assert progress["state"]["job"] == f"task({done['result'].info['job_id']})"


def test_options_are_in_the_store_for_every_replica(tmp_path: Path, redis_url: str) -> None:
    """Two API replicas on one Redis: bravo's ``/options`` model, set on one, is what the
    other reports and runs bravo's txt2img on; alpha keeps its own (the default) on both."""
    import uuid

    from tests.tenants import ALPHA, BRAVO, settings_for

    def as_service(url: str, token: str) -> webuiapi.WebUIApi:
        api = _api(url)
        api.session.headers["authorization"] = f"Bearer {token}"  # easel's service token
        return api

    prefix = f"a1111:{uuid.uuid4().hex[:8]}:"
    # b: an API-only replica (no backend; the models a's worker serves); the results
    # directory is shared, as it is in a real deployment
    shared: dict[str, Any] = {"redis_prefix": prefix, "mock_models": ["mock-xl"],
                              "output_dir": tmp_path / "outputs"}  # fmt: skip
    first = settings_for(tmp_path / "a", redis_url, concurrency=1, **shared)
    second = settings_for(tmp_path / "b", redis_url, concurrency=0, **shared)
    with serve(create_app(first)) as a, serve(create_app(second)) as b:
        bravo_a, bravo_b, alpha_b = as_service(a, BRAVO), as_service(b, BRAVO), as_service(b, ALPHA)
        assert bravo_b.get_options()["sd_model_checkpoint"] == "mock"
        assert bravo_a.set_options({"sd_model_checkpoint": "mock-xl"})["sd_model_checkpoint"] == (
            "mock-xl"
        )
        assert bravo_b.get_options()["sd_model_checkpoint"] == "mock-xl"
        assert alpha_b.get_options()["sd_model_checkpoint"] == "mock"
        assert {"mock", "mock-xl"} <= {m["model_name"] for m in alpha_b.get_sd_models()}
        bravo_b.set_options({"sd_model_checkpoint": "MOCK-XL"})  # set on the API-only one
        assert bravo_a.get_options()["sd_model_checkpoint"] == "mock-xl"
        for api, models in ((bravo_b, {"mock-xl"}), (alpha_b, {None, "mock"})):
            result = api.txt2img(prompt="which model", width=64, height=64, steps=1)
            answer = httpx.get(f"{b}/v1/jobs/{result.info['job_id']}",
                               headers=dict(api.session.headers))  # fmt: skip
            assert answer.json()["request"]["model"] in models, answer.text


def _slow_txt2img(api: Any) -> tuple[dict[str, Any], threading.Thread]:
    """A 100-step txt2img on a thread: its ``result`` (or ``error``) lands in the dict."""
    done: dict[str, Any] = {}

    def generate() -> None:
        try:
            done["result"] = api.txt2img(prompt="slow fox", width=64, height=64, steps=100)
        except Exception as exc:  # surfaced by the caller, not as an unhandled thread error
            done["error"] = exc

    thread = threading.Thread(target=generate)
    thread.start()
    return done, thread
