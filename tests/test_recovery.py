"""Nothing accepted is lost: ``easel serve`` killed with SIGKILL mid-job, then restarted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect

from tests.servers import easel_serve

SLOW = {"EASEL_MOCK_STEP_DELAY": "0.05"}


def wait_for(url: str, job_id: str, wanted: str) -> dict[str, object]:
    with connect(f"{url.replace('http', 'ws')}/v1/events?job_id={job_id}") as ws:
        while True:
            event: dict[str, object] = json.loads(ws.recv(timeout=30))
            if event["type"] == wanted:
                return event
            assert event["type"] not in {"failed", "cancelled"}, event


def final_state(url: str, job_id: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state: str = httpx.get(f"{url}/v1/jobs/{job_id}").json()["state"]
        if state in {"succeeded", "failed", "cancelled"}:
            return state
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not end")


def test_jobs_survive_a_killed_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with easel_serve(data, env=SLOW) as first:
        running = httpx.post(
            f"{first.url}/v1/jobs", json={"prompt": "interrupted", "width": 64, "height": 64,
                                          "steps": 150}
        ).json()  # fmt: skip
        queued = httpx.post(
            f"{first.url}/v1/jobs", json={"prompt": "waiting", "width": 64, "height": 64,
                                          "steps": 2}
        ).json()  # fmt: skip
        wait_for(first.url, running["id"], "progress")
        first.popen.kill()  # no shutdown, no requeue: a crash

    with easel_serve(data, env={"EASEL_MOCK_STEP_DELAY": "0"}) as second:
        for job_id in (running["id"], queued["id"]):
            assert final_state(second.url, job_id) == "succeeded"
        recovered = httpx.get(f"{second.url}/v1/jobs/{running['id']}").json()
        assert recovered["state"] == "succeeded"
        assert recovered["attempts"] == 2  # the lost run counts as an attempt
        assert httpx.get(f"{second.url}/v1/jobs/{queued['id']}").json()["attempts"] == 1
