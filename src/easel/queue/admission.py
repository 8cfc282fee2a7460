"""Admission policy: what a request must satisfy before it costs anything. Pure functions.

The store enforces the per-user cap atomically at enqueue; everything here runs before.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence

from easel.backends.base import (
    EXECUTOR_PREFIX,
    SAMPLER_PREFIX,
    Backend,
    executor_capabilities,
    needed_capabilities,
)
from easel.config import Limits
from easel.errors import (
    BackendUnavailable,
    EaselError,
    InvalidRequest,
    ModelNotFound,
    NoBackend,
    SamplerUnsupported,
    Unsupported,
)
from easel.images import decode_base64_image
from easel.jobs import GenerationRequest, JobKind, random_seed
from easel.payloads import Executor
from easel.queue.routing import BackendView, Policy, Want, capable, choose
from easel.samplers import parse_sampler


def check_limits(request: GenerationRequest, limits: Limits) -> None:
    """Refuse sizes, step counts, batches and prompts over the server's limits."""
    if request.metadata:
        size = len(json.dumps(request.metadata, separators=(",", ":")).encode())
        if size > limits.max_metadata_bytes:
            raise InvalidRequest(
                f"metadata is {size} bytes as JSON; this server keeps at most "
                f"{limits.max_metadata_bytes} per job"
            )
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
    _check_steps_and_batch(request, limits)
    _check_prompts(request, limits)
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
        _check_prompts(request, limits)
    _check_steps_and_batch(request, limits)


def _check_steps_and_batch(request: GenerationRequest, limits: Limits) -> None:
    if request.steps > limits.max_steps:
        raise InvalidRequest(
            f"steps is {request.steps}; this server allows at most {limits.max_steps}"
        )
    if request.batch_size > limits.max_batch_size:
        raise InvalidRequest(
            f"batch_size is {request.batch_size}; this server allows at most "
            f"{limits.max_batch_size}"
        )


