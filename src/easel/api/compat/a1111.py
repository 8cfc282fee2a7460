"""Automatic1111-compatible web API: the ``/sdapi/v1/*`` routes that clients and plugins use.

``txt2img`` and ``img2img`` translate into one :class:`~easel.jobs.GenerationRequest` (a
batch of ``batch_size x n_iter``), go through the fair queue and wait, as A1111's do; the
answer carries base64 PNGs (with their ``parameters`` text chunk), the ``parameters`` echoed
and ``info``: A1111's JSON string whose ``infotexts`` are the PNGs' own infotext.

A1111 has no users. easel runs each caller as the user named by the ``X-Easel-User``
header, else the HTTP Basic user name (``WebUIApi(username=..., password=...)``), else the
client's address (``ip:<address>``); see :func:`easel.api.compat._shared.identify`. ``/progress``
and ``/interrupt`` act on that caller's most recent A1111 job only, never on anyone else's.

Mapped: ``sampler_name`` (else an explicit ``sampler_index``; else the model's own
scheduler) with ``scheduler`` appended as a modifier (``karras``, ``exponential``,
``beta``, ``sgm_uniform``, ``align_your_steps``; ``automatic``/``uniform``/``simple``/
``normal`` add none), ``seed`` (-1: random), ``width``/``height`` (rounded down to multiples
of 8, as A1111 does), ``denoising_strength`` (img2img), ``override_settings.
sd_model_checkpoint``. Ignored: hires fix, restore faces, tiling, subseeds, scripts, styles.
``/options`` POST with ``sd_model_checkpoint`` (any model of the deployment, its workers'
included) sets the model of the calling service's later A1111 requests that do not name one
(the native API keeps choosing per request); it is kept in the store, so every replica uses
it and it outlives a restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from easel.api.compat._shared import caller, png_bytes, submitted
from easel.api.errors import ErrorResponse
from easel.api.native import runtime_of
from easel.constants import VERSION
from easel.errors import (
    EaselError,
    InvalidRequest,
    JobFinished,
    ModelNotFound,
    SamplerUnsupported,
    Unsupported,
)
from easel.images import strip_data_url
from easel.jobs import (
    MAX_SEED,
    Capability,
    Event,
    EventType,
    GenerationRequest,
    Job,
    JobKind,
    JobState,
    check_json_shape,
    job_error,
)
from easel.results.metadata import infotext, parse_infotext, read_embedded, read_parameters
from easel.runtime.facade import Runtime
from easel.safety.services import current_service
from easel.samplers import (
    A1111_SAMPLERS,
    A1111_SCHEDULERS,
    SAMPLERS,
    SamplerName,
    Schedule,
    a1111_sampler,
    known_sampler,
)

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])
internal = APIRouter(prefix="/internal", tags=["automatic1111"])
"""A1111's per-task progress (its web UI's own route), for clients that set force_task_id."""


class A1111HTTPError(BaseModel):
    """A1111's own error shape, which its clients match on (an unknown sampler)."""

    error: str = Field(examples=["HTTPException"])
    detail: str
    body: str
    errors: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {
        "model": ErrorResponse | A1111HTTPError,
        "description": "Model not served here (easel's error), or a sampler A1111 does not "
        "know (A1111's own shape)",
    },
    429: {"model": ErrorResponse, "description": "The caller's queue is full"},
    500: {"model": ErrorResponse, "description": "The generation failed"},
}

MAX_CALLERS = 10_000
"""Callers whose latest job ``/progress`` remembers; the oldest is forgotten first."""


# -- requests and responses --------------------------------------------------------------


