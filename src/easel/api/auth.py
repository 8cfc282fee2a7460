"""Service tokens: who is calling, and what it may do. A pure ASGI middleware.

When any token is configured, every route but ``/health`` and the web page's own files
(``/``, ``/ui/...``: the page asks for a token and sends it itself) needs one, as
``Authorization: Bearer <token>`` (or ``?token=`` on a websocket, which browsers cannot
give headers). Tokens are compared in constant time against every configured token and
are never logged. The caller's service lands in ``scope["state"]["service"]``; routes use
it to show a service only its own jobs (``admin`` sees all); so does
``easel.safety.services.current_service``, for code below the routes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from easel.api.errors import refuse_websocket
from easel.errors import EaselError, Forbidden, RequestTooLarge, Unauthorized
from easel.safety.services import Permission, ServiceToken, current_service, identify

OPEN_PATHS = frozenset({"/health", "/"})
OPEN_PREFIXES = ("/ui/",)


def required_scope(method: str) -> str:
    return Permission.read if method in {"GET", "HEAD", "OPTIONS"} else Permission.submit


class TokenAuth:
    def __init__(self, app: ASGIApp, tokens: Sequence[ServiceToken]) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in {"http", "websocket"} or not self.tokens:
            await self.app(scope, receive, send)
            return
        if scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        service = identify(self.tokens, _presented(scope))
        method = scope.get("method", "GET")
        if service is None:
            await _refuse(scope, receive, send, Unauthorized("a valid service token is required"))
            return
        if not service.may(required_scope(method)):
            needed = required_scope(method)
            message = f"service {service.name!r} lacks the {needed!r} scope"
            await _refuse(scope, receive, send, Forbidden(message))
            return
        scope.setdefault("state", {})["service"] = service
        reset = current_service.set(service)
        try:
            await self.app(scope, receive, send)
        finally:
            current_service.reset(reset)


def _presented(scope: Scope) -> str | None:
    name: bytes
    value: bytes
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            if kind.lower() == "bearer":
                return token.strip()
    if scope["type"] == "websocket":
        query: dict[str, list[str]] = parse_qs(scope.get("query_string", b"").decode())
        tokens = query.get("token")
        return tokens[0] if tokens else None
    return None


async def _refuse(scope: Scope, receive: Receive, send: Send, error: EaselError) -> None:
    if scope["type"] == "websocket":
        await refuse_websocket(scope, receive, send, error)
        return
    status = error.status
    body = json.dumps({"error": error.to_dict()}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with easel's 413, before they are read whole.

    ``Content-Length`` is checked up front; a chunked body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than {self.max_bytes} bytes"
        await _refuse(scope, receive, send, RequestTooLarge(message))


class _TooLarge(Exception):
    pass
