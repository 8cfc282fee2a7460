"""The sync client: the async one, run on a private event loop thread.

Each method hands its coroutine to an anyio blocking portal and waits for it, so there is
one implementation of every behaviour (reconnects, handlers, errors). Handlers run on the
portal's thread.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncGenerator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, overload

from easel.client._async import AsyncClient
from easel.client._common import Handler, HandlerName
from easel.client._portal import Blocking
from easel.jobs import Event, GenerationRequest, Job, JobState, JobView
from easel.views import Backends, Health, Line, Models, QueueState

H = TypeVar("H", bound=Handler)


class Client(Blocking[AsyncClient]):
    """The blocking API of :class:`~easel.client.AsyncClient`: same methods, same results."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        user_id: str | None = None,
        timeout: float = 30.0,
        token: str | None = None,
        max_reconnects: int | None = 10,
        retries: int = 3,
    ) -> None:
        super().__init__(
            partial(
                AsyncClient,
                base_url,
                user_id=user_id,
                timeout=timeout,
                token=token,
                max_reconnects=max_reconnects,
                retries=retries,
            )
        )

    @property
    def base_url(self) -> str:
        return self._async.base_url

    @property
    def user_id(self) -> str | None:
        return self._async.user_id

    @overload
    def on(self, name: HandlerName) -> Callable[[H], H]: ...

    @overload
    def on(self, name: HandlerName, handler: H) -> H: ...

    def on(self, name: HandlerName, handler: H | None = None) -> H | Callable[[H], H]:
        """See :meth:`AsyncClient.on`; handlers run on the client's event loop thread."""
        if handler is None:
            return self._async.on(name)
        return self._async.on(name, handler)

    def submit(
        self,
        prompt: str | None = None,
        *,
        request: GenerationRequest | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> JobView:
        call = partial(
            self._async.submit, prompt, request=request, idempotency_key=idempotency_key, **params
        )
        return self._portal.call(call)

    def get(self, job_id: str) -> JobView:
        return self._portal.call(self._async.get, job_id)

    def list(
        self, user_id: str | None = None, state: JobState | str | None = None, limit: int = 100
    ) -> builtins.list[Job]:
        return self._portal.call(self._async.list, user_id, state, limit)

    def cancel(self, job_id: str) -> Job:
        return self._portal.call(self._async.cancel, job_id)

    def models(self) -> Models:
        return self._portal.call(self._async.models)

    def backends(self) -> Backends:
        return self._portal.call(self._async.backends)

    def queue(self) -> QueueState:
        return self._portal.call(self._async.queue)

    def line(self, user_id: str | None = None, limit: int = 500) -> Line:
        return self._portal.call(self._async.line, user_id, limit)

    def health(self) -> Health:
        return self._portal.call(self._async.health)

    def image(self, job_or_id: Job | str, index: int = 0) -> bytes:
        return self._portal.call(self._async.image, job_or_id, index)

    def save_images(
        self, job: Job, directory: Path | str, prefix: str | None = None
    ) -> builtins.list[Path]:
        return self._portal.call(self._async.save_images, job, directory, prefix)

    def write_images(self, job: Job, paths: builtins.list[Path]) -> builtins.list[Path]:
        return self._portal.call(self._async.write_images, job, paths)

    def generate(
        self,
        prompt: str | None = None,
        *,
        request: GenerationRequest | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Job:
        call = partial(self._async.generate, prompt, request=request, timeout=timeout, **params)
        return self._portal.call(call)

    def generate_audio(self, prompt: str, *, timeout: float | None = None, **params: Any) -> Job:
        call = partial(self._async.generate_audio, prompt, timeout=timeout, **params)
        return self._portal.call(call)

    def generate_speech(self, text: str, *, timeout: float | None = None, **params: Any) -> Job:
        call = partial(self._async.generate_speech, text, timeout=timeout, **params)
        return self._portal.call(call)

    def audio(self, job_or_id: Job | str, index: int = 0) -> bytes:
        return self._portal.call(self._async.audio, job_or_id, index)

    def save_audio(
        self, job: Job, directory: Path | str, prefix: str | None = None
    ) -> builtins.list[Path]:
        return self._portal.call(self._async.save_audio, job, directory, prefix)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        return self._portal.call(self._async.wait, job_id, timeout)

    def listen(self, user_id: str | None = None, after: int | None = None) -> None:
        self._portal.call(self._async.listen, user_id, after)

    def events(
        self,
        job_id: str | None = None,
        user_id: str | None = None,
        after: int | None = None,
        *,
        include_images: bool = False,
    ) -> Iterator[Event]:
        stream = self._async.events(job_id, user_id, after, include_images=include_images)
        try:
            while (event := self._portal.call(_next, stream)) is not None:
                yield event
        finally:
            self._portal.call(stream.aclose)


async def _next(stream: AsyncGenerator[Event, None]) -> Event | None:
    """``anext`` with a sentinel: StopAsyncIteration must not cross the portal."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None
