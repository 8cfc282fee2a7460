"""A request-balancer style client: what Telegram/Discord bots written for it already call.

    client = GeneratorClient(endpoint="http://127.0.0.1:8000", service="discord", token=TOKEN)
    client.register_req_done_handler(done)          # async def done(response): ...
    client.register_req_error_handler(failed)
    client.register_req_queued_handler(queued)
    client.register_req_generating_handler(generating)
    client.register_con_error_handler(lost)         # async def lost(exception): ...
    client.run(asyncio.get_running_loop())
    await client.text2img(executor=Executor.AUTOMATIC1111, payload={...}, user_id=1,
                          chat_id=1, message_id=1, premium=1, moderate=1, max_user_queue_size=2)

Built on :class:`~easel.client.AsyncClient`: a submission is a native job carrying the
engine ``payload`` (``executor``) and ``include_images``, so the done event brings the
picture itself (``response.result.content``: the image bytes; fetched when the server left
them out for size). Handlers get a :class:`GenerationResponse` with the old attribute paths
(``object_id``, ``result.content``, ``service_info.user_id``/``chat_id``/``message_id``,
``avg_time``). A submission the server refuses at once (moderation, a bad payload) goes to
the error handlers; a full queue raises :class:`QueueIsFullError`, as before.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from easel.client._async import AsyncClient
from easel.errors import EaselError, QueueFull
from easel.jobs import Event, EventType, Job
from easel.payloads import Executor as _Executor

QueueIsFullError = QueueFull
"""The name request-balancer clients catch for a full (user) queue."""

CLIENT_KEY = "balancer"
"""The request metadata key under which the client keeps what its handlers report."""


class Executor(Enum):
    """The engine a payload is written for."""

    AUTOMATIC1111 = _Executor.automatic1111.value
    KANDINSKY = _Executor.kandinsky.value
    COMFYUI = _Executor.comfyui.value


class GenStatus(Enum):
    QUEUED = "queued"
    GENERATING = "generating"
    DONE = "done"
    ERROR = "error"


class GenType(Enum):
    TEXT2IMG = "text2img"
    IMG2IMG = "img2img"
    MIX2IMG = "mix2img"


@dataclass
class ServiceInfo:
    user_id: Any = None
    chat_id: Any = None
    message_id: Any = None


@dataclass
class GenerationSettings:
    premium: bool = False
    moderate: bool = False
    sync_with_s3: bool = False
    max_user_queue_size: int | None = None


@dataclass
class GenerationResult:
    """``content``: the first image's bytes when done, the error text on error."""

    content: bytes | str | None = None
    contents: list[bytes] = field(default_factory=list)
    file_name: str | None = None
    urls: list[str] = field(default_factory=list)


@dataclass
class GenerationResponse:
    object_id: str | None
    gen_status: GenStatus
    gen_type: GenType
    executor: Executor | None
    service_info: ServiceInfo
    settings: GenerationSettings
    result: GenerationResult = field(default_factory=GenerationResult)
    avg_time: float | None = None
    position: int | None = None


Handler = Callable[[Any], Awaitable[object] | object]


