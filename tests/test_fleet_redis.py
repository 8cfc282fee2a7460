"""A fleet scaled out on a real Redis: API-only replicas build no backend and route by what
live ``easel worker`` processes advertise; a worker that dies takes its backend out.

Also the README's scale-out commands, run literally (with this machine's paths)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import easel_command, easel_serve

FLEET = """
[[backends]]
name = "painter"
kind = "mock"
capabilities = ["txt2img", "img2img", "negative_prompt", "seed"]
options = { step_delay = 0.002, models = ["sdxl"] }

[[backends]]
name = "sketcher"
kind = "mock"
capabilities = ["txt2img", "negative_prompt", "seed"]
options = { step_delay = 0.002, models = ["sdxl", "flux"] }
"""
SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def _env(redis_url: str) -> dict[str, str]:
    return {
        "EASEL_REDIS_PREFIX": f"fleet:{uuid.uuid4().hex[:8]}:",
        "EASEL_HEARTBEAT_SECONDS": "0.5",
        "EASEL_MOCK_STEP_DELAY": "0",
        "EASEL_SHUTDOWN_GRACE_SECONDS": "1",
    }


def _worker(
    stack: ExitStack, base: Path, env: dict[str, str], *args: str
) -> subprocess.Popen[bytes]:
    log = stack.enter_context((base / f"worker-{uuid.uuid4().hex[:6]}.log").open("wb"))
    process = subprocess.Popen(
        [easel_command(), "worker", *args], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )  # fmt: skip

    def stop() -> None:
        if process.poll() is None:
            process.kill()
        process.wait()

    stack.callback(stop)
    return process


def _until(check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise TimeoutError("condition never held")


def _backends(url: str) -> dict[str, dict[str, Any]]:
    listing = httpx.get(f"{url}/v1/backends").json()["backends"]
    return {backend["name"]: backend for backend in listing}


def _job(url: str, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    return job


def _post(url: str, **fields: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", json={"prompt": "p", **SMALL, **fields}, timeout=10)


@pytest.mark.slow
def test_api_replica_routes_by_what_workers_advertise(
    redis_url: str, tmp_path: Path, stack: ExitStack
) -> None:
    config = tmp_path / "easel.toml"
    config.write_text(FLEET)
    env = _env(redis_url)
    data = tmp_path / "data"
    api = stack.enter_context(
        easel_serve(data, "--redis", redis_url, "--concurrency", "0", env=env)
    )
    common = ("--redis", redis_url, "--data-dir", str(data), "--config", str(config))
    _worker(stack, tmp_path, env, *common, "--only", "painter")
    sketcher = _worker(stack, tmp_path, env, *common, "--only", "sketcher")
    _until(lambda: set(_backends(api.url)) == {"painter", "sketcher"})
    listed = _backends(api.url)
    assert listed["sketcher"]["where"] == "workers"
    assert listed["sketcher"]["models"] == ["flux", "mock", "sdxl"]
    assert listed["painter"]["capabilities"] == ["img2img", "negative_prompt", "seed", "txt2img"]

    edit = _post(api.url, model="sdxl", init_image=_png(), strength=0.5).json()
    flux = _post(api.url, model="flux").json()
    assert (edit["backend"], flux["backend"]) == ("painter", "sketcher")
    for job in (edit, flux):
        done = _until(lambda j=job: _job(api.url, j["id"])["state"] == "succeeded" and j)
        assert _job(api.url, done["id"])["runs"][0]["backend"] == done["backend"]

    # the sketcher dies: its backend leaves the fleet once its heartbeats stop
    sketcher.send_signal(signal.SIGSTOP)  # frozen first: jobs queue for it
    queued_flux = _post(api.url, model="flux", backend="sketcher").json()
    movable = _post(api.url, model="sdxl").json()
    sketcher.kill()
    _until(lambda: set(_backends(api.url)) == {"painter"})
    # a job that painter can run moves there if it was the sketcher's (it named none)...
    _until(lambda: _job(api.url, movable["id"])["state"] == "succeeded")
    assert _job(api.url, movable["id"])["backend"] == "painter"
    # ...one that only a sketcher could run waits for one, and new ones are refused
    waiting = _job(api.url, queued_flux["id"])
    assert waiting["state"] == "queued" and waiting["backend"] == "sketcher"
    assert "no live worker runs backend 'sketcher'" in waiting["waiting_reason"]
    refused = _post(api.url, model="flux")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    # a new sketcher picks the waiting job up
    _worker(stack, tmp_path, env, *common, "--only", "sketcher")
    _until(lambda: _job(api.url, queued_flux["id"])["state"] == "succeeded")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_readme_scale_out_commands_run_jobs(
    redis_url: str, tmp_path: Path, tiny_model_dir: Path, stack: ExitStack
) -> None:
    """README "Scaling out on Redis", as written (this machine's Redis, folders, model)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    serve_line = (
        "easel serve  --redis redis://10.0.0.5:6379/0 --concurrency 0 --data-dir /shared/easel"
    )
    worker_line = (
        "easel worker --redis redis://10.0.0.5:6379/0 --backend diffusers --model /models/sdxl"
    )
    assert serve_line in readme and worker_line in readme
    shared = tmp_path / "shared-easel"

    def literal(line: str) -> list[str]:
        words = line.replace("redis://10.0.0.5:6379/0", redis_url).split()
        words = [str(shared) if w == "/shared/easel" else w for w in words]
        return [str(tiny_model_dir) if w == "/models/sdxl" else w for w in words]

    env = _env(redis_url)
    api = stack.enter_context(easel_serve(shared, *literal(serve_line)[2:], env=env))
    _worker(stack, tmp_path, env, *literal(worker_line)[2:], "--data-dir", str(shared))
    # loading diffusers and the model takes a while on a busy CPU
    _until(lambda: httpx.get(f"{api.url}/v1/workers").json()["workers"], timeout=300)
    response = _post(api.url)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    done = _until(
        lambda: _job(api.url, job_id)["state"] in {"succeeded", "failed"} and True, timeout=120
    )
    assert done and _job(api.url, job_id)["state"] == "succeeded"
    image = httpx.get(f"{api.url}/v1/jobs/{job_id}/images/0")
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"


def _png() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 90, 200)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()
