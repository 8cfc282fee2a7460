"""The async client's retries: a server that answers 503 at first still gets one job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from easel.api import create_app
from easel.client import AsyncClient
from easel.config import Settings
from easel.errors import ServerUnreachable
from tests.servers import serve


class Flaky:
    """An ASGI wrapper answering 503 to the next ``failures`` HTTP requests."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.failures = 0
        self.seen: list[tuple[str, str, str | None]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            key = dict(scope["headers"]).get(b"idempotency-key")
            self.seen.append((scope["method"], scope["path"], key.decode() if key else None))
            if self.failures > 0:
                self.failures -= 1
                await send({"type": "http.response.start", "status": 503, "headers": []})
                await send({"type": "http.response.body", "body": b"try later"})
                return
        await self.app(scope, receive, send)


@pytest.fixture
def flaky(tmp_path: Path) -> Iterator[tuple[str, Flaky]]:
    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0, backend="mock")
    wrapper = Flaky(create_app(settings))
    with serve(cast(Any, wrapper)) as url:
        yield url, wrapper


async def test_a_submission_retried_after_503s_makes_one_job(flaky: tuple[str, Flaky]) -> None:
    url, server = flaky
    async with AsyncClient(url, user_id="retry") as client:
        server.failures = 2
        view = await client.submit("a red fox", width=64, height=64, steps=1)
        posts = [entry for entry in server.seen if entry[0] == "POST"]
        assert len(posts) == 3
        assert len({key for _, _, key in posts}) == 1 and posts[0][2]  # one key, resent
        assert [job.id for job in await client.list(user_id="retry")] == [view.id]

        server.failures = 1
        assert (await client.get(view.id)).id == view.id


async def test_retries_give_up_with_the_servers_answer(flaky: tuple[str, Flaky]) -> None:
    url, server = flaky
    async with AsyncClient(url, retries=1) as client:
        server.failures = 5
        with pytest.raises(ServerUnreachable) as info:  # a 503 that is not easel's own body
            await client.get("anything")
    assert (info.value.status, info.value.code) == (503, "server_unreachable")
    assert len(server.seen) == 2
