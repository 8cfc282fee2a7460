"""A deterministic placeholder backend: no model, no GPU, real queue behaviour.

It draws the prompt, seed and size on a background that the seed decides, one "step" at a
time with a configurable delay, so progress, cancellation and ETAs behave as with a model.
Tests and the no-GPU quickstart use it. With ``folder``, it serves real pictures instead:
the image of the folder that the seed picks (``seed % count``, in name order), fitted to
the requested size, for realistic demos and downstream tests. With ``preview_every`` (or
a request's own), it sends a preview every K steps: the result so far, blurred.
"""

from __future__ import annotations

import asyncio
import random
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from easel.audio import AudioClip
from easel.backends.base import (
    Backend,
    Capability,
    GenerationResult,
    ModelInfo,
    RunContext,
)
from easel.errors import (
    BackendUnavailable,
    Cancelled,
    GenerationError,
    InvalidRequest,
    MockFailure,
    Unsupported,
)
from easel.images import decode_base64_image
from easel.jobs import GenerationRequest, JobKind

MOCK_MODEL = "mock"
FAIL_PROMPT = "[mock:fail]"
"""A prompt containing this fails at run time: lets tests and demos see a failed job."""
UNAVAILABLE_PROMPT = "[mock:unavailable]"
"""A prompt containing this fails as a transient error (``backend_unavailable``): retried."""


def _failure(requests: list[GenerationRequest]) -> GenerationError:
    if any(UNAVAILABLE_PROMPT in r.prompt for r in requests):
        return BackendUnavailable("the mock backend is pretending to be unavailable")
    return MockFailure("the mock backend was asked to fail")


class MockBackend(Backend):
    name = "mock"
    capabilities = frozenset(
        {
            Capability.txt2img,
            Capability.img2img,
            Capability.negative_prompt,
            Capability.seed,
            Capability.scheduler,
            Capability.preview,
        }
    )

    batches = True
    IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})

    def __init__(
        self,
        *,
        step_delay: float = 0.0,
        name: str | None = None,
        folder: str | Path | None = None,
        preview_every: int = 0,
        seconds_per_megapixel_step: float = 0.0,
        overhead_seconds: float = 0.0,
        load_seconds: float = 0.0,
        models: Sequence[str] = (),
        **_options: object,
    ) -> None:
        if name is not None:
            self.name = name
        self.step_delay = step_delay
        # a realistic cost, for ETAs: per step per megapixel, per call, per model switch
        self.seconds_per_megapixel_step = seconds_per_megapixel_step
        self.overhead_seconds = overhead_seconds
        self.load_seconds = load_seconds
        self.model_names = [MOCK_MODEL, *(m for m in models if m != MOCK_MODEL)]
        self.loaded: str | None = None
        self.loads = 0
        """Model switches so far (with ``models`` and ``load_seconds``: a fleet's affinity)."""
        self.preloads_done = 0
        """Of those, the ones :meth:`load` did ahead of a job (model pressure)."""
        self.unavailable = False
        """Set it to make every run and health check fail transiently (an engine gone)."""
        self.preview_every = preview_every
        self.pictures: list[Path] = []
        if folder is not None:
            self.pictures = sorted(
                p for p in Path(folder).iterdir() if p.suffix.lower() in self.IMAGE_SUFFIXES
            )
            if not self.pictures:
                raise InvalidRequest(
                    f"mock folder {str(folder)!r} holds no PNG, JPEG or WebP images"
                )

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=name,
                backend=self.name,
                family="mock",
                loaded=not self.load_seconds or name == self.loaded,  # loads on its first job
            )
            for name in self.model_names
        ]

    preloads = True

    async def load(self, model: str) -> None:
        await asyncio.to_thread(self._load, model)

    def _load(self, model: str) -> None:
        if self.unavailable:
            raise BackendUnavailable(f"mock backend {self.name!r} is switched off")
        if model != (self.loaded or MOCK_MODEL):
            self.loads += 1
            self.preloads_done += 1
            if self.load_seconds:
                time.sleep(self.load_seconds)
        self.loaded = model

    async def health(self) -> None:
        if self.unavailable:
            raise BackendUnavailable(f"mock backend {self.name!r} is switched off")

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        results = await asyncio.to_thread(self._generate, [request], [context])
        return results[0]

    async def generate_batch(
        self, requests: list[GenerationRequest], contexts: list[RunContext]
    ) -> list[GenerationResult]:
        return await asyncio.to_thread(self._generate, requests, contexts)

    def _generate(
        self, requests: list[GenerationRequest], contexts: list[RunContext]
    ) -> list[GenerationResult]:
        """One "step" loop for the whole batch, as a pipeline would run it."""
        if self.unavailable:
            raise BackendUnavailable(f"mock backend {self.name!r} is switched off")
        steps = requests[0].steps
        model = requests[0].model or MOCK_MODEL
        if model != (self.loaded or MOCK_MODEL):
            self.loads += 1
        if self.load_seconds and model != self.loaded:
            time.sleep(self.load_seconds)
        self.loaded = model
        if self.overhead_seconds:
            time.sleep(self.overhead_seconds)
        megapixels = sum(r.width * r.height * r.batch_size for r in requests) / 1e6
        step_seconds = self.step_delay + self.seconds_per_megapixel_step * megapixels
        for step in range(1, steps + 1):
            if all(context.cancelled for context in contexts):
                raise Cancelled("every job of the batch was cancelled")
            if step_seconds:
                time.sleep(step_seconds)
            for request, context in zip(requests, contexts, strict=True):
                every = request.preview_every
                every = self.preview_every if every is None else every
                preview = None
                if every and step % every == 0 and step < steps:
                    preview = self._picture(request, request.seeds[0]).filter(
                        ImageFilter.GaussianBlur(2 * (steps - step))
                    )
                context.progress(step, steps, preview)
        if len(requests) == 1:
            contexts[0].raise_if_cancelled()
        if any(FAIL_PROMPT in r.prompt or UNAVAILABLE_PROMPT in r.prompt for r in requests):
            raise _failure(requests)
        return [self._draw(request) for request in requests]

    def _draw(self, request: GenerationRequest) -> GenerationResult:
        init = None
        if request.kind is JobKind.img2img and request.init_image:
            init = decode_base64_image(request.init_image).resize((request.width, request.height))
        images = [self._picture(request, seed, init) for seed in request.seeds]
        model = request.model or MOCK_MODEL
        return GenerationResult(images=images, seeds=request.seeds, model=model)

    def _picture(
        self, request: GenerationRequest, seed: int, init: Image.Image | None = None
    ) -> Image.Image:
        if not self.pictures:
            return placeholder(request, seed, init)
        with Image.open(self.pictures[seed % len(self.pictures)]) as picture:
            fitted = ImageOps.fit(picture.convert("RGB"), (request.width, request.height))
        if init is not None:
            fitted = Image.blend(fitted, init.convert("RGB"), 1 - request.strength)
        return fitted


