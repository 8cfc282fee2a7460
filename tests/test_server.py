"""``easel serve`` as a process: SIGTERM with clients waiting on jobs, and a second server
on a busy data dir (``api/server.py``, ``store/sqlite.py``'s one owner per data dir).

Jobs are the mock's with a step delay: a long job holds the single worker while others
queue behind it and clients follow them (an SSE stream, a websocket, an A1111 call that
waits for its images).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from easel.jobs import JobState
from easel.store.sqlite import SqliteStore
from tests.servers import easel_command, easel_serve

GRACE = 1.0
SLOW = {"EASEL_MOCK_STEP_DELAY": "0.1", "EASEL_SHUTDOWN_GRACE_SECONDS": str(GRACE)}
LONG = {"prompt": "long", "width": 8, "height": 8, "steps": 150}  # 15 s: outlives the grace
SHORT = {"width": 8, "height": 8, "steps": 2}


def _until(http: httpx.Client, job_id: str, *states: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} never reached {states}")


def _stored(data: Path, *job_ids: str) -> dict[str, Any]:
    """The jobs as the SQLite store holds them (the server is gone: the file is free)."""

    async def read() -> dict[str, Any]:
        store = SqliteStore(data / "easel.db")
        await store.open()
        try:
            return {job_id: await store.get(job_id) for job_id in job_ids}
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.mark.slow
def test_sigterm_with_clients_waiting_on_jobs_ends_within_the_grace(tmp_path: Path) -> None:
    """Previously uvicorn waited for every open stream: more than 45 s. Now the running job
    gets the grace and goes back unspent, every stream ends after its job's last event, a
    waiting request gets 503 ``shutting_down``, and the process is gone soon after."""
    data = tmp_path / "data"
    seen: dict[str, Any] = {}
    with easel_serve(data, "--backend", "mock", env=SLOW) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        long = http.post("/v1/jobs", json=LONG).json()["id"]
        _until(http, long, "running")
        behind = http.post("/v1/jobs", json={**SHORT, "prompt": "behind"}).json()["id"]

        def sse() -> None:
            with http.stream("GET", f"/v1/jobs/{behind}/events") as stream:
                seen["sse"] = [line for line in stream.iter_lines() if line.startswith("event:")]

        def waiting() -> None:
            body = {"prompt": "a1111 waits", "width": 8, "height": 8, "steps": 2}
            response = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
            seen["a1111"] = response.status_code, response.text

        threads = [threading.Thread(target=sse), threading.Thread(target=waiting)]
        for thread in threads:
            thread.start()
        url = f"{server.url.replace('http', 'ws')}/v1/events?job_id={long}&after=0"
        with connect(url) as socket:
            assert json.loads(socket.recv(timeout=10))["type"] == "queued"  # it follows
            deadline = time.monotonic() + 30
            while len(http.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]) < 2:
                assert time.monotonic() < deadline, "the A1111 call never queued its job"
                time.sleep(0.05)

            began = time.monotonic()
            server.popen.send_signal(signal.SIGTERM)
            code = server.popen.wait(timeout=GRACE + 12)  # hung > 45 s before
            took = time.monotonic() - began
            print(f"\nSIGTERM with 3 clients waiting: exited in {took:.1f}s (grace {GRACE:.0f}s)")
            events = []
            with contextlib.suppress(ConnectionClosed):  # the server ends the stream
                while True:
                    events.append(json.loads(socket.recv(timeout=10))["type"])
            closed = socket.close_code
        for thread in threads:
            thread.join(timeout=10)
        http.close()
    assert code in {0, -signal.SIGTERM}, server.log.read_text()
    assert "Waiting for background tasks" not in server.log.read_text()
    assert events[-1] == "queued"  # the long job went back to the queue, and said so
    assert closed in {1012, 1013}  # service restart / "resume with after=<last id>"
    assert seen["sse"] == ["event: queued"]  # its stream ended; the job waits in line
    status, text = seen["a1111"]
    assert status == 503 and "shutting_down" in text, text

    jobs = _stored(data, long, behind)
    assert jobs[long].state is JobState.queued and jobs[long].attempts == 0  # not spent
    assert jobs[behind].state is JobState.queued
    # nothing lost: a restart runs them all
    fast = {"EASEL_MOCK_STEP_DELAY": "0"}
    with (
        easel_serve(data, "--backend", "mock", env=fast) as again,
        httpx.Client(base_url=again.url, timeout=60) as http,
    ):
        for job_id in (long, behind):
            assert _until(http, job_id, "succeeded", "failed")["state"] == "succeeded"


@pytest.mark.slow
def test_a_second_server_on_a_busy_data_dir_exits_and_the_first_finishes_its_jobs(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = {"EASEL_MOCK_STEP_DELAY": "0.1"}  # the running job takes 15 s: it outlasts the
    # second server's start and refusal, even on a loaded machine
    with easel_serve(data, "--backend", "mock", env=env) as first:
        http = httpx.Client(base_url=first.url, timeout=60)
        running = http.post("/v1/jobs", json={**SHORT, "prompt": "running", "steps": 150})
        running_id = running.json()["id"]
        _until(http, running_id, "running")
        queued = [
            http.post("/v1/jobs", json={**SHORT, "prompt": f"queued {i}"}).json()["id"]
            for i in range(3)
        ]
        second = subprocess.run(
            [easel_command(), "serve", "--port", "0", "--data-dir", str(data),
             "--backend", "mock"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1, second.stdout + second.stderr
        message = second.stdout + second.stderr
        assert f"in use by another easel process (pid {first.popen.pid})" in message
        assert "store_in_use" in message
        assert http.get(f"/v1/jobs/{running_id}").json()["state"] == "running"  # untouched
        finals = {job_id: _until(http, job_id, "succeeded", "failed", "cancelled")
                  for job_id in (running_id, *queued)}  # fmt: skip
        http.close()
    assert {job["state"] for job in finals.values()} == {"succeeded"}
    assert finals[running_id]["attempts"] == 1  # its run was never disturbed
