"""One error shape for every route: ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from easel.errors import EaselError

log = logging.getLogger("easel.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # details such as ``count`` ride along

    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers or None
    )


def describe_validation(errors: Any) -> tuple[int, str, str]:
    """Pydantic's error list -> (status, code, one readable sentence)."""
    errors = list(errors)
    if any(error.get("type") == "json_invalid" for error in errors):
        return 400, "invalid_json", "the request body is not valid JSON"
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
        message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return 422, "invalid_request", "; ".join(parts) or "the request is invalid"


def install(app: FastAPI) -> None:
    @app.exception_handler(EaselError)
    async def easel_error(request: Request, exc: EaselError) -> JSONResponse:
        headers = None
        if isinstance(retry := exc.details.get("retry_after"), int | float):
            headers = {"Retry-After": str(max(1, math.ceil(retry)))}
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, message = describe_validation(exc.errors())
        if (runtime := getattr(request.app.state, "runtime", None)) is not None:
            runtime.metrics.rejected.labels(code).inc()
        return error_response(status, code, message)

    @app.exception_handler(ValidationError)
    async def invalid_model(request: Request, exc: ValidationError) -> JSONResponse:
        # a compatibility route building easel's request from a foreign one: still the
        # client's input, so still a 422 with a code, never a 500
        status, code, message = describe_validation(exc.errors())
        return error_response(status, code, message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "easel hit an unexpected error; see its log")
