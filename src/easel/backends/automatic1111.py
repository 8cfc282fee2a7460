"""Automatic1111 (and Forge, SD.Next, or another easel) as a backend, over its web API.

A job becomes one ``POST /sdapi/v1/txt2img`` or ``/img2img`` (inpaint: ``mask``), sent
with ``force_task_id`` so its progress can be asked for by task: ``POST
/internal/progress`` (live previews as data URLs) where the engine has it, else the global
``GET /sdapi/v1/progress`` (``current_image``). A request carrying a raw A1111 ``payload``
is sent unchanged but for the seed easel recorded. The model is switched per request with
``override_settings.sd_model_checkpoint``; the checkpoint the engine has loaded (from
``/sdapi/v1/options``, then from each answer's ``info``) is reported for model affinity.

Cancelling a running job calls ``POST /sdapi/v1/interrupt``, only while the engine says
our task is the one running or queued (A1111's interrupt stops whatever runs). HTTP Basic
auth (A1111's ``--api-auth``) comes from ``username`` + ``password_env``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from PIL.Image import Image

from easel.backends._remote import RemoteBackend
from easel.backends.base import Capability, GenerationResult, RunContext
from easel.errors import EngineError
from easel.images import decode_base64_image
from easel.jobs import GenerationRequest, JobKind
from easel.payloads import Executor
from easel.samplers import SamplerName, parse_sampler


class Automatic1111Backend(RemoteBackend):
    kind = "automatic1111"
    capabilities = frozenset(
        {
            Capability.txt2img,
            Capability.img2img,
            Capability.inpaint,
            Capability.negative_prompt,
            Capability.seed,
            Capability.scheduler,
            Capability.preview,
        }
    )

    def __init__(self, *, user_header: bool = True, **options: Any) -> None:
        """``user_header``: send the job's user as ``X-Easel-User`` (an easel engine then
        shares its queue fairly between the users behind this backend)."""
        super().__init__(**options)
        self.user_header = user_header
        self._internal_progress = True

    def sampler_refusal(self, sampler: SamplerName, model: str | None) -> str | None:
        """Automatic1111 runs its own samplers with its own schedule types."""
        return None if sampler.in_a1111 else "Automatic1111 has no such sampler or schedule"

    async def refresh(self) -> None:
        models = (await self.call("GET", "/sdapi/v1/sd-models")).json()
        self.engine_models = [str(m.get("model_name") or m.get("title")) for m in models]
        options = (await self.call("GET", "/sdapi/v1/options")).json()
        if checkpoint := options.get("sd_model_checkpoint"):
            self.loaded_model = _model_name(str(checkpoint))

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        task_id = f"task(easel-{uuid.uuid4().hex})"
        payload = self.payload_for(request, task_id)
        route = "/sdapi/v1/img2img" if payload.get("init_images") else "/sdapi/v1/txt2img"
        headers = {"X-Easel-User": request.user_id} if self.user_header else {}
        watch = _Watch(self, task_id, request.steps, context, headers)
        async with self.slot():
            response = await self.follow(
                self.call("POST", route, json=payload, headers=headers),
                context,
                interrupt=watch.interrupt,
                poll=watch.poll,
            )
        return await asyncio.to_thread(self._result, request, response.json())

    def payload_for(self, request: GenerationRequest, task_id: str) -> dict[str, Any]:
        """The body sent: the caller's own payload (with the recorded seed), or a translation."""
        if request.payload is not None and request.executor is Executor.automatic1111:
            payload = dict(request.payload)
            payload["seed"] = request.seed
        else:
            payload = {
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "width": request.width,
                "height": request.height,
                "steps": request.steps,
                "cfg_scale": request.cfg_scale,
                "seed": request.seed,
                "batch_size": request.batch_size,
                "n_iter": 1,
                "send_images": True,
                "save_images": False,
            }
            if request.scheduler:
                sampler = parse_sampler(request.scheduler)
                payload["sampler_name"] = sampler.a1111_label
                if (schedule := sampler.a1111[1]) != "Automatic":
                    payload["scheduler"] = schedule
            if request.kind in (JobKind.img2img, JobKind.inpaint):
                payload["init_images"] = [request.init_image]
                payload["denoising_strength"] = request.strength
            if request.kind is JobKind.inpaint:
                payload["mask"] = request.mask_image
            if request.model:
                payload["override_settings"] = {"sd_model_checkpoint": request.model}
        payload["force_task_id"] = task_id
        return payload

    def _result(self, request: GenerationRequest, body: dict[str, Any]) -> GenerationResult:
        images = [self.decode(data) for data in body.get("images") or []]
        info = _info(body.get("info"))
        if info.get("interrupted") and not images:
            raise EngineError(f"backend {self.name!r}: the engine interrupted the job")
        if not images:
            raise EngineError(f"backend {self.name!r}: the engine returned no images")
        model = info.get("sd_model_name")
        if isinstance(model, str) and model:
            self.loaded_model = _model_name(model)
        seeds = info.get("all_seeds")
        if not (isinstance(seeds, list) and len(seeds) >= len(images)):
            seeds = [(request.seed or 0) + i for i in range(len(images))]
        return GenerationResult(
            images=images,
            seeds=[int(s) for s in seeds[: len(images)]],
            model=self.loaded_model or request.model,
            info={"engine": self.kind, "backend": self.name},
        )