def placeholder(
    request: GenerationRequest, seed: int, init: Image.Image | None = None
) -> Image.Image:
    """The same request and seed always give the same pixels."""
    rng = random.Random(seed)
    background = tuple(rng.randrange(40, 216) for _ in range(3))
    image = Image.new("RGB", (request.width, request.height), background)
    if init is not None:
        image = Image.blend(image, init, 1 - request.strength)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    text = "\n".join(
        [
            *textwrap.wrap(request.prompt, width=max(request.width // 7, 8))[:6],
            f"seed {seed}",
            f"{request.width}x{request.height}",
        ]
    )
    draw.multiline_text((6, 6), text, fill=(255, 255, 255), font=font, spacing=2)
    return image


MOCK_AUDIO_MODEL = "mock-audio"
MOCK_SAMPLE_RATE = 16_000
MOCK_VOICES = ("plain", "high")


class MockAudioBackend(Backend):
    """Sound without a model: a tone the seed picks, as long as asked (speech: as long as
    its words take), one "step" at a time. Tests and demos of audio jobs use it."""

    name = "mock-audio"
    capabilities = frozenset(
        {Capability.txt2audio, Capability.txt2speech, Capability.negative_prompt, Capability.seed}
    )

    def __init__(self, *, step_delay: float = 0.0, **_options: object) -> None:
        self.step_delay = step_delay

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name=MOCK_AUDIO_MODEL, backend=self.name, family="mock", loaded=True)]

    def voices(self) -> list[str]:
        return list(MOCK_VOICES)

    def check(self, request: GenerationRequest) -> None:
        super().check(request)
        if request.voice is not None and request.voice not in MOCK_VOICES:
            raise Unsupported(
                f"voice {request.voice!r} is not served here; voices are: {', '.join(MOCK_VOICES)}"
            )

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        return await asyncio.to_thread(self._generate, request, context)

    def _generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        steps = request.steps if request.kind is JobKind.txt2audio else 1
        for step in range(1, steps + 1):
            context.raise_if_cancelled()
            if self.step_delay:
                time.sleep(self.step_delay)
            context.progress(step, steps, None)
        context.raise_if_cancelled()
        if FAIL_PROMPT in request.prompt or UNAVAILABLE_PROMPT in request.prompt:
            raise _failure([request])
        clips = [tone(request, seed) for seed in request.seeds]
        return GenerationResult(images=[], seeds=request.seeds, model=MOCK_AUDIO_MODEL, audio=clips)


def tone(request: GenerationRequest, seed: int) -> AudioClip:
    """The same request and seed always give the same samples."""
    rng = np.random.default_rng(seed)
    rate = request.sample_rate or MOCK_SAMPLE_RATE
    frames = round(request.audio_seconds * rate)
    pitch = float(rng.uniform(220, 880)) * (2 if request.voice == "high" else 1)
    t = np.arange(frames, dtype=np.float32) / rate
    wave = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.02 * rng.standard_normal(frames)
    channels = request.channels or 1
    return AudioClip(np.repeat(wave.astype(np.float32)[:, None], channels, axis=1), rate)
