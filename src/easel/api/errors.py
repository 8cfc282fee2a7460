"""The native API's error translator: ``{"error": {"code": ..., "message": ...}}``.

Every refusal goes through here: easel's own errors, pydantic's validation errors and
Starlette's HTTP errors (404 for an unknown route, 405...), all as codes of the catalogue in
``easel.errors``. The compatibility surfaces translate in ``api/compat/_errors.py``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketState

from easel.errors import (
    EaselError,
    InternalError,
    InvalidJson,
    InvalidRequest,
    describe_validation,
    error_for_status,
)

log = logging.getLogger("easel.api")


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # details such as ``count`` ride along

    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(exc: EaselError) -> JSONResponse:
    """The body and status of ``exc``; ``Retry-After`` when it says when to come back."""
    headers = None
    if isinstance(retry := exc.details.get("retry_after"), int | float):
        headers = {"Retry-After": str(max(1, math.ceil(retry)))}
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)


async def refuse_websocket(scope: Scope, receive: Receive, send: Send, error: EaselError) -> None:
    """Refuse a websocket handshake as an HTTP answer would: the error's status and easel's
    body (ASGI's denial response); a server without that extension gets close 1008 and the
    sentence (most servers then answer 403). After the handshake: close 1008."""
    websocket = WebSocket(scope, receive, send)
    denial = "websocket.http.response" in scope.get("extensions", {})
    if denial and websocket.application_state is WebSocketState.CONNECTING:
        await websocket.send_denial_response(error_response(error))
        return
    await websocket.close(code=1008, reason=error.message[:120])  # a close reason: <= 123 bytes


def validation_error(errors: Any) -> InvalidRequest:
    """Pydantic's error list -> ``invalid_json`` or ``invalid_request`` with one sentence."""
    errors = list(errors)
    if any(error.get("type") == "json_invalid" for error in errors):
        return InvalidJson("the request body is not valid JSON")
    return InvalidRequest(describe_validation(errors))


def install(app: FastAPI) -> None:
    @app.exception_handler(EaselError)
    async def easel_error(request: Request, exc: EaselError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc.errors())
        if (runtime := getattr(request.app.state, "runtime", None)) is not None:
            runtime.metrics.rejected.labels(error.code).inc()
        return error_response(error)

    @app.exception_handler(WebSocketRequestValidationError)
    async def invalid_socket(websocket: WebSocket, exc: WebSocketRequestValidationError) -> None:
        error = validation_error(exc.errors())
        await refuse_websocket(websocket.scope, websocket.receive, websocket.send, error)

    @app.exception_handler(ValidationError)
    async def invalid_model(request: Request, exc: ValidationError) -> JSONResponse:
        # a compatibility route building easel's request from a foreign one: still the
        # client's input, so still a 422 with a code, never a 500
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        response = error_response(error_for_status(exc.status_code, str(exc.detail)))
        response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110), for one
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError("easel hit an unexpected error; see its log"))
