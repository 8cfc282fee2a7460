"""What both clients share: error translation, handler names, reconnect backoff."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Self

import httpx

from easel.errors import EaselError, ServerUnreachable, error_for, error_for_status
from easel.jobs import EventType
from easel.queue.backoff import retry_delay


class AsyncResource:
    """A client that is an async context manager: leaving the block calls :meth:`aclose`."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release the connections."""


HandlerName = Literal[
    "queued", "generating", "progress", "done", "error", "cancelled", "connection_error"
]
Handler = Callable[[Any], Any]
"""Called with an :class:`~easel.jobs.Event` (``connection_error``: the exception); may be async."""

HANDLER_NAMES: tuple[HandlerName, ...] = (
    "queued",
    "generating",
    "progress",
    "done",
    "error",
    "cancelled",
    "connection_error",
)

HANDLER_FOR_EVENT: dict[EventType, HandlerName] = {
    EventType.queued: "queued",
    EventType.started: "generating",
    EventType.progress: "progress",
    EventType.succeeded: "done",
    EventType.failed: "error",
    EventType.cancelled: "cancelled",
}


def error_from_response(response: httpx.Response) -> EaselError:
    """``{"error": {"code", "message"}}`` -> exception; anything else keeps its HTTP status."""
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        message = f"{response.request.method} {response.request.url} answered "
        message += f"{response.status_code} {response.reason_phrase}: {response.text[:200]}"
        return error_for_status(response.status_code, message)
    return error_for(code, message, response.status_code)


def unreachable(base_url: str, exc: BaseException) -> EaselError:
    detail = str(exc) or type(exc).__name__
    return ServerUnreachable(
        f"could not talk to easel at {base_url} ({detail}); is `easel serve` running there?"
    )


def backoff(attempt: int) -> float:
    """Before reconnect ``attempt`` (0-based), full jitter: after a server restart, its
    clients come back spread out, not at once."""
    return retry_delay(attempt + 1, base=0.1, cap=5.0, jitter=1.0)
