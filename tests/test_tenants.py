"""Two services on one deployment: neither reads, counts or stops the other's jobs, and
their tokens never reach a log line; hostile frames and undecodable input get clean answers.
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
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from easel.api import create_app
from easel.config import Safety, Settings
from tests.servers import easel_serve, free_port, serve

ALPHA = "alpha-token-0123456789"
BRAVO = "bravo-token-0123456789"
ADMIN = "admin-token-0123456789"
TOKENS = [{"service": "alpha", "token": ALPHA}, {"service": "bravo", "token": BRAVO}]
WITH_ADMIN = [*TOKENS, {"service": "ops", "token": ADMIN, "scopes": ["admin"]}]
SMALL = {"width": 64, "height": 64, "steps": 2}


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **headers}


@pytest.fixture(scope="module")
def two_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("tenants") / "data",
        backend="mock",
        mock_step_delay=0.05,
        heartbeat_seconds=0.5,  # the registry (GET /v1/workers) is fed by heartbeats
        safety=Safety.model_validate({"tokens": WITH_ADMIN}),
    )
    with serve(create_app(settings)) as url:
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


def test_a_binary_frame_gets_a_close_frame_with_a_reason(two_services: str) -> None:
    url = two_services.replace("http", "ws") + f"/v1/events?token={ALPHA}"
    with connect(url) as ws:
        ws.send(b"\x00\x01binary")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1003 and "binary" in closed.value.rcvd.reason


def test_undecodable_images_are_refused_without_the_servers_insides(two_services: str) -> None:
    for data in ("bm90IGFuIGltYWdl", "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"):  # text; a cut PNG
        body = {**SMALL, "prompt": "x", "kind": "img2img", "init_image": data}
        answer = httpx.post(f"{two_services}/v1/jobs", json=body, headers=bearer(ALPHA))
        assert answer.status_code == 422, answer.text
        message = answer.json()["error"]["message"]
        assert "0x" not in message and "object at" not in message and "Error" not in message


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
        assert httpx.get(f"{server.url}/v1/jobs", headers=bearer(wrong)).status_code == 401
        httpx.get(f"{server.url}/v1/jobs/{job['id']}?token={BRAVO}", headers=bearer(BRAVO))
        httpx.get(f"{server.url}/sdapi/v1/progress", auth=("carol", ALPHA))
    log = server.log.read_text()
    assert "WebSocket" in log and "[redacted]" in log  # the lines that carried them are there
    for token in (ALPHA, BRAVO, wrong):
        assert token not in log
    print(f"searched {len(log.splitlines())} log lines for {len(TOKENS) + 1} tokens")


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def test_grpc_hostile_input_is_refused_with_a_status_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    """Every hostile GenerateImage gets INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a
    sentence (no Python class names); three concurrent oversized tensors (25 MB float16,
    2048x2048, for a 64x64 request) grow the server's peak memory by less than 200 MB."""
    import grpc
    from PIL import Image

    from easel.proto import imageservice_pb2 as pb
    from easel.proto.drawthings import Configuration, encode_configuration, encode_tensor

    port = free_port()
    with easel_serve(tmp_path / "data", "--backend", "mock", "--grpc-port", str(port)) as server:
        config = encode_configuration(Configuration(width=64, height=64, steps=2))
        big = encode_tensor(Image.new("RGB", (2048, 2048), (200, 10, 10)))
        cut = encode_tensor(Image.new("RGB", (64, 64)))[:2000]
        corpus: list[tuple[str, bytes]] = [
            ("not protobuf", b"\xff\xff\xff\xff\x0f\x01"),
            ("damaged configuration",
             pb.ImageGenerationRequest(prompt="x", configuration=b"\x08\0\0\0" + b"\xff" * 40)
             .SerializeToString()),
            ("no configuration", pb.ImageGenerationRequest(prompt="x").SerializeToString()),
            ("tensor header only", pb.ImageGenerationRequest(
                prompt="x", configuration=config, image=b"\0" * 70).SerializeToString()),
            ("truncated tensor", pb.ImageGenerationRequest(
                prompt="x", configuration=config, image=cut).SerializeToString()),
            ("tensor far larger than the request", pb.ImageGenerationRequest(
                prompt="x", configuration=config, image=big).SerializeToString()),
            ("message over the body limit", pb.ImageGenerationRequest(
                prompt="x", configuration=config, image=big + big).SerializeToString()),
        ]  # fmt: skip
        pid = server.popen.pid
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 128 << 20)]
        ) as channel:
            generate = channel.unary_stream(
                "/ImageGenerationService/GenerateImage",
                request_serializer=lambda raw: raw,
                response_deserializer=lambda raw: raw,
            )
            refused = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
            for name, raw in corpus:
                with pytest.raises(grpc.RpcError) as failed:
                    list(generate(raw, timeout=30))
                code, details = failed.value.code(), failed.value.details() or ""
                assert code in refused, (name, code, details)
                assert "<class" not in details and "Error" not in details, (name, details)
            print(f"gRPC corpus: {len(corpus)} inputs, each refused with a status and a sentence")

            growth = {
                name: _peak_growth_mb(pid, generate, corpus[index][1])
                for name, index in (("over the body limit (50 MB)", 6),
                                    ("within it (25 MB), 2048x2048 for 64x64", 5))
            }  # fmt: skip
        jobs = httpx.get(f"{server.url}/v1/jobs").json()["jobs"]
        assert jobs == []  # nothing refused ever became a job
    for name, grown in growth.items():
        print(f"peak RSS growth, 3 concurrent hostile tensors {name}: {grown:.0f} MB")
    # over the limit: refused as it arrives; within it: a few copies of each message
    # (gRPC's buffer, the bytes, the parsed field), never a decoded image
    assert growth["over the body limit (50 MB)"] < 200
    assert growth["within it (25 MB), 2048x2048 for 64x64"] < 400


