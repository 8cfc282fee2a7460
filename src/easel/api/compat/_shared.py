"""What the compatibility APIs share: who is calling, and running one job to its end.

Each compatibility API (OpenAI, Automatic1111, Draw Things gRPC, the pipeline routes)
translates its request into a :class:`~easel.jobs.GenerationRequest`, submits it through
:meth:`Runtime.submit` like any other job, follows that job's events, and translates the
final :class:`~easel.jobs.Job` back. This module is the part in between.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.requests import HTTPConnection, Request

from easel.errors import EaselError
from easel.events.bus import Subscription
from easel.jobs import (
    FINAL_EVENTS,
    FINAL_STATES,
    Event,
    GenerationRequest,
    Job,
    JobView,
    final_event,
)
from easel.runtime.facade import Runtime

USER_HEADER = "x-easel-user"
"""A header any compatibility client can set to name its user (A1111 has no user field)."""


def identify(
    *,
    explicit: str | None = None,
    header: str | None = None,
    authorization: str | None = None,
    host: str | None = None,
) -> str:
    """The user a compatibility request runs as, first found of: a user field of the API
    (OpenAI ``user``, Draw Things ``user``), the ``X-Easel-User`` header, the user name of
    HTTP Basic auth, a hash of a Bearer token (``token:<sha256 prefix>``: the token itself
    is never stored), the client's address (``ip:<address>``).

    Not authentication: any client can claim any name until tokens are configured.
    """
    for name in (explicit, header):
        if name and name.strip():
            return name.strip()[:200]
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "basic" and credentials:
        try:
            user = base64.b64decode(credentials, validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            user = ""
        if user:
            return user[:200]
    if scheme.lower() == "bearer" and credentials.strip():
        return "token:" + hashlib.sha256(credentials.strip().encode()).hexdigest()[:16]
    return f"ip:{host or 'unknown'}"


def caller(connection: HTTPConnection, explicit: str | None = None) -> str:
    """:func:`identify` for an HTTP request."""
    return identify(
        explicit=explicit,
        header=connection.headers.get(USER_HEADER),
        authorization=connection.headers.get("authorization"),
        host=connection.client.host if connection.client else None,
    )


@dataclass
class Run:
    """A submitted job and its events, from ``queued`` to its final one."""

    view: JobView
    events: AsyncIterator[Event]


@asynccontextmanager
async def submitted(runtime: Runtime, request: GenerationRequest) -> AsyncIterator[Run]:
    """Submit ``request`` and follow its events.

    The subscription (to the user's events) opens before the submission, so no event of the
    job is missed and no history has to be replayed; other jobs of the user are skipped.
    """
    async with runtime.subscribe(user_id=request.user_id) as subscription:
        view = await runtime.submit(request)
        yield Run(view, _events_of(runtime, subscription, view.id))


async def _events_of(
    runtime: Runtime, subscription: Subscription, job_id: str
) -> AsyncIterator[Event]:
    async for event in subscription:
        if event.job_id != job_id:
            continue
        yield event
        if event.type in FINAL_EVENTS:
            return
    # the bus ended the stream (a slow subscriber, or shutdown): the record has the end
    job = await runtime.wait(job_id)
    if job.state in FINAL_STATES:
        yield final_event(job)


async def run_to_end(
    runtime: Runtime, request: GenerationRequest, connection: Request | None = None
) -> Job:
    """Submit and wait: the final job (succeeded, failed or cancelled).

    With ``connection``, a client that hangs up before the end cancels the job: nobody is
    left to receive its images (a remote easel backend cancels this way).
    """
    async with submitted(runtime, request) as run:
        watcher = None
        if connection is not None:
            watcher = asyncio.create_task(_cancel_on_disconnect(runtime, run.view.id, connection))
        try:
            async for _ in run.events:
                pass
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
    return await runtime.get(run.view.id)


async def _cancel_on_disconnect(runtime: Runtime, job_id: str, connection: Request) -> None:
    """Wait for ``http.disconnect`` (the body is read already: it is the next message).
    Starlette's ``is_disconnected`` polls through a cancelled scope, whose cancellation
    can leak into the caller; a plain ``receive`` cannot."""
    while (await connection.receive())["type"] != "http.disconnect":
        pass
    with contextlib.suppress(EaselError):
        await runtime.cancel(job_id)


async def png_bytes(runtime: Runtime, job: Job) -> list[bytes]:
    """The stored PNGs of a finished job, in batch order (read in a thread)."""
    paths = [await runtime.image_path(job.id, ref.index) for ref in job.images]
    return await asyncio.to_thread(lambda: [path.read_bytes() for path in paths])


async def pngs_base64(runtime: Runtime, job: Job) -> list[str]:
    """The stored PNGs as base64 text, encoded in a thread."""
    pngs = await png_bytes(runtime, job)
    return await asyncio.to_thread(lambda: [base64.b64encode(png).decode() for png in pngs])
