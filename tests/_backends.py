"""Test backends built on the packaged mock."""

from __future__ import annotations

from PIL import Image

from easel.backends.base import GenerationResult, RunContext
from easel.backends.mock import MockBackend
from easel.jobs import GenerationRequest


class PreviewMock(MockBackend):
    """The mock, drawing a preview at every step (as the diffusers backend does)."""

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        inner = context.on_progress

        def with_preview(step: int, total: int, preview: Image.Image | None) -> None:
            inner(step, total, Image.new("RGB", (32, 24), (200, 10 * step % 256, 0)))

        own = RunContext(on_progress=with_preview, cancel_event=context.cancel_event)
        return await super().generate(request, own)
