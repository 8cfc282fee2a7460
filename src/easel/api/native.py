"""easel's own API: jobs, their images, audio and events, models, health."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, ValidationError

from easel.api.errors import ErrorResponse, refuse_websocket
from easel.constants import MAX_EVENT_ID, VERSION
from easel.errors import EaselError, UnsupportedMediaType
from easel.events.bus import Subscription, event_json
from easel.events.pacing import pacer
from easel.jobs import (
    AUDIO_MEDIA_TYPES,
    AudioRef,
    Event,
    EventType,
    GenerationRequest,
    ImageFormat,
    ImageRef,
    Job,
    JobState,
    JobView,
)
from easel.results.files import LocalStorage
from easel.runtime.facade import Runtime
from easel.runtime.registry import WorkerInfo
from easel.safety.services import current_service, may_see
from easel.views import (
    BackendEntry,
    Backends,
    Health,
    JobList,
    Line,
    LineEntry,
    ModelEntry,
    Models,
    QueueState,
)

AfterId = Annotated[
    int | None,
    Query(ge=0, le=MAX_EVENT_ID, description="Resume after this event id (the last one seen)."),
]
LastEventId = Annotated[
    int | None, Header(ge=0, le=MAX_EVENT_ID, description="The last event id seen.")
]
"""Resume points of the event streams (websocket and SSE): 64-bit, never negative."""

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such job, image or audio"},
    409: {"model": ErrorResponse, "description": "The job already ended"},
    429: {"model": ErrorResponse, "description": "The user's queue is full"},
}


def runtime_of(request: Request | WebSocket) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobView,
    responses={k: v for k, v in _ERRORS.items() if k == 429},
    tags=["jobs"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/GenerationRequest"}}
            },
        }
    },
)
async def submit_job(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=200, description="Resending the same key returns the same job."),
    ] = None,
) -> Response:
    """Queue a generation. Answered once the job is durable; watch it on ``/v1/events``."""
    # The hot path: pydantic-core parses the bytes straight into the model, skipping
    # FastAPI's dependency machinery (about a tenth of each request).
    media = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media != "application/json":
        raise UnsupportedMediaType(f"send the job as application/json, not {media}")
    try:
        body = GenerationRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    job = await runtime_of(request).submit(body, idempotency_key=idempotency_key)
    return Response(
        job.model_dump_json(),
        status_code=202,
        media_type="application/json",
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


@router.get("/v1/jobs", response_model=JobList, tags=["jobs"])
async def list_jobs(
    request: Request,
    user_id: str | None = None,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    q: Annotated[
        str | None, Query(max_length=200, description="Text the prompt contains (any case).")
    ] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[float | None, Query(description="Created at or after (Unix time).")] = None,
    until: Annotated[float | None, Query(description="Created before (Unix time).")] = None,
    before: Annotated[
        str | None, Query(max_length=64, description="Jobs older than this job id: the next page.")
    ] = None,
) -> JobList:
    """Newest first. A service token sees its own service's jobs only."""
    jobs = await runtime_of(request).list_jobs(
        user_id=user_id, state=state, limit=limit, text=q or None, model=model,
        since=since, until=until, before=before,
    )  # fmt: skip
    return JobList(jobs=jobs)


@router.delete("/v1/jobs", response_model=JobList, tags=["jobs"])
async def cancel_user_jobs(request: Request, user_id: str) -> JobList:
    """Cancel every queued and running job of one user."""
    return JobList(jobs=await runtime_of(request).cancel_user(user_id))


@router.get("/v1/queue", response_model=QueueState, tags=["jobs"])
async def queue_state(request: Request) -> QueueState:
    """Queued jobs per priority tier and per user, and measured run times."""
    return QueueState.model_validate(await runtime_of(request).queue())


