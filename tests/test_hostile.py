"""Hostile input on every route family (JSON, multipart, websocket, SSE, gRPC): each input
gets a clear 4xx (or the gRPC equivalent) with a code, in bounded time, and no refused
request ever runs a job. Each corpus prints its size and result.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.servers import easel_serve, free_port
from tests.tenants import ALPHA, SMALL, bearer, two_services_server


@pytest.fixture(scope="module")
def two_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with two_services_server(tmp_path_factory.mktemp("hostile") / "data") as deployment:
        yield deployment.url


def test_a_binary_frame_gets_a_close_frame_with_a_reason(two_services: str) -> None:
    url = two_services.replace("http", "ws") + f"/v1/events?token={ALPHA}"
    with connect(url) as ws:
        ws.send(b"\x00\x01binary")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1003 and "binary" in closed.value.rcvd.reason


def test_hostile_handshakes_get_a_4xx_with_a_code_at_once(two_services: str) -> None:
    """A real websocket client against uvicorn on loopback: long queries (past easel's
    4 KiB bound, past the handshake parser's 8 KiB line), too many or too long headers and
    unparseable parameters each get an HTTP refusal with easel's code, within the open
    timeout, and nothing is ever accepted; the same bound holds on plain HTTP."""
    ws = two_services.replace("http", "ws") + "/v1/events"
    token = f"token={ALPHA}"
    corpus: list[tuple[str, str, dict[str, str], int, str]] = [
        ("query of 5,000 bytes", f"{ws}?{token}&x={'a' * 5_000}", {}, 414, "query_too_long"),
        ("query of 10,000 bytes", f"{ws}?{token}&x={'a' * 10_000}", {}, 414, "query_too_long"),
        ("query of 100,000 bytes", f"{ws}?x={'a' * 100_000}&{token}", {}, 414, "query_too_long"),
        ("200 headers", f"{ws}?{token}", {f"x-h{i}": "v" for i in range(200)}, 431,
         "headers_too_large"),
        ("a 10,000-byte header", f"{ws}?{token}", {"x-big": "v" * 10_000}, 431,
         "headers_too_large"),
        ("after is not a number", f"{ws}?{token}&after=abc", {}, 422, "invalid_request"),
        ("no token", ws, {}, 401, "unauthorized"),
        ("a wrong token", f"{ws}?token=wrong-token-0123456789", {}, 401, "unauthorized"),
    ]  # fmt: skip
    for name, url, headers, status, code in corpus:
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=10).close()
        response = refused.value.response
        assert response.status_code == status, (name, response.status_code, response.body)
        assert json.loads(response.body or b"")["error"]["code"] == code, name
    long_get = httpx.get(f"{two_services}/v1/jobs?q={'a' * 5_000}", headers=bearer(ALPHA))
    assert long_get.status_code == 414 and long_get.json()["error"]["code"] == "query_too_long"
    print(f"websocket handshake corpus: {len(corpus)} inputs, each refused with a 4xx and a code")


def test_undecodable_images_are_refused_without_the_servers_insides(two_services: str) -> None:
    for data in ("bm90IGFuIGltYWdl", "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"):  # text; a cut PNG
        body = {**SMALL, "prompt": "x", "kind": "img2img", "init_image": data}
        answer = httpx.post(f"{two_services}/v1/jobs", json=body, headers=bearer(ALPHA))
        assert answer.status_code == 422, answer.text
        message = answer.json()["error"]["message"]
        assert "0x" not in message and "object at" not in message and "Error" not in message


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
