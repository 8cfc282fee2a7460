"""Queue behaviour through a real server: ETAs, retries, batches, caps, cancelling a user."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from easel.api import create_app
from easel.backends.mock import MockBackend
from easel.config import Settings
from easel.runtime.facade import Runtime
from tests.servers import serve
from tests.test_api import SMALL, events_until_final, hold_worker, submit


def server_with(tmp_path: Path, **options: Any) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path / "data", backend="mock", **options)
    backend = MockBackend(step_delay=settings.mock_step_delay)
    runtime = Runtime(settings, backends={"mock": backend})
    with serve(create_app(runtime=runtime)) as url:
        yield url


@pytest.fixture
def batching_server(tmp_path: Path) -> Iterator[str]:
    yield from server_with(tmp_path, mock_step_delay=0.01, batch_limit=4)


@pytest.fixture
def retrying_server(tmp_path: Path) -> Iterator[str]:
    yield from server_with(tmp_path, mock_step_delay=0.0, retry_base_seconds=0.05)


@pytest.fixture
def small_queue_server(tmp_path: Path) -> Iterator[str]:
    yield from server_with(tmp_path, mock_step_delay=0.01, max_queue_size=2)


def test_compatible_jobs_run_as_one_batch_with_their_own_events(batching_server: str) -> None:
    url = batching_server
    blocker = hold_worker(url)
    ids = [submit(url, prompt=f"fox {i}", user_id=f"u{i}", seed=100 + i)["id"] for i in range(4)]
    different = submit(url, prompt="bigger", user_id="u9", width=128, height=128)["id"]
    httpx.delete(f"{url}/v1/jobs/{blocker}")
    events = events_until_final(url, {*ids, different})
    started = [e["job_id"] for e in events if e["type"] == "started"]
    # the four compatible jobs start together, before the one of another size
    assert started[-5:-1] == ids and started[-1] == different
    position = {(e["type"], e["job_id"], e.get("step")): n for n, e in enumerate(events)}
    assert max(position["started", i, None] for i in ids) < position["progress", ids[0], 1]
    for job_id, seed in zip(ids, range(100, 104), strict=True):
        mine = [e for e in events if e["job_id"] == job_id]
        assert [e["type"] for e in mine][-5:] == ["started", "progress", "progress",
                                                  "progress", "succeeded"]  # fmt: skip
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        assert job["images"][0]["seed"] == seed and job["request"]["prompt"].startswith("fox")


def test_a_transient_failure_is_retried_then_fails_with_its_reason(retrying_server: str) -> None:
    url = retrying_server
    job = submit(url, prompt="flaky [mock:unavailable]")
    events = [e for e in events_until_final(url, {job["id"]}) if e["job_id"] == job["id"]]
    types = [e["type"] for e in events]
    # three attempts (the default), re-queued twice in between
    assert types.count("started") == 3 and types.count("queued") == 3
    assert types[-1] == "failed"
    final = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
    assert final["attempts"] == 3 and final["error"]["code"] == "backend_unavailable"


def test_a_permanent_failure_is_not_retried(retrying_server: str) -> None:
    job = submit(retrying_server, prompt="broken [mock:fail]")
    events = events_until_final(retrying_server, {job["id"]})
    assert [e["type"] for e in events if e["job_id"] == job["id"]].count("started") == 1
    assert httpx.get(f"{retrying_server}/v1/jobs/{job['id']}").json()["attempts"] == 1


def test_the_global_queue_cap_is_429_with_the_count(small_queue_server: str) -> None:
    url = small_queue_server
    blocker = hold_worker(url)
    submit(url, prompt="one", user_id="a")
    submit(url, prompt="two", user_id="b")
    refused = httpx.post(f"{url}/v1/jobs", json={"prompt": "three", "user_id": "c", **SMALL})
    assert refused.status_code == 429
    assert refused.json()["error"] == {
        "code": "queue_full", "message": refused.json()["error"]["message"], "count": 2,
    }  # fmt: skip
    httpx.delete(f"{url}/v1/jobs/{blocker}")


def test_queue_counts_positions_etas_and_averages(slow_server: str) -> None:
    url = slow_server
    warm = submit(url, prompt="measure me", user_id="x")
    events_until_final(url, {warm["id"]})  # one run measured: ETAs are known from now on
    blocker = hold_worker(url)
    first = submit(url, prompt="a", user_id="alice")
    second = submit(url, prompt="b", user_id="alice")
    premium = submit(url, prompt="p", user_id="bob", premium=True)
    assert first["eta_seconds"] is not None and first["average_seconds"] is not None
    queue = httpx.get(f"{url}/v1/queue").json()
    # one projection, one instant (the blocker's time left shrinks between two reads)
    etas = {row["job_id"]: row["eta_seconds"] for row in queue["waiting"]}
    assert etas[second["id"]] > etas[first["id"]]
    assert queue["queued"] == 3 and queue["running"] == 1
    assert queue["tiers"] == {"0": 2, "10": 1} and queue["users"] == {"alice": 2, "bob": 1}
    assert queue["averages"][0]["width"] == 64
    assert httpx.get(f"{url}/v1/jobs/{premium['id']}").json()["position"] == 0
    httpx.delete(f"{url}/v1/jobs/{blocker}")


def test_cancel_all_jobs_of_a_user(slow_server: str) -> None:
    url = slow_server
    running = hold_worker(url)  # user "blocker"
    mine = [submit(url, prompt=f"m{i}", user_id="blocker")["id"] for i in range(2)]
    theirs = submit(url, prompt="other", user_id="bob")["id"]
    cancelled = httpx.delete(f"{url}/v1/jobs", params={"user_id": "blocker"}).json()["jobs"]
    assert {j["id"] for j in cancelled} == {running, *mine}
    events = events_until_final(url, {running, *mine, theirs})
    assert {e["job_id"] for e in events if e["type"] == "cancelled"} == {running, *mine}
    assert httpx.get(f"{url}/v1/jobs/{theirs}").json()["state"] == "succeeded"


def test_queued_event_carries_position_and_eta(slow_server: str) -> None:
    url = slow_server
    blocker = hold_worker(url)
    with connect(f"{url.replace('http', 'ws')}/v1/events?user_id=carol") as ws:
        submit(url, prompt="c", user_id="carol")
        queued = json.loads(ws.recv(timeout=10))
    assert queued["type"] == "queued" and queued["position"] == 0
    httpx.delete(f"{url}/v1/jobs/{blocker}")
