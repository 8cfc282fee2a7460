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