class Txt2ImgRequest(BaseModel):
    """A1111's txt2img request; fields easel does not use are accepted and echoed back."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, body: Any) -> Any:
        check_json_shape(body, "the request")  # it is echoed back: bound it before it runs
        return body

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED)
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1)
    steps: int = Field(default=50, ge=1)
    cfg_scale: float = 7.0
    width: int = Field(default=512, ge=8)
    height: int = Field(default=512, ge=8)
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    force_task_id: str | None = Field(
        default=None, max_length=200, description="Names the task for POST /internal/progress."
    )
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(min_length=1, description="Base64 images; the first is used.")
    mask: str | None = Field(default=None, description="Refused: no inpainting yet.")
    denoising_strength: float | None = Field(default=0.75, ge=0, le=1)
    include_init_images: bool = False


class A1111Images(BaseModel):
    images: list[str] | None = Field(description="Base64 PNGs.")
    parameters: dict[str, Any]
    info: str = Field(description="JSON: seeds, infotexts (A1111's infotext per image)...")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 for the caller's job now running.")
    eta_relative: float
    state: ProgressState
    current_image: str | None = Field(default=None, description="Base64 preview, if any.")
    textinfo: str | None = None


class TaskProgressRequest(BaseModel):
    id_task: str = Field(max_length=200)
    id_live_preview: int = -1


class TaskProgress(BaseModel):
    """A1111's ``/internal/progress`` answer for one task."""

    active: bool
    queued: bool
    completed: bool
    progress: float | None = None
    eta: float | None = None
    live_preview: str | None = Field(default=None, description="A data: URL (JPEG).")
    id_live_preview: int = -1
    textinfo: str | None = None


class Options(BaseModel):
    """The A1111 options easel reads or reports; others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = Field(default=None, examples=["mock"])
    sd_checkpoint_hash: str | None = None
    samples_format: str = "png"
    live_previews_enable: bool = True
    CLIP_stop_at_last_layers: int = 1


class SDModel(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class Scheduler(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None


# -- per caller: the latest job, for /progress and /interrupt -----------------------------


@dataclass
class _Live:
    job_id: str
    created: float
    owner: str = ""
    step: int = 0
    total: int = 0
    preview: str | None = None
    previews: int = 0
    started: float | None = None
    finished: bool = False
    interrupted: bool = False

    def update(self, event: Event) -> None:
        if event.type is EventType.started:
            self.started = time.monotonic()
        elif event.type is EventType.progress:
            self.step, self.total = event.step or 0, event.total or 0
            if event.preview:
                self.preview, self.previews = event.preview, self.previews + 1
        elif event.type in (EventType.succeeded, EventType.failed, EventType.cancelled):
            self.finished = True


MODEL_SETTING = "a1111:sd_model_checkpoint"
"""The store setting (per service) that ``POST /options`` sets: an A1111 server's own
setting, here each service's own (one cannot switch another's model), and in the store so
that every API replica runs a service's A1111 requests on the same model."""


class A1111State:
    """This process's A1111 state: each caller's latest job (its live step and preview,
    streamed here; other replicas read the job from the store)."""

    def __init__(self) -> None:
        self.live: OrderedDict[str, _Live] = OrderedDict()
        self.tasks: OrderedDict[str, _Live] = OrderedDict()

    def track(self, who: str, job_id: str, task_id: str | None = None) -> _Live:
        live = _Live(job_id, time.time(), owner=who)
        for key, table in ((who, self.live), (task_id, self.tasks)):
            if key is None:
                continue
            table[key] = live
            table.move_to_end(key)
            while len(table) > MAX_CALLERS:
                table.popitem(last=False)
        return live


def state_of(request: Request) -> A1111State:
    state: A1111State | None = getattr(request.app.state, "a1111", None)
    if state is None:
        state = request.app.state.a1111 = A1111State()
    return state


# -- routes ------------------------------------------------------------------------------


@router.post("/txt2img", response_model=A1111Images, responses=_ERRORS)
async def txt2img(body: Txt2ImgRequest, request: Request) -> A1111Images | JSONResponse:
    """Generate from a prompt; waits for the images."""
    return _sampler_not_found(body) or await _generate_or_404(request, body)


@router.post("/img2img", response_model=A1111Images, responses=_ERRORS)
async def img2img(body: Img2ImgRequest, request: Request) -> A1111Images | JSONResponse:
    """Generate from an image and a prompt; waits for the images."""
    if (refusal := _sampler_not_found(body)) is not None:
        return refusal
    if body.mask:
        raise Unsupported("mask (inpainting) is not supported yet; send init_images alone")
    return await _generate_or_404(request, body)


