"""Two services on one deployment: neither reads, counts or stops the other's jobs, on any
door, embedded and on Redis; their tokens never reach a log line.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.servers import easel_serve
from tests.tenants import ADMIN, ALPHA, BRAVO, SMALL, TOKENS, bearer, two_services_server


@pytest.fixture(scope="module")
def two_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with two_services_server(tmp_path_factory.mktemp("tenants") / "data") as url:
        yield url


def test_an_idempotency_key_never_crosses_services(two_services: str) -> None:
    key = {"Idempotency-Key": "shared-key-1"}
    body = {**SMALL, "user_id": "bob", "steps": 1}
    bravo = httpx.post(f"{two_services}/v1/jobs", json={**body, "prompt": "bravo's secret"},
                       headers=bearer(BRAVO, **key))  # fmt: skip
    alpha = httpx.post(f"{two_services}/v1/jobs", json={**body, "prompt": "alpha's own"},
                       headers=bearer(ALPHA, **key))  # fmt: skip
    assert bravo.status_code == alpha.status_code == 202
    assert alpha.json()["id"] != bravo.json()["id"]
    assert alpha.json()["request"]["prompt"] == "alpha's own"
    assert alpha.json()["service"] == "alpha"
    again = httpx.post(f"{two_services}/v1/jobs", json={**body, "prompt": "alpha's own"},
                       headers=bearer(ALPHA, **key))  # fmt: skip
    assert again.json()["id"] == alpha.json()["id"]  # the key still works within a service


def test_a1111_current_job_is_the_callers_within_its_service(two_services: str) -> None:
    """Bravo's carol runs a job; alpha's carol sees no progress and cannot interrupt it."""
    bravo = bearer(BRAVO, **{"X-Easel-User": "carol"})
    alpha = bearer(ALPHA, **{"X-Easel-User": "carol"})
    result: dict[str, Any] = {}

    def run() -> None:
        body = {"prompt": "bravo's long one", "width": 64, "height": 64, "steps": 40}
        response = httpx.post(f"{two_services}/sdapi/v1/txt2img", json=body, headers=bravo,
                              timeout=60)  # fmt: skip
        result["response"] = response

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # until bravo's carol sees her job running
            seen = httpx.get(f"{two_services}/sdapi/v1/progress", headers=bravo).json()
            if seen["state"]["sampling_step"] > 0:
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        other = httpx.get(f"{two_services}/sdapi/v1/progress", headers=alpha).json()
        assert other["state"]["job"] == "" and other["progress"] == 0
        assert httpx.post(f"{two_services}/sdapi/v1/interrupt", headers=alpha).status_code == 200
        after = httpx.get(f"{two_services}/sdapi/v1/progress", headers=bravo).json()
        assert after["state"]["interrupted"] is False
    finally:
        thread.join(timeout=60)
    response = result["response"]
    assert response.status_code == 200 and len(response.json()["images"]) == 1


def test_tokens_never_reach_the_log(tmp_path: Path) -> None:
    """``easel serve`` at INFO; every door tried with right and wrong tokens; then the whole
    log is searched for them."""
    wrong = "wrong-token-9876543210"
    env = {"EASEL_SAFETY__TOKENS": json.dumps(TOKENS), "EASEL_MOCK_STEP_DELAY": "0"}
    with easel_serve(tmp_path / "data", "--backend", "mock", env=env) as server:
        ws = server.url.replace("http", "ws")
        with connect(f"{ws}/v1/events?after=0&token={ALPHA}") as events:
            job = httpx.post(f"{server.url}/v1/jobs", json={**SMALL, "prompt": "x"},
                             headers=bearer(ALPHA)).json()  # fmt: skip
            while json.loads(events.recv(timeout=20))["type"] != "succeeded":
                pass
        with pytest.raises(Exception):  # noqa: B017 the handshake is refused
            connect(f"{ws}/v1/events?token={wrong}").close()
        for size in (5_000, 10_000):  # refused by easel's bound, by the handshake parser
            with pytest.raises(InvalidStatus) as refused:
                connect(f"{ws}/v1/events?token={ALPHA}&x={'a' * size}", open_timeout=10).close()
            assert refused.value.response.status_code == 414
        assert httpx.get(f"{server.url}/v1/jobs", headers=bearer(wrong)).status_code == 401
        httpx.get(f"{server.url}/v1/jobs/{job['id']}?token={BRAVO}", headers=bearer(BRAVO))
        httpx.get(f"{server.url}/sdapi/v1/progress", auth=("carol", ALPHA))
    log = server.log.read_text()
    assert "WebSocket" in log and "[redacted]" in log  # the lines that carried them are there
    for token in (ALPHA, BRAVO, wrong):
        assert token not in log
    print(f"searched {len(log.splitlines())} log lines for {len(TOKENS) + 1} tokens")


def test_queue_and_workers_show_a_service_only_its_own(two_services: str) -> None:
    """Bravo's long job runs and bravo's dave waits; alpha sees neither in its views. Each
    service's dave has a cap of 1 of his own, and the counts are per (service, user)."""
    url = two_services
    body = {**SMALL, "steps": 100, "max_user_queue_size": 1}
    sent = [
        (token, httpx.post(f"{url}/v1/jobs", json={**body, "prompt": prompt, "user_id": user},
                           headers=bearer(token)))
        for token, prompt, user in ((BRAVO, "bravo runs", "erin"), (BRAVO, "bravo waits", "dave"),
                                    (ALPHA, "alpha waits", "dave"))
    ]  # fmt: skip
    assert [answer.status_code for _, answer in sent] == [202, 202, 202]  # one cap per service
    jobs = [(token, answer.json()) for token, answer in sent]
    running = jobs[0][1]
    try:
        deadline = time.monotonic() + 30
        while True:  # until the worker reports bravo's job as its own
            workers = httpx.get(f"{url}/v1/workers", headers=bearer(BRAVO)).json()["workers"]
            if any(running["id"] in w["current_jobs"] for w in workers):
                break
            assert time.monotonic() < deadline, workers
            time.sleep(0.05)
        seen = httpx.get(f"{url}/v1/workers", headers=bearer(ALPHA)).json()["workers"]
        assert seen and all(w["current_jobs"] == [] for w in seen)
        full = httpx.post(f"{url}/v1/jobs", json={**body, "prompt": "x", "user_id": "dave"},
                          headers=bearer(ALPHA))  # fmt: skip
        assert full.status_code == 429 and full.json()["error"]["code"] == "user_queue_full"
        users = {token: httpx.get(f"{url}/v1/queue", headers=bearer(token)).json()["users"]
                 for token in (ALPHA, BRAVO, ADMIN)}  # fmt: skip
        assert users[BRAVO] == {"dave": 1} and users[ALPHA] == {"dave": 1}
        assert users[ADMIN] == {"alpha/dave": 1, "bravo/dave": 1}
    finally:
        for token, job in jobs:
            httpx.delete(f"{url}/v1/jobs/{job['id']}", headers=bearer(token))
