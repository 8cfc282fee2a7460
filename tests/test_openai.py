"""The OpenAI-compatible images API, driven by the real ``openai`` SDK."""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from easel.results.metadata import parse_infotext


def _client(server: str, api_key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def _jobs(server: str, user: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = httpx.get(f"{server}/v1/jobs", params={"user_id": user}).json()[
        "jobs"
    ]
    return jobs


def test_generate_b64_json(server: str) -> None:
    result = _client(server).images.generate(
        model="dall-e-3",  # an OpenAI name: the server's default model
        prompt="a red fox",
        n=2,
        size="256x128",
        quality="high",
        style="vivid",
        response_format="b64_json",
        user="alice",
        extra_body={"seed": 42, "negative_prompt": "blurry"},
    )
    assert result.size == "256x128" and result.output_format == "png"
    assert result.data is not None and len(result.data) == 2
    for index, item in enumerate(result.data):
        assert item.b64_json is not None and item.url is None
        image = _png(base64.b64decode(item.b64_json))
        assert image.size == (256, 128)
        fields = parse_infotext(image.info["parameters"])
        assert fields["prompt"] == "a red fox"
        assert fields["negative_prompt"] == "blurry"
        assert fields["Seed"] == str(42 + index)
        assert fields["Steps"] == "30"  # quality=high
        assert fields["Size"] == "256x128"

    [job] = _jobs(server, "alice")  # one job, recorded with what the call meant
    request = job["request"]
    assert (request["batch_size"], request["width"], request["height"]) == (2, 256, 128)
    assert (request["seed"], request["steps"], request["model"]) == (42, 30, None)
    assert request["metadata"] == {"api": "openai"}


def test_generate_url_points_at_the_stored_png(server: str) -> None:
    result = _client(server).images.generate(
        prompt="a red fox", size="64x64", response_format="url", user="bob"
    )
    assert result.data is not None
    [item] = result.data
    assert item.url is not None and item.b64_json is None
    assert item.url.startswith(f"{server}/v1/jobs/")
    response = httpx.get(item.url)
    assert response.headers["content-type"] == "image/png"
    assert _png(response.content).size == (64, 64)
    [job] = _jobs(server, "bob")
    assert item.url == server + job["images"][0]["url"]


def test_the_user_is_a_hash_of_the_token_when_no_user_is_given(server: str) -> None:
    _client(server, api_key="sk-secret").images.generate(prompt="a fox", size="64x64")
    user = "token:" + hashlib.sha256(b"sk-secret").hexdigest()[:16]
    assert len(_jobs(server, user)) == 1


def test_edit_runs_img2img_at_the_images_own_size(server: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (100, 60), (255, 0, 0)).save(buffer, "PNG")
    result = _client(server).images.edit(
        image=[("fox.png", buffer.getvalue(), "image/png")],  # sent as image[]
        prompt="make it blue",
        user="carol",
        extra_body={"strength": 0.3, "seed": 5},
    )
    assert result.size == "96x56"  # rounded down to multiples of 8
    assert result.data is not None
    [item] = result.data
    assert item.b64_json is not None
    assert _png(base64.b64decode(item.b64_json)).size == (96, 56)
    [job] = _jobs(server, "carol")
    assert (job["request"]["kind"], job["request"]["strength"]) == ("img2img", 0.3)


def test_errors_have_openais_shape(server: str) -> None:
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(prompt="x", size="100x100x3")
    assert bad_size.value.status_code == 400
    assert bad_size.value.body == {
        "message": "size must be WIDTHxHEIGHT, e.g. 1024x1024, or auto (got '100x100x3')",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_request",
    }
    with pytest.raises(openai.BadRequestError) as not_multiple:
        client.images.generate(prompt="x", size="100x100")
    assert isinstance(not_multiple.value.body, dict)
    assert not_multiple.value.body["param"] == "width"

    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(prompt="x", model="sdxl-turbo")
    assert isinstance(missing.value.body, dict)
    assert missing.value.body["code"] == "model_not_found"

    with pytest.raises(openai.InternalServerError) as failed:
        client.images.generate(prompt="[mock:fail] x", size="64x64")
    assert isinstance(failed.value.body, dict)
    assert (failed.value.body["type"], failed.value.body["code"]) == (
        "server_error",
        "mock_failure",
    )

    raw = httpx.post(f"{server}/v1/images/generations", json={"size": "64x64"})
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert raw.json()["error"]["param"] == "prompt"

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "PNG")
    with pytest.raises(openai.BadRequestError) as masked:
        client.images.edit(
            image=("a.png", buffer.getvalue(), "image/png"),
            mask=("m.png", buffer.getvalue(), "image/png"),
            prompt="x",
        )
    assert isinstance(masked.value.body, dict)
    assert masked.value.body["code"] == "unsupported"
    with pytest.raises(openai.BadRequestError) as not_an_image:
        client.images.edit(image=("a.txt", b"hello", "text/plain"), prompt="x")
    assert "PNG, JPEG or WebP" in str(not_an_image.value)

    # the native API keeps easel's own error shape
    native = httpx.get(f"{server}/v1/jobs/nope").json()
    assert native["error"]["code"] == "job_not_found" and "type" not in native["error"]