class GeneratorClient:
    """See the module doc. ``endpoint``: the server's URL (a ``ws://host:port/ws`` endpoint of
    the old balancer is read as ``http://host:port``); ``service``: this client's name (the
    token decides the service the server sees)."""

    def __init__(
        self,
        endpoint: str,
        service: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        self.service = service
        self.id = uuid.uuid4().hex
        self.client = AsyncClient(_http_url(endpoint), token=token, timeout=timeout)
        self._handlers: dict[str, list[Handler]] = {
            name: [] for name in ("done", "error", "queued", "generating", "con_error")
        }
        self._mine: dict[str, dict[str, Any] | None] = {}
        self._listener: asyncio.Task[None] | None = None
        self.client.on("connection_error", self._connection_error)

    # -- handlers -------------------------------------------------------------------------

    def register_req_done_handler(self, handler: Handler) -> None:
        self._handlers["done"].append(handler)

    def register_req_error_handler(self, handler: Handler) -> None:
        self._handlers["error"].append(handler)

    def register_req_queued_handler(self, handler: Handler) -> None:
        self._handlers["queued"].append(handler)

    def register_req_generating_handler(self, handler: Handler) -> None:
        self._handlers["generating"].append(handler)

    def register_con_error_handler(self, handler: Handler) -> None:
        """``handler(exception)``: the event stream dropped (it reconnects by itself)."""
        self._handlers["con_error"].append(handler)

    async def _call(self, name: str, argument: object) -> None:
        for handler in self._handlers[name]:
            result = handler(argument)
            if inspect.isawaitable(result):
                await result

    async def _connection_error(self, exception: Exception) -> None:
        await self._call("con_error", exception)

    # -- running --------------------------------------------------------------------------

    def run(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None]:
        """Start following the server's events in ``loop`` (returns the task)."""
        self._listener = loop.create_task(self._listen(), name=f"easel-balancer-{self.service}")
        return self._listener

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        await self.client.aclose()

    async def _listen(self) -> None:
        async for event in self.client.events():
            if event.type in (EventType.progress, EventType.uploaded, EventType.upload_failed):
                continue
            if (info := await self._info(event.job_id)) is None:
                continue
            await self._dispatch(event, info)

    async def _info(self, job_id: str) -> dict[str, Any] | None:
        """What this client recorded on its job; None for other clients' jobs."""
        if job_id not in self._mine:  # an event before submit returned, or after a restart
            try:
                job = await self.client.get(job_id)
            except EaselError:
                self._mine[job_id] = None
            else:
                recorded = job.request.metadata.get(CLIENT_KEY)
                mine = isinstance(recorded, dict) and recorded.get("service") == self.service
                self._mine[job_id] = recorded if mine and isinstance(recorded, dict) else None
        return self._mine[job_id]

    async def _dispatch(self, event: Event, info: dict[str, Any]) -> None:
        response = _response(event.job_id, info)
        if event.type is EventType.queued:
            response.gen_status, response.position = GenStatus.QUEUED, event.position
            response.avg_time = event.average_seconds or event.eta_seconds
            await self._call("queued", response)
        elif event.type is EventType.started:
            response.gen_status = GenStatus.GENERATING
            await self._call("generating", response)
        elif event.type is EventType.succeeded:
            response.gen_status = GenStatus.DONE
            response.result = await self._result(event)
            await self._call("done", response)
        elif event.type in (EventType.failed, EventType.cancelled):
            response.gen_status = GenStatus.ERROR
            text = event.error.message if event.error else f"the job was {event.type.value}"
            response.result = GenerationResult(content=text)
            await self._call("error", response)

    async def _result(self, event: Event) -> GenerationResult:
        images = event.images or []
        if event.content is not None:
            contents = [base64.b64decode(data) for data in event.content]
        else:  # too big to travel in the event: fetched
            contents = [await self.client.image(event.job_id, ref.index) for ref in images]
        return GenerationResult(
            content=contents[0] if contents else None,
            contents=contents,
            file_name=images[0].path.rsplit("/", 1)[-1] if images else None,
            urls=[ref.remote_url or ref.url for ref in images],
        )

    # -- submitting -----------------------------------------------------------------------

    async def text2img(self, **params: Any) -> str | None:
        """Queue a text-to-image job; returns its id (None if refused: see the module doc)."""
        return await self._submit(GenType.TEXT2IMG, params)

    async def img2img(self, **params: Any) -> str | None:
        """Queue an image-to-image job (the payload carries the image)."""
        return await self._submit(GenType.IMG2IMG, params)

    async def mix2img(self, **params: Any) -> str | None:
        """Queue a mix of images and prompts (a Kandinsky ``images_texts`` payload)."""
        return await self._submit(GenType.MIX2IMG, params)

    async def _submit(self, gen_type: GenType, params: dict[str, Any]) -> str | None:
        executor = params.pop("executor", None)
        executor = (
            Executor(executor.value if isinstance(executor, Enum) else executor)
            if executor
            else None
        )
        service_info = ServiceInfo(
            user_id=params.pop("user_id", None),
            chat_id=params.pop("chat_id", None),
            message_id=params.pop("message_id", None),
        )
        settings = GenerationSettings(
            premium=bool(params.pop("premium", False)),
            moderate=bool(params.pop("moderate", False)),
            sync_with_s3=bool(params.pop("sync_with_s3", False)),
            max_user_queue_size=params.pop("max_user_queue_size", None),
        )
        info = {
            "service": self.service,
            "client": self.id,
            "gen_type": gen_type.value,
            "executor": executor.value if executor else None,
            "user_id": service_info.user_id,
            "chat_id": service_info.chat_id,
            "message_id": service_info.message_id,
            "premium": settings.premium,
            "moderate": settings.moderate,
            "sync_with_s3": settings.sync_with_s3,
            "max_user_queue_size": settings.max_user_queue_size,
        }
        body: dict[str, Any] = {
            "user_id": f"{self.service}:{service_info.user_id}",
            "premium": settings.premium,
            "moderate": settings.moderate,
            "sync_with_s3": settings.sync_with_s3,
            "include_images": True,
            "metadata": {CLIENT_KEY: info},
            **params,
        }
        if settings.max_user_queue_size is not None:
            body["max_user_queue_size"] = settings.max_user_queue_size
        if executor is not None:
            body["executor"] = executor.value
        try:
            view = await self.client.submit(**body)
        except QueueFull:
            raise
        except EaselError as refusal:
            response = _response(None, info)
            response.gen_status = GenStatus.ERROR
            response.result = GenerationResult(content=refusal.message)
            await self._call("error", response)
            return None
        self._mine[view.id] = info
        return view.id

    async def get(self, job_id: str) -> Job:
        return await self.client.get(job_id)


def _response(job_id: str | None, info: dict[str, Any]) -> GenerationResponse:
    executor = info.get("executor")
    return GenerationResponse(
        object_id=job_id,
        gen_status=GenStatus.QUEUED,
        gen_type=GenType(info.get("gen_type", GenType.TEXT2IMG.value)),
        executor=Executor(executor) if executor else None,
        service_info=ServiceInfo(info.get("user_id"), info.get("chat_id"), info.get("message_id")),
        settings=GenerationSettings(
            premium=bool(info.get("premium")),
            moderate=bool(info.get("moderate")),
            sync_with_s3=bool(info.get("sync_with_s3")),
            max_user_queue_size=info.get("max_user_queue_size"),
        ),
    )


def _http_url(endpoint: str) -> str:
    """``ws://host:port/ws`` (the old balancer's) -> ``http://host:port``; http(s) URLs stay."""
    url = endpoint.rstrip("/")
    if url.startswith(("ws://", "wss://")):
        url = "http" + url[2:]
        url = url.removesuffix("/ws")
    return url