def _check_prompts(request: GenerationRequest, limits: Limits) -> None:
    for name in ("prompt", "negative_prompt"):
        length = len(getattr(request, name))
        if length > limits.max_prompt_length:
            raise InvalidRequest(
                f"{name} has {length} characters; this server allows at most "
                f"{limits.max_prompt_length}"
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
    raise _refused(
        "no backend served here can run this request",
        [(b.name, r) for b, r in zip(candidates, refusals, strict=True)],
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


def want_of(request: GenerationRequest, *, moving: bool = False) -> Want:
    """What the request needs of a backend. ``moving``: where it may go after its backend
    failed or went down (a named backend binds it unless ``fallback`` frees it)."""
    named: frozenset[str] | None = None
    if request.backend is not None:
        if moving and request.fallback is True:
            named = None
        elif moving and isinstance(request.fallback, list):
            named = frozenset({request.backend, *request.fallback})
        else:
            named = frozenset({request.backend})
    needed = frozenset(str(c) for c in needed_capabilities(request))
    if request.scheduler is not None and request.executor is not Executor.comfyui:
        with contextlib.suppress(InvalidRequest):  # an unknown name is refused elsewhere
            sampler = parse_sampler(request.scheduler)
            if sampler.diffusers_class is None:  # a class name: its backend's check decides
                needed |= {SAMPLER_PREFIX + sampler.name}
    if request.executor is not None:  # an engine payload: a backend that runs that engine's
        needed |= executor_capabilities(frozenset({request.executor}))
    return Want(
        capabilities=needed,
        model=request.model,
        tags=frozenset(request.tags),
        backends=named,
        cost=request.cost,
    )


Check = Callable[[GenerationRequest], None]


def route_request(
    request: GenerationRequest,
    views: Sequence[BackendView],
    checks: Mapping[str, Check],
    policy: Policy | None = None,
) -> str:
    """The backend of the fleet a new job goes to, or a 4xx saying why none can run it.

    ``views`` are every backend of the deployment (local ones and those live workers
    advertise); ``checks`` are the local backends' own checks (schedulers, LoRAs...).
    When every capable backend is down, the job still goes to the least loaded one and
    waits there (or moves, once one is back up).
    """
    names = sorted(view.name for view in views)
    if not views:
        raise BackendUnavailable(
            "no backend of this deployment is running: start one (easel worker ...) and resend"
        )
    for name in [request.backend] + (
        request.fallback if isinstance(request.fallback, list) else []
    ):
        if name is not None and name not in names:
            raise InvalidRequest(
                f"backend {name!r} is not served here; served backends are: {', '.join(names)}"
            )
    want = want_of(request)
    if request.executor is not None:
        runs = EXECUTOR_PREFIX + str(request.executor)
        if not any(runs in view.capabilities for view in views):
            raise NoBackend(
                f"no backend of this deployment runs {request.executor} payloads; send "
                "easel's own fields instead, or add a backend that runs them"
                + _HOW_TO_RUN.get(str(request.executor), "")
            )
    fits = [view for view in views if capable(want, view)]
    if not fits:
        raise _why_not(request, want, views)
    refusals: list[tuple[str, EaselError]] = []
    passing = []
    for view in fits:
        try:
            if (check := checks.get(view.name)) is not None:
                check(request)
        except EaselError as refusal:
            refusals.append((view.name, refusal))
        else:
            passing.append(view)
    if not passing:
        if len(refusals) == 1:
            raise refusals[0][1]
        raise _refused("no backend of this fleet can run this request", refusals)
    chosen = choose(want, passing, policy)
    if chosen is None:  # all down: wait where the wait is shortest
        chosen = min(passing, key=lambda view: (view.wait(), view.name))
    return chosen.name


def _refused(lead: str, refusals: Sequence[tuple[str, EaselError]]) -> Unsupported:
    """Every backend's refusal in one 4xx; ``sampler_unsupported`` when each refused only
    the sampler (so A1111's doors can answer it as A1111 does)."""
    said = "; ".join(f"{name}: {refusal.message}" for name, refusal in refusals)
    if all(isinstance(refusal, SamplerUnsupported) for _, refusal in refusals):
        return SamplerUnsupported(f"{lead}: {said}")
    return Unsupported(f"{lead}: {said}")


def _lacks(name: str, missing: frozenset[str], offered: frozenset[str] = frozenset()) -> str:
    """ "gpu cannot do img2img" / "plain does not run kandinsky payloads" / "dt does not
    run sampler DPM fast (it runs: Euler a, ...)"."""
    engines = sorted(
        c.removeprefix(EXECUTOR_PREFIX) for c in missing if c.startswith(EXECUTOR_PREFIX)
    )
    samplers = sorted(
        c.removeprefix(SAMPLER_PREFIX) for c in missing if c.startswith(SAMPLER_PREFIX)
    )
    skills = sorted(
        c for c in missing if not c.startswith(EXECUTOR_PREFIX) and not c.startswith(SAMPLER_PREFIX)
    )
    said = [f"cannot do {', '.join(skills)}"] if skills else []
    said += [f"does not run {', '.join(engines)} payloads"] if engines else []
    if samplers:
        runs = sorted(
            c.removeprefix(SAMPLER_PREFIX) for c in offered if c.startswith(SAMPLER_PREFIX)
        )
        said += [f"does not run sampler {', '.join(samplers)} (it runs: {', '.join(runs)})"]
    return f"{name} {' and '.join(said)}" if said else ""


_HOW_TO_RUN = {
    "kandinsky": " (a diffusers backend with a Kandinsky 2.2/3 model, a hosted fusionbrain "
    'backend, or a fleet entry declaring executors = ["kandinsky"])',
    "comfyui": " (a comfyui backend)",
}


def _why_not(request: GenerationRequest, want: Want, views: Sequence[BackendView]) -> EaselError:
    named = [v for v in views if want.backends is None or v.name in want.backends]
    if want.model is not None and not any(v.serves(want.model) for v in named):
        served = sorted({m for v in named for m in v.models})
        where = f"by backend {request.backend!r}" if request.backend else "here"
        return ModelNotFound(
            f"model {want.model!r} is not served {where}; served models are: "
            f"{', '.join(served) or 'none listed'}"
        )
    if want.tags and not any(want.tags <= v.tags for v in named):
        tags = sorted({t for v in views for t in v.tags})
        return InvalidRequest(
            f"no backend carries the tags {', '.join(sorted(want.tags))}; tags in this fleet: "
            f"{', '.join(tags) or 'none'}"
        )
    missing = {v.name: _missing(want, v) for v in named}
    reasons = [_lacks(v.name, missing[v.name], v.capabilities) for v in named]
    said = "; ".join(r for r in reasons if r) or "none serves its model with its tags"
    if all(m and all(c.startswith(SAMPLER_PREFIX) for c in m) for m in missing.values()):
        return SamplerUnsupported(f"no backend of this fleet runs this sampler: {said}")
    return Unsupported(f"no backend of this fleet can run this request: {said}")


def _missing(want: Want, view: BackendView) -> frozenset[str]:
    """What ``view`` lacks of ``want`` (a sampler only where it lists its samplers)."""
    missing = want.capabilities - view.capabilities
    if SAMPLER_PREFIX + "*" in view.capabilities or not any(
        c.startswith(SAMPLER_PREFIX) for c in view.capabilities
    ):
        missing = frozenset(c for c in missing if not c.startswith(SAMPLER_PREFIX))
    return missing