@router.get("/v1/queue/jobs", response_model=Line, tags=["jobs"])
async def queue_line(
    request: Request,
    user_id: Annotated[
        str | None, Query(description="Whose prompts to show (the viewer's own jobs).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> Line:
    """Running jobs, then queued ones in serving order with their tier and position.

    A service's token lists its own service's jobs only (positions still count every job
    ahead), with the prompts of ``user_id``'s jobs; an admin token lists all, prompts too.
    """
    caller = current_service.get()
    admin = caller is not None and caller.is_admin
    jobs = await runtime_of(request).line(limit)
    return Line(
        jobs=[
            _line_entry(job, admin or job.user_id == user_id)
            for job in jobs
            if may_see(job.service)
        ]
    )


def _line_entry(job: JobView, show_prompt: bool) -> LineEntry:
    r = job.request
    return LineEntry(
        id=job.id, user_id=job.user_id, service=job.service, state=job.state, tier=r.priority,
        position=job.position, eta_seconds=job.eta_seconds, backend=job.backend, model=r.model,
        width=r.width, height=r.height, steps=r.steps, batch_size=r.batch_size,
        created_at=job.created_at, started_at=job.started_at,
        prompt=r.prompt if show_prompt else None,
    )  # fmt: skip


class Move(BaseModel):
    to: Literal["front", "back"] = Field(description="First or last in line of its tier.")


@router.post(
    "/v1/jobs/{job_id}/move",
    response_model=JobView,
    responses={
        403: {"model": ErrorResponse, "description": "Needs the admin scope"},
        404: _ERRORS[404],
        409: {"model": ErrorResponse, "description": "The job is not waiting in line"},
    },
    tags=["jobs"],
)
async def move_job(job_id: str, body: Move, request: Request) -> JobView:
    """Operators: put a queued job first or last in line of its priority tier."""
    return await runtime_of(request).move(job_id, front=body.to == "front")


@router.get("/v1/jobs/{job_id}", response_model=JobView, responses=_ERRORS, tags=["jobs"])
async def get_job(job_id: str, request: Request) -> JobView:
    return await runtime_of(request).get(job_id)


@router.delete("/v1/jobs/{job_id}", response_model=Job, responses=_ERRORS, tags=["jobs"])
async def cancel_job(job_id: str, request: Request) -> Job:
    """Cancel a queued job at once, or a running one at its next step."""
    return await runtime_of(request).cancel(job_id)


@router.get(
    "/v1/jobs/{job_id}/images/{index}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}}}, **_ERRORS},
    tags=["jobs"],
)
async def get_image(job_id: str, index: int, request: Request) -> FileResponse:
    path = await runtime_of(request).image_path(job_id, index)
    return FileResponse(path, media_type=ImageFormat.of_path(path.name).media_type)


@router.get(
    "/v1/jobs/{job_id}/audio/{index}",
    response_class=FileResponse,
    responses={
        200: {"content": {media: {} for media in AUDIO_MEDIA_TYPES.values()}},
        **_ERRORS,
    },
    tags=["jobs"],
)
async def get_audio(job_id: str, index: int, request: Request) -> FileResponse:
    """Clip ``index`` of an audio job, in the format it asked for (WAV by default)."""
    path, ref = await runtime_of(request).audio_path(job_id, index)
    return FileResponse(
        path, media_type=ref.media_type, filename=path.name, content_disposition_type="inline"
    )


@router.get("/v1/models", response_model=Models, tags=["models"])
async def list_models(request: Request) -> Models:
    runtime = runtime_of(request)
    return Models(
        models=[
            ModelEntry.model_validate(m, from_attributes=True)
            for backend in runtime.backends.values()
            for m in backend.models()
        ],
        backends=[
            BackendEntry(
                name=name,
                capabilities=sorted(backend.capabilities),
                default=name == runtime.default_backend,
            )
            for name, backend in runtime.backends.items()
        ],
    )


@router.get("/health", response_model=Health, tags=["operations"])
async def health(request: Request) -> Health:
    """Liveness: ``{"status": "healthy"}`` (what text-to-image microservice clients check)."""
    return Health(status="healthy", version=VERSION, backends=list(runtime_of(request).backends))


@router.websocket("/v1/events")
async def events(
    websocket: WebSocket,
    job_id: str | None = None,
    user_id: str | None = None,
    after: AfterId = None,
    include_images: bool = False,
    last_event_id: LastEventId = None,
) -> None:
    """Every event (or one job's, or one user's) as JSON text frames, in order.

    Resume with ``after`` (or a ``Last-Event-ID`` header) set to the last id seen. A
    subscription to one job replays that job's events from the start by default.
    ``include_images``: ``succeeded`` events carry the result files, base64, in
    ``content`` (when small enough), as if every job had asked for them.
    """
    runtime = runtime_of(websocket)
    if after is None:
        after = last_event_id if last_event_id is not None else (0 if job_id else None)
    if job_id is not None:
        try:  # another service's job, or none: refused as SSE refuses it (404), not silence
            await runtime.get(job_id)
        except EaselError as refused:  # job_not_found (404); store_unavailable (503)
            await refuse_websocket(websocket.scope, websocket.receive, websocket.send, refused)
            return
    await websocket.accept()
    subscription = runtime.subscribe(job_id=job_id, user_id=user_id, after=after)
    async with subscription:
        inline = runtime.storage if include_images else None
        sender = asyncio.create_task(_forward(subscription, websocket, inline))
        receiver = asyncio.create_task(_until_disconnect(websocket))
        done, pending = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if sender in done and not receiver.done():
            # the bus ended the stream (subscriber too slow, or shutdown): resume from last id
            with contextlib.suppress(Exception):
                await websocket.close(code=1013, reason="resume with after=<last id>")


async def _forward(
    subscription: Subscription, websocket: WebSocket, inline: LocalStorage | None = None
) -> None:
    turn = pacer().turn  # 100 subscribers' sends spread over loop iterations
    async for event in subscription:
        if not may_see(event.service):  # a service sees only its own jobs' events
            continue
        await turn()
        await websocket.send_text(await subscriber_json(event, inline))


async def subscriber_json(event: Event, inline: LocalStorage | None) -> str:
    """The event as JSON for one subscriber. ``inline`` (a subscription's ``include_images``):
    a ``succeeded`` event carries its result files (images or audio), base64, in ``content``
    while they fit the inline limit together, else its URLs only, as for everyone."""
    if inline is not None and event.type is EventType.succeeded and event.content is None:
        refs: list[ImageRef | AudioRef] = [*(event.images or []), *(event.audio or [])]
        with contextlib.suppress(EaselError, OSError):  # files gone: the URLs remain
            text = await asyncio.to_thread(_with_content, event, inline, refs)
            if text is not None:
                return text
    return event_json(event)


def _with_content(
    event: Event, inline: LocalStorage, refs: list[ImageRef | AudioRef]
) -> str | None:
    """This subscriber's own copy, with the files base64 inside, as JSON; blocks (megabytes
    of base64 are read, encoded and dumped here, not on the event loop)."""
    content = inline.inline(refs)
    if content is None:
        return None
    return event.model_copy(update={"content": content}).model_dump_json(exclude_none=True)


async def _until_disconnect(websocket: WebSocket) -> None:
    """Reads (and ignores) what the client sends until it leaves; a binary frame, which
    this stream has no use for, is answered with a close frame that says so (1003)."""
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await websocket.close(
                    code=1003, reason="this stream sends events and takes no binary frames"
                )
                return


class WorkerList(BaseModel):
    workers: list[WorkerInfo]


@router.get("/v1/backends", response_model=Backends, tags=["operations"])
async def list_backends(request: Request) -> Backends:
    """Every backend of the fleet (this process's and those live workers run): kind,
    state (up, down, probing), slots in use, models and which are loaded, queued work,
    measured speed and the last error."""
    return Backends(backends=await runtime_of(request).fleet.describe())


@router.get("/v1/workers", response_model=WorkerList, tags=["operations"])
async def list_workers(request: Request) -> WorkerList:
    """Live workers of every process sharing this queue: backend, models, capabilities,
    the jobs they run and the age of their last heartbeat."""
    return WorkerList(workers=await runtime_of(request).worker_list())
