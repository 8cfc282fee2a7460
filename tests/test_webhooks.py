"""Webhooks end to end: a real easel server POSTs to a real receiving app on loopback."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response

from easel.api import create_app
from easel.config import Settings
from easel.effects.webhooks import check_webhook_url, sign
from tests.servers import serve

SECRET = "a webhook secret for tests"
SMALL = {"prompt": "a kite", "width": 64, "height": 64, "steps": 3}


@dataclass
class Receiver:
    """Records every delivery; answers 500 to the first ``fail_first`` of them."""

    fail_first: int = 0
    calls: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            body = await request.body()
            with self.lock:
                self.calls += 1
                if self.calls <= self.fail_first:
                    return Response(status_code=500)
                timestamp = request.headers["x-easel-timestamp"]
                expected = sign(SECRET.encode(), timestamp, body)
                self.received.append(
                    {
                        "event": json.loads(body),
                        "valid": hmac.compare_digest(
                            request.headers["x-easel-signature"], expected
                        ),
                        "timestamp": int(timestamp),
                    }
                )
            return Response(status_code=204)

        return app

    def wait_for(self, job_id: str, type: str, timeout: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                events = [r for r in self.received if r["event"]["job_id"] == job_id]
            if any(r["event"]["type"] == type for r in events):
                return events
            time.sleep(0.02)
        raise AssertionError(f"no {type} webhook for {job_id}; got {self.received}")


def easel(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "mock_step_delay": 0.0,
        "backend": "mock",
        "webhook_allowed_hosts": ["127.0.0.1"],
        "webhook_secret": SECRET,
        "webhook_retry_base_seconds": 0.05,
    }
    return Settings(**{**options, **overrides})


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
def hook_url(receiver: Receiver) -> Iterator[str]:
    with serve(receiver.app()) as url:
        yield f"{url}/hook"


def test_events_arrive_signed_and_in_order(
    tmp_path: Path, receiver: Receiver, hook_url: str
) -> None:
    with serve(create_app(easel(tmp_path))) as server:
        response = httpx.post(f"{server}/v1/jobs", json={**SMALL, "webhook_url": hook_url})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        got = receiver.wait_for(job_id, "succeeded")
        assert [r["event"]["type"] for r in got] == ["queued", "started", "succeeded"]
        assert all(r["valid"] for r in got)  # no progress ticks (easel.effects.webhooks)
        assert abs(got[0]["timestamp"] - time.time()) < 60
        assert got[-1]["event"]["images"][0]["index"] == 0
        job = _settled(server, job_id, events=3)
    assert job["webhook"] == {
        "url": hook_url, "delivered": True, "events": 3, "attempts": 3, "last_error": None,
    }  # fmt: skip


def test_a_failing_receiver_is_retried_until_it_takes_the_event(
    tmp_path: Path, receiver: Receiver, hook_url: str
) -> None:
    receiver.fail_first = 2
    with serve(create_app(easel(tmp_path))) as server:
        job_id = httpx.post(f"{server}/v1/jobs", json={**SMALL, "webhook_url": hook_url}).json()[
            "id"
        ]
        got = receiver.wait_for(job_id, "succeeded")
        assert [r["event"]["type"] for r in got] == ["queued", "started", "succeeded"]
        job = _settled(server, job_id, events=3)
    webhook = job["webhook"]
    assert webhook["delivered"] is True and webhook["events"] == 3
    assert webhook["attempts"] == 5  # two refusals, then three deliveries
    assert webhook["last_error"] == "HTTP 500"


def test_a_receiver_that_never_answers_leaves_the_job_undelivered(tmp_path: Path) -> None:
    settings = easel(tmp_path, webhook_max_attempts=2, webhook_timeout_seconds=1)
    dead = "http://127.0.0.1:9/hook"  # the discard port: connection refused
    with serve(create_app(settings)) as server:
        job_id = httpx.post(f"{server}/v1/jobs", json={**SMALL, "webhook_url": dead}).json()["id"]
        deadline = time.monotonic() + 20
        while (webhook := httpx.get(f"{server}/v1/jobs/{job_id}").json()["webhook"]) is None or (
            webhook["attempts"] < 6
        ):
            assert time.monotonic() < deadline, webhook
            time.sleep(0.05)
    assert webhook["delivered"] is False and webhook["events"] == 0
    assert "Connect" in webhook["last_error"]


@pytest.mark.parametrize(
    "url",
    ["http://evil.example/hook", "ftp://127.0.0.1/hook", "file:///etc/passwd", "not a url"],
)
def test_a_disallowed_webhook_is_refused_at_admission(
    tmp_path: Path, server_for_refusals: str, url: str
) -> None:
    response = httpx.post(f"{server_for_refusals}/v1/jobs", json={**SMALL, "webhook_url": url})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "webhook_not_allowed"
    assert httpx.get(f"{server_for_refusals}/v1/jobs").json()["jobs"] == []


@pytest.fixture
def server_for_refusals(tmp_path: Path) -> Iterator[str]:
    with serve(create_app(easel(tmp_path))) as url:
        yield url


def test_webhooks_are_refused_when_none_are_configured(server: str) -> None:
    response = httpx.post(
        f"{server}/v1/jobs", json={**SMALL, "webhook_url": "http://127.0.0.1/hook"}
    )
    assert response.status_code == 422
    assert "webhook_allowed_hosts" in response.json()["error"]["message"]
    assert httpx.get(f"{server}/v1/jobs").json()["jobs"] == []


def test_check_webhook_url_matches_hosts_not_prefixes() -> None:
    check_webhook_url("https://Hooks.Example.com/x", ["hooks.example.com"], True)
    for url in ("https://hooks.example.com.evil.net/x", "https://evil.net/?hooks.example.com"):
        with pytest.raises(Exception, match="not allowed"):
            check_webhook_url(url, ["hooks.example.com"], True)


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    digest = hmac.new(b"k", b"123.{}", hashlib.sha256).hexdigest()
    assert sign(b"k", "123", b"{}") == f"sha256={digest}"


def _settled(server: str, job_id: str, *, events: int) -> dict[str, Any]:
    """The job once ``events`` deliveries are recorded on it."""
    deadline = time.monotonic() + 10
    while True:
        job: dict[str, Any] = httpx.get(f"{server}/v1/jobs/{job_id}").json()
        if job.get("webhook") and job["webhook"]["events"] >= events:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def test_audio_jobs_post_their_clips(tmp_path: Path, receiver: Receiver, hook_url: str) -> None:
    from easel.backends.mock import MockAudioBackend
    from easel.runtime.facade import Runtime

    runtime = Runtime(easel(tmp_path), backends={"mock-audio": MockAudioBackend()})
    with serve(create_app(runtime=runtime)) as server:
        body = {"kind": "txt2speech", "text": "Hello.", "webhook_url": hook_url}
        job_id = httpx.post(f"{server}/v1/jobs", json=body).json()["id"]
        got = receiver.wait_for(job_id, "succeeded")
    assert all(r["valid"] for r in got)
    (clip,) = got[-1]["event"]["audio"]
    assert clip["media_type"] == "audio/wav" and clip["url"] == f"/v1/jobs/{job_id}/audio/0"
