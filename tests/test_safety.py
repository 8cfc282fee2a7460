"""Safety through a real server: service tokens, rate limits, moderation, bad input."""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from easel.api import create_app
from easel.config import Safety, Settings
from tests.servers import serve
from tests.test_api import SMALL, events_until_final

BOT = "bot-token-0123456789"
SHOP = "shop-token-0123456789"
READER = "reader-token-0123456789"
ADMIN = "admin-token-0123456789"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[str]:
    tokens = [
        {"service": "bot", "token": BOT},
        {"service": "shop", "token": SHOP},
        {"service": "dashboard", "token": READER, "scopes": ["read"]},
        {"service": "ops", "token": ADMIN, "scopes": ["admin"]},
    ]
    settings = Settings(
        data_dir=tmp_path / "data",
        mock_step_delay=0.0,
        backend="mock",
        safety=Safety.model_validate(
            {
                "tokens": tokens,
                "user_rate": 1.0,
                "user_burst": 3,
                "deny_words": ["gore"],
                "max_body_bytes": 64 * 1024,
            }
        ),
    )
    with serve(create_app(settings)) as url:
        yield url


def post(url: str, token: str | None, **fields: Any) -> httpx.Response:
    headers = bearer(token) if token else {}
    return httpx.post(f"{url}/v1/jobs", json={**SMALL, **fields}, headers=headers)


def listed(url: str, token: str) -> list[str]:
    return [j["id"] for j in httpx.get(f"{url}/v1/jobs", headers=bearer(token)).json()["jobs"]]


def test_every_route_but_health_needs_a_token(guarded: str) -> None:
    assert httpx.get(f"{guarded}/health").status_code == 200
    for token in (None, "wrong-token-0123456789"):
        refused = post(guarded, token, prompt="x")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        headers = bearer(token) if token else {}
        assert httpx.get(f"{guarded}/v1/jobs", headers=headers).status_code == 401
    assert httpx.get(f"{guarded}/metrics").status_code == 401
    with pytest.raises(InvalidStatus) as handshake:  # the handshake itself is refused
        connect(guarded.replace("http", "ws") + "/v1/events")
    assert handshake.value.response.status_code == 401  # with easel's body: a code
    assert json.loads(handshake.value.response.body or b"")["error"]["code"] == "unauthorized"


def test_scopes(guarded: str) -> None:
    refused = post(guarded, READER, prompt="x")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert httpx.get(f"{guarded}/v1/jobs", headers=bearer(READER)).status_code == 200


def test_a_service_sees_and_cancels_only_its_own_jobs(guarded: str) -> None:
    mine = post(guarded, BOT, prompt="mine", user_id="u1").json()
    theirs = post(guarded, SHOP, prompt="theirs", user_id="u1").json()
    assert mine["service"] == "bot" and theirs["service"] == "shop"
    for path in (f"/v1/jobs/{theirs['id']}", f"/v1/jobs/{theirs['id']}/images/0"):
        hidden = httpx.get(f"{guarded}{path}", headers=bearer(BOT))
        assert hidden.status_code == 404  # not 403: another service's ids do not leak
    cancel = httpx.delete(f"{guarded}/v1/jobs/{theirs['id']}", headers=bearer(BOT))
    assert cancel.status_code == 404
    assert listed(guarded, BOT) == [mine["id"]]
    assert set(listed(guarded, ADMIN)) == {mine["id"], theirs["id"]}
    # events: a service's websocket carries only its own jobs
    ws_url = guarded.replace("http", "ws") + f"/v1/events?after=0&token={BOT}"
    with connect(ws_url) as ws:
        seen = {json.loads(ws.recv(timeout=10))["job_id"] for _ in range(2)}
    assert seen == {mine["id"]}


def test_per_user_rate_limit_is_429_with_retry_after(guarded: str) -> None:
    for i in range(3):  # the burst
        assert post(guarded, BOT, prompt=f"p{i}", user_id="eager").status_code == 202
    limited = post(guarded, BOT, prompt="p3", user_id="eager")
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert post(guarded, BOT, prompt="other", user_id="calm").status_code == 202
    assert len([j for j in listed(guarded, BOT)]) == 4  # the refused one left no job


