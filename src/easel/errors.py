"""easel's one error catalogue: every error class, its code and its HTTP status.

Every error a client can cause or see carries a machine-readable ``code`` and the HTTP
status the API answers with; the native API renders them as
``{"error": {"code": ..., "message": ...}}`` and each compatibility surface translates
them in one place (``api/errors.py``, ``api/compat/_errors.py``). The same codes are
recorded on failed jobs. A code belongs to exactly one class: to say something new, add a
class here (and to :data:`ERRORS`), never a ``code=`` on a generic one.

    EaselError                  500 error
    ├── InvalidRequest          422 invalid_request
    │   ├── Unsupported         422 unsupported
    │   │   ├── NoBackend       422 no_backend          (nothing deployed runs it: add a backend)
    │   │   └── SamplerUnsupported 422 sampler_unsupported (a known sampler no backend runs)
    │   ├── InvalidJson         400 invalid_json
    │   ├── PromptRejected      422 prompt_rejected     (moderation said no)
    │   ├── PipelineBusy        400 pipeline_busy       (pipeline API: a run is unfinished)
    │   └── PipelineNotDone     400 pipeline_not_done   (pipeline API: no finished run)
    ├── BadRequest              400 bad_request
    ├── Unauthorized            401 unauthorized
    ├── Forbidden               403 forbidden
    ├── NotFound                404 not_found
    │   ├── JobNotFound         404 job_not_found
    │   ├── ImageNotFound       404 image_not_found
    │   ├── AudioNotFound       404 audio_not_found
    │   └── ModelNotFound       404 model_not_found
    ├── MethodNotAllowed        405 method_not_allowed
    ├── JobFinished             409 job_finished
    ├── JobNotQueued            409 job_not_queued      (only a job waiting in line moves)
    ├── RequestTooLarge         413 request_too_large
    ├── QueryTooLong            414 query_too_long      (a URL's query string, websockets too)
    ├── HeadersTooLarge         431 headers_too_large   (a websocket handshake's headers)
    ├── UnsupportedMediaType    415 unsupported_media_type
    ├── QueueFull               429 queue_full
    │   ├── UserQueueFull       429 user_queue_full
    │   └── ServiceQueueFull    429 service_queue_full
    ├── RateLimited             429 rate_limited        (``retry_after`` in its details)
    ├── InternalError           500 internal_error      (a bug: the server's log says more)
    ├── StoreError              500 store_error         (the store answered an error)
    │   └── StoreInUse          500 store_in_use        (another process owns the SQLite file)
    ├── StoreUnavailable        503 store_unavailable   (transient)
    ├── ShuttingDown            503 shutting_down       (this server stops; the job is kept)
    ├── ModerationUnavailable   503 moderation_unavailable
    ├── ServerUnreachable       503 server_unreachable  (client side: no answer at all)
    ├── UnexpectedResponse      502 unexpected_response (client side: not easel's answer)
    ├── TimedOut                504 timed_out           (client side: no answer in time)
    └── GenerationError         500 generation_failed   (recorded on the job, not an HTTP answer)
        ├── Cancelled           499 cancelled
        ├── LeaseLost           409 lease_lost
        ├── WorkerLost          500 worker_lost         (its worker stopped too many times)
        ├── MockFailure         500 mock_failure        (the mock backend, asked to fail)
        ├── BackendUnavailable  503 backend_unavailable (transient: worth a retry)
        └── EngineError         502 engine_error        (a remote engine refused or failed)
            └── EngineRefused   422 engine_refused      (its safety system or validation)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any


class EaselError(Exception):
    code: str = "error"
    status: int = 500
    retryable: bool = False
    """Transient: the same job may succeed if run again later."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, object]:
        """The API's error body: code, message and any details (such as a count), with
        nothing of the server's insides (see :func:`public_text`)."""
        return {"code": self.code, "message": public_text(self.message), **self.details}


class InvalidRequest(EaselError):
    code = "invalid_request"
    status = 422


class Unsupported(InvalidRequest):
    code = "unsupported"


class NoBackend(Unsupported):
    """Nothing in the deployment can run the request at all (an engine payload no backend
    runs): adding such a backend, not changing the request's numbers, is the fix."""

    code = "no_backend"


class SamplerUnsupported(Unsupported):
    """A sampler easel knows, which the backends the request may go to cannot run (the
    message names what each runs). A1111's doors answer it as A1111 does: 404."""

    code = "sampler_unsupported"


class InvalidJson(InvalidRequest):
    code = "invalid_json"
    status = 400


class PromptRejected(InvalidRequest):
    code = "prompt_rejected"


class PipelineBusy(InvalidRequest):
    """The pipeline API's reference answers 400 where easel would say 422."""

    code = "pipeline_busy"
    status = 400


class PipelineNotDone(InvalidRequest):
    code = "pipeline_not_done"
    status = 400


class BadRequest(EaselError):
    code = "bad_request"
    status = 400


class Unauthorized(EaselError):
    code = "unauthorized"
    status = 401


class Forbidden(EaselError):
    code = "forbidden"
    status = 403


class NotFound(EaselError):
    code = "not_found"
    status = 404


class JobNotFound(NotFound):
    code = "job_not_found"


class ImageNotFound(NotFound):
    code = "image_not_found"


class AudioNotFound(NotFound):
    code = "audio_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(EaselError):
    code = "method_not_allowed"
    status = 405


class JobFinished(EaselError):
    code = "job_finished"
    status = 409


class JobNotQueued(EaselError):
    """Only a job waiting in line can be moved in it."""

    code = "job_not_queued"
    status = 409


class RequestTooLarge(EaselError):
    code = "request_too_large"
    status = 413


