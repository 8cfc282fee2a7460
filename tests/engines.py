"""Helpers for remote-engine backend tests: a local runtime in front of one engine, a job
run to its end with its events, and waiting on an engine's state without sleeping blind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from easel.backends.base import Backend
from easel.config import Settings
from easel.jobs import FINAL_EVENTS, Event, EventType, GenerationRequest, Job
from easel.runtime.facade import Runtime


@asynccontextmanager
async def runtime_with(
    tmp_path: Path, *backends: Backend, **settings: Any
) -> AsyncIterator[Runtime]:
    """An embedded easel whose fleet is ``backends``; a failed engine call is retried once."""
    options: dict[str, Any] = {"max_attempts": 2, "retry_base_seconds": 0.0, **settings}
    runtime = Runtime(
        Settings(data_dir=tmp_path / "local", **options),
        backends={backend.name: backend for backend in backends},
    )
    async with runtime:
        yield runtime


async def run_job(
    runtime: Runtime,
    request: GenerationRequest,
    *,
    on_event: Callable[[Event], Awaitable[None]] | None = None,
    timeout: float = 60,
) -> tuple[Job, list[Event]]:
    """Submit ``request`` and collect its events until its final one."""
    events: list[Event] = []
    async with asyncio.timeout(timeout):
        async with runtime.bus.subscribe(user_id=request.user_id) as subscription:
            view = await runtime.submit(request)
            async for event in subscription:
                if event.job_id != view.id:
                    continue
                events.append(event)
                if on_event is not None:
                    await on_event(event)
                if event.type in FINAL_EVENTS:
                    break
    return await runtime.store.get(view.id), events


def cancel_on(
    runtime: Runtime, type: EventType = EventType.progress
) -> Callable[[Event], Awaitable[None]]:
    """An ``on_event`` that cancels the job at its first event of ``type`` (once)."""
    done: set[str] = set()

    async def cancel(event: Event) -> None:
        if event.type is type and event.job_id not in done:
            done.add(event.job_id)
            await runtime.cancel(event.job_id)

    return cancel


def progress_of(events: list[Event]) -> list[Event]:
    return [event for event in events if event.type is EventType.progress]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    """Until ``check()`` is true (an engine's state we can only poll); fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not become true in time")
        await asyncio.sleep(0.05)
