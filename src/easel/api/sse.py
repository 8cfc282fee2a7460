"""Server-Sent Events: the event stream for clients that cannot open a websocket.

``GET /v1/jobs/{id}/events`` streams one job's events, from its start, and ends after its
final one; ``GET /v1/events`` streams every event (or one user's) until the client leaves.
Each frame is ``id: <event id>``, ``event: <type>``, ``data: <the event as JSON>``, the
same JSON as the websocket's. A reconnecting client (a browser's ``EventSource`` does it by
itself) sends ``Last-Event-ID`` and gets exactly the events after it; ``?after=<id>`` does the
same by hand. The larger of the two wins, so a URL that still carries its first ``after``
resumes right. A job that already ended and has nothing after the client's id answers
``204``, which tells ``EventSource`` to stop reconnecting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from easel.api.errors import ErrorResponse
from easel.api.native import AfterId, LastEventId, runtime_of, subscriber_json
from easel.events.bus import Subscription
from easel.events.pacing import pacer
from easel.jobs import FINAL_EVENTS, Event, Job, final_event
from easel.results.files import LocalStorage
from easel.runtime.facade import Runtime
from easel.safety.services import may_see

router = APIRouter(tags=["events"])

KEEPALIVE_SECONDS = 15.0
"""A comment line this often keeps idle proxies from closing the stream."""
REPLAY_GRACE = 0.5
"""How long to wait for a finished job's replayed events before deciding there are none."""

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An event stream: `id:`, `event:` and `data:` (the event JSON) per event",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
}


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        **_STREAM,
        204: {"description": "The job ended and has no events after Last-Event-ID"},
        404: {"model": ErrorResponse, "description": "No such job"},
    },
)
async def job_events(
    job_id: str,
    request: Request,
    after: AfterId = None,
    include_images: bool = False,
    last_event_id: LastEventId = None,
) -> Response:
    """One job's events as Server-Sent Events, from its start (or after the last id seen),
    ending with its final event. ``include_images``: its ``succeeded`` event carries the
    result files, base64, in ``content`` (when small enough; else the URLs only)."""
    runtime = runtime_of(request)
    start = _resume_point(after, last_event_id)
    job = await runtime.get(job_id)  # 404 before any stream starts
    synthesize = False
    if job.state.is_final:
        # the job's events may be forgotten by now; see whether any come back
        async with runtime.subscribe(job_id=job_id, after=start or 0) as probe:
            replayed = await _next(probe, REPLAY_GRACE)
        if replayed is None:
            if start:
                return Response(status_code=204)
            synthesize = True
    inline = runtime.storage if include_images else None
    stream = _job_stream(runtime, job, start or 0, synthesize, inline)
    return StreamingResponse(stream, media_type="text/event-stream", headers=_HEADERS)


@router.get("/v1/events", response_class=StreamingResponse, responses=_STREAM)
async def all_events(
    request: Request,
    user_id: str | None = None,
    after: AfterId = None,
    include_images: bool = False,
    last_event_id: LastEventId = None,
) -> Response:
    """Every event (or one user's) as Server-Sent Events, live or from after the last id
    seen, until the client leaves. The websocket at the same path serves the same events.
    ``include_images``: ``succeeded`` events carry the result files, base64, in
    ``content`` (when small enough), as if every job had asked for them."""
    runtime = runtime_of(request)
    start = _resume_point(after, last_event_id)
    inline = runtime.storage if include_images else None

    async def stream() -> AsyncIterator[str]:
        async with runtime.subscribe(user_id=user_id, after=start) as subscription:
            async for frame in _frames(subscription, until_final=False, inline=inline):
                yield frame

    return StreamingResponse(stream(), media_type="text/event-stream", headers=_HEADERS)


def _resume_point(after: int | None, last_event_id: int | None) -> int | None:
    given = [value for value in (after, last_event_id) if value is not None]
    return max(given) if given else None


async def _job_stream(
    runtime: Runtime, job: Job, start: int, synthesize: bool, inline: LocalStorage | None
) -> AsyncIterator[str]:
    if synthesize:  # ended so long ago that the bus forgot it: its record says how
        event = final_event(job)
        yield _frame(event, await subscriber_json(event, inline), with_id=False)
        return
    async with runtime.subscribe(job_id=job.id, after=start) as subscription:
        async for frame in _frames(subscription, until_final=True, inline=inline):
            yield frame


async def _frames(
    subscription: Subscription, *, until_final: bool, inline: LocalStorage | None = None
) -> AsyncIterator[str]:
    """SSE frames of the subscription's events, with a keep-alive comment when idle."""
    yield "retry: 1000\n\n"
    while True:
        try:
            event = await _next(subscription, KEEPALIVE_SECONDS, raise_timeout=True)
        except TimeoutError:
            yield ": keep-alive\n\n"
            continue
        if event is None:  # the bus ended the stream (slow client, shutdown): resume
            return
        if not may_see(event.service):  # a service sees only its own jobs' events
            continue
        await pacer().turn()  # many streams' writes spread over loop iterations
        yield _frame(event, await subscriber_json(event, inline))
        if until_final and event.type in FINAL_EVENTS:
            return


async def _next(
    subscription: Subscription, timeout: float, *, raise_timeout: bool = False
) -> Event | None:
    """The next event, or None when the stream ended (or, unless ``raise_timeout``, timed
    out). Waits on the subscription's queue, whose ``get`` is safe to cancel."""
    try:
        return await asyncio.wait_for(subscription.queue.get(), timeout)
    except TimeoutError:
        if raise_timeout:
            raise
        return None


def _frame(event: Event, data: str, *, with_id: bool = True) -> str:
    lines = [f"id: {event.id}"] if with_id else []
    lines += [f"event: {event.type}", f"data: {data}"]
    return "\n".join(lines) + "\n\n"