class QueryTooLong(EaselError):
    """A URL whose query string is past the bound: refused before any route reads it."""

    code = "query_too_long"
    status = 414


class HeadersTooLarge(EaselError):
    """A handshake with too many header lines, or one too long."""

    code = "headers_too_large"
    status = 431


class UnsupportedMediaType(EaselError):
    code = "unsupported_media_type"
    status = 415


class QueueFull(EaselError):
    code = "queue_full"
    status = 429


class UserQueueFull(QueueFull):
    code = "user_queue_full"


class ServiceQueueFull(QueueFull):
    code = "service_queue_full"


class RateLimited(EaselError):
    code = "rate_limited"
    status = 429


class InternalError(EaselError):
    code = "internal_error"
    status = 500


class StoreError(EaselError):
    code = "store_error"
    status = 500


class StoreInUse(StoreError):
    """Another process owns this SQLite job store (one owner per data dir); the message
    names its pid. Share one queue between processes with Redis instead."""

    code = "store_in_use"


class StoreUnavailable(EaselError):
    code = "store_unavailable"
    status = 503
    retryable = True


class ShuttingDown(EaselError):
    """A request waiting for its job while this server shuts down: the job is kept (queued
    again, or still running elsewhere); follow it by id on another replica or later."""

    code = "shutting_down"
    status = 503
    retryable = True


class ModerationUnavailable(EaselError):
    code = "moderation_unavailable"
    status = 503
    retryable = True


class ServerUnreachable(EaselError):
    code = "server_unreachable"
    status = 503
    retryable = True


class UnexpectedResponse(EaselError):
    code = "unexpected_response"
    status = 502


class TimedOut(EaselError):
    code = "timed_out"
    status = 504
    retryable = True


class GenerationError(EaselError):
    code = "generation_failed"
    status = 500


class Cancelled(GenerationError):
    code = "cancelled"
    status = 499


class LeaseLost(GenerationError):
    code = "lease_lost"
    status = 409


class WorkerLost(GenerationError):
    code = "worker_lost"


class MockFailure(GenerationError):
    code = "mock_failure"


class BackendUnavailable(GenerationError):
    code = "backend_unavailable"
    status = 503
    retryable = True


class EngineError(GenerationError):
    """A remote engine (Automatic1111, ComfyUI, an OpenAI-compatible API...) failed the job
    for good; the message carries the engine's own text."""

    code = "engine_error"
    status = 502


class EngineRefused(EngineError):
    """A remote engine refused the request itself (its safety system, its validation):
    running it again would be refused again."""

    code = "engine_refused"
    status = 422


CATALOGUE: tuple[type[EaselError], ...] = (
    EaselError,
    InvalidRequest,
    Unsupported,
    NoBackend,
    SamplerUnsupported,
    InvalidJson,
    PromptRejected,
    PipelineBusy,
    PipelineNotDone,
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    JobNotFound,
    ImageNotFound,
    AudioNotFound,
    ModelNotFound,
    MethodNotAllowed,
    JobFinished,
    JobNotQueued,
    RequestTooLarge,
    QueryTooLong,
    HeadersTooLarge,
    UnsupportedMediaType,
    QueueFull,
    UserQueueFull,
    ServiceQueueFull,
    RateLimited,
    InternalError,
    StoreError,
    StoreInUse,
    StoreUnavailable,
    ShuttingDown,
    ModerationUnavailable,
    ServerUnreachable,
    UnexpectedResponse,
    TimedOut,
    GenerationError,
    Cancelled,
    LeaseLost,
    WorkerLost,
    MockFailure,
    BackendUnavailable,
    EngineError,
    EngineRefused,
)
"""Every class, in the order of the tree above."""

ERRORS: dict[str, type[EaselError]] = {cls.code: cls for cls in CATALOGUE}
"""Code -> class: how a client rebuilds the exception the server raised."""

_FOR_STATUS: dict[int, type[EaselError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    413: RequestTooLarge,
    414: QueryTooLong,
    431: HeadersTooLarge,
    415: UnsupportedMediaType,
    422: InvalidRequest,
    429: QueueFull,
    499: Cancelled,
    502: UnexpectedResponse,
    503: ServerUnreachable,
    504: TimedOut,
}
"""For a code this client does not know (a newer server): the general class of its status."""


def error_for(
    code: str, message: str, status: int | None = None, *, unknown: type[EaselError] | None = None
) -> EaselError:
    """The exception for an error the server reported by ``code`` (and HTTP ``status``).

    A code missing from :data:`ERRORS` (a newer server's, a third-party backend's) becomes
    ``unknown`` or the general class of its status, and keeps the reported code, so nothing
    the server said is lost.
    """
    cls = ERRORS.get(code)
    if cls is not None:
        return cls(message)
    exc = unknown(message) if unknown else error_for_status(status or 500, message)
    exc.code = code
    return exc


def error_for_status(status: int, message: str) -> EaselError:
    """The general class of an HTTP status, for an answer that carried no easel code."""
    exc = _FOR_STATUS.get(status, EaselError)(message)
    exc.status = status
    return exc


def describe_validation(errors: Iterable[Mapping[str, Any]]) -> str:
    """Pydantic's error list -> one readable sentence (the first five problems)."""
    errors = list(errors)
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
        message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "the request is invalid"


_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")
_PATH = re.compile(r"(?<![\w:/.])(?:/[\w.@+-]+){2,}/?")


def public_text(text: str) -> str:
    """``text`` fit for a response body: memory addresses dropped, server paths cut to
    their last part (``/srv/models/sd15`` -> ``sd15``), so errors say what, never where."""
    text = _ADDRESS.sub("the data", text)
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
