"""Admission policy: what a request must satisfy before it costs anything. Pure functions.

The store enforces the per-user cap atomically at enqueue; everything here runs before.
"""

from __future__ import annotations

from collections.abc import Mapping

from easel.backends.base import Backend
from easel.config import Limits
from easel.errors import InvalidRequest, ModelNotFound
from easel.images import decode_base64_image
from easel.jobs import GenerationRequest, random_seed


def check_limits(request: GenerationRequest, limits: Limits) -> None:
    """Refuse sizes, step counts, batches and prompts over the server's limits."""
    pixels = request.width * request.height
    if pixels > limits.max_pixels:
        raise InvalidRequest(
            f"{request.width}x{request.height} is {pixels} pixels; "
            f"this server allows at most {limits.max_pixels}"
        )
    if max(request.width, request.height) > limits.max_side:
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
    if request.init_image is not None:
        decode_base64_image(request.init_image, max_bytes=limits.max_init_image_bytes)


def choose_backend(
    request: GenerationRequest, backends: Mapping[str, Backend], default: str
) -> Backend:
    """The backend named by the request, else the one serving its model, else the default."""
    if request.backend is not None:
        backend = backends.get(request.backend)
        if backend is None:
            raise InvalidRequest(
                f"backend {request.backend!r} is not served here; "
                f"served backends are: {', '.join(sorted(backends))}"
            )
        return backend
    if request.model is not None:
        for backend in backends.values():
            if any(model.name == request.model for model in backend.models()):
                return backend
        served = sorted(m.name for b in backends.values() for m in b.models())
        raise ModelNotFound(
            f"model {request.model!r} is not served here; served models are: {', '.join(served)}"
        )
    return backends[default]


def admit(
    request: GenerationRequest, backends: Mapping[str, Backend], default: str, limits: Limits
) -> tuple[GenerationRequest, Backend]:
    """Check everything a request can be refused for; fix its seed so it is reproducible."""
    check_limits(request, limits)
    backend = choose_backend(request, backends, default)
    backend.check(request)
    if request.seed is None:
        request = request.model_copy(update={"seed": random_seed()})
    return request, backend
