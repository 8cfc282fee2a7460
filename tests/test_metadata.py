"""Result formats (PNG, WebP, JPEG) carry their parameters, and everything reads them back:
easel's own reader, the client's sidecar, and A1111's ``/sdapi/v1/png-info``."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image

from easel.api import create_app
from easel.client import AsyncClient, Client
from easel.config import OutputSettings, Settings
from easel.jobs import GenerationRequest, ImageFormat, JobState
from easel.results.metadata import (
    EXIF_IFD,
    USER_COMMENT,
    parse_infotext,
    read_parameters,
    read_user_comment,
)
from tests.servers import serve

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 2}
TRICKY = 'a "quoted" fox, über: the moon\nand a second line'


@pytest.mark.parametrize("format", list(ImageFormat))
def test_every_format_round_trips_infotext_and_request(format: ImageFormat) -> None:
    from easel.backends.base import GenerationResult
    from easel.backends.mock import placeholder
    from easel.jobs import Job
    from easel.results.files import encode_image
    from easel.results.metadata import sidecar

    request = GenerationRequest(prompt=TRICKY, negative_prompt="blurry", seed=7, **SMALL)
    job = Job(request=request, backend="mock")
    result = GenerationResult(images=[placeholder(request, 7)], seeds=[7], model="m")
    metadata = sidecar(job, 0, 7, model=result.model, scheduler=None)
    data = encode_image(result.images[0], metadata, format)

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[format]
    embedded = read_parameters(data)
    assert embedded.infotext is not None and embedded.infotext == metadata["infotext"]
    assert embedded.request == metadata["request"]
    fields = parse_infotext(embedded.infotext)
    assert fields["prompt"] == TRICKY
    assert (fields["Seed"], fields["Model"]) == ("7", "m")
    assert GenerationRequest.model_validate(embedded.request).prompt == TRICKY


@pytest.mark.parametrize("format", [ImageFormat.webp, ImageFormat.jpeg])
def test_exif_user_comment_is_what_piexif_writes(format: ImageFormat) -> None:
    """A1111 reads JPEG/WebP parameters with ``piexif.helper.UserComment.load``: the
    ``UNICODE\\0`` marker, then UTF-16 big-endian."""
    from easel.results.files import encode_image

    image = Image.new("RGB", (16, 16))
    data = encode_image(image, {"infotext": TRICKY, "request": {}}, format)
    with Image.open(io.BytesIO(data)) as opened:
        raw = opened.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]
    assert raw == b"UNICODE\x00" + TRICKY.encode("utf-16-be")
    assert read_user_comment(raw) == TRICKY


def test_quality_and_compress_level_are_applied() -> None:
    from easel.results.files import encode_image

    noise = Image.effect_noise((128, 128), 64).convert("RGB")
    meta = {"infotext": "x", "request": {}}
    low = encode_image(noise, meta, ImageFormat.jpeg, quality=10)
    high = encode_image(noise, meta, ImageFormat.jpeg, quality=95)
    assert len(low) < len(high)
    stored = encode_image(noise, meta, ImageFormat.png, OutputSettings(png_compress_level=0))
    packed = encode_image(noise, meta, ImageFormat.png, OutputSettings(png_compress_level=9))
    assert len(packed) < len(stored)


def test_png_strategy_is_applied_and_lossless() -> None:
    """rle (the default) and zlib's default strategy: other bytes, the same pixels."""
    from easel.results.files import encode_image

    flat = Image.new("RGB", (256, 256), "white")
    flat.paste(Image.effect_noise((64, 64), 40).convert("RGB"), (96, 96))
    meta = {"infotext": "x", "request": {}}
    assert OutputSettings().png_strategy == "rle"
    rle = encode_image(flat, meta, ImageFormat.png)
    zlib = encode_image(flat, meta, ImageFormat.png, OutputSettings(png_strategy="default"))
    assert rle != zlib
    for data in (rle, zlib):
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.tobytes() == flat.tobytes()
            assert decoded.info["parameters"] == "x"


async def test_per_request_and_server_default_formats_through_a_server(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", backend="mock", mock_step_delay=0.0,
        output=OutputSettings(format="webp"),
    )  # fmt: skip
    with serve(create_app(settings)) as url:
        async with AsyncClient(url, user_id="ann") as client:
            default = await client.generate("a fox", **SMALL)
            jpeg = await client.generate("a fox", output_format="jpeg", **SMALL)
            png = await client.generate("a fox", output_format="png", **SMALL)
            for job, media in ((default, "webp"), (jpeg, "jpeg"), (png, "png")):
                assert job.state is JobState.succeeded
                response = httpx.get(f"{url}{job.images[0].url}")
                assert response.headers["content-type"] == f"image/{media}"
                assert read_parameters(response.content).request is not None
            saved = await client.save_images(jpeg, tmp_path / "out")
    assert saved[0].suffix == ".jpg"
    assert saved[0].with_suffix(".json").is_file()
    assert "Seed: " in (read_parameters(saved[0].read_bytes()).infotext or "")


def test_a1111_png_info_reads_png_and_jpeg(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", backend="mock", mock_step_delay=0.0)
    with serve(create_app(settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        result = api.txt2img(prompt="a red fox", seed=5, width=64, height=64, steps=2)
        png_info = api.png_info(result.images[0])  # the real client re-sends it as PNG
        assert png_info.info.startswith("a red fox\n")
        assert png_info.parameters["Prompt"] == "a red fox"
        assert png_info.parameters["Seed"] == "5"

        # JPEG bytes as the web UI's PNG-info tab posts them (webuiapi re-encodes to PNG)
        with Client(url) as client:
            job = client.generate("a fox", output_format="jpeg", seed=9, **SMALL)
            jpeg = client.image(job)
        with httpx.Client(base_url=url) as http:
            answer = http.post(
                "/sdapi/v1/png-info",
                json={"image": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()},
            ).json()
            assert answer["parameters"]["Seed"] == "9"
            assert answer["info"].startswith("a fox\n")
            refused = http.post("/sdapi/v1/png-info", json={"image": "not base64!"})
            assert refused.status_code == 422
            assert refused.json()["error"]["code"] == "invalid_request"


def test_the_readme_output_settings_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    [line] = [line for line in readme.splitlines() if line.startswith("EASEL_OUTPUT__FORMAT=")]
    for pair in line.split()[:-2]:  # the env vars before "easel serve"
        name, _, value = pair.partition("=")
        monkeypatch.setenv(name, value)
    output = Settings().output
    assert (output.format, output.webp_quality, output.png_compress_level) == ("webp", 90, 6)
