"""One runtime contract over every deployment shape: what a user sees must not depend on it.

Each test runs against real processes on loopback:

- ``embedded``: one ``easel serve`` (API + worker + SQLite); "another replica" is the same
  server, a restart is that server stopped and started again on its data dir;
- ``redis``: two ``easel serve --redis URL --concurrency 0`` API replicas and one
  ``easel worker --redis URL`` process on a real redis-server; a restart restarts replica 0.

Webhooks go to a receiver on loopback, uploads to moto's S3 server. Every request carries
a service token (service ``bot``, at most ``CAP`` active jobs).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Process, easel_command, easel_serve, serve
from tests.test_webhooks import SECRET, Receiver

pytestmark = pytest.mark.slow

TOKEN = "contract-token-0123456789"
CAP = 8
"""Above what the other tests have active at once; the cap test fills it from both replicas."""
BUCKET = "contract"
QUICK = {"prompt": "a kite", "width": 8, "height": 8, "steps": 1}
LONG_STEPS = 150  # x 50 ms a step: a job that stays active while a test looks at it
AUTH = {"authorization": f"Bearer {TOKEN}"}


class Deployment:
    """The processes of one deployment shape, restartable, sharing one environment."""

    def __init__(self, shape: str, base: Path, env: dict[str, str], redis_url: str) -> None:
        self.shape = shape
        self.base = base
        self.env = env
        self.redis_url = redis_url
        self.data = base / "data"
        self._stack = ExitStack()
        self._apis: list[tuple[ExitStack, Process]] = []

    def start(self) -> Deployment:
        if self.shape == "embedded":
            self._apis.append(self._serve("--backend", "mock"))
        else:
            api_only = ("--redis", self.redis_url, "--concurrency", "0")
            self._apis.extend(self._serve(*api_only) for _ in range(2))
            self._stack.enter_context(self._worker())
            deadline = time.monotonic() + 60
            while not httpx.get(f"{self.urls[0]}/v1/workers", headers=AUTH).json()["workers"]:
                assert time.monotonic() < deadline, (self.base / "worker.log").read_text()
                time.sleep(0.1)
        return self

    def _serve(self, *args: str) -> tuple[ExitStack, Process]:
        stack = ExitStack()
        return stack, stack.enter_context(easel_serve(self.data, *args, env=self.env))

    def _worker(self) -> Any:
        log = open(self.base / "worker.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(
            [easel_command(), "worker", "--redis", self.redis_url, "--backend", "mock",
             "--data-dir", str(self.data), "--heartbeat-seconds", "0.5"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
        )  # fmt: skip
        stack = ExitStack()
        stack.callback(log.close)
        stack.callback(process.wait)
        stack.callback(process.kill)
        return stack

    @property
    def urls(self) -> list[str]:
        """Two replicas to compare (embedded: the one server, twice)."""
        urls = [process.url for _, process in self._apis]
        return urls if len(urls) > 1 else urls * 2

    def restart(self) -> None:
        """Stop replica 0 (killed: nothing is flushed on the way out) and start it again."""
        stack, process = self._apis[0]
        args = process.popen.args[6:] if isinstance(process.popen.args, list) else []
        stack.close()
        self._apis[0] = self._serve(*args)

    def close(self) -> None:
        for stack, _ in self._apis:
            stack.close()
        self._stack.close()

    # -- calls ----------------------------------------------------------------------

    def submit(self, replica: int = 0, *, key: str | None = None, **body: Any) -> httpx.Response:
        headers = {**AUTH, **({"Idempotency-Key": key} if key else {})}
        response = httpx.post(
            f"{self.urls[replica]}/v1/jobs", json={**QUICK, **body}, headers=headers, timeout=30
        )
        if response.status_code not in {202, 429}:
            raise AssertionError(f"{response.status_code} {response.text}")
        return response

    def job(self, job_id: str, replica: int = 0) -> dict[str, Any]:
        response = httpx.get(f"{self.urls[replica]}/v1/jobs/{job_id}", headers=AUTH, timeout=30)
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job

    def until(
        self, job_id: str, done: Callable[[dict[str, Any]], bool], replica: int = 0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while not done(job := self.job(job_id, replica)):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        return job

    def cancel(self, job_id: str) -> None:
        httpx.delete(f"{self.urls[0]}/v1/jobs/{job_id}", headers=AUTH, timeout=30)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.servers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    ).create_bucket(Bucket=BUCKET)  # fmt: skip
    yield url
    server.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    hooks = Receiver()
    with serve(hooks.app()) as url:
        yield hooks, f"{url}/hook"


@pytest.fixture(scope="module", params=["embedded", "redis"])
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, moto_url: str
) -> Iterator[Deployment]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    env = {
        "EASEL_REDIS_PREFIX": f"contract:{uuid.uuid4().hex[:8]}:",
        "EASEL_MOCK_STEP_DELAY": "0.05",
        "EASEL_HEARTBEAT_SECONDS": "0.5",
        "EASEL_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
        "EASEL_WEBHOOK_SECRET": SECRET,
        "EASEL_WEBHOOK_RETRY_BASE_SECONDS": "0.05",
        "EASEL_SAFETY__TOKENS": json.dumps([{"service": "bot", "token": TOKEN}]),
        "EASEL_SAFETY__SERVICE_MAX_ACTIVE": str(CAP),
        "EASEL_S3__BUCKET": BUCKET,
        "EASEL_S3__ENDPOINT_URL": moto_url,
        "EASEL_S3__REGION": "us-east-1",
        "EASEL_S3__ACCESS_KEY_ID": "test",
        "EASEL_S3__SECRET_ACCESS_KEY": "test",
        "EASEL_S3__PRESIGN_SECONDS": "0",
    }
    base = tmp_path_factory.mktemp(request.param)
    deployment = Deployment(request.param, base, env, redis_url).start()
    yield deployment
    deployment.close()


def _final(job: dict[str, Any]) -> bool:
    return job["state"] in {"succeeded", "failed", "cancelled"}


def test_every_event_is_one_webhook_and_its_state_is_on_every_replica(
    deployment: Deployment, receiver: tuple[Receiver, str]
) -> None:
    hooks, url = receiver
    ids = [deployment.submit(i % 2, webhook_url=url).json()["id"] for i in range(6)]
    for job_id in ids:
        hooks.wait_for(job_id, "uploaded")
    states = [deployment.until(i, lambda j: (j["webhook"] or {}).get("events") == 4) for i in ids]
    assert [deployment.job(i, 1)["webhook"] for i in ids] == [s["webhook"] for s in states]
    sent = Counter(
        (r["event"]["job_id"], r["event"]["type"])
        for r in hooks.received
        if r["event"]["job_id"] in ids
    )
    assert sorted(sent) == sorted(
        (i, t) for i in ids for t in ("queued", "started", "succeeded", "uploaded")
    )
    assert set(sent.values()) == {1}  # exactly one POST per event, whatever the replicas


def test_upload_and_webhook_state_survive_a_restart(
    deployment: Deployment, receiver: tuple[Receiver, str]
) -> None:
    hooks, url = receiver
    job_id = deployment.submit(1, webhook_url=url).json()["id"]
    hooks.wait_for(job_id, "uploaded")
    before = deployment.until(job_id, lambda j: (j["webhook"] or {}).get("events") == 4, 1)
    assert before["images"][0]["remote_url"].startswith(deployment.env["EASEL_S3__ENDPOINT_URL"])
    deployment.restart()
    after = deployment.job(job_id, 0)
    assert after["images"] == before["images"] and after["webhook"] == before["webhook"]
    assert after["webhook"]["state"] == "delivered"


def test_service_caps_are_shared_and_a_resend_at_the_cap_returns_the_job(
    deployment: Deployment,
) -> None:
    held = [
        deployment.submit(i % 2, key=f"long-{i}-{uuid.uuid4().hex}", steps=LONG_STEPS)
        for i in range(CAP)
    ]
    try:
        assert [r.status_code for r in held] == [202] * CAP
        refused = deployment.submit(1)  # the cap counts both replicas' jobs
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "service_queue_full"
        key = held[0].request.headers["idempotency-key"]
        again = deployment.submit(1, key=key, steps=LONG_STEPS)
        assert again.status_code == 202 and again.json()["id"] == held[0].json()["id"]
    finally:
        for response in held:
            deployment.cancel(response.json()["id"])
    for response in held:
        deployment.until(response.json()["id"], _final)
    assert deployment.submit(1).status_code == 202  # the slots are free again


def test_an_eta_on_every_replica_after_jobs_ran(deployment: Deployment) -> None:
    ran = [deployment.submit(i % 2).json()["id"] for i in range(3)]
    for job_id in ran:
        deployment.until(job_id, _final)
    long = deployment.submit(0, steps=LONG_STEPS).json()["id"]
    try:
        deployment.until(long, lambda j: j["state"] == "running")
        waiting = deployment.submit(1).json()["id"]
        views = [
            deployment.job(job_id, replica) for job_id in (long, waiting) for replica in (0, 1)
        ]
        assert [view["position"] for view in views] == [None, None, 0, 0]
        # run times measured by the worker are kept in the store: API-only replicas too
        assert all(view["eta_seconds"] is not None for view in views), views
        assert all(view["eta_seconds"] > 0 for view in views), views
    finally:
        deployment.cancel(long)
        deployment.until(long, _final)