class PngInfoRequest(BaseModel):
    image: str = Field(description="Base64 PNG, JPEG or WebP (a data: URL is accepted).")


class PngInfoResponse(BaseModel):
    info: str = Field(description="The infotext the image carries ('' when none).")
    items: dict[str, Any] = Field(default_factory=dict, description="Its other text chunks.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="The infotext parsed.")


@router.post("/png-info", response_model=PngInfoResponse, responses=_ERRORS)
async def png_info(body: PngInfoRequest, request: Request) -> PngInfoResponse:
    """The generation parameters inside an image: PNG text chunk, else EXIF UserComment
    (JPEG, WebP), as A1111 reads them. Decoded in a thread, headers only."""
    if not body.image.strip():
        return PngInfoResponse(info="")
    limit = runtime_of(request).settings.limits.max_init_image_bytes
    return await asyncio.to_thread(_png_info, body.image.strip(), limit)


def _png_info(data: str, max_bytes: int) -> PngInfoResponse:
    data = strip_data_url(data)
    if len(data) > max_bytes * 4 // 3 + 4:
        raise InvalidRequest(f"image is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            embedded = read_embedded(image)
            items = {
                str(key): value
                for key, value in image.info.items()
                if isinstance(value, str) and key not in {"parameters", "easel"}
            }
    except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"the image could not be read: {exc}") from None
    text = embedded.infotext or ""
    parameters: dict[str, Any] = {}
    if text:
        fields = parse_infotext(text)
        parameters = {
            "Prompt": fields.pop("prompt"),
            "Negative prompt": fields.pop("negative_prompt"),
            **fields,
        }
    return PngInfoResponse(info=text, items=items, parameters=parameters)


@router.get("/progress", response_model=ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False) -> ProgressResponse:
    """The progress of the caller's own latest job (see the module doc for who a caller is)."""
    live = state_of(request).live.get(_account(request))
    idle = ProgressResponse(
        progress=0, eta_relative=0, state=ProgressState(), textinfo="Waiting..."
    )
    if live is None:  # another replica took the call (or this one restarted since)
        stored = await _stored_current(request)
        return idle if stored is None else await _stored_progress(request, stored)
    if live.finished:
        return idle
    state = ProgressState(
        job=f"task({live.job_id})",
        job_count=1,
        job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(live.created)),
        sampling_step=live.step,
        sampling_steps=live.total,
        interrupted=live.interrupted,
    )
    if live.started is None or not live.total:
        view = await runtime_of(request).get(live.job_id)
        ahead = view.position or 0
        return ProgressResponse(
            progress=0,
            eta_relative=view.eta_seconds or 0,
            state=state,
            textinfo=f"In queue: {ahead} job(s) ahead",
        )
    done = live.step / live.total
    elapsed = time.monotonic() - live.started
    return ProgressResponse(
        progress=done,
        eta_relative=elapsed / done - elapsed if done else 0,
        state=state,
        current_image=None if skip_current_image else live.preview,
        textinfo=f"Sampling step {live.step}/{live.total}",
    )


@router.post("/interrupt", response_model=dict[str, Any])
async def interrupt(request: Request) -> dict[str, Any]:
    """Stop the caller's own running (or queued) job; its txt2img call returns no images."""
    live = state_of(request).live.get(_account(request))
    if live is not None and not live.finished:
        live.interrupted = True
        with contextlib.suppress(JobFinished):
            await runtime_of(request).cancel(live.job_id)
    elif live is None and (stored := await _stored_current(request)) is not None:
        with contextlib.suppress(JobFinished):  # the replica running the call ends it
            await runtime_of(request).cancel(stored.id)
    return {}


@router.post("/skip", response_model=dict[str, Any])
async def skip(request: Request) -> dict[str, Any]:
    """As ``/interrupt``: easel runs a batch as one job."""
    return await interrupt(request)


