"""Hostile input on every route family (JSON, multipart, websocket, SSE, gRPC): each input
gets a clear 4xx (or the gRPC equivalent) with a code, in bounded time, and no refused
request ever runs a job. Each corpus prints its size and result.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.servers import easel_serve, free_port
from tests.tenants import ALPHA, SMALL, bearer, two_services_server

BODY_LIMIT = 4 * 1024 * 1024
IMAGE_LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def two_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Smaller body and image limits than the defaults (32 MiB, 20 MiB): the same checks,
    exercised with smaller uploads."""
    with two_services_server(
        tmp_path_factory.mktemp("hostile") / "data",
        safety={"max_body_bytes": BODY_LIMIT},
        limits={"max_init_image_bytes": IMAGE_LIMIT},
    ) as deployment:
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
        ("native, 1 MB metadata", "/v1/jobs", {"prompt": "x", "metadata": {"s": "x" * 1_000_000}}),
        ("native, a body over the limit", "/v1/jobs",
         {"prompt": "x", "metadata": {"s": "x" * BODY_LIMIT}}),
        ("native, payload 300 deep", "/v1/jobs",
         {"executor": "automatic1111", "payload": {"prompt": "x", "extra": _nested(300)}}),
        ("A1111, a field 300 deep", "/sdapi/v1/txt2img", {"prompt": "x", "deep": _nested(300)}),
        ("A1111, override_settings 300 deep", "/sdapi/v1/txt2img",
         {"prompt": "x", "override_settings": _nested(300)}),
        ("A1111, 20,000 extra keys", "/sdapi/v1/txt2img", {"prompt": "x", **many}),
    ]  # fmt: skip
    raw: list[tuple[str, str, bytes]] = []
    for path in JSON_DOORS:  # beyond what a JSON parser recurses into; not JSON at all
        raw += [
            (f"{path}, 100,000 deep", path, b'{"d": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            (f"{path}, not JSON", path, b"\x00\xff{"),
            (f"{path}, JSON cut short", path, b'{"prompt": "x", '),
        ]  # fmt: skip
    with httpx.Client(base_url=two_services, headers=bearer(ALPHA), timeout=30) as http:
        answers = [(name, http.post(path, json=body)) for name, path, body in corpus]
        typed = {"content-type": "application/json"}
        answers += [
            (name, http.post(path, content=body, headers=typed)) for name, path, body in raw
        ]
    for name, answer in answers:
        _refused(name, answer)
    after = len(httpx.get(f"{two_services}/v1/jobs", headers=bearer(ALPHA)).json()["jobs"])
    assert after == before
    print(f"JSON corpus: {len(answers)} inputs, each a 4xx with a code, no job run")


JSON_DOORS = (
    "/v1/jobs", "/v1/images/generations", "/v1/audio/speech", "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img", "/sdapi/v1/options", "/sdapi/v1/png-info", "/pipeline/run",
    "/pipeline/select-device",
    "/internal/progress", "/v1/jobs/some-job/move",
)  # fmt: skip
"""Every route that takes a JSON body."""


def _png(width: int, height: int, mode: str = "RGB", noise: bool = False) -> bytes:
    from PIL import Image

    image = (
        Image.effect_noise((width, height), 64).convert(mode)
        if noise
        else Image.new(mode, (width, height))
    )
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _declared_png(width: int, height: int, *, rows: int = 1) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (1 bit per pixel), with ``rows``
    rows of zeros as its data: rows=height is a real decompression bomb (a few hundred KB
    that would decode to width x height pixels); fewer rows, a header that lies."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (width + 7) // 8)
    data = zlib.compress(row * rows, 1)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


@functools.cache
def _hostile_images() -> list[tuple[str, bytes]]:
    from PIL import Image

    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, "GIF")
    noisy = _png(64, 64, noise=True)
    return [
        ("header declaring 100000x100000", _declared_png(100_000, 100_000)),
        ("header declaring 12000x12000", _declared_png(12_000, 12_000)),
        ("decompression bomb, 20000x20000", _declared_png(20_000, 20_000, rows=20_000)),
        ("decompression bomb, 9000x9000", _declared_png(9_000, 9_000, rows=9_000)),
        ("text", b"this is not an image at all"),
        ("truncated PNG", noisy[: len(noisy) // 2]),
        ("PNG signature only", noisy[:8]),
        ("a GIF", gif.getvalue()),
        ("empty", b""),
    ]


def _job_count(url: str) -> int:
    return len(httpx.get(f"{url}/v1/jobs", headers=bearer(ALPHA)).json()["jobs"])


def _refused(name: str, answer: httpx.Response) -> None:
    assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text[:300])
    error = answer.json()["error"]
    assert error["code"], name
    message = error["message"]
    assert not re.search(r"0x[0-9a-f]{6,}|object at|Traceback|/work/|/tmp/", message), message


def test_hostile_uploads_are_refused_before_any_job(two_services: str) -> None:
    """Multipart image uploads (OpenAI's edits) and base64 ones (A1111's img2img, easel's
    img2img): lying headers, decompression bombs, non-images, truncated files, formats not
    taken, wrong parts and malformed multipart bodies each get a 4xx with a code, and no
    job is made."""
    url = two_services
    before = _job_count(url)
    good = _png(64, 64)
    form = {"prompt": "x", "size": "64x64"}
    multipart: list[tuple[str, dict[str, Any]]] = [
        (f"edits: {name}", {"data": form, "files": {"image": ("a.png", raw, "image/png")}})
        for name, raw in _hostile_images()
    ]
    multipart += [
        ("edits: text sent as text/plain", {"data": form,
         "files": {"image": ("a.txt", b"not an image", "text/plain")}}),
        ("edits: no image", {"data": form}),
        ("edits: two images", {"data": form, "files": [("image", ("a.png", good, "image/png")),
                                                       ("image[]", ("b.png", good, "image/png"))]}),
        ("edits: a mask", {"data": form, "files": [("image", ("a.png", good, "image/png")),
                                                   ("mask", ("m.png", good, "image/png"))]}),
        ("edits: size not WxH", {"data": {**form, "size": "huge"},
                                 "files": {"image": ("a.png", good, "image/png")}}),
        ("edits: 1,100 form fields", {"data": {**form, **{f"f{i}": "v" for i in range(1_100)}},
                                      "files": {"image": ("a.png", good, "image/png")}}),
        ("edits: a file over the body limit", {"data": form, "files": {
            "image": ("a.png", b"\0" * (BODY_LIMIT + 1), "image/png")}}),
        ("edits: multipart without a boundary", {"content": b"--x\r\n\r\n",
         "headers": {"content-type": "multipart/form-data"}}),
        ("edits: a cut multipart body", {
            "content": b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx',
            "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        ("edits: JSON instead of a form", {"json": {"prompt": "x", "image": "aGk="}}),
    ]  # fmt: skip
    http = httpx.Client(base_url=url, timeout=30)  # one connection for the whole corpus
    for name, request in multipart:
        headers = {**bearer(ALPHA), **request.pop("headers", {})}
        _refused(name, http.post("/v1/images/edits", headers=headers, **request))
    base64_doors: list[tuple[str, str, dict[str, Any]]] = []
    for name, raw in _hostile_images():
        encoded = base64.b64encode(raw).decode()
        base64_doors += [
            (f"A1111 img2img: {name}", "/sdapi/v1/img2img",
             {"prompt": "x", **SMALL, "init_images": [encoded]}),
            (f"native img2img: {name}", "/v1/jobs",
             {"prompt": "x", **SMALL, "kind": "img2img", "init_image": encoded}),
        ]  # fmt: skip
    base64_doors += [
        ("A1111 img2img: not base64", "/sdapi/v1/img2img",
         {"prompt": "x", **SMALL, "init_images": ["%%% not base64 %%%"]}),
        ("A1111 img2img: a data URL of text", "/sdapi/v1/img2img",
         {"prompt": "x", **SMALL, "init_images": ["data:image/png;base64,aGVsbG8="]}),
        ("A1111 img2img: a bomb as the mask", "/sdapi/v1/img2img",
         {"prompt": "x", **SMALL, "init_images": [base64.b64encode(good).decode()],
          "mask": base64.b64encode(dict(_hostile_images())[
              "decompression bomb, 20000x20000"]).decode()}),
        ("A1111 img2img: no image", "/sdapi/v1/img2img", {"prompt": "x", **SMALL}),
        ("native img2img: base64 over the image limit", "/v1/jobs",
         {"prompt": "x", **SMALL, "kind": "img2img", "init_image": "A" * (IMAGE_LIMIT * 2)}),
        ("A1111 img2img: base64 over the image limit", "/sdapi/v1/img2img",
         {"prompt": "x", **SMALL, "init_images": ["A" * (IMAGE_LIMIT * 2)]}),
    ]  # fmt: skip
    for name, path, body in base64_doors:
        _refused(name, http.post(path, json=body, headers=bearer(ALPHA)))
    http.close()
    assert _job_count(url) == before
    total = len(multipart) + len(base64_doors)
    print(f"upload corpus: {total} inputs ({len(multipart)} multipart, {len(base64_doors)} "
          "base64), each a 4xx with a code, no job run")  # fmt: skip


@pytest.fixture(scope="module", params=["embedded", "redis"])
def stores(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The deployment on each store: resume points reach the Redis bus as stream ids."""
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    data_dir = tmp_path_factory.mktemp(f"hostile-{request.param}") / "data"
    with two_services_server(data_dir, redis_url) as deployment:
        yield deployment.url


def test_hostile_event_streams_are_refused_before_streaming(stores: str) -> None:
    """SSE (and the websocket) with bad resume points (Last-Event-ID, after), huge queries
    and unknown jobs: a 4xx with a code before any stream starts, on both stores alike."""
    url = stores
    job = httpx.post(f"{url}/v1/jobs", json={**SMALL, "prompt": "x"}, headers=bearer(ALPHA))
    job_id = job.json()["id"]
    streams = (f"/v1/jobs/{job_id}/events", "/v1/events")
    corpus: list[tuple[str, str, dict[str, str]]] = []
    for path in streams:
        corpus += [
            (f"{path}: Last-Event-ID {value!r}", path, {"last-event-id": value})
            for value in ("abc", "-1", "1.5", "", "9" * 30, "9" * 5_000, "1" * 100_000)
        ]
        corpus += [
            (f"{path}: after={value[:12]}", f"{path}?after={value}", {})
            for value in ("abc", "-5", "9" * 30, "0x10")
        ]
        corpus.append((f"{path}: a 5,000-byte query", f"{path}?user_id={'u' * 5_000}", {}))
    corpus += [
        ("an unknown job", "/v1/jobs/no-such-job/events", {}),
        ("a path climbing out", "/v1/jobs/%2e%2e%2f%2e%2e%2fetc/events", {}),
    ]
    for name, path, headers in corpus:
        with httpx.stream("GET", f"{url}{path}", headers={**bearer(ALPHA), **headers},
                          timeout=30) as answer:  # fmt: skip
            answer.read()
            _refused(name, answer)
    ws = url.replace("http", "ws")
    sockets = [f"{ws}/v1/events?token={ALPHA}&after={value}" for value in ("-1", "9" * 30)]
    for socket in sockets:
        with pytest.raises(InvalidStatus) as refused:
            connect(socket, open_timeout=10).close()
        assert refused.value.response.status_code == 422
    print(f"event stream corpus: {len(corpus) + len(sockets)} inputs, each a 4xx with a code")
