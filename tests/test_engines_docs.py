"""docs/engines.md: every fleet-file example loads and builds its backends; the mixed
fleet runs jobs on a local mock, an A1111 peer (a second easel) and a ComfyUI-protocol
server, routed by requested backend and by capability."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from easel.api import create_app
from easel.backends import registry
from easel.client import AsyncClient
from easel.fleet import fleet_of, load_settings
from easel.runtime.facade import Runtime
from easel.runtime.fleet import build_backends
from tests import comfyui_server
from tests.servers import Process, serve

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "engines.md"
EXAMPLES = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)
SECRETS = ("OPENAI_API_KEY", "FAL_KEY", "REPLICATE_API_TOKEN", "FUSIONBRAIN_KEY",
           "FUSIONBRAIN_SECRET", "FORGE_PASSWORD")  # fmt: skip


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder laid out as the examples expect: docs/workflows, a pictures folder, keys."""
    shutil.copytree(ROOT / "docs" / "workflows", tmp_path / "docs" / "workflows")
    (tmp_path / "pictures").mkdir()
    Image.new("RGB", (32, 32), "teal").save(tmp_path / "pictures" / "teal.png")
    monkeypatch.chdir(tmp_path)
    for name in SECRETS:
        monkeypatch.setenv(name, f"{name.lower()}-for-tests")
    return tmp_path


def test_the_doc_has_an_example_for_every_remote_kind() -> None:
    kinds = {kind for text in EXAMPLES for kind in re.findall(r'kind = "([\w-]+)"', text)}
    assert kinds >= {"automatic1111", "comfyui", "drawthings", "openai", "hosted", "mock"}


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
async def test_each_example_loads_and_builds(workdir: Path, index: int) -> None:
    path = workdir / "easel.toml"
    path.write_text(EXAMPLES[index])
    settings = load_settings(path, kinds=registry.available())
    backends = build_backends(fleet_of(settings))
    assert list(backends) == [spec.name for spec in settings.backends]
    for backend in backends.values():
        assert "-for-tests" not in repr(backend)  # keys never shown
        await backend.close()


@pytest.fixture
def a1111_peer(engine_peer: tuple[Process, str]) -> Process:
    return engine_peer[0]


def red() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.slow
async def test_the_mixed_fleet_routes_and_completes(workdir: Path, a1111_peer: Process) -> None:
    comfy_app = comfyui_server.create_app(workdir / "comfy")
    with serve(comfy_app) as comfy_url:
        text = EXAMPLES[-1].replace("http://127.0.0.1:7860", a1111_peer.url)
        text = text.replace("http://127.0.0.1:8188", comfy_url)
        (workdir / "easel.toml").write_text(f'data_dir = "{workdir / "data"}"\n' + text)
        settings = load_settings(workdir / "easel.toml", kinds=registry.available())
        runtime = Runtime(settings)  # the fleet, built from the file
        workflow = json.loads((workdir / "docs" / "workflows" / "txt2img.json").read_text())
        workflow["3"]["inputs"].update(seed=1, steps=3, cfg=5.0, sampler_name="euler",
                                       scheduler="normal", denoise=1.0)  # fmt: skip
        workflow["5"]["inputs"].update(width=64, height=64, batch_size=1)
        workflow["6"]["inputs"]["text"], workflow["7"]["inputs"]["text"] = "a raw fox", ""
        workflow["4"]["inputs"]["ckpt_name"] = "tiny.safetensors"
        small = {"width": 64, "height": 64, "steps": 3}
        requests = {
            "named": {"prompt": "on a1111", "backend": "a1111", **small},
            "img2img": {"prompt": "edit", "init_image": red(), **small},
            "workflow": {"executor": "comfyui", "payload": workflow},
            "plain": {"prompt": "anywhere", **small},
        }
        expected = {"named": "a1111", "img2img": "a1111", "workflow": "comfy"}
        with serve(create_app(runtime=runtime)) as url:
            async with AsyncClient(url) as client:
                views = {key: await client.submit(**body) for key, body in requests.items()}
                jobs = {key: await client.wait(v.id, timeout=30) for key, v in views.items()}
                fleet = httpx.get(f"{url}/v1/backends").json()["backends"]
    assert all(job.state.value == "succeeded" for job in jobs.values())
    assert {k: jobs[k].backend for k in expected} == expected  # by name and by capability
    assert jobs["plain"].backend in {"local", "a1111", "comfy"}  # the router's choice
    assert {(b["name"], b["kind"]) for b in fleet} == {
        ("local", "mock"), ("a1111", "automatic1111"), ("comfy", "comfyui"),
    }  # fmt: skip
