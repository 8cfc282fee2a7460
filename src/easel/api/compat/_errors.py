"""easel's errors in each foreign surface's terms: one translator per surface.

The native API's translator is ``api/errors.py`` (``{"error": {"code", "message"}}``);
A1111 and the pipeline API answer in that same native shape. OpenAI's routes answer
``{"error": {"message", "type", "param", "code"}}`` and gRPC a status code with a sentence.
Each takes an :class:`~easel.errors.EaselError` from the catalogue; a failed job becomes one
through :func:`easel.jobs.job_error` first, so every surface reports a job's failure alike.
"""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from easel.errors import EaselError

# -- OpenAI -----------------------------------------------------------------------------


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


def openai_response(
    status: int, message: str, code: str | None, param: str | None = None
) -> JSONResponse:
    """OpenAI's error shape; ``type`` is the class of error OpenAI's clients branch on."""
    if status == 429:
        kind = "rate_limit_exceeded"
    elif status >= 500:
        kind = "server_error"
    elif status == 401:
        kind = "authentication_error"
    else:
        kind = "invalid_request_error"
    body = OpenAIError(error=OpenAIErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def to_openai(exc: EaselError) -> JSONResponse:
    """OpenAI says 400 for what easel calls 422; a cancelled job (499, not HTTP) is a 500."""
    status = {422: 400, 499: 500}.get(exc.status, exc.status)
    return openai_response(status, exc.message, exc.code)


# -- gRPC -------------------------------------------------------------------------------

_GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def to_grpc(exc: EaselError) -> tuple[grpc.StatusCode, str]:
    """The status a Draw Things client understands, and a sentence that starts with the code."""
    return _GRPC_STATUS.get(exc.status, grpc.StatusCode.INTERNAL), f"{exc.code}: {exc.message}"
