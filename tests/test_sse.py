"""Event streams that resume: Server-Sent Events, and the websocket killed mid-job."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from easel.api import create_app
from easel.config import Settings
from easel.events.bus import InProcessEventBus
from easel.runtime.facade import Runtime
from tests.servers import serve

SMALL = {"width": 64, "height": 64}
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[str]:
    """20 ms a step: a 20-step job lasts long enough to drop a connection in the middle."""
    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0.02, backend="mock")
    with serve(create_app(settings)) as url:
        yield url


def _submit(url: str, **fields: Any) -> str:
    response = httpx.post(f"{url}/v1/jobs", json={"prompt": "a fox", **SMALL, **fields})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def _frames(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """SSE frames as dicts of their fields (comments and ``retry`` skipped)."""
    frame: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in frame:
                yield frame
            frame = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            frame[field] = value


def _sse(
    url: str, job_id: str, *, limit: int | None = None, **request: Any
) -> list[dict[str, Any]]:
    """Events of one job over SSE: all of them, or the first ``limit`` (then hang up)."""
    events: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=20, **request) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for frame in _frames(response.iter_lines()):
            event = json.loads(frame["data"])
            assert frame["event"] == event["type"]
            assert frame.get("id") == (str(event["id"]) if "id" in frame else None)
            events.append(event)
            if limit is not None and len(events) == limit:
                break
    return events


def test_sse_streams_a_job_from_its_start_to_its_end(server: str) -> None:
    job_id = _submit(server, steps=3)
    events = _sse(server, job_id)
    assert [(e["type"], e.get("step")) for e in events] == [
        ("queued", None), ("started", None),
        ("progress", 1), ("progress", 2), ("progress", 3),
        ("succeeded", None),
    ]  # fmt: skip
    assert events[-1]["images"][0]["url"] == f"/v1/jobs/{job_id}/images/0"


@pytest.mark.parametrize("resume", ["last-event-id", "after"])
def test_sse_resumes_after_the_last_id_exactly_once(slow_server: str, resume: str) -> None:
    job_id = _submit(slow_server, steps=20)
    first = _sse(slow_server, job_id, limit=4)  # hang up at progress 2, mid-job
    assert first[-1]["type"] == "progress" and first[-1]["step"] == 2
    last = first[-1]["id"]
    if resume == "after":
        rest = _sse(slow_server, job_id, params={"after": last})
    else:  # as EventSource reconnects: the header wins over the URL's first ``after``
        rest = _sse(slow_server, job_id, params={"after": 0}, headers={"Last-Event-ID": str(last)})
    everything = _sse(slow_server, job_id)
    assert [e["id"] for e in first + rest] == [e["id"] for e in everything]
    assert [e["step"] for e in everything if e["type"] == "progress"] == list(range(1, 21))

    # resuming after the final event: nothing left, and 204 tells EventSource to stop
    done = httpx.get(
        f"{slow_server}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(rest[-1]["id"])}
    )
    assert done.status_code == 204


def test_sse_of_a_job_whose_events_are_forgotten_gives_its_final_event(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0.0, backend="mock")
    runtime = Runtime(settings, bus=InProcessEventBus(history_size=2))
    with serve(create_app(runtime=runtime)) as url:
        job_id = _submit(url, steps=2)
        _sse(url, job_id)  # runs to the end
        _sse(url, _submit(url, steps=2))  # pushes the first job out of the history
        [final] = _sse(url, job_id)
    # rebuilt from the job's record: no SSE id, since the bus has none for it any more
    assert (final["type"], final["job_id"], final["id"]) == ("succeeded", job_id, 0)
    assert final["images"][0]["url"] == f"/v1/jobs/{job_id}/images/0"


def test_sse_of_an_unknown_job_is_404(server: str) -> None:
    response = httpx.get(f"{server}/v1/jobs/nope/events")
    assert (response.status_code, response.json()["error"]["code"]) == (404, "job_not_found")


def test_sse_of_all_events_for_one_user(server: str) -> None:
    _submit(server, steps=1, user_id="someone-else")
    mine = _submit(server, steps=1, user_id="me")
    seen: list[dict[str, Any]] = []
    with httpx.stream(
        "GET", f"{server}/v1/events", params={"user_id": "me", "after": 0}, timeout=20
    ) as response:
        for frame in _frames(response.iter_lines()):
            seen.append(json.loads(frame["data"]))
            if seen[-1]["type"] in FINAL:
                break
    assert {e["job_id"] for e in seen} == {mine}
    assert [e["type"] for e in seen] == ["queued", "started", "progress", "succeeded"]


@pytest.mark.parametrize("resume", ["last-event-id", "after"])
async def test_a_killed_websocket_resumes_with_every_remaining_event_once(
    slow_server: str, resume: str
) -> None:
    """Kill the connection mid-job (no close handshake), let events happen while away,
    reconnect with the last id seen: every remaining event arrives, none twice."""
    job_id = _submit(slow_server, steps=20)
    ws_url = slow_server.replace("http", "ws") + f"/v1/events?job_id={job_id}"
    first: list[dict[str, Any]] = []
    websocket = await connect(ws_url)
    while not first or first[-1].get("step") != 3:
        first.append(json.loads(await websocket.recv()))
    websocket.transport.abort()  # killed: no close frame, the server finds out by itself
    with contextlib.suppress(Exception):
        await websocket.close()
    await asyncio.sleep(0.1)  # ~5 steps happen while no one listens

    last = first[-1]["id"]
    if resume == "after":
        url, headers = f"{ws_url}&after={last}", {}
    else:
        url, headers = ws_url, {"Last-Event-ID": str(last)}
    rest: list[dict[str, Any]] = []
    async with connect(url, additional_headers=headers) as again:
        while not rest or rest[-1]["type"] not in FINAL:
            rest.append(json.loads(await asyncio.wait_for(again.recv(), 10)))

    async with connect(ws_url) as replay:  # the whole job, from the bus's history
        everything: list[dict[str, Any]] = []
        while not everything or everything[-1]["type"] not in FINAL:
            everything.append(json.loads(await asyncio.wait_for(replay.recv(), 10)))

    ids = [e["id"] for e in first + rest]
    assert ids == [e["id"] for e in everything]
    assert len(set(ids)) == len(ids)
    assert [e["type"] for e in everything] == ["queued", "started", *["progress"] * 20, "succeeded"]
    assert rest[0]["step"] == 4  # the first event after the one last seen