@internal.post("/progress", response_model=TaskProgress)
async def task_progress(body: TaskProgressRequest, request: Request) -> TaskProgress:
    """One task's progress, by the ``force_task_id`` its txt2img/img2img call set (a task
    unknown here, or someone else's, reads as not active)."""
    live = state_of(request).tasks.get(body.id_task)
    if live is None or live.owner != _account(request):
        return TaskProgress(active=False, queued=False, completed=False, textinfo="Unknown task")
    if live.finished:
        return TaskProgress(active=False, queued=False, completed=True, progress=1)
    if live.started is None or not live.total:
        return TaskProgress(active=False, queued=True, completed=False, textinfo="In queue")
    done = live.step / live.total
    elapsed = time.monotonic() - live.started
    fresh = live.preview is not None and live.previews != body.id_live_preview
    return TaskProgress(
        active=True,
        queued=False,
        completed=False,
        progress=done,
        eta=elapsed / done - elapsed if done else None,
        live_preview=f"data:image/jpeg;base64,{live.preview}" if fresh else None,
        id_live_preview=live.previews,
        textinfo=f"Sampling step {live.step}/{live.total}",
    )


@router.get("/sd-models", response_model=list[SDModel])
async def sd_models(request: Request) -> list[SDModel]:
    """Every model the deployment serves, by name (this process's and its workers')."""
    return await _models(runtime_of(request))


@router.get("/samplers", response_model=list[Sampler])
async def samplers(request: Request) -> list[Sampler]:
    """The samplers this deployment runs, by A1111's names (A1111's own first, with its
    aliases): the union over its backends. Schedule types are ``/schedulers``."""
    return [
        Sampler(name=name, aliases=list(A1111_SAMPLERS.get(name, ())), options={})
        for name in await runnable_samplers(runtime_of(request))
    ]


@router.get("/schedulers", response_model=list[Scheduler])
async def schedulers() -> list[Scheduler]:
    """The A1111 ``scheduler`` values easel maps onto its samplers."""
    return [Scheduler(name=name, label=label) for name, label in A1111_SCHEDULERS.items()]


@router.get("/scripts", response_model=dict[str, list[str]])
async def scripts() -> dict[str, list[str]]:
    """No scripts: clients (webuiapi) ask at start to see which extensions are installed."""
    return {"txt2img": [], "img2img": []}


@router.get("/options", response_model=Options)
async def get_options(request: Request) -> Options:
    """The options A1111 clients read; ``sd_model_checkpoint`` is the model in use."""
    return await _options(runtime_of(request))


@router.post("/options", response_model=Options, responses=_ERRORS)
async def set_options(options: Options, request: Request) -> Options:
    """Switch the model of later A1111 requests (``sd_model_checkpoint``); other options are
    accepted and ignored."""
    runtime = runtime_of(request)
    if options.sd_model_checkpoint is not None:
        model = await _served_model(runtime, options.sd_model_checkpoint)
        await runtime.set_setting(MODEL_SETTING, model)
    return await _options(runtime)


# -- translation -------------------------------------------------------------------------


async def runnable_samplers(runtime: Runtime) -> list[str]:
    """Samplers some backend of this deployment runs (with some schedule), A1111's own
    first. A backend only other processes run is not asked: it may run any of them."""
    try:
        elsewhere = set(await runtime.fleet.views()) - set(runtime.backends)
    except EaselError:  # the store is out: say what the local backends run
        elsewhere = set()
    order = [*A1111_SAMPLERS, *(s for s in SAMPLERS if s not in A1111_SAMPLERS)]
    if elsewhere:
        return order
    schedules = (None, *Schedule)
    runs: set[str] = set()
    for backend in runtime.backends.values():
        if Capability.scheduler not in backend.capabilities:
            continue
        by_family = {m.family: m.name for m in backend.pipelines()}
        for model in [None, *by_family.values()]:
            why = backend.sampler_refusal
            runs.update(
                s
                for s in order
                if s not in runs and any(why(SamplerName(s, h), model) is None for h in schedules)
            )
    return [s for s in order if s in runs]


