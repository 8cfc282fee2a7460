"""The blocking face of an async client, shared by every sync client easel ships.

One private event loop thread (an anyio blocking portal) runs each call of the async
client, so a sync client is the async one, not a copy: reconnects, handlers and errors
behave the same. Handlers run on the portal's thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from anyio.from_thread import start_blocking_portal


class _Closable(Protocol):
    def aclose(self) -> Awaitable[None]: ...


A = TypeVar("A", bound=_Closable)


class Blocking(Generic[A]):
    """Owns the portal thread and the async client built on it (``factory`` runs there)."""

    def __init__(self, factory: Callable[[], A]) -> None:
        self._stack = ExitStack()
        self._portal = self._stack.enter_context(start_blocking_portal())
        try:
            self._async: A = self._portal.call(factory)
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._portal.call(self._async.aclose)
        finally:
            # cancel what an interrupted call left running (a listen() stopped by Ctrl-C)
            self._portal.call(self._portal.stop, True)
            self._stack.close()
