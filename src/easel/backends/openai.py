"""Any OpenAI-compatible images API as a backend: ``/v1/images/generations`` and ``/edits``.

txt2img is one ``POST {url}/images/generations`` (``url`` ends with ``/v1``); img2img and
inpaint are one multipart ``POST {url}/images/edits`` (``image``, and ``mask`` where white
is repainted: OpenAI's mask is transparent where it repaints, so easel converts it).
The key comes from the env var named by ``api_key_env``. easel model names map onto the
engine's with ``model_map`` (``{"dalle": "dall-e-3"}``); a request naming no model gets
``model``. The engine reports no steps: a job shows one progress event, when its answer
arrives. Cancelling closes the call (an easel engine cancels the job when its client
leaves; OpenAI has no cancel).

A 400 from the engine (its safety system: "Your request was rejected as a result of our
safety system") is a permanent ``engine_refused`` with the engine's text; 429 and 5xx are
transient. ``extensions = true`` also sends easel's own fields (``seed``, ``steps``,
``negative_prompt``, ``cfg_scale``, ``scheduler``, ``strength``) for an engine that reads
them, such as another easel.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

from PIL import Image, ImageOps

from easel.backends._remote import RemoteBackend
from easel.backends.base import Capability, GenerationResult, RunContext
from easel.errors import EngineError
from easel.images import decode_base64_image
from easel.jobs import GenerationRequest, JobKind


class OpenAIBackend(RemoteBackend):
    kind = "openai"

    def __init__(
        self,
        *,
        model: str | None = None,
        model_map: dict[str, str] | None = None,
        response_format: str | None = "b64_json",
        extensions: bool = False,
        extra: dict[str, Any] | None = None,
        allowed_hosts: list[str] | None = None,
        **options: Any,
    ) -> None:
        """``extra``: fields added to every body (``quality``, ``style``...);
        ``allowed_hosts``: hosts result URLs may be downloaded from (besides the engine's)."""
        options.setdefault("models", list(model_map or {}))
        super().__init__(**options)
        self.model = model
        self.model_map = dict(model_map or {})
        self.response_format = response_format
        self.extensions = extensions
        self.extra = dict(extra or {})
        self.allowed_hosts = list(allowed_hosts or [])
        capabilities = {Capability.txt2img, Capability.img2img, Capability.inpaint}
        if extensions:
            capabilities |= {Capability.seed, Capability.negative_prompt, Capability.scheduler}
        self.capabilities = frozenset(capabilities)
        self.loaded_model = model

    def body_for(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "n": request.batch_size,
            "size": f"{request.width}x{request.height}",
            **self.extra,
        }
        model = self.model_map.get(request.model or "", request.model if request.model else None)
        if model or self.model:
            body["model"] = model or self.model
        if self.response_format:
            body["response_format"] = self.response_format
        if request.user_id:
            body["user"] = request.user_id
        if self.extensions:
            body.update(seed=request.seed, steps=request.steps, cfg_scale=request.cfg_scale)
            if request.negative_prompt:
                body["negative_prompt"] = request.negative_prompt
            if request.scheduler:
                body["scheduler"] = request.scheduler
            if request.kind is not JobKind.txt2img:
                body["strength"] = request.strength
        return body

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        body = self.body_for(request)
        if request.kind is JobKind.txt2img:
            call = self.call("POST", "images/generations", json=body)
        else:
            files = await asyncio.to_thread(_edit_files, request)
            form = {k: str(v) for k, v in body.items()}
            call = self.call("POST", "images/edits", data=form, files=files)
        async with self.slot():
            response = await self.follow(call, context)
            images = await self._images(response.json())
        context.progress(request.steps, request.steps, None)
        seeds = request.seeds[: len(images)]
        if len(seeds) < len(images):
            seeds += [request.seeds[-1]] * (len(images) - len(seeds))
        return GenerationResult(
            images=images, seeds=seeds, model=body.get("model"), info={"engine": self.kind}
        )

    async def _images(self, answer: dict[str, Any]) -> list[Image.Image]:
        images = []
        for item in answer.get("data") or []:
            if item.get("b64_json"):
                images.append(await asyncio.to_thread(self.decode, str(item["b64_json"])))
            elif item.get("url"):
                url = str(item["url"])
                images.append(await self.fetch_image(url, allowed_hosts=self.allowed_hosts))
        if not images:
            raise EngineError(f"backend {self.name!r}: the engine returned no images")
        return images


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _edit_files(request: GenerationRequest) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The multipart files of an edit: the image, and OpenAI's mask (transparent = repaint)."""
    init = decode_base64_image(request.init_image or "")
    files = [("image", ("image.png", _png(init), "image/png"))]
    if request.mask_image:
        white = decode_base64_image(request.mask_image).convert("L").resize(init.size)
        mask = init.convert("RGBA")
        mask.putalpha(ImageOps.invert(white))
        files.append(("mask", ("mask.png", _png(mask), "image/png")))
    return files
