"""Bounds on a request before any route reads it: its query string and its websocket
handshake.

Two layers, because a long handshake line never reaches ASGI at all. ``QueryLimit`` (an
ASGI middleware) refuses a query string over :data:`~easel.constants.MAX_QUERY_BYTES` with
414 ``query_too_long`` on HTTP and on websocket handshakes alike. Below it, uvicorn's
sans-I/O websocket protocol hands the raw handshake to the ``websockets`` parser, which
refuses a line over 8 KiB (414) or too many or too large headers (431) by queuing an answer
that uvicorn 0.54 never sends: the connection just hangs. :class:`WebSocketProtocol` answers
instead (the same status, easel's error body) and closes, so every handshake ends at once,
accepted or refused; a denial response sent by the app no longer logs "returned without
completing handshake". ``easel serve`` runs uvicorn with it (``ws=WebSocketProtocol``).
"""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import HeaderLineTooLong, RequestLineTooLong, TooManyHeaders
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS

from easel.api.errors import error_response, refuse_websocket
from easel.constants import MAX_QUERY_BYTES
from easel.errors import BadRequest, EaselError, HeadersTooLarge, QueryTooLong


class QueryLimit:
    """Refuse a query string over ``max_bytes`` with easel's 414, before any route."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_QUERY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        size = len(scope.get("query_string", b""))
        if scope["type"] not in {"http", "websocket"} or size <= self.max_bytes:
            await self.app(scope, receive, send)
            return
        error = QueryTooLong(
            f"the query string is {size} bytes, more than {self.max_bytes}; send the "
            "parameters in the body, or fewer of them"
        )
        if scope["type"] == "http":
            await error_response(error)(scope, receive, send)
        else:
            await refuse_websocket(scope, receive, send, error)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websocket protocol, answering the handshakes its parser refuses."""

    def data_received(self, data: bytes) -> None:
        if not self.handshake_initiated:
            self.conn.receive_data(data)
            if (refused := self.conn.handshake_exc) is not None:  # before any request event
                self.conn.data_to_send()  # its own plain-text answer: easel's is sent instead
                self.transport.write(_answer(_handshake_error(refused)))
                self.close_sent = True
                self.transport.close()
                return
            if self.conn.parser_exc is not None:
                self.handle_parser_exception()
                return
            self.handle_events()
            return
        super().data_received(data)

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True  # the app's denial response is the whole answer


def _handshake_error(exc: Exception) -> EaselError:
    """What the ``websockets`` parser refused, as easel's error."""
    if isinstance(exc, RequestLineTooLong):
        return QueryTooLong(
            f"the request line is longer than {MAX_LINE_LENGTH} bytes; shorten the query "
            f"(at most {MAX_QUERY_BYTES} bytes)"
        )
    if isinstance(exc, HeaderLineTooLong | TooManyHeaders):
        return HeadersTooLarge(
            f"the handshake has more than {MAX_NUM_HEADERS} headers or one longer than "
            f"{MAX_LINE_LENGTH} bytes; send fewer, shorter ones"
        )
    return BadRequest("this is not a valid HTTP request for a websocket handshake")


def _answer(error: EaselError) -> bytes:
    """A complete HTTP/1.1 response carrying easel's error body; the connection closes."""
    body = json.dumps({"error": error.to_dict()}).encode()
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body