class _Watch:
    """One job's progress and interrupt at the engine."""

    def __init__(
        self,
        backend: Automatic1111Backend,
        task_id: str,
        steps: int,
        context: RunContext,
        headers: dict[str, str],
    ) -> None:
        self.backend, self.task_id, self.steps = backend, task_id, steps
        self.context, self.headers = context, headers
        self.preview_id = -1
        self.last: tuple[int, int] | None = None

    async def poll(self) -> None:
        if self.backend._internal_progress:
            body = {"id_task": self.task_id, "id_live_preview": self.preview_id}
            try:
                response = await self.backend.call(
                    "POST", "/internal/progress", json=body, headers=self.headers
                )
            except EngineError:  # 404: no per-task progress here (Forge API-only, old A1111)
                self.backend._internal_progress = False
            else:
                return self._internal(response.json())
        response = await self.backend.call("GET", "/sdapi/v1/progress", headers=self.headers)
        self._global(response.json())

    def _internal(self, data: dict[str, Any]) -> None:
        if not data.get("active"):
            return
        step = round(float(data.get("progress") or 0) * self.steps)
        preview = None
        if isinstance(live := data.get("live_preview"), str) and live:
            preview = _image(live)
            self.preview_id = int(data.get("id_live_preview") or self.preview_id)
        self._report(step, self.steps, preview)

    def _global(self, data: dict[str, Any]) -> None:
        state = data.get("state") or {}
        step, total = int(state.get("sampling_step") or 0), int(state.get("sampling_steps") or 0)
        if not total:
            return
        current = data.get("current_image")
        self._report(step, total, _image(current) if isinstance(current, str) else None)

    def _report(self, step: int, total: int, preview: Image | None) -> None:
        if (step, total) == self.last and preview is None:
            return
        self.last = (step, total)
        self.context.progress(step, total, preview)

    async def interrupt(self) -> None:
        """Stop the engine's run, if it is ours (A1111's interrupt stops whatever runs)."""
        if self.backend._internal_progress:
            try:
                response = await self.backend.call(
                    "POST",
                    "/internal/progress",
                    json={"id_task": self.task_id},
                    headers=self.headers,
                )
            except EngineError:
                pass
            else:
                data = response.json()
                if not (data.get("active") or data.get("queued")):
                    return
        await self.backend.call("POST", "/sdapi/v1/interrupt", headers=self.headers)


def _info(info: Any) -> dict[str, Any]:
    if isinstance(info, dict):
        return info
    try:
        parsed = json.loads(info) if isinstance(info, str) else {}
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _image(data: str) -> Image | None:
    """A preview (base64 or a data: URL); an unreadable one is skipped, not fatal."""
    try:
        if data.startswith("data:"):
            data = data.partition(",")[2]
        return decode_base64_image(data)
    except Exception:
        return None


def _model_name(title: str) -> str:
    """A1111 titles read ``name.safetensors [hash]``; easel names models ``name``."""
    name = title.split(" [")[0].strip()
    for suffix in (".safetensors", ".ckpt"):
        name = name.removesuffix(suffix)
    return name