def test_moderation_refuses_before_any_job_exists(guarded: str) -> None:
    refused = post(guarded, BOT, prompt="so much GORE", moderate=True)
    assert refused.status_code == 422
    body = refused.json()["error"]
    assert body["code"] == "prompt_rejected" and "gore" in body["message"].lower()
    assert post(guarded, BOT, prompt="gore", moderate=False).status_code == 202  # opt-in
    assert post(guarded, BOT, prompt="a gorgeous cat", moderate=True).status_code == 202


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size it never delivers: the start of a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.parametrize(
    ("send", "status", "code"),
    [
        ({"content": b"{" + b" " * 70_000 + b"}"}, 413, "request_too_large"),
        (
            {
                "json": {
                    "prompt": "x",
                    "init_image": base64.b64encode(png_header(50_000, 50_000)).decode(),
                }
            },
            422,
            "invalid_request",
        ),
        ({"json": {"prompt": "x", "init_image": "iVBORw0KGgo"}}, 422, "invalid_request"),
        ({"json": {"prompt": "x", "init_image": "%%%not base64%%%"}}, 422, "invalid_request"),
        (
            {"content": b"prompt=x", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
    ],
)
def test_bad_input_is_a_4xx_and_leaves_no_job(
    guarded: str, send: dict[str, Any], status: int, code: str
) -> None:
    headers = {**bearer(ADMIN), **send.pop("headers", {"content-type": "application/json"})}
    response = httpx.post(f"{guarded}/v1/jobs", headers=headers, **send)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert listed(guarded, ADMIN) == []


def test_file_routes_never_leave_the_output_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0.0, backend="mock")
    with serve(create_app(settings)) as url:
        job = post(url, None, prompt="x").json()
        events_until_final(url, {job["id"]})
        done = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
        job_id = job["id"]
        for path in (
            "/v1/jobs/..%2F..%2Fetc%2Fpasswd/images/0",
            "/v1/jobs/%2Fetc%2Fpasswd/images/0",
            f"/v1/jobs/{job_id}/images/..%2F1",
            f"/v1/jobs/{job_id}/images/-1",
        ):
            assert httpx.get(f"{url}{path}").status_code in {404, 422}
        # a symlink planted in place of the image, pointing outside: refused, not followed
        image = settings.resolved_output_dir / done["images"][0]["path"]
        image.unlink()
        os.symlink("/etc/passwd", image)
        escaped = httpx.get(f"{url}/v1/jobs/{job['id']}/images/0")
        assert escaped.status_code == 404
        assert escaped.json()["error"]["code"] == "image_not_found"


def test_metrics_and_readiness(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0.0, backend="mock")
    with serve(create_app(settings)) as url:
        ok = [post(url, None, prompt=f"ok {i}").json()["id"] for i in range(3)]
        failed = post(url, None, prompt="[mock:fail]").json()["id"]
        assert post(url, None, prompt="x", width=65).status_code == 422
        events_until_final(url, {*ok, failed})
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        text = httpx.get(f"{url}/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['easel_jobs_submitted_total{backend="mock"}'] == 4
    assert samples['easel_jobs_finished_total{backend="mock",state="succeeded"}'] == 3
    assert samples['easel_jobs_finished_total{backend="mock",state="failed"}'] == 1
    assert samples['easel_rejections_total{code="invalid_request"}'] == 1
    assert samples['easel_job_run_seconds_count{backend="mock",model=""}'] == 3
    assert samples['easel_job_wait_seconds_count{backend="mock",model=""}'] == 4
    assert samples["easel_workers"] == 1


def test_the_page_needs_no_token_but_every_call_it_makes_does(guarded: str) -> None:
    page = httpx.get(f"{guarded}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{guarded}/ui/app.js").status_code == 200
    assert httpx.get(f"{guarded}/v1/queue/jobs").status_code == 401


def test_queue_line_hides_prompts_and_only_admin_moves(tmp_path: Path) -> None:
    """No workers (API only), so every job stays queued."""
    tokens = [
        {"service": "bot", "token": BOT},
        {"service": "shop", "token": SHOP},
        {"service": "ops", "token": ADMIN, "scopes": ["admin"]},
    ]
    settings = Settings(
        data_dir=tmp_path / "data",
        backend="mock",
        concurrency=0,
        safety=Safety.model_validate({"tokens": tokens}),
    )
    with serve(create_app(settings)) as url:
        first = post(url, BOT, prompt="bot secret one", user_id="u1").json()
        second = post(url, BOT, prompt="bot secret two", user_id="u1").json()
        theirs = post(url, SHOP, prompt="shop secret", user_id="u2").json()

        def line(token: str) -> dict[str, Any]:
            reply = httpx.get(f"{url}/v1/queue/jobs?user_id=u1", headers=bearer(token))
            return {job["id"]: job["prompt"] for job in reply.json()["jobs"]}

        assert line(BOT) == {first["id"]: "bot secret one", second["id"]: "bot secret two"}
        assert line(SHOP) == {theirs["id"]: None}  # its own line: another user's prompt hidden
        assert line(ADMIN)[theirs["id"]] == "shop secret"
        moved = httpx.post(
            f"{url}/v1/jobs/{theirs['id']}/move", json={"to": "front"}, headers=bearer(BOT)
        )
        assert moved.status_code == 403 and moved.json()["error"]["code"] == "forbidden"
        moved = httpx.post(
            f"{url}/v1/jobs/{theirs['id']}/move", json={"to": "front"}, headers=bearer(ADMIN)
        )
        assert moved.status_code == 200 and moved.json()["position"] == 0
        # the gallery query is scoped to the service inside the store
        found = httpx.get(f"{url}/v1/jobs", params={"q": "SECRET"}, headers=bearer(BOT)).json()
        assert [job["id"] for job in found["jobs"]] == [second["id"], first["id"]]
