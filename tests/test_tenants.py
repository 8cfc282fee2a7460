"""Two services on one deployment: neither reads, counts, watches or stops the other's jobs
or users on any door (native, SSE, websocket, OpenAI, A1111, pipeline, gRPC), embedded and
on Redis; their tokens never reach a log line.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.servers import easel_serve
from tests.tenants import (
    ADMIN,
    ALPHA,
    BRAVO,
    SMALL,
    TOKENS,
    Deployment,
    bearer,
    two_services_server,
)


@pytest.fixture(scope="module", params=["embedded", "redis"])
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """One deployment per module and store: SQLite in-process, or Redis (a real
    redis-server) with the workers in the same process."""
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    data_dir = tmp_path_factory.mktemp(f"tenants-{request.param}") / "data"
    with two_services_server(data_dir, redis_url, mock_models=["mock-xl"]) as served:
        yield served


@pytest.fixture
def two_services(deployment: Deployment) -> str:
    return deployment.url


def wait_until_final(url: str, job_id: str, token: str, timeout: float = 60) -> dict[str, Any]:
    """Follow the job's SSE stream (as its own service) to its final event; its record."""
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=bearer(token),
                      timeout=timeout) as events:  # fmt: skip
        for _ in events.iter_lines():
            pass
    job: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}", headers=bearer(token)).json()
    assert job["state"] in {"succeeded", "failed", "cancelled"}, job
    return job


def submit(url: str, token: str, **fields: Any) -> dict[str, Any]:
    answer = httpx.post(f"{url}/v1/jobs", json={**SMALL, **fields}, headers=bearer(token))
    assert answer.status_code == 202, answer.text
    job: dict[str, Any] = answer.json()
    return job


def test_a1111_options_are_each_services_own(two_services: str) -> None:
    """Bravo switches its A1111 model; alpha's stays the default, and alpha's txt2img runs
    on it (A1111's /options is a server setting: here each service has its own)."""
    url = two_services
    options = f"{url}/sdapi/v1/options"
    switched = httpx.post(options, json={"sd_model_checkpoint": "mock-xl"}, headers=bearer(BRAVO))
    assert switched.status_code == 200 and switched.json()["sd_model_checkpoint"] == "mock-xl"
    assert httpx.get(options, headers=bearer(ALPHA)).json()["sd_model_checkpoint"] == "mock"
    assert httpx.get(options, headers=bearer(BRAVO)).json()["sd_model_checkpoint"] == "mock-xl"
    body = {"prompt": "which model", "width": 64, "height": 64, "steps": 1}
    for token, models in ((ALPHA, {None, "mock"}), (BRAVO, {"mock-xl"})):
        headers = bearer(token, **{"X-Easel-User": "options-user"})
        answer = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, headers=headers, timeout=60)
        assert answer.status_code == 200, answer.text
        jobs = httpx.get(f"{url}/v1/jobs", params={"user_id": "options-user"},
                         headers=bearer(token)).json()["jobs"]  # fmt: skip
        assert len(jobs) == 1 and jobs[0]["request"]["model"] in models, (token, jobs)
    httpx.post(options, json={"sd_model_checkpoint": "mock"}, headers=bearer(BRAVO))


