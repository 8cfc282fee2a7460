"""Service tokens: who is calling, and what it may do. A pure ASGI middleware.

When any token is configured, every route but ``/health`` needs one, as
``Authorization: Bearer <token>`` (or ``?token=`` on a websocket, which browsers cannot
give headers). Tokens are compared in constant time against every configured token and
are never logged. The caller's service lands in ``scope["state"]["service"]``; routes use
it to show a service only its own jobs (``admin`` sees all).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health"})


class Permission(StrEnum):
    submit = "submit"
    read = "read"
    admin = "admin"


@dataclass(frozen=True)
class Service:
    name: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope in self.scopes or Permission.admin in self.scopes

    @property
    def is_admin(self) -> bool:
        return Permission.admin in self.scopes


@dataclass(frozen=True)
class ServiceToken:
    service: Service
    token: bytes


def identify(tokens: Sequence[ServiceToken], presented: str | None) -> Service | None:
    """The service whose token was presented; every token is compared, in constant time."""
    if not presented:
        return None
    given = presented.encode()
    found = None
    for candidate in tokens:
        if hmac.compare_digest(candidate.token, given):
            found = candidate.service
    return found


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
        if scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        service = identify(self.tokens, _presented(scope))
        method = scope.get("method", "GET")
        if service is None:
            await _refuse(scope, send, 401, "unauthorized", "a valid service token is required")
            return
        if not service.may(required_scope(method)):
            await _refuse(
                scope, send, 403, "forbidden",
                f"service {service.name!r} lacks the {required_scope(method)!r} scope",
            )  # fmt: skip
            return
        scope.setdefault("state", {})["service"] = service
        await self.app(scope, receive, send)


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


async def _refuse(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message})
        return
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
