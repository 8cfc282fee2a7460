"""What every remote engine backend shares: one HTTP client, error mapping, cancellation.

A remote backend (Automatic1111, ComfyUI, an OpenAI-compatible API, a hosted queue...)
spends no local compute: it translates easel's request, calls the engine, relays progress
and previews, and maps the engine's failures into easel's vocabulary (the httpx
``map_httpcore_exceptions`` idea, at this boundary):

- connection errors, timeouts, 5xx and 429 -> :class:`~easel.errors.BackendUnavailable`
  (transient: the queue retries the job with backoff; the fleet's breaker counts them);
- any other 4xx -> :class:`~easel.errors.EngineError` (or ``EngineRefused`` for a refusal
  such as a safety system's), with the engine's own text in the message.

Credentials come from environment variables named in the options (``api_key_env``,
``password_env``), never from the fleet file itself, and never reach a log or a message:
messages name the backend and the path called, not the URL's user info or headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from PIL import Image

from easel.backends.base import Backend, ModelInfo, RunContext
from easel.errors import (
    BackendUnavailable,
    Cancelled,
    EngineError,
    EngineRefused,
    GenerationError,
    InvalidRequest,
)
from easel.images import decode_base64_image, decode_image_bytes

T = TypeVar("T")

MAX_RESULT_BYTES = 64 * 1024 * 1024
"""The largest encoded image an engine may return."""

MAX_ENGINE_TEXT = 500
"""Characters of an engine's error text kept in a job's error message."""


def secret_from_env(variable: str | None, what: str) -> str | None:
    """The value of the env var named ``variable``; a named but unset one is a config error."""
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise InvalidRequest(
            f"{what}: environment variable {variable} is not set; set it to the key"
        )
    return value


def public_url(url: str) -> str:
    """``url`` without user info (``http://user:pass@host`` -> ``http://host``), for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def engine_text(response: httpx.Response) -> str:
    """The engine's own words: ``error.message``, ``detail``, ``error``... or the body."""
    try:
        body: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = response.text
    text = _message_in(body)
    return " ".join(text.split())[:MAX_ENGINE_TEXT] or response.reason_phrase


def _message_in(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "detail", "message", "errors", "exception_message"):
            if body.get(key):
                return _message_in(body[key])
        return json.dumps(body)
    if isinstance(body, list) and body:
        return "; ".join(_message_in(item) for item in body[:5])
    return str(body)


class RemoteBackend(Backend):
    """A backend whose engine is reached over HTTP. Subclasses implement ``generate``.

    Options every remote kind takes (the fleet file's ``options``):

    - ``url``: the engine's base URL; ``name``: this backend's name in the fleet;
    - ``timeout``: seconds one job may take at the engine (then ``backend_unavailable``);
      ``connect_timeout``: seconds to reach it;
    - ``concurrency``: calls in flight to this engine from this process, at most;
    - ``api_key_env`` / ``username`` + ``password_env``: credentials, from env vars;
    - ``headers``: extra headers (no secrets: use the env options);
    - ``models``: model names to offer when the engine cannot list its own;
    - ``poll_seconds``: how often progress is asked for and cancellation checked.
    """

    kind = "remote"

    def __init__(
        self,
        *,
        url: str,
        name: str | None = None,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        concurrency: int = 4,
        api_key_env: str | None = None,
        username: str | None = None,
        password_env: str | None = None,
        headers: dict[str, str] | None = None,
        models: Iterable[str] = (),
        poll_seconds: float = 0.25,
        verify: bool = True,
        device: str | None = None,  # given to every kind by the runtime; unused here
    ) -> None:
        if concurrency < 1:
            raise InvalidRequest(f"{self.kind}: concurrency must be at least 1")
        self.name = name or self.kind
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.poll_seconds = poll_seconds
        self.verify = verify
        self.extra_headers = dict(headers or {})
        self.api_key = secret_from_env(api_key_env, f"backend {self.name!r}")
        self.auth: httpx.BasicAuth | None = None
        if username is not None:
            password = secret_from_env(password_env, f"backend {self.name!r}") or ""
            self.auth = httpx.BasicAuth(username, password)
        self.configured_models = list(models)
        self.loaded_model: str | None = None
        self.engine_models: list[str] = []
        self._slots = asyncio.Semaphore(concurrency)
        self._http: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never the credentials
        return f"<{type(self).__name__} {self.name!r} {public_url(self.url)}>"

    # -- lifecycle ------------------------------------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        """Headers carrying the API key; kinds whose engine wants another scheme override."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=self.url,
                timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                auth=self.auth,
                headers={**self.extra_headers, **self.auth_headers()},
                verify=self.verify,
                follow_redirects=False,
            )
        return self._http

    async def start(self) -> None:
        """Ask the engine what it serves; an engine that is down now may be up later."""
        with contextlib.suppress(GenerationError):
            await self.refresh()

    async def refresh(self) -> None:
        """Update ``engine_models`` and ``loaded_model`` from the engine (kinds override)."""

    async def health(self) -> None:
        """Ask the engine (what ``refresh`` asks); ``BackendUnavailable`` when it is down or
        failing, for the fleet's health checks and circuit breaker."""
        await self.refresh()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def models(self) -> list[ModelInfo]:
        names = list(dict.fromkeys([*self.configured_models, *self.engine_models]))
        return [
            ModelInfo(name=n, backend=self.name, family="remote", loaded=n == self.loaded_model)
            for n in names
        ]

    # -- calls ----------------------------------------------------------------------------

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP call to the engine; failures mapped (see the module doc). An absolute
        URL must be on the engine's host: its credentials go nowhere else."""
        if not self.same_host(path):
            raise EngineError(
                f"backend {self.name!r}: the engine pointed at another host "
                f"({urlsplit(path).hostname}); easel sends its credentials nowhere else"
            )
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise BackendUnavailable(
                f"backend {self.name!r}: {method} {path} timed out ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"backend {self.name!r} is unreachable at {public_url(self.url)} "
                f"({type(exc).__name__})"
            ) from exc
        if response.is_success:
            return response
        raise self.error_for(response, f"{method} {path}")

    def error_for(self, response: httpx.Response, what: str) -> GenerationError:
        status, text = response.status_code, engine_text(response)
        message = f"backend {self.name!r}: {what} answered {status}: {text}"
        if status == 429 or status >= 500:
            return BackendUnavailable(message)
        if self.is_refusal(response, text):
            return EngineRefused(message)
        return EngineError(message)

    def is_refusal(self, response: httpx.Response, text: str) -> bool:
        """Whether a 4xx is the engine refusing the request itself (safety, validation)."""
        return response.status_code in (400, 422)

    def same_host(self, url: str) -> bool:
        """Whether ``url`` (absolute or relative) is on the engine's own host and port."""
        parts, own = urlsplit(url), urlsplit(self.url)
        return not parts.netloc or (parts.scheme, parts.netloc) == (own.scheme, own.netloc)

    async def download(self, url: str, *, allowed_hosts: Iterable[str] = ()) -> bytes:
        """Bytes of a result URL: ``data:`` URLs, the engine's own host (with its
        credentials), or a host of ``allowed_hosts`` (without them); any other is refused."""
        if url.startswith("data:"):
            try:
                return base64.b64decode(url.partition(",")[2], validate=False)
            except ValueError as exc:
                raise EngineError(f"backend {self.name!r}: unreadable data URL") from exc
        if self.same_host(url):
            return (await self.call("GET", url)).content
        host = urlsplit(url).hostname or ""
        if host not in set(allowed_hosts):
            raise EngineError(
                f"backend {self.name!r}: the engine returned a result on {host!r}, which is not "
                "an allowed host; add it to the backend's allowed_hosts"
            )
        try:
            async with httpx.AsyncClient(timeout=self.http.timeout, verify=self.verify) as plain:
                response = await plain.get(url)
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"backend {self.name!r}: could not download a result from {host} "
                f"({type(exc).__name__})"
            ) from exc
        if not response.is_success:
            raise self.error_for(response, f"GET result on {host}")
        return response.content

    def decode(self, data: bytes | str) -> Image.Image:
        """An image the engine returned (bytes, base64 or a data: URL), decoded within the
        bounds uploads get; junk is the engine's failure, not the caller's. Blocking."""
        try:
            if isinstance(data, bytes):
                return decode_image_bytes(data)
            return decode_base64_image(data, max_bytes=MAX_RESULT_BYTES)
        except InvalidRequest as exc:
            raise EngineError(f"backend {self.name!r}: unreadable image ({exc})") from exc

    async def fetch_image(self, url: str, *, allowed_hosts: Iterable[str] = ()) -> Image.Image:
        """:meth:`download` then :meth:`decode`, off the event loop."""
        raw = await self.download(url, allowed_hosts=allowed_hosts)
        return await asyncio.to_thread(self.decode, raw)

    # -- running one job ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of ``concurrency`` places at the engine, for a whole job."""
        async with self._slots:
            yield

    async def follow(
        self,
        work: Awaitable[T],
        context: RunContext,
        *,
        interrupt: Callable[[], Awaitable[object]] | None = None,
        poll: Callable[[], Awaitable[object]] | None = None,
    ) -> T:
        """Await ``work`` within ``timeout``, calling ``poll`` every ``poll_seconds`` (progress),
        and on cancellation call ``interrupt`` (the engine stops) and raise ``Cancelled``."""
        task = asyncio.ensure_future(work)
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    done, _ = await asyncio.wait({task}, timeout=self.poll_seconds)
                    if done:
                        return task.result()
                    if context.cancelled:
                        if interrupt is not None:
                            with contextlib.suppress(GenerationError):
                                await interrupt()
                        raise Cancelled("the job was cancelled")
                    if poll is not None:
                        with contextlib.suppress(GenerationError):
                            await poll()
        except TimeoutError:
            if interrupt is not None:
                with contextlib.suppress(GenerationError):
                    await interrupt()
            raise BackendUnavailable(
                f"backend {self.name!r} did not finish within {self.timeout:g}s"
            ) from None
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def poll_delays(first: float = 0.25, most: float = 5.0) -> Iterable[float]:
    """Jittered, growing delays for polling a hosted queue (start quick, then back off)."""
    delay = first
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * 1.5, most)
