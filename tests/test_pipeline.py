"""The text-to-image microservice routes (``/pipeline/*``), one pipeline per caller."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
from PIL import Image

from easel.api import create_app
from easel.config import Settings
from tests.servers import serve

ANN = {"X-Easel-User": "ann"}


def _wait_completed(url: str, headers: dict[str, str]) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        status: dict[str, object] = httpx.get(f"{url}/pipeline/status", headers=headers).json()
        if not status["running"]:
            return status
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_select_run_status_image(server: str) -> None:
    device = httpx.post(f"{server}/pipeline/select-device", json={"device": "GPU"}).json()
    assert device["status"] == "success" and "auto" in device["message"]

    idle = httpx.get(f"{server}/pipeline/status", headers=ANN).json()
    assert (idle["running"], idle["completed"]) == (False, False)
    not_yet = httpx.get(f"{server}/pipeline/image", headers=ANN)
    assert (not_yet.status_code, not_yet.json()["error"]["code"]) == (400, "pipeline_not_done")

    started = httpx.post(
        f"{server}/pipeline/run",
        json={"prompt": "a red fox", "width": 128, "height": 64, "num_inference_steps": 2},
        headers=ANN,
    ).json()
    assert started["status"] == "success"
    status = _wait_completed(server, ANN)
    assert (status["completed"], status["job_id"]) == (True, started["job_id"])

    image = httpx.get(f"{server}/pipeline/image", headers=ANN)
    assert image.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(image.content)) as png:
        assert png.size == (128, 64)
        assert "Steps: 2" in png.info["parameters"]

    # another caller has its own pipeline
    bob = httpx.get(f"{server}/pipeline/status", headers={"X-Easel-User": "bob"}).json()
    assert (bob["running"], bob["completed"]) == (False, False)
    job = httpx.get(f"{server}/v1/jobs/{started['job_id']}").json()
    assert (job["request"]["user_id"], job["request"]["metadata"]) == ("ann", {"api": "pipeline"})


def test_a_second_run_while_one_is_unfinished_is_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0.02, backend="mock")
    with serve(create_app(settings)) as url:
        run = {"prompt": "slow", "width": 64, "height": 64, "num_inference_steps": 50}
        assert httpx.post(f"{url}/pipeline/run", json=run).status_code == 200
        busy = httpx.post(f"{url}/pipeline/run", json=run)
        assert (busy.status_code, busy.json()["error"]["code"]) == (400, "pipeline_busy")
        assert httpx.get(f"{url}/pipeline/status").json()["running"] is True
