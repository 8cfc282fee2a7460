"""What a backend is, what it can do, and how easel finds one by name.

A backend turns one :class:`~easel.jobs.GenerationRequest` into images (or audio clips). It
declares its capabilities so that admission refuses what it cannot do before any GPU time
is spent.
``generate`` is async; a backend that computes locally runs its work in a thread
(``asyncio.to_thread``) so the event loop only moves bytes and events.
"""

from __future__ import annotations

import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL.Image import Image

from easel.audio import AudioClip
from easel.errors import Cancelled, SamplerUnsupported, Unsupported
from easel.jobs import Capability as Capability  # backends declare what they can do
from easel.jobs import GenerationRequest
from easel.payloads import Executor
from easel.samplers import (
    CAPABILITY_PREFIX,
    SAMPLERS,
    SamplerName,
    Schedule,
    parse_sampler,
)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backend: str
    family: str = "unknown"
    path: str | None = None
    loaded: bool = False
    kind: str = "pipeline"
    """pipeline, lora, controlnet or preview_vae: what a request may name it as."""
    size_bytes: int | None = None
    description: str | None = None
    base_model: str | None = None
    """What it was trained or merged from (``NAME.json`` ``base_model``)."""
    merged_from: tuple[str, ...] = ()
    format: str | None = None
    """``diffusers`` (a folder) or ``single_file`` (one checkpoint)."""

    @property
    def state(self) -> str:
        """``loaded`` (in memory, ready) or ``on_disk`` (loads on first use)."""
        return "loaded" if self.loaded else "on_disk"


ProgressCallback = Callable[[int, int, "Image | None"], None]
"""``(step, total, preview)``; safe to call from any thread."""


@dataclass
class RunContext:
    """What a running generation may use besides its request: progress and cancellation."""

    on_progress: ProgressCallback = field(default=lambda step, total, preview: None)
    cancel_event: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled("the job was cancelled")

    def progress(self, step: int, total: int, preview: Image | None = None) -> None:
        self.on_progress(step, total, preview)


@dataclass
class GenerationResult:
    """Images (or audio clips) in batch order; ``seeds[i]`` reproduces result ``i`` alone."""

    images: list[Image]
    seeds: list[int]
    model: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    audio: list[AudioClip] = field(default_factory=list)


EXECUTOR_PREFIX = "executor:"
"""The router sees "runs this engine's payloads" as a capability: ``executor:kandinsky``."""


def executor_capabilities(executors: frozenset[Executor]) -> frozenset[str]:
    return frozenset(EXECUTOR_PREFIX + str(executor) for executor in executors)


SAMPLER_PREFIX = CAPABILITY_PREFIX
"""A worker advertises the samplers its backend runs as ``sampler:DPM++ 2M Karras`` (or
``sampler:*``, every one easel knows), so an API-only replica routes a sampler by them."""


_SAMPLERS: weakref.WeakKeyDictionary[Backend, tuple[frozenset[str], frozenset[str]]] = (
    weakref.WeakKeyDictionary()
)


def sampler_capabilities(backend: Backend) -> frozenset[str]:
    """``sampler:NAME`` for every sampler x schedule ``backend`` runs on any of its models
    (``sampler:*`` when that is all of them); nothing for a backend without samplers.
    Worked out again only when its models' families change (routing asks every time)."""
    if Capability.scheduler not in backend.capabilities:
        return frozenset()
    by_family = {m.family: m.name for m in backend.pipelines()}
    known = _SAMPLERS.get(backend)
    if known is None or known[0] != frozenset(by_family):
        known = _SAMPLERS[backend] = (frozenset(by_family), _runs(backend, by_family))
    return known[1]


def _runs(backend: Backend, by_family: dict[str, str]) -> frozenset[str]:
    models = [None, *by_family.values()]
    names = [SamplerName(s, h) for s in SAMPLERS for h in (None, *Schedule)]
    runs = {n.name for n in names if any(backend.sampler_refusal(n, m) is None for m in models)}
    if len(runs) == len(names):
        return frozenset({SAMPLER_PREFIX + "*"})
    return frozenset(SAMPLER_PREFIX + name for name in runs)


def needed_capabilities(request: GenerationRequest) -> set[Capability]:
    """What a backend must be able to do to run the request (the router filters on it)."""
    needed = {Capability(request.kind.value)}
    if request.scheduler is not None:
        needed.add(Capability.scheduler)
    if request.loras:
        needed.add(Capability.lora)
    if request.controlnet is not None:
        needed.add(Capability.controlnet)
    if request.upscale is not None:
        needed.add(Capability.upscale)
    return needed


