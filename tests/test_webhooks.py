"""Webhooks end to end: a real easel server POSTs to a real receiving app on loopback."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from collections import Counter
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
    tries: list[tuple[str, str]] = field(default_factory=list)
    """(X-Easel-Delivery, event type) of every POST, refused ones too."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            body = await request.body()
            with self.lock:
                self.calls += 1
                self.tries.append((request.headers["x-easel-delivery"], json.loads(body)["type"]))
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
                        "delivery": request.headers["x-easel-delivery"],
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
        "url": hook_url, "state": "delivered", "delivered": True, "events": 3, "attempts": 3,
        "dead_letters": 0, "last_error": None,
    }  # fmt: skip
    assert len({r["delivery"] for r in got}) == 3  # one idempotency id per event


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
    first = [delivery for delivery, type in receiver.tries if type == "queued"]
    assert len(first) == 3 and len(set(first)) == 1  # retries carry the event's id


def test_a_receiver_that_never_answers_ends_in_dead_letters(tmp_path: Path) -> None:
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
    assert webhook["state"] == "dead" and webhook["dead_letters"] == 3
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


def _job_webhook(server: str, job_id: str, done: Any, timeout: float = 20) -> dict[str, Any]:
    """The job's ``webhook`` once ``done(webhook)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        webhook = httpx.get(f"{server}/v1/jobs/{job_id}").json()["webhook"]
        if webhook is not None and done(webhook):
            return dict(webhook)
        assert time.monotonic() < deadline, webhook
        time.sleep(0.02)


def test_a_pending_delivery_survives_a_restart(
    tmp_path: Path, receiver: Receiver, hook_url: str
) -> None:
    """Embedded: the queue is a table beside the job database; a server restarted while
    an event waits for its retry sends it, once."""
    receiver.fail_first = 10**6  # refuses everything until the restart
    settings = easel(tmp_path, webhook_retry_base_seconds=0.3)
    with serve(create_app(settings)) as server:
        job_id = httpx.post(f"{server}/v1/jobs", json={**SMALL, "webhook_url": hook_url}).json()[
            "id"
        ]
        _job_webhook(server, job_id, lambda w: w["state"] == "retrying")
    receiver.fail_first = 0
    with serve(create_app(settings)) as server:
        got = receiver.wait_for(job_id, "succeeded")
        webhook = _job_webhook(server, job_id, lambda w: w["events"] == 3)
    assert [r["event"]["type"] for r in got] == ["queued", "started", "succeeded"]
    assert webhook["state"] == "delivered" and webhook["attempts"] >= 4


def _replicas(tmp_path: Path, redis_url: str, **overrides: Any) -> list[Settings]:
    """Two API replicas on one Redis: one with a worker, one API-only."""
    prefix = f"hooks:{uuid.uuid4().hex[:8]}:"
    common = {"redis_url": redis_url, "redis_prefix": prefix, **overrides}
    return [
        easel(tmp_path / "a", concurrency=1, **common),
        easel(tmp_path / "b", concurrency=0, **common),
    ]


def test_two_replicas_deliver_each_event_exactly_once(
    tmp_path: Path, redis_url: str, receiver: Receiver, hook_url: str
) -> None:
    """A consumer group on the event stream: each event to one replica, acknowledged."""
    receiver.fail_first = 2  # the first two POSTs fail: retried by whoever holds them
    first, second = _replicas(tmp_path, redis_url)
    with serve(create_app(first)) as a, serve(create_app(second)) as b:
        ids = [
            httpx.post(f"{url}/v1/jobs", json={**SMALL, "webhook_url": hook_url}).json()["id"]
            for url in (a, b) * 4
        ]
        for job_id in ids:
            receiver.wait_for(job_id, "succeeded")
        webhooks = [_job_webhook(b, job_id, lambda w: w["events"] == 3) for job_id in ids]
        assert [_job_webhook(a, i, lambda w: w["events"] == 3) for i in ids] == webhooks
    sent = Counter((r["event"]["job_id"], r["event"]["type"]) for r in receiver.received)
    assert set(sent.values()) == {1} and len(sent) == 3 * len(ids)
    assert sum(w["attempts"] for w in webhooks) == 3 * len(ids) + 2
    assert all(w["state"] == "delivered" for w in webhooks)


def test_a_dead_letter_on_redis_is_on_the_job_for_every_replica(
    tmp_path: Path, redis_url: str
) -> None:
    first, second = _replicas(
        tmp_path, redis_url, webhook_max_attempts=2, webhook_timeout_seconds=1
    )
    dead = "http://127.0.0.1:9/hook"  # the discard port: connection refused
    with serve(create_app(first)) as a, serve(create_app(second)) as b:
        job_id = httpx.post(f"{b}/v1/jobs", json={**SMALL, "webhook_url": dead}).json()["id"]
        webhook = _job_webhook(b, job_id, lambda w: w["dead_letters"] == 3)
        assert _job_webhook(a, job_id, lambda w: w["dead_letters"] == 3) == webhook
    assert webhook["state"] == "dead" and webhook["attempts"] == 6 and webhook["events"] == 0
    assert "Connect" in webhook["last_error"]


async def test_a_delivery_held_by_a_dead_replica_is_taken_over(redis_url: str) -> None:
    """A replica that died mid-POST leaves its delivery pending in the group; after the
    lease another replica claims it (XAUTOCLAIM) with the same idempotency id."""
    from easel.effects.deliveries import Outcome, RedisDeliveries
    from easel.events.redis import RedisEventBus
    from easel.jobs import Event, EventType
    from easel.store.redis import RedisStore

    prefix = f"hooks:{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_url, prefix=prefix)
    bus = RedisEventBus(redis_url, prefix=prefix)
    dying = RedisDeliveries(redis_url, store, prefix=prefix, lease_seconds=0.3, block_ms=50)
    survivor = RedisDeliveries(redis_url, store, prefix=prefix, lease_seconds=0.3, block_ms=50)
    await store.open()
    await bus.open()
    await dying.open()
    await survivor.open()
    try:
        await bus.publish(Event(type=EventType.progress, job_id="j1", user_id="u"))
        sent = await bus.publish(Event(type=EventType.queued, job_id="j1", user_id="u"))
        (held,) = await dying.take(10)  # progress is acknowledged, never handed out
        assert held.event.id == sent.id and held.attempts == 0
        deadline = time.monotonic() + 10
        while not (taken := await survivor.take(10)):
            assert time.monotonic() < deadline
        assert [d.id for d in taken] == [held.id]
        await survivor.settle(taken[0], "http://h/x", Outcome.delivered)
        assert await survivor.take(10) == []  # acknowledged: nobody gets it again
    finally:
        for part in (survivor, dying, bus, store):
            await part.close()