def test_every_native_route_as_the_other_service(two_services: str) -> None:
    """Alpha tries every native route on bravo's jobs and users: a 404 (as if they did not
    exist) for each job route, empty lists and counts, and nothing of bravo's changes."""
    url = two_services
    done = submit(url, BRAVO, prompt="bravo's secret", user_id="native-user", steps=1)
    assert wait_until_final(url, done["id"], BRAVO)["state"] == "succeeded"
    live = submit(url, BRAVO, prompt="bravo's secret, still going", user_id="native-user",
                  steps=150)  # fmt: skip
    try:
        for method, path in (
            ("GET", f"/v1/jobs/{done['id']}"),
            ("GET", f"/v1/jobs/{done['id']}/images/0"),
            ("GET", f"/v1/jobs/{done['id']}/events"),
            ("GET", f"/v1/jobs/{live['id']}"),
            ("GET", f"/v1/jobs/{live['id']}/events"),
            ("DELETE", f"/v1/jobs/{live['id']}"),
        ):
            answer = httpx.request(method, f"{url}{path}", headers=bearer(ALPHA))
            assert answer.status_code == 404, (method, path, answer.status_code)
            assert answer.json()["error"]["code"] == "job_not_found", path
        moved = httpx.post(f"{url}/v1/jobs/{live['id']}/move", json={"to": "front"},
                           headers=bearer(ALPHA))  # fmt: skip
        assert moved.status_code == 403  # only admin reorders the line
        ids = {done["id"], live["id"]}
        for query in ({}, {"user_id": "native-user"}, {"q": "secret"}, {"state": "succeeded"}):
            listed = httpx.get(f"{url}/v1/jobs", params=query, headers=bearer(ALPHA)).json()
            assert not ids & {job["id"] for job in listed["jobs"]}, query
        cancelled = httpx.delete(f"{url}/v1/jobs", params={"user_id": "native-user"},
                                 headers=bearer(ALPHA))  # fmt: skip
        assert cancelled.status_code == 200 and cancelled.json()["jobs"] == []
        line = httpx.get(f"{url}/v1/queue/jobs", params={"user_id": "native-user"},
                         headers=bearer(ALPHA)).json()  # fmt: skip
        assert not ids & {job["id"] for job in line["jobs"]}
        assert (
            "native-user" not in httpx.get(f"{url}/v1/queue", headers=bearer(ALPHA)).json()["users"]
        )
        mine = httpx.get(f"{url}/v1/jobs/{live['id']}", headers=bearer(BRAVO)).json()
        assert mine["state"] in {"queued", "running"}  # nothing alpha did reached it
        assert httpx.get(f"{url}/v1/jobs/{live['id']}", headers=bearer(ADMIN)).status_code == 200
    finally:
        httpx.delete(f"{url}/v1/jobs/{live['id']}", headers=bearer(BRAVO))


def test_event_streams_carry_only_the_callers_events(two_services: str) -> None:
    """Both services' sse-user run a job; alpha's streams of every event (SSE and websocket,
    replayed from the start, all users or sse-user) carry alpha's job and none of bravo's."""
    url = two_services
    theirs = submit(url, BRAVO, prompt="bravo's", user_id="sse-user", steps=1)
    wait_until_final(url, theirs["id"], BRAVO)
    mine = submit(url, ALPHA, prompt="alpha's", user_id="sse-user", steps=1)
    wait_until_final(url, mine["id"], ALPHA)
    for query in ("after=0", "after=0&user_id=sse-user"):
        seen: list[dict[str, Any]] = []
        with httpx.stream("GET", f"{url}/v1/events?{query}", headers=bearer(ALPHA),
                          timeout=30) as stream:  # fmt: skip
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["job_id"] == mine["id"] and seen[-1]["type"] == "succeeded":
                        break
        ws = url.replace("http", "ws")
        with connect(f"{ws}/v1/events?{query}&token={ALPHA}") as events:
            while True:
                seen.append(json.loads(events.recv(timeout=30)))
                if seen[-1]["job_id"] == mine["id"] and seen[-1]["type"] == "succeeded":
                    break
        assert theirs["id"] not in {event["job_id"] for event in seen}, query
        assert {event.get("service") for event in seen} == {"alpha"}, query


def test_a_websocket_to_another_services_job_is_refused_as_sse_refuses_it(
    two_services: str,
) -> None:
    """Alpha subscribes by websocket to bravo's job, and to a job that does not exist: the
    handshake is refused with SSE's answer (404 ``job_not_found``), never an open silent
    stream; bravo's own subscription to its job opens and replays it."""
    url = two_services
    theirs = submit(url, BRAVO, prompt="bravo's", user_id="ws-user", steps=1)
    wait_until_final(url, theirs["id"], BRAVO)
    ws = url.replace("http", "ws")
    for job_id in (theirs["id"], "no-such-job"):
        sse = httpx.get(f"{url}/v1/jobs/{job_id}/events", headers=bearer(ALPHA))
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{ws}/v1/events?job_id={job_id}&token={ALPHA}").close()
        answer = refused.value.response
        assert answer.status_code == sse.status_code == 404, job_id
        assert json.loads(answer.body or b"")["error"] == sse.json()["error"], job_id
    with connect(f"{ws}/v1/events?job_id={theirs['id']}&token={BRAVO}") as events:
        while (event := json.loads(events.recv(timeout=30)))["type"] != "succeeded":
            assert event["job_id"] == theirs["id"]


