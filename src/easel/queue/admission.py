"""Admission policy: what a request must satisfy before it costs anything. Pure functions.

The store enforces the per-user cap atomically at enqueue; everything here runs before.
"""

from __future__ import annotations

from collections.abc import Mapping

from easel.backends.base import Backend
from easel.config import Limits
from easel.errors import EaselError, InvalidRequest, ModelNotFound, Unsupported
from easel.images import decode_base64_image
from easel.jobs import GenerationRequest, JobKind, random_seed


def check_limits(request: GenerationRequest, limits: Limits) -> None:
    """Refuse sizes, step counts, batches and prompts over the server's limits."""
    if request.kind.is_audio:
        _check_audio_limits(request, limits)
        return
    width, height = request.output_size
    pixels = width * height
    if pixels > limits.max_pixels:
        raise InvalidRequest(
            f"{width}x{height} is {pixels} pixels; this server allows at most {limits.max_pixels}"
        )
    if max(width, height) > limits.max_side:
        raise InvalidRequest(f"width and height must be at most {limits.max_side}")
    if request.steps > limits.max_steps:
        raise InvalidRequest(
            f"steps is {request.steps}; this server allows at most {limits.max_steps}"
        )
    if request.batch_size > limits.max_batch_size:
        raise InvalidRequest(
            f"batch_size is {request.batch_size}; this server allows at most "
            f"{limits.max_batch_size}"
        )
    for name in ("prompt", "negative_prompt"):
        length = len(getattr(request, name))
        if length > limits.max_prompt_length:
            raise InvalidRequest(
                f"{name} has {length} characters; this server allows at most "
                f"{limits.max_prompt_length}"
            )
    images = [request.init_image, request.mask_image]
    images += [request.controlnet.image] if request.controlnet is not None else []
    images += [item.image for item in request.mix]
    for image in images:
        if image is not None:
            decode_base64_image(image, max_bytes=limits.max_init_image_bytes)


def _check_audio_limits(request: GenerationRequest, limits: Limits) -> None:
    """Durations, text lengths, steps and batches of audio requests."""
    if request.kind is JobKind.txt2speech:
        if len(request.prompt) > limits.max_speech_characters:
            raise InvalidRequest(
                f"text has {len(request.prompt)} characters; this server speaks at most "
                f"{limits.max_speech_characters} per request: split it"
            )
    else:
        seconds = request.audio_seconds
        if seconds > limits.max_audio_seconds:
            raise InvalidRequest(
                f"duration_seconds is {seconds:g}; this server makes at most "
                f"{limits.max_audio_seconds:g} seconds per clip"
            )
        for name in ("prompt", "negative_prompt"):
            length = len(getattr(request, name))
            if length > limits.max_prompt_length:
                raise InvalidRequest(
                    f"{name} has {length} characters; this server allows at most "
                    f"{limits.max_prompt_length}"
                )
    if request.steps > limits.max_steps:
        raise InvalidRequest(
            f"steps is {request.steps}; this server allows at most {limits.max_steps}"
        )
    if request.batch_size > limits.max_batch_size:
        raise InvalidRequest(
            f"batch_size is {request.batch_size}; this server allows at most "
            f"{limits.max_batch_size}"
        )


def choose_backend(
    request: GenerationRequest, backends: Mapping[str, Backend], default: str
) -> Backend:
    """The first backend that can run the request, trying the one it names, else those
    serving its model, else every backend with the default first.

    A request no served backend can run is refused here, before it costs anything.
    """
    if request.backend is not None:
        if request.backend not in backends:
            raise InvalidRequest(
                f"backend {request.backend!r} is not served here; "
                f"served backends are: {', '.join(sorted(backends))}"
            )
        candidates = [backends[request.backend]]
    elif request.model is not None:
        candidates = [
            b
            for b in backends.values()
            if any(m.name == request.model and m.kind == "pipeline" for m in b.models())
        ]
        if not candidates:
            served = sorted(
                m.name for b in backends.values() for m in b.models() if m.kind == "pipeline"
            )
            raise ModelNotFound(
                f"model {request.model!r} is not served here; "
                f"served models are: {', '.join(served)}"
            )
    else:
        candidates = [backends[default], *(b for n, b in backends.items() if n != default)]
    refusals: list[EaselError] = []
    for backend in candidates:
        try:
            backend.check(request)
        except EaselError as refusal:
            refusals.append(refusal)
        else:
            return backend
    if len(refusals) == 1:
        raise refusals[0]
    raise Unsupported(
        "no backend served here can run this request: "
        + "; ".join(f"{b.name}: {r.message}" for b, r in zip(candidates, refusals, strict=True))
    )


def admit(
    request: GenerationRequest, backends: Mapping[str, Backend], default: str, limits: Limits
) -> tuple[GenerationRequest, Backend]:
    """Check everything a request can be refused for; fix its seed so it is reproducible."""
    check_limits(request, limits)
    backend = choose_backend(request, backends, default)
    if request.seed is None:
        request = request.model_copy(update={"seed": random_seed()})
    return request, backend
