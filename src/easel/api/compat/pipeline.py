"""The routes of a common text-to-image microservice, as a thin view of easel's queue.

Intel's edge reference microservices for Stable Diffusion (SDXL, SD3/3.5, FLUX) expose
``POST /pipeline/select-device``, ``POST /pipeline/run`` (starts one generation in the
background), ``GET /pipeline/status`` (``running``, ``completed``) and ``GET /pipeline/image``
(the PNG). Clients written for them work against easel unchanged. The mapping:

- One pipeline per caller instead of one per server: a caller (``X-Easel-User``, HTTP Basic
  user, or address; see :func:`easel.api.compat._shared.identify`) sees its own latest job, kept
  in the job store, so it survives a restart. ``run`` is refused (400) while that job is
  unfinished, as the reference refuses a second run.
- ``select-device`` cannot move easel's models (the device is chosen when the server
  starts): it answers ``success`` and names the device in use.
- ``image`` keeps answering until the next ``run`` (the reference deletes it on first read).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from easel.api.compat._shared import caller
from easel.api.errors import ErrorResponse
from easel.api.native import runtime_of
from easel.errors import PipelineBusy, PipelineNotDone
from easel.jobs import MAX_SEED, GenerationRequest, ImageFormat, Job, JobState

router = APIRouter(prefix="/pipeline", tags=["pipeline"])
_BUSY: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "A run is unfinished or absent"}
}


class DeviceRequest(BaseModel):
    device: str = Field(examples=["CPU", "GPU"])


class PipelineAnswer(BaseModel):
    status: Literal["success", "error"]
    message: str
    job_id: str | None = Field(default=None, description="easel's job (an extension).")


class RunRequest(BaseModel):
    prompt: str = Field(min_length=1)
    width: int = 1024
    height: int = 1024
    num_inference_steps: int = Field(default=28, gt=0)
    # easel extensions
    negative_prompt: str = ""
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


class PipelineStatus(BaseModel):
    running: bool
    completed: bool
    job_id: str | None = None
    state: JobState | None = None


@router.post("/select-device", response_model=PipelineAnswer)
async def select_device(body: DeviceRequest, request: Request) -> PipelineAnswer:
    """Answers success: easel keeps the device it was started with, and names it."""
    device = runtime_of(request).settings.device
    return PipelineAnswer(
        status="success",
        message=f"Pipeline prepared on {device} (easel keeps its device; asked: {body.device}).",
    )


@router.post("/run", response_model=PipelineAnswer, responses=_BUSY)
async def run(body: RunRequest, request: Request) -> PipelineAnswer:
    """Queue one generation for the caller and answer at once; poll ``/pipeline/status``."""
    runtime, who = runtime_of(request), caller(request)
    latest = await _latest(request, who)
    if latest is not None and not latest.state.is_final:
        raise PipelineBusy(
            "Another pipeline execution is in progress. Please wait until it completes."
        )
    view = await runtime.submit(
        GenerationRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            width=body.width,
            height=body.height,
            steps=body.num_inference_steps,
            seed=body.seed,
            user_id=who,
            metadata={"api": "pipeline"},
        )
    )
    return PipelineAnswer(
        status="success", message="Pipeline execution started in background.", job_id=view.id
    )


@router.get("/status", response_model=PipelineStatus)
async def status(request: Request) -> PipelineStatus:
    """The caller's latest job: running (queued or running) and completed (succeeded)."""
    latest = await _latest(request, caller(request))
    if latest is None:
        return PipelineStatus(running=False, completed=False)
    return PipelineStatus(
        running=not latest.state.is_final,
        completed=latest.state is JobState.succeeded,
        job_id=latest.id,
        state=latest.state,
    )


@router.get(
    "/image",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The PNG",
        },
        **_BUSY,
    },
)
async def image(request: Request) -> FileResponse:
    """The PNG of the caller's latest job, once it succeeded."""
    latest = await _latest(request, caller(request))
    if latest is None or latest.state is not JobState.succeeded:
        raise PipelineNotDone("Pipeline execution is not yet complete.")
    path = await runtime_of(request).image_path(latest.id, 0)
    return FileResponse(path, media_type=ImageFormat.of_path(path.name).media_type)


async def _latest(request: Request, who: str) -> Job | None:
    jobs = await runtime_of(request).list_jobs(user_id=who, limit=1)
    return jobs[0] if jobs else None
