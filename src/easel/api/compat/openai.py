"""OpenAI-compatible images API: ``POST /v1/images/generations`` and ``/v1/images/edits``.

A client of OpenAI's images API (the ``openai`` SDK, or anything that speaks its JSON)
points its base URL at ``<easel>/v1`` and gets easel's models through easel's fair queue.
The call waits for the job, as OpenAI's does. What maps to what:

- ``prompt``, ``n`` (the batch), ``size`` (``WxH``, multiples of 8; ``auto`` or none is
  1024x1024), ``response_format`` (``b64_json``, the default, or ``url``: easel's URL of the
  stored PNG); ``model``: a model easel serves, or an OpenAI model name (``dall-e-*``,
  ``gpt-image-*``, ``chatgpt-image-*``), which means the server's default model.
- ``quality`` sets the steps: ``low`` 10, ``medium``/``standard``/``auto`` the default
  (20), ``high``/``hd`` 30, ``xhigh`` 40, ``max`` 50. ``style``, ``background``,
  ``moderation`` and other fields are accepted and ignored; ``output_format`` must be
  ``png``; ``stream`` is refused.
- The user (for fairness) is ``safety_identifier``, else ``user``, else a hash of the Bearer
  token; see :func:`easel.api.compat._shared.identify`.
- easel extensions (``extra_body`` in the SDK): ``seed``, ``negative_prompt``, ``steps``,
  ``cfg_scale``, ``scheduler``, ``strength`` (edits).
- Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, on these
  routes only; ``code`` is easel's error code.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from easel.api.compat._errors import OpenAIError, openai_response, to_openai
from easel.api.compat._shared import caller, pngs_base64, run_to_end
from easel.api.native import runtime_of
from easel.errors import EaselError, InvalidRequest, Unsupported, error_for_status
from easel.images import image_size
from easel.jobs import MAX_SEED, GenerationRequest, JobKind, JobState, job_error

DEFAULT_SIZE = (1024, 1024)
OPENAI_MODEL_PREFIXES = ("dall-e", "gpt-image", "chatgpt-image")
QUALITY_STEPS: dict[str, int | None] = {
    "low": 10,
    "medium": None,
    "standard": None,
    "auto": None,
    "high": 30,
    "hd": 30,
    "xhigh": 40,
    "max": 50,
}
"""``quality`` -> steps (None: the server's default)."""

_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


# -- errors in OpenAI's shape ------------------------------------------------------------


def _from_validation(errors: list[Any]) -> JSONResponse:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "form")]
    message = str(first.get("msg", "is invalid")).removeprefix("Value error, ")
    param = ".".join(loc) or None
    message = f"{param}: {message}" if param else message
    return openai_response(400, message, InvalidRequest.code, param)


class OpenAIRoute(APIRoute):
    """Renders every error of its routes in OpenAI's shape (the rest of easel keeps its own)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _from_validation(list(exc.errors()))
            except ValidationError as exc:
                return _from_validation(list(exc.errors()))
            except EaselError as exc:
                return to_openai(exc)
            except HTTPException as exc:
                return to_openai(error_for_status(exc.status_code, str(exc.detail)))

        return route


router = APIRouter(route_class=OpenAIRoute, tags=["openai"])
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIError, "description": description}
    for status, description in (
        (400, "Invalid request"),
        (404, "Model not served here"),
        (429, "The user's queue is full"),
        (500, "The generation failed"),
    )
}


# -- requests and responses --------------------------------------------------------------


class ImageGenerationBody(BaseModel):
    """OpenAI's image generation request; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    size: str | None = Field(default=None, examples=["1024x1024", "512x512", "auto"])
    quality: str | None = Field(default=None, description="Sets the steps; see the module doc.")
    style: str | None = Field(default=None, description="Accepted and ignored.")
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png"] | None = None
    stream: bool | None = None
    user: str | None = None
    safety_identifier: str | None = None
    # easel extensions
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    negative_prompt: str | None = None
    steps: int | None = Field(default=None, gt=0)
    cfg_scale: float | None = None
    scheduler: str | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str
    quality: str | None = None


# -- routes ------------------------------------------------------------------------------


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=ERROR_RESPONSES)
async def generations(body: ImageGenerationBody, request: Request, response: Response) -> Any:
    """Generate images from a prompt (OpenAI ``images.generate``); waits for the result."""
    if body.stream:
        raise Unsupported("streaming image generation is not supported; leave stream unset")
    width, height = _size(body.size) or DEFAULT_SIZE
    generation = _request(
        request,
        prompt=body.prompt,
        model=body.model,
        n=body.n,
        width=width,
        height=height,
        quality=body.quality,
        user=body.safety_identifier or body.user,
        extra=body.model_dump(
            include={"seed", "negative_prompt", "steps", "cfg_scale", "scheduler"},
            exclude_none=True,
        ),
    )
    return await _answer(request, response, generation, body.response_format, body.quality)


