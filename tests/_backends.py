"""Test backends built on the packaged mock."""

from __future__ import annotations

from PIL import Image

from easel.backends.base import GenerationResult, RunContext
from easel.backends.mock import MockBackend
from easel.jobs import GenerationRequest
from easel.samplers import DRAWTHINGS_SAMPLERS, SamplerName


class PreviewMock(MockBackend):
    """The mock, drawing a preview at every step (as the diffusers backend does)."""

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        inner = context.on_progress

        def with_preview(step: int, total: int, preview: Image.Image | None) -> None:
            inner(step, total, Image.new("RGB", (32, 24), (200, 10 * step % 256, 0)))

        own = RunContext(on_progress=with_preview, cancel_event=context.cancel_event)
        return await super().generate(request, own)


class DrawThingsSamplersMock(MockBackend):
    """The mock, running only Draw Things' samplers: a local engine that lacks some of
    A1111's (as the diffusers backend lacks "DPM fast"), without loading a pipeline."""

    def sampler_refusal(self, sampler: SamplerName, model: str | None) -> str | None:
        return None if sampler.drawthings is not None else "not one of Draw Things' samplers"

    def samplers(self, model: str | None = None) -> list[str]:
        return list(DRAWTHINGS_SAMPLERS)
