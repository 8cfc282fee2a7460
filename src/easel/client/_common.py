"""What both clients share: error translation, handler names, reconnect backoff."""

from __future__ import annotations

import json
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
    fallback = f"{response.request.method} {response.request.url} answered "
    fallback += f"{response.status_code} {response.reason_phrase}: {response.text[:200]}"
    return error_from_body(response.status_code, response.content, fallback)


def error_from_body(status: int, body: bytes, fallback: str) -> EaselError:
    """An error answer's body (HTTP, or a refused websocket handshake) -> the catalogue's
    exception; a body that is not easel's error keeps ``status`` with ``fallback``."""
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return error_for_status(status, fallback)
    return error_for(code, message, status)


def unreachable(base_url: str, exc: BaseException) -> EaselError:
    detail = str(exc) or type(exc).__name__
    return ServerUnreachable(
        f"could not talk to easel at {base_url} ({detail}); is `easel serve` running there?"
    )


def backoff(attempt: int) -> float:
    """Before reconnect ``attempt`` (0-based), full jitter: after a server restart, its
    clients come back spread out, not at once."""
    return retry_delay(attempt + 1, base=0.1, cap=5.0, jitter=1.0)
