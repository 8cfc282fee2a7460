"""The Draw Things-style request people copy ("UniPC ays", 16 steps, cfg 5, model realDream)
over HTTP and over Draw Things' gRPC, on tiny SD 1.x and SDXL pipelines: it runs, and the
image's infotext says what A1111 would ("Sampler: UniPC, Schedule type: Align Your Steps")."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from easel.api import create_app
from easel.client import Client
from easel.client.grpc import DrawThingsClient
from easel.config import Settings
from easel.results.metadata import parse_infotext
from tests.servers import serve

pytest.importorskip("diffusers")

MODELS = {"realDream": "sd", "realDreamXL": "sdxl"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(HTTP URL, gRPC address) of a server whose models are tiny SD and SDXL pipelines under
    the names a Draw Things client sends."""
    from easel.tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("drawthings")
    for name, family in MODELS.items():
        make_tiny_pipeline(root / "models" / name, family=family, seed=2)
    settings = Settings(
        data_dir=root / "data", models_dir=root / "models", backend="diffusers", device="cpu"
    )
    app = create_app(settings, grpc_port=0)
    with serve(app) as url:
        yield url, f"127.0.0.1:{app.state.grpc_port}"


def _infotext(url: str, job_id: str) -> dict[str, str]:
    png = httpx.get(f"{url}/v1/jobs/{job_id}/images/0", timeout=30).content
    with Image.open(io.BytesIO(png)) as image:
        return parse_infotext(str(image.info["parameters"]))


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_unipc_ays_over_http(servers: tuple[str, str], model: str) -> None:
    url, _ = servers
    with Client(url) as client:
        job = client.generate(
            "a beautiful sunset",
            model=model,
            steps=16,
            width=64,
            height=64,
            cfg_scale=5.0,
            scheduler="UniPC ays",
            seed=3,
            timeout=300,
        )

    assert job.state == "succeeded", job.error
    fields = _infotext(url, job.id)
    assert (fields["Sampler"], fields["Schedule type"]) == ("UniPC", "Align Your Steps")
    assert (fields["Steps"], fields["CFG scale"], fields["Model"]) == ("16", "5", model)
    sidecar = httpx.get(f"{url}/v1/jobs/{job.id}", timeout=30).json()
    assert sidecar["request"]["scheduler"] == "UniPC ays"


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_unipc_ays_over_grpc(servers: tuple[str, str], model: str) -> None:
    url, address = servers
    user = f"grpc-{model}"
    with DrawThingsClient(address, user=user) as client:
        [image] = client.generate(
            "a beautiful sunset",
            model=model,
            steps=16,
            width=64,
            height=64,
            guidance_scale=5.0,
            sampler="UniPC AYS",  # SamplerType 18
            seed=3,
        )

    assert image.size == (64, 64)
    [job] = httpx.get(f"{url}/v1/jobs", params={"user_id": user}, timeout=30).json()["jobs"]
    fields = _infotext(url, job["id"])
    assert (fields["Sampler"], fields["Schedule type"]) == ("UniPC", "Align Your Steps")
    assert fields["Model"] == model