def test_openai_door_per_service(two_services: str) -> None:
    """The official openai client with each service's key: each service's job is its own
    (listed for it, a 404 for the other), and a wrong key is refused."""
    import openai

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{two_services}/v1", api_key=key, max_retries=0)

    for key, prompt in ((ALPHA, "alpha's openai fox"), (BRAVO, "bravo's openai fox")):
        result = client(key).images.generate(prompt=prompt, size="64x64", user="openai-user")
        assert result.data and result.data[0].b64_json
    with pytest.raises(openai.AuthenticationError):
        client("wrong-token-0123456789").images.generate(prompt="x", size="64x64")
    for own, other, prompt in ((ALPHA, BRAVO, "alpha's openai fox"),
                               (BRAVO, ALPHA, "bravo's openai fox")):  # fmt: skip
        query = {"user_id": "openai-user"}
        jobs = httpx.get(f"{two_services}/v1/jobs", params=query, headers=bearer(own)).json()
        assert [job["request"]["prompt"] for job in jobs["jobs"]] == [prompt]
        hidden = httpx.get(f"{two_services}/v1/jobs/{jobs['jobs'][0]['id']}", headers=bearer(other))
        assert hidden.status_code == 404


def test_pipeline_state_is_per_caller_within_its_service(two_services: str) -> None:
    """Alpha's pipe-user runs; bravo's pipe-user is not busy, sees no job and no image, and
    runs its own; then each sees its own latest job."""
    url = two_services
    alpha = bearer(ALPHA, **{"X-Easel-User": "pipe-user"})
    bravo = bearer(BRAVO, **{"X-Easel-User": "pipe-user"})
    run = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 150}
    started = httpx.post(f"{url}/pipeline/run", json=run, headers=alpha).json()
    try:
        assert httpx.get(f"{url}/pipeline/status", headers=alpha).json()["running"] is True
        other = httpx.get(f"{url}/pipeline/status", headers=bravo).json()
        assert other == {**other, "running": False, "completed": False, "job_id": None}
        image = httpx.get(f"{url}/pipeline/image", headers=bravo)
        assert image.status_code == 400 and image.json()["error"]["code"] == "pipeline_not_done"
        short = {**run, "num_inference_steps": 1}
        own = httpx.post(f"{url}/pipeline/run", json=short, headers=bravo)
        assert own.status_code == 200, own.text  # not busy: alpha's run is not bravo's
        httpx.delete(f"{url}/v1/jobs/{started['job_id']}", headers=bearer(ALPHA))  # make way
        wait_until_final(url, own.json()["job_id"], BRAVO)
        assert (
            httpx.get(f"{url}/pipeline/status", headers=bravo).json()["job_id"]
            == own.json()["job_id"]
        )
        assert httpx.get(f"{url}/pipeline/image", headers=bravo).status_code == 200
        assert (
            httpx.get(f"{url}/pipeline/status", headers=alpha).json()["job_id"] == started["job_id"]
        )
    finally:
        httpx.delete(f"{url}/v1/jobs/{started['job_id']}", headers=bearer(ALPHA))


def test_grpc_door_per_service(
    deployment: Deployment, stubs: tuple[ModuleType, ModuleType]
) -> None:
    """Draw Things' generated stubs: no token or a wrong one is UNAUTHENTICATED; bravo's
    GenerateImage is bravo's job (listed for bravo, a 404 for alpha)."""
    import grpc

    from easel.proto.drawthings import Configuration, encode_configuration

    pb, pb_grpc = stubs
    config = encode_configuration(Configuration(width=64, height=64, steps=1, seed=1))
    request = pb.ImageGenerationRequest(prompt="bravo's grpc fox", configuration=config,
                                        user="grpc-user")  # fmt: skip
    with grpc.insecure_channel(deployment.grpc) as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong-token-0123456789"),)):
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.GenerateImage(request, metadata=metadata, timeout=30))
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        replies = list(stub.GenerateImage(request, metadata=(("authorization", f"Bearer {BRAVO}"),),
                                          timeout=60))  # fmt: skip
    assert any(reply.generated_images for reply in replies)
    query = {"user_id": "grpc-user"}
    jobs = httpx.get(f"{deployment.url}/v1/jobs", params=query, headers=bearer(BRAVO)).json()
    assert [(job["service"], job["state"]) for job in jobs["jobs"]] == [("bravo", "succeeded")]
    assert (
        httpx.get(f"{deployment.url}/v1/jobs", params=query, headers=bearer(ALPHA)).json()["jobs"]
        == []
    )
    hidden = httpx.get(f"{deployment.url}/v1/jobs/{jobs['jobs'][0]['id']}", headers=bearer(ALPHA))
    assert hidden.status_code == 404


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
