"""Fan-out pacing: a burst of sends is spread over loop iterations, in arrival order."""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import pytest
from websockets.asyncio.client import connect

from easel.events.pacing import Pacer, pacer
from tests.tenants import SMALL


async def test_at_most_per_turn_sends_per_iteration_first_come_first_served() -> None:
    gate = Pacer(per_turn=3)
    granted: list[int] = []

    async def send(i: int) -> None:
        await gate.turn()
        granted.append(i)

    tasks = [asyncio.create_task(send(i)) for i in range(10)]
    seen = [0]
    while len(granted) < 10:
        await asyncio.sleep(0)  # one loop iteration
        seen.append(len(granted))
    await asyncio.gather(*tasks)
    assert granted == list(range(10))
    assert max(b - a for a, b in itertools.pairwise(seen)) <= 3
    assert len(seen) > 10 // 3  # spread over iterations, not all at once


async def test_a_cancelled_waiter_leaves_the_line_and_the_others_go_on() -> None:
    gate = Pacer(per_turn=1)
    first, second, third = (asyncio.create_task(gate.turn()) for _ in range(3))
    await asyncio.sleep(0)  # the first takes this iteration's send; the others wait
    assert first.done() and not second.done()
    second.cancel()
    await asyncio.wait_for(third, 5)
    assert second.cancelled()


async def test_one_pacer_per_loop() -> None:
    assert pacer() is pacer()


def test_per_turn_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Pacer(per_turn=0)


async def test_forty_websocket_subscribers_each_get_every_event_in_order(server: str) -> None:
    """A burst to more subscribers than one iteration's sends: paced, nothing lost or
    reordered (a real server, real websocket clients)."""
    url = server.replace("http", "ws") + "/v1/events?user_id=pace&after=0"
    async with httpx.AsyncClient(base_url=server, timeout=30) as http:
        ids = []
        for n in range(3):
            body = {"prompt": f"pace {n}", "user_id": "pace", **SMALL}
            ids.append((await http.post("/v1/jobs", json=body)).json()["id"])

    async def follow() -> list[tuple[str, str, int | None, int]]:
        seen = []
        async with connect(url, max_size=None) as ws:
            done = 0
            while done < len(ids):
                event = json.loads(await asyncio.wait_for(ws.recv(), 60))
                seen.append((event["job_id"], event["type"], event.get("step"), event["id"]))
                done += event["type"] == "succeeded"
        return seen

    views = await asyncio.gather(*(follow() for _ in range(40)))
    assert all(view == views[0] for view in views)
    event_ids = [event_id for *_, event_id in views[0]]
    assert event_ids == sorted(event_ids)
    for job_id in ids:
        assert [(kind, step) for job, kind, step, _ in views[0] if job == job_id] == [
            ("queued", None), ("started", None), ("progress", 1), ("progress", 2),
            ("succeeded", None),
        ]  # fmt: skip