async def _options(runtime: Runtime) -> Options:
    model = await runtime.setting(MODEL_SETTING)
    if model is None and (local := runtime.backends.get(runtime.default_backend)) is not None:
        model = local.default_model
    if model is None:  # an API-only replica: a model the default route's workers serve
        with contextlib.suppress(EaselError):
            view = (await runtime.fleet.views()).get(runtime.default_backend)
            model = min(view.models) if view is not None and view.models else None
    return Options(sd_model_checkpoint=model)


async def _models(runtime: Runtime) -> list[SDModel]:
    """The models of this process's backends, then those the deployment's other workers
    advertise (all of them on an API-only replica, which runs no backend itself)."""
    models = [
        SDModel(title=m.name, model_name=m.name, filename=m.path or m.name)
        for m in runtime.served_models()
    ]
    try:
        views = await runtime.fleet.views()
    except EaselError:  # the store is out: what this process serves
        return models
    known = {m.model_name for m in models}
    remote = sorted({name for view in views.values() for name in view.models} - known)
    return [*models, *(SDModel(title=name, model_name=name, filename=name) for name in remote)]


async def _served_model(runtime: Runtime, title: str) -> str:
    """A model by A1111 title (``name [hash]``) or name, case-insensitive."""
    wanted = title.split(" [")[0].strip().casefold()
    names = [m.model_name for m in await _models(runtime)]
    for name in names:
        if name.casefold() == wanted:
            return name
    raise ModelNotFound(
        f"model {title!r} is not served here; served models are: {', '.join(names)}"
    )


def _sampler_not_found(body: Txt2ImgRequest) -> JSONResponse | None:
    """A1111's own answer to a sampler it does not know (404, its error shape), whatever
    backend would have run the job: the same name fails the same way everywhere."""
    sampler = body.sampler_name or (
        body.sampler_index if "sampler_index" in body.model_fields_set else None
    )
    if not sampler or known_sampler(sampler):
        return None
    return _not_found_404()


def _not_found_404(why: str | None = None) -> JSONResponse:
    """A1111's 404 for a sampler, in its shape; ``why`` (a sampler A1111 has that no backend
    here runs) follows its words, naming what the backends run."""
    detail = "Sampler not found" if why is None else f"Sampler not found here: {why}"
    body = {"error": "HTTPException", "detail": detail, "body": "", "errors": f"404: {detail}"}
    return JSONResponse(status_code=404, content=body)


async def _generate_or_404(request: Request, body: Txt2ImgRequest) -> A1111Images | JSONResponse:
    """A sampler A1111 has, which no backend here runs, is A1111's 404 too."""
    try:
        return await _generate(request, body)
    except SamplerUnsupported as exc:
        return _not_found_404(exc.message)


def _scheduler(body: Txt2ImgRequest) -> str | None:
    sampler = body.sampler_name or (
        body.sampler_index if "sampler_index" in body.model_fields_set else None
    )
    return a1111_sampler(sampler, body.scheduler)


async def _model_of(body: Txt2ImgRequest, runtime: Runtime) -> str | None:
    """The request's ``override_settings`` model, else the service's ``/options`` one."""
    override = (body.override_settings or {}).get("sd_model_checkpoint")
    if override:
        return await _served_model(runtime, str(override))
    return await runtime.setting(MODEL_SETTING)


def _translate(body: Txt2ImgRequest, user: str, model: str | None) -> GenerationRequest:
    """A1111's request -> easel's one vocabulary."""
    if not body.prompt.strip():
        raise InvalidRequest("prompt is empty; easel needs a prompt")
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "width": max(body.width - body.width % 8, 8),
        "height": max(body.height - body.height % 8, 8),
        "steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "scheduler": _scheduler(body),
        "seed": None if body.seed < 0 else body.seed,
        "batch_size": body.batch_size * body.n_iter,
        "model": model,
        "user_id": user,
        "metadata": {"api": "a1111"},
    }
    if isinstance(body, Img2ImgRequest):
        fields["kind"] = JobKind.img2img
        fields["init_image"] = body.init_images[0]
        if body.denoising_strength is not None:
            fields["strength"] = body.denoising_strength
    return GenerationRequest.model_validate(fields)


