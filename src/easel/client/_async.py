"""The async client: easel's HTTP API and event websocket, with typed results and handlers."""

from __future__ import annotations

import asyncio
import base64
import builtins
import inspect
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar, overload
from urllib.parse import quote, urlencode

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from easel.client import _files
from easel.client._common import (
    HANDLER_FOR_EVENT,
    HANDLER_NAMES,
    AsyncResource,
    Handler,
    HandlerName,
    backoff,
    error_from_body,
    error_from_response,
    unreachable,
)
from easel.constants import VERSION
from easel.errors import InvalidRequest
from easel.jobs import (
    FINAL_EVENTS,
    Event,
    GenerationRequest,
    Job,
    JobState,
    JobView,
    final_event,
)
from easel.views import Backends, Health, Line, Models, QueueState

H = TypeVar("H", bound=Handler)

REPLAY_GRACE = 0.5
"""Seconds to wait for a finished job's replayed events before rebuilding its final one."""

STEADY_SECONDS = 10.0
"""A connection that stayed up this long counts as healthy: the reconnect budget refills."""

RETRY_STATUSES = frozenset({502, 503, 504})
"""Answers that say "not now" (a proxy without its upstream, a store briefly unavailable)."""


class AsyncClient(AsyncResource):
    """easel over HTTP and websockets. Async first: :class:`~easel.client.Client` wraps this.

    Errors the server answers become the matching :class:`~easel.errors.EaselError` subclass;
    a server that cannot be reached becomes an ``EaselError`` with code ``server_unreachable``.

    ``timeout`` bounds each HTTP call (and the websocket's opening). A call that could not
    reach the server, or got 502/503/504, is tried again up to ``retries`` times with
    jittered exponential backoff: always for reads and cancels, and for submissions too,
    because each carries an ``Idempotency-Key`` (a retried submission returns the same job).
    """

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
        self.base_url = base_url.rstrip("/")
        self.user_id = user_id
        self.timeout = timeout
        self.max_reconnects = max_reconnects
        self.retries = retries
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            headers={"User-Agent": f"easel-client/{VERSION}", **self._auth},
        )
        self._ws_url = "ws" + self.base_url.removeprefix("http")
        self._handlers: dict[HandlerName, list[Handler]] = {name: [] for name in HANDLER_NAMES}

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- handlers -------------------------------------------------------------------------

    @overload
    def on(self, name: HandlerName) -> Callable[[H], H]: ...

    @overload
    def on(self, name: HandlerName, handler: H) -> H: ...

    def on(self, name: HandlerName, handler: H | None = None) -> H | Callable[[H], H]:
        """Register a handler, sync or async; usable as ``@client.on("done")``.

        ``queued``, ``generating``, ``progress``, ``done``, ``error`` and ``cancelled`` get
        the :class:`~easel.jobs.Event`; ``connection_error`` gets the exception that dropped
        the event stream, before it reconnects. They fire in :meth:`wait` (so in
        :meth:`generate`) and :meth:`listen`, in event order.
        """
        if name not in self._handlers:
            raise ValueError(
                f"unknown handler {name!r}; valid names are: {', '.join(HANDLER_NAMES)}"
            )

        def register(function: H) -> H:
            self._handlers[name].append(function)
            return function

        return register(handler) if handler is not None else register

    async def _dispatch(self, name: HandlerName, argument: object) -> None:
        for handler in self._handlers[name]:
            result = handler(argument)
            if inspect.isawaitable(result):
                await result

    async def _dispatch_event(self, event: Event) -> None:
        await self._dispatch(HANDLER_FOR_EVENT[event.type], event)

    # -- jobs -----------------------------------------------------------------------------

    async def submit(
        self,
        prompt: str | None = None,
        *,
        request: GenerationRequest | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> JobView:
        """Queue a job; returns once the server holds it durably (with ``position``, ``eta``).

        ``params`` are :class:`~easel.jobs.GenerationRequest` fields and override ``request``;
        the server validates them. ``init_image`` may be bytes or a path as well as base64.
        ``idempotency_key`` (default: a new one per call, so retries are safe): submitting
        again with the same key returns the same job instead of a second one.
        """
        body = request.model_dump(mode="json", exclude_unset=True) if request else {}
        body.update(params)
        if prompt is not None:
            body["prompt"] = prompt
        if "prompt" not in body and "payload" not in body:  # a payload carries its own
            raise InvalidRequest("a prompt is needed: submit('a red fox') or submit(request=...)")
        if self.user_id is not None:
            body.setdefault("user_id", self.user_id)
        if isinstance(init := body.get("init_image"), bytes | Path):
            raw = init if isinstance(init, bytes) else await asyncio.to_thread(init.read_bytes)
            body["init_image"] = base64.b64encode(raw).decode()
        key = idempotency_key or uuid.uuid4().hex
        response = await self._request(
            "POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}
        )
        return JobView.model_validate_json(response.content)

    async def get(self, job_id: str) -> JobView:
        response = await self._request("GET", f"/v1/jobs/{quote(job_id, safe='')}")
        return JobView.model_validate_json(response.content)

    async def list(
        self, user_id: str | None = None, state: JobState | str | None = None, limit: int = 100
    ) -> builtins.list[Job]:
        """Newest first."""
        query = {"user_id": user_id, "state": state, "limit": limit}
        params = {key: str(value) for key, value in query.items() if value is not None}
        response = await self._request("GET", "/v1/jobs", params=params)
        return [Job.model_validate(job) for job in response.json()["jobs"]]

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, a running one at its next step (409 once it ended)."""
        response = await self._request("DELETE", f"/v1/jobs/{quote(job_id, safe='')}")
        return Job.model_validate_json(response.content)

    async def models(self) -> Models:
        response = await self._request("GET", "/v1/models")
        return Models.model_validate_json(response.content)

    async def backends(self) -> Backends:
        """The fleet: each backend's kind, state, slots in use, loaded models, speed."""
        response = await self._request("GET", "/v1/backends")
        return Backends.model_validate_json(response.content)

    async def queue(self) -> QueueState:
        """Queued and running jobs per tier and per user (the caller's users), run times."""
        response = await self._request("GET", "/v1/queue")
        return QueueState.model_validate_json(response.content)

    async def line(self, user_id: str | None = None, limit: int = 500) -> Line:
        """Running jobs, then queued ones in serving order; prompts only of ``user_id``'s."""
        params = {"limit": str(limit)} | ({"user_id": user_id} if user_id else {})
        response = await self._request("GET", "/v1/queue/jobs", params=params)
        return Line.model_validate_json(response.content)

    async def health(self) -> Health:
        response = await self._request("GET", "/health")
        return Health.model_validate_json(response.content)

    async def image(self, job_or_id: Job | str, index: int = 0) -> bytes:
        """The PNG bytes, with the ``parameters`` text chunk that reproduces the image."""
        job_id = job_or_id if isinstance(job_or_id, str) else job_or_id.id
        response = await self._request("GET", f"/v1/jobs/{quote(job_id, safe='')}/images/{index}")
        return response.content

    async def save_images(
        self, job: Job, directory: Path | str, prefix: str | None = None
    ) -> builtins.list[Path]:
        """Write ``<prefix or job id>-<index>.png`` and a ``.json`` sidecar beside each one.

        The sidecar holds the job id, index, seed and the request with that seed and batch
        size 1: enough to reproduce that one image. Returns the PNG paths.
        """
        targets = _files.image_targets(await _directory(directory), job, prefix)
        return await self.write_images(job, targets)

    async def write_images(self, job: Job, paths: builtins.list[Path]) -> builtins.list[Path]:
        """Write image ``i`` of a finished job (and its sidecar) to ``paths[i]``."""
        _saveable(job, "images")
        for ref, path in zip(job.images, paths, strict=True):
            png = await self.image(job, ref.index)
            metadata = await asyncio.to_thread(_files.client_sidecar, job, ref, png)
            await asyncio.to_thread(_files.write_image, path, png, metadata)
        return paths

    async def generate(
        self,
        prompt: str | None = None,
        *,
        request: GenerationRequest | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Job:
        """Submit and :meth:`wait`: the final job, whether it succeeded or not."""
        view = await self.submit(prompt, request=request, **params)
        return await self.wait(view.id, timeout)

    async def generate_audio(
        self, prompt: str, *, timeout: float | None = None, **params: Any
    ) -> Job:
        """Sound from a prompt (``txt2audio``): submit and :meth:`wait`. ``params`` are request
        fields: ``duration_seconds``, ``steps``, ``cfg_scale``, ``seed``, ``sample_rate``,
        ``channels``, ``audio_format``, ``negative_prompt``..."""
        return await self.generate(prompt, timeout=timeout, kind="txt2audio", **params)

    async def generate_speech(
        self, text: str, *, timeout: float | None = None, **params: Any
    ) -> Job:
        """Speech (``txt2speech``): ``text`` spoken with ``voice`` at ``speed``; submit and
        :meth:`wait`."""
        return await self.generate(text, timeout=timeout, kind="txt2speech", **params)

    async def audio(self, job_or_id: Job | str, index: int = 0) -> bytes:
        """Clip ``index`` as stored (WAV unless the request asked for another format), its
        request in its tags."""
        job_id = job_or_id if isinstance(job_or_id, str) else job_or_id.id
        response = await self._request("GET", f"/v1/jobs/{quote(job_id, safe='')}/audio/{index}")
        return response.content

    async def save_audio(
        self, job: Job, directory: Path | str, prefix: str | None = None
    ) -> builtins.list[Path]:
        """Write ``<prefix or job id>-<index>.<wav|flac|ogg|opus|mp3>`` and a ``.json``
        sidecar (the request with that clip's seed) beside each; returns the audio paths."""
        targets = _files.audio_targets(await _directory(directory), job, prefix)
        return await self.write_audio(job, targets)

    async def write_audio(self, job: Job, paths: builtins.list[Path]) -> builtins.list[Path]:
        """Write clip ``i`` of a finished job (and its sidecar) to ``paths[i]``."""
        _saveable(job, "audio")
        for ref, path in zip(job.audio, paths, strict=True):
            data = await self.audio(job, ref.index)
            await asyncio.to_thread(_files.write_image, path, data, _files.audio_sidecar(job, ref))
        return paths

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Follow the job's events (dispatching handlers) until it ends; its final record.

        Failed and cancelled jobs are returned too: check ``job.state``. A job that ended so
        long ago that the server forgot its events still gets its final handler, once.
        """
        async with asyncio.timeout(timeout):
            stream = self._stream(job_id=job_id)
            try:
                await self._follow(job_id, stream)
            finally:
                await stream.aclose()
            return await self.get(job_id)

    async def _follow(self, job_id: str, stream: AsyncIterator[Event | None]) -> None:
        ended: Job | None = None
        while True:
            try:
                async with asyncio.timeout(REPLAY_GRACE if ended else None):
                    item = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if ended is None:
                    raise
                await self._dispatch_event(final_event(ended))
                return
            if item is None:  # (re)connected: the job may have ended while we were away
                job = await self.get(job_id)
                ended = job if job.state.is_final else None
            else:
                await self._dispatch_event(item)

    # -- events ---------------------------------------------------------------------------

    async def events(
        self,
        job_id: str | None = None,
        user_id: str | None = None,
        after: int | None = None,
        *,
        include_images: bool = False,
    ) -> AsyncGenerator[Event, None]:
        """Events as they happen: all, one user's, or one job's (replayed from its start and
        ending with its final event). Handlers are not called; see :meth:`listen`.
        ``include_images``: ``succeeded`` events carry the results, base64, in ``content``
        (when small enough; else only their URLs) for every job, not only those that asked.

        A dropped connection is resumed after the last id seen, with backoff, so no event is
        lost or repeated; ``max_reconnects`` failures in a row raise ``server_unreachable``.
        A stream of all events that drops before its first event resumes live.
        """
        stream = self._stream(
            job_id=job_id, user_id=user_id, after=after, include_images=include_images
        )
        async for item in stream:
            if item is not None:
                yield item

    async def listen(self, user_id: str | None = None, after: int | None = None) -> None:
        """Follow every event (or one user's) and dispatch handlers until cancelled: for bots.

        A bot that keeps the last event id it handled passes it as ``after`` when it restarts
        and gets what it missed while down (what the server still remembers).
        """
        async for event in self.events(user_id=user_id, after=after):
            await self._dispatch_event(event)

    async def _stream(
        self,
        *,
        job_id: str | None = None,
        user_id: str | None = None,
        after: int | None = None,
        include_images: bool = False,
    ) -> AsyncGenerator[Event | None, None]:
        """Events, and ``None`` each time the websocket (re)connects."""
        last, failures = after, 0
        while True:
            query = {
                "job_id": job_id,
                "user_id": user_id,
                "after": last,
                "include_images": "true" if include_images else None,
            }
            url = f"{self._ws_url}/v1/events?" + urlencode(
                {key: value for key, value in query.items() if value is not None}
            )
            opened = time.monotonic()
            try:
                async with connect(
                    url, additional_headers=self._auth, open_timeout=self.timeout
                ) as websocket:
                    yield None
                    while True:
                        event = Event.model_validate_json(await websocket.recv())
                        if last is not None and event.id <= last:
                            continue
                        last, failures = event.id, 0
                        yield event
                        if job_id is not None and event.type in FINAL_EVENTS:
                            return
            except InvalidStatus as exc:
                status = exc.response.status_code
                if 400 <= status < 500:
                    body = bytes(exc.response.body or b"")
                    refused = f"{url} refused the websocket ({status})"
                    raise error_from_body(status, body, refused) from exc
                reason: Exception = exc
            except (OSError, ConnectionClosed, InvalidHandshake) as exc:
                # OSError includes refused connections and the open timeout
                reason = exc
            if time.monotonic() - opened > STEADY_SECONDS:
                failures = 0
            await self._dispatch("connection_error", reason)
            if self.max_reconnects is not None and failures >= self.max_reconnects:
                raise unreachable(self.base_url, reason) from reason
            await asyncio.sleep(backoff(failures))
            failures += 1

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, retried with backoff while the server cannot take it (see the class)."""
        headers = kwargs.get("headers") or {}
        safe = method in {"GET", "HEAD", "DELETE"} or "Idempotency-Key" in headers
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                # a connection never made sent nothing: retrying is safe for any call
                retry = safe or isinstance(exc, httpx.ConnectError)
                if not retry or attempt >= self.retries:
                    raise unreachable(self.base_url, exc) from exc
            else:
                if response.status_code not in RETRY_STATUSES or not safe:
                    break
                if attempt >= self.retries:
                    break
            await asyncio.sleep(backoff(attempt))
            attempt += 1
        if response.is_error:
            raise error_from_response(response)
        return response


def _saveable(job: Job, what: str) -> None:
    if job.state is not JobState.succeeded:
        raise InvalidRequest(f"job {job.id} is {job.state}, so it has no {what} to save")


async def _directory(directory: Path | str) -> Path:
    path = Path(directory)
    await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
    return path
