"""Results inside succeeded events: asked for by the request, or by the subscription."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
from websockets.asyncio.client import connect

from easel.client import AsyncClient
from easel.jobs import EventType

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 2}


async def test_a_request_asks_for_its_images_in_the_succeeded_event(server: str) -> None:
    async with AsyncClient(server) as client:
        view = await client.submit("inline", include_images=True, batch_size=2, **SMALL)
        events = [e async for e in client.events(job_id=view.id)]
        plain = await client.submit("by url", **SMALL)
        plain_events = [e async for e in client.events(job_id=plain.id)]
        stored = [await client.image(view.id, index) for index in range(2)]
    [done] = [e for e in events if e.type is EventType.succeeded]
    assert done.content is not None
    assert [base64.b64decode(data) for data in done.content] == stored
    [plain_done] = [e for e in plain_events if e.type is EventType.succeeded]
    assert plain_done.content is None and plain_done.images


async def test_a_subscription_asks_for_every_job_s_images(server: str) -> None:
    async with AsyncClient(server) as client:
        job = await client.generate("any job", **SMALL)
    ws = "ws" + server.removeprefix("http")
    async with connect(f"{ws}/v1/events?job_id={job.id}&include_images=true") as socket:
        while (event := json.loads(await socket.recv()))["type"] != "succeeded":
            pass
    png = httpx.get(f"{server}/v1/jobs/{job.id}/images/0").content
    assert [base64.b64decode(data) for data in event["content"]] == [png]


def _sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [
        json.loads(line.removeprefix("data: "))
        for line in response.iter_lines()
        if line.startswith("data: ")
    ]


async def test_an_sse_subscription_asks_for_the_images_too(server: str) -> None:
    async with AsyncClient(server) as client:
        job = await client.generate("over sse", **SMALL)
        png = await client.image(job.id, 0)
        # the websocket client's subscription, too (a job that did not ask)
        events = [e async for e in client.events(job_id=job.id, include_images=True)]
    [done] = [e for e in events if e.type is EventType.succeeded]
    assert done.content is not None and base64.b64decode(done.content[0]) == png
    with httpx.stream("GET", f"{server}/v1/jobs/{job.id}/events?include_images=true") as r:
        [succeeded] = [e for e in _sse_events(r) if e["type"] == "succeeded"]
    assert [base64.b64decode(data) for data in succeeded["content"]] == [png]
    with httpx.stream("GET", f"{server}/v1/jobs/{job.id}/events") as r:
        [plain] = [e for e in _sse_events(r) if e["type"] == "succeeded"]
    assert "content" not in plain and plain["images"]  # not asked: the URLs only


async def test_results_over_the_inline_limit_stay_urls(server: str, monkeypatch: Any) -> None:
    from easel.results.files import LocalStorage

    monkeypatch.setattr(LocalStorage, "inline_max_bytes", 10)  # smaller than any PNG
    async with AsyncClient(server) as client:
        job = await client.generate("too big", **SMALL)
        events = [e async for e in client.events(job_id=job.id, include_images=True)]
    [done] = [e for e in events if e.type is EventType.succeeded]
    assert done.content is None and done.images
