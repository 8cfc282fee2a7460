"""What both clients share: error translation, handler names, reconnect backoff."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Literal

import httpx

from easel.errors import Cancelled, EaselError, GenerationError
from easel.jobs import EventType, Job, JobState

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


UNREACHABLE = "server_unreachable"


def _hierarchy() -> tuple[dict[str, type[EaselError]], dict[int, type[EaselError]]]:
    """Every EaselError class by code, and the most general one by status (breadth first)."""
    by_code: dict[str, type[EaselError]] = {}
    by_status: dict[int, type[EaselError]] = {}
    pending: list[type[EaselError]] = [EaselError]
    while pending:
        cls = pending.pop(0)
        by_code.setdefault(cls.code, cls)
        by_status.setdefault(cls.status, cls)
        pending.extend(cls.__subclasses__())
    return by_code, by_status


_BY_CODE, _BY_STATUS = _hierarchy()


def error_for(code: str, message: str, status: int | None = None) -> EaselError:
    """The EaselError subclass the server raised, rebuilt from its code (else its status)."""
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status or 500, EaselError)
    exc = cls(message, code=code)
    if status is not None:
        exc.status = status
    return exc


def error_from_response(response: httpx.Response) -> EaselError:
    """``{"error": {"code", "message"}}`` -> exception; anything else keeps its HTTP status."""
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code = f"http_{response.status_code}"
        message = f"{response.request.method} {response.request.url} answered "
        message += f"{response.status_code} {response.reason_phrase}: {response.text[:200]}"
    return error_for(code, message, response.status_code)


def job_error(job: Job) -> EaselError:
    """Why a job did not succeed, as the exception a caller that wanted images gets."""
    if job.state is JobState.cancelled:
        return Cancelled(f"job {job.id} was cancelled")
    code = job.error.code if job.error else GenerationError.code
    message = job.error.message if job.error else f"job {job.id} ended {job.state}"
    return (_BY_CODE.get(code) or GenerationError)(message, code=code)


def unreachable(base_url: str, exc: BaseException) -> EaselError:
    detail = str(exc) or type(exc).__name__
    return EaselError(
        f"could not talk to easel at {base_url} ({detail}); is `easel serve` running there?",
        code=UNREACHABLE,
    )


def backoff(attempt: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    """Full jitter: after a server restart, its clients come back spread out, not at once."""
    return random.uniform(0, min(cap, base * 2**attempt))