def _peak_growth_mb(pid: int, generate: Any, hostile: bytes) -> float:
    import grpc

    before = _rss_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from here
    codes: list[grpc.StatusCode] = []

    def attack() -> None:
        try:
            list(generate(hostile, timeout=60))
        except grpc.RpcError as exc:
            codes.append(exc.code())

    threads = [threading.Thread(target=attack) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(codes) == 3 and set(codes) <= refused, codes
    return (_rss_kib(pid, "VmHWM") - before) / 1024


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def test_hostile_json_is_refused_before_any_job(two_services: str) -> None:
    """Deep nesting, huge key counts and oversized metadata on the JSON doors: a 4xx with a
    code each, and no job made."""
    before = len(httpx.get(f"{two_services}/v1/jobs", headers=bearer(ALPHA)).json()["jobs"])
    many = {f"k{i}": i for i in range(20_000)}
    corpus: list[tuple[str, str, dict[str, Any]]] = [
        ("native, metadata 300 deep", "/v1/jobs", {"prompt": "x", "metadata": _nested(300)}),
        ("native, 20,000 metadata keys", "/v1/jobs", {"prompt": "x", "metadata": many}),
        ("native, 5 MB metadata", "/v1/jobs", {"prompt": "x", "metadata": {"s": "x" * 5_000_000}}),
        ("native, payload 300 deep", "/v1/jobs",
         {"executor": "automatic1111", "payload": {"prompt": "x", "extra": _nested(300)}}),
        ("A1111, a field 300 deep", "/sdapi/v1/txt2img", {"prompt": "x", "deep": _nested(300)}),
        ("A1111, override_settings 300 deep", "/sdapi/v1/txt2img",
         {"prompt": "x", "override_settings": _nested(300)}),
        ("A1111, 20,000 extra keys", "/sdapi/v1/txt2img", {"prompt": "x", **many}),
    ]  # fmt: skip
    for name, path, body in corpus:
        answer = httpx.post(f"{two_services}{path}", json=body, headers=bearer(ALPHA), timeout=30)
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text[:300])
        assert answer.json()["error"]["code"], name
    after = len(httpx.get(f"{two_services}/v1/jobs", headers=bearer(ALPHA)).json()["jobs"])
    assert after == before
    print(f"JSON corpus: {len(corpus)} inputs, each a 4xx with a code, no job run")


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