@router.post("/v1/images/edits", response_model=ImagesResponse, responses=ERROR_RESPONSES)
async def edits(
    request: Request,
    response: Response,
    prompt: Annotated[str, Form(min_length=1)],
    image: Annotated[UploadFile | None, File(description="The image to edit.")] = None,
    images: Annotated[
        list[UploadFile] | None, File(alias="image[]", description="Or one image as image[].")
    ] = None,
    mask: Annotated[UploadFile | None, File(description="Refused: no inpainting yet.")] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form(ge=1, le=10)] = 1,
    size: Annotated[str | None, Form(description="Default: the image's own size.")] = None,
    quality: Annotated[str | None, Form()] = None,
    response_format: Annotated[Literal["b64_json", "url"] | None, Form()] = None,
    output_format: Annotated[Literal["png"] | None, Form()] = None,
    user: Annotated[str | None, Form()] = None,
    safety_identifier: Annotated[str | None, Form()] = None,
    seed: Annotated[int | None, Form(ge=0, le=MAX_SEED)] = None,
    negative_prompt: Annotated[str | None, Form()] = None,
    steps: Annotated[int | None, Form(gt=0)] = None,
    strength: Annotated[float | None, Form(ge=0, le=1)] = None,
) -> Any:
    """Edit an image from a prompt (OpenAI ``images.edit``): easel runs it as img2img."""
    if mask is not None:
        raise Unsupported("masks (inpainting) are not supported yet; send the image alone")
    uploads = [upload for upload in [image, *(images or [])] if upload is not None]
    if len(uploads) != 1:
        raise InvalidRequest(f"send exactly one image to edit (got {len(uploads)})")
    raw = await uploads[0].read()
    own_size = await asyncio.to_thread(image_size, raw)
    width, height = _size(size) or (own_size[0] - own_size[0] % 8, own_size[1] - own_size[1] % 8)
    extra = {"seed": seed, "negative_prompt": negative_prompt, "steps": steps, "strength": strength}
    init = await asyncio.to_thread(lambda: base64.b64encode(raw).decode())
    generation = _request(
        request,
        prompt=prompt,
        model=model,
        n=n,
        width=width,
        height=height,
        quality=quality,
        user=safety_identifier or user,
        extra={key: value for key, value in extra.items() if value is not None},
        kind=JobKind.img2img,
        init_image=init,
    )
    return await _answer(request, response, generation, response_format, quality)


def _size(size: str | None) -> tuple[int, int] | None:
    """``"WxH"`` -> (W, H); ``auto``/None -> None."""
    if size is None or size.strip() in ("", "auto"):
        return None
    match = _SIZE.match(size)
    if match is None:
        raise InvalidRequest(f"size must be WIDTHxHEIGHT, e.g. 1024x1024, or auto (got {size!r})")
    return int(match[1]), int(match[2])


def _request(
    request: Request,
    *,
    prompt: str,
    model: str | None,
    n: int,
    width: int,
    height: int,
    quality: str | None,
    user: str | None,
    extra: dict[str, Any],
    **fields: Any,
) -> GenerationRequest:
    """The OpenAI request's meaning as easel's one vocabulary."""
    if quality is not None and quality not in QUALITY_STEPS:
        raise InvalidRequest(f"quality must be one of: {', '.join(QUALITY_STEPS)}")
    params: dict[str, Any] = {
        "prompt": prompt,
        "width": width,
        "height": height,
        "batch_size": n,
        "user_id": caller(request, user),
        "metadata": {"api": "openai"},
        **fields,
    }
    if model and not model.startswith(OPENAI_MODEL_PREFIXES):
        params["model"] = model
    if quality and (steps := QUALITY_STEPS[quality]) is not None:
        params["steps"] = steps
    params.update(extra)
    return GenerationRequest.model_validate(params)


async def _answer(
    request: Request,
    response: Response,
    generation: GenerationRequest,
    response_format: str | None,
    quality: str | None,
) -> ImagesResponse:
    runtime = runtime_of(request)
    job = await run_to_end(runtime, generation, request)
    response.headers["X-Easel-Job-Id"] = job.id
    if job.state is not JobState.succeeded:
        raise job_error(job)
    if response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [ImageData(url=base + ref.url) for ref in job.images]
    else:
        data = [ImageData(b64_json=png) for png in await pngs_base64(runtime, job)]
    return ImagesResponse(
        created=int(job.created_at),
        data=data,
        size=f"{generation.width}x{generation.height}",
        quality=quality,
    )
