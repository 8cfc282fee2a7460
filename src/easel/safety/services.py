"""Who is calling: services, their tokens and scopes, and the service of this request.

The service of the request being handled lives in a context variable, set by the token
middleware (``easel.api.auth``) and read wherever a decision depends on it (admission,
who may see a job), so no signature in between has to carry it.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum


class Permission(StrEnum):
    submit = "submit"
    read = "read"
    admin = "admin"


@dataclass(frozen=True)
class Service:
    name: str
    scopes: frozenset[str]

    def may(self, permission: str) -> bool:
        return permission in self.scopes or Permission.admin in self.scopes

    @property
    def is_admin(self) -> bool:
        return Permission.admin in self.scopes


@dataclass(frozen=True)
class ServiceToken:
    service: Service
    token: bytes


current_service: ContextVar[Service | None] = ContextVar("easel_service", default=None)
"""The calling service; None when no tokens are configured (everyone sees everything)."""


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


def may_see(owner: str | None) -> bool:
    """Whether the calling service may see a job owned by ``owner``."""
    service = current_service.get()
    return service is None or service.is_admin or service.name == owner