class Backend(ABC):
    """One engine. Subclasses set ``name`` and ``capabilities`` and implement ``generate``."""

    name: str = "backend"
    capabilities: frozenset[Capability] = frozenset()
    batches: bool = False
    """Whether ``generate_batch`` runs compatible requests as one call (faster than each)."""
    executors: frozenset[Executor] = frozenset({Executor.automatic1111})
    """Engine payloads this backend runs: as they are (an engine of that kind) or through the
    easel fields read from them (an A1111 payload is also a plain txt2img/img2img, which any
    backend runs). A Kandinsky payload runs only where Kandinsky does: a diffusers backend
    with a Kandinsky 2.2/3 pipeline, FusionBrain, or a fleet entry declaring it."""

    preloads: bool = False
    """Whether :meth:`load` loads a model ahead of its jobs (model pressure)."""

    async def start(self) -> None:
        """Load what must be loaded before the first job (called once by the runtime)."""

    async def load(self, model: str) -> None:
        """Load ``model`` now, ahead of the jobs that want it: the fleet calls it when queued
        jobs want a model no backend has loaded and this one is out of work. Default:
        nothing (it loads with its first job)."""

    async def close(self) -> None:
        """Free what ``start`` took."""

    async def health(self) -> None:
        """Raise :class:`~easel.errors.BackendUnavailable` when it cannot take work now
        (an engine unreachable): the fleet's breaker counts it. Default: always healthy."""

    def models(self) -> list[ModelInfo]:
        return []

    def voices(self) -> list[str]:
        """Voices a txt2speech request may name (the first is the default)."""
        return []

    def pipelines(self) -> list[ModelInfo]:
        """The models a request may name as its ``model`` (not LoRAs, ControlNets...)."""
        return [model for model in self.models() if model.kind == "pipeline"]

    @property
    def default_model(self) -> str | None:
        models = self.pipelines()
        return models[0].name if models else None

    def check(self, request: GenerationRequest) -> None:
        """Refuse at admission what this backend cannot run; raise a 4xx EaselError."""
        needed = needed_capabilities(request)
        if request.executor is not None and request.executor not in self.executors:
            raise Unsupported(
                f"backend {self.name!r} cannot run {request.executor} payloads; it runs "
                f"{', '.join(sorted(self.executors)) or 'none'}"
            )
        if missing := needed - self.capabilities:
            raise Unsupported(
                f"backend {self.name!r} cannot do {', '.join(sorted(missing))}; it can do "
                f"{', '.join(sorted(self.capabilities))}"
            )
        # a ComfyUI workflow names its own sampler; anything else is checked here
        if request.scheduler is not None and request.executor is not Executor.comfyui:
            self.check_sampler(request.scheduler, request.model)

    def check_sampler(self, name: str, model: str | None = None) -> None:
        """Refuse at admission a sampler this backend cannot run: ``invalid_request`` for a
        name no tool has, ``sampler_unsupported`` (naming what it runs) for one it lacks."""
        why = self.sampler_refusal(parse_sampler(name), model)
        if why is not None:
            runs = self.samplers(model)
            raise SamplerUnsupported(
                f"backend {self.name!r} cannot run sampler {name!r} ({why}); it runs "
                f"{', '.join(runs) or 'no sampler'}"
            )

    def sampler_refusal(self, sampler: SamplerName, model: str | None) -> str | None:
        """Why this backend cannot run ``sampler`` (on ``model``, None: its default), or
        None when it can. Default: every sampler easel parses (the mock does)."""
        return None

    def samplers(self, model: str | None = None) -> list[str]:
        """The samplers it runs (A1111's spelling, without a schedule), for
        ``/sdapi/v1/samplers`` and for refusals to name the alternatives."""
        return [s for s in SAMPLERS if self.sampler_refusal(SamplerName(s), model) is None]

    @abstractmethod
    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        """Run one request; raise :class:`~easel.errors.Cancelled` when cancelled midway."""

    async def generate_batch(
        self, requests: list[GenerationRequest], contexts: list[RunContext]
    ) -> list[GenerationResult]:
        """Run compatible requests (same batch key: size, steps, model...) together.

        Each result must equal what ``generate`` gives for its request alone. A request
        whose context is cancelled may still get a result: the worker discards it.
        """
        return [await self.generate(r, c) for r, c in zip(requests, contexts, strict=True)]