async def _stored_current(request: Request) -> Job | None:
    """The caller's current job read from the store: its newest A1111 job, if still queued
    or running. What a replica answers for a call another replica holds (the live step
    and preview stay with the replica that streams them)."""
    service = current_service.get()
    owner = service.name if service is not None else None
    for job in await runtime_of(request).list_jobs(user_id=caller(request), limit=20):
        if job.service == owner and job.request.metadata.get("api") == "a1111":
            return None if job.state.is_final else job
    return None


async def _stored_progress(request: Request, job: Job) -> ProgressResponse:
    view = await runtime_of(request).get(job.id)
    state = ProgressState(
        job=f"task({job.id})",
        job_count=1,
        job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
        sampling_steps=job.request.steps,
    )
    if view.state is JobState.queued:
        ahead = view.position or 0
        textinfo = f"In queue: {ahead} job(s) ahead"
        done = 0.0
    else:  # running: how far, from the measured run time and what is left of it
        left, whole = view.run_eta_seconds, view.average_seconds
        done = min(max(1 - left / whole, 0.0), 0.99) if left is not None and whole else 0.0
        textinfo = "Sampling"
    return ProgressResponse(
        progress=done, eta_relative=view.eta_seconds or 0, state=state, textinfo=textinfo
    )


def _service_name() -> str:
    service = current_service.get()
    return service.name if service else ""


def _account(request: Request, user: str | None = None) -> str:
    """Whose "current job" a call means: the caller within its service, so that two
    services' users of the same name never see or interrupt each other's jobs."""
    return f"{_service_name()}\0{user or caller(request)}"


async def _generate(request: Request, body: Txt2ImgRequest) -> A1111Images:
    runtime, state = runtime_of(request), state_of(request)
    who = caller(request)
    generation = _translate(body, who, await _model_of(body, runtime))
    async with submitted(runtime, generation) as run:
        live = state.track(_account(request, who), run.view.id, body.force_task_id)
        async for event in run.events:
            live.update(event)
    job = await runtime.get(run.view.id)
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters.update(init_images=None, mask=None)
    if job.state is JobState.succeeded:
        images, infotexts = await asyncio.to_thread(_encode, await png_bytes(runtime, job))
    elif job.state is JobState.cancelled:
        images, infotexts = [], []
    else:
        raise job_error(job)
    info = _info(job, infotexts, interrupted=job.state is JobState.cancelled)
    return A1111Images(
        images=images if body.send_images else None, parameters=parameters, info=info
    )


def _encode(files: list[bytes]) -> tuple[list[str], list[str]]:
    """Base64 of each stored image and the infotext inside it (blocks)."""
    images, texts = [], []
    for data in files:
        texts.append(read_parameters(data).infotext or "")
        images.append(base64.b64encode(data).decode())
    return images, texts


def _info(job: Job, infotexts: list[str], *, interrupted: bool) -> str:
    """A1111's ``info``: a JSON string, its ``infotexts`` those written into the PNGs."""
    request = job.request
    seeds = [ref.seed for ref in job.images] or request.seeds
    if not infotexts:  # nothing was stored (interrupted): describe the request itself
        infotexts = [infotext(request, seed=seeds[0], model=request.model, scheduler=None)]
    fields = parse_infotext(infotexts[0])
    return json.dumps(
        {
            "prompt": request.prompt,
            "all_prompts": [request.prompt] * len(seeds),
            "negative_prompt": request.negative_prompt,
            "all_negative_prompts": [request.negative_prompt] * len(seeds),
            "seed": seeds[0],
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(seeds),
            "width": request.width,
            "height": request.height,
            "sampler_name": fields.get("Sampler"),
            "cfg_scale": request.cfg_scale,
            "steps": request.steps,
            "batch_size": request.batch_size,
            "sd_model_name": fields.get("Model"),
            "denoising_strength": request.strength if request.kind is JobKind.img2img else None,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
            "version": f"easel {VERSION}",
            "job_id": job.id,
            "interrupted": interrupted,
        }
    )
