"""Hosted queue APIs as a backend: submit, poll status, fetch the result, cancel.

One adapter, configured per ``service``, for the shape that fal's queue API, Replicate's
predictions API and Kandinsky's hosted API (FusionBrain) share:

- ``fal``: ``POST {url}/{app}`` (``Authorization: Key <key>``) -> ``request_id``,
  ``status_url``, ``response_url``, ``cancel_url``; status ``IN_QUEUE`` / ``IN_PROGRESS``
  / ``COMPLETED``; the result's ``images[].url``; cancel ``PUT cancel_url``.
- ``replicate``: ``POST {url}/v1/models/{app}/predictions`` (or ``/v1/predictions`` with
  ``version``; ``Authorization: Bearer <key>``) -> a prediction whose ``status`` is
  ``starting`` / ``processing`` / ``succeeded`` / ``failed`` / ``canceled``, ``output`` the
  image URLs, ``urls.get`` / ``urls.cancel``; progress read from its ``logs`` ("12/30").
- ``fusionbrain``: ``POST {url}/key/api/v1/pipeline/run`` (multipart ``pipeline_id`` +
  ``params``; headers ``X-Key: Key <key>``, ``X-Secret: Secret <secret>``) -> ``uuid``;
  ``GET .../pipeline/status/{uuid}`` -> ``INITIAL`` / ``PROCESSING`` / ``DONE`` / ``FAIL``
  with base64 images and a ``censored`` flag (a censored result is ``engine_refused``). It
  has no cancel: a cancelled job stops being polled.

Status is polled with jittered backoff (quick first, then up to ``poll_max_seconds``).
Result images are downloaded only from the API's own host (with credentials) or a host of
``allowed_hosts`` (without them). ``input`` adds fields to every submission.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from easel.backends._remote import RemoteBackend, poll_delays, secret_from_env
from easel.backends.base import Capability, GenerationResult, RunContext
from easel.errors import Cancelled, EngineError, EngineRefused, InvalidRequest
from easel.jobs import GenerationRequest
from easel.payloads import Executor

Service = Literal["fal", "replicate", "fusionbrain"]
_STEP = re.compile(r"(\d+)\s*/\s*(\d+)")


@dataclass
class _Submitted:
    """Where a submitted request is: its status and result URLs, its cancel call."""

    id: str
    status_url: str
    result_url: str | None = None
    cancel: Callable[[], Awaitable[object]] | None = None
    data: dict[str, Any] = field(default_factory=dict)


class HostedBackend(RemoteBackend):
    kind = "hosted"
    capabilities = frozenset({Capability.txt2img, Capability.negative_prompt, Capability.seed})

    def __init__(
        self,
        *,
        service: Service,
        app: str | None = None,
        version: str | None = None,
        pipeline_id: str | None = None,
        secret_env: str | None = None,
        input: dict[str, Any] | None = None,
        allowed_hosts: list[str] | None = None,
        poll_max_seconds: float = 5.0,
        **options: Any,
    ) -> None:
        """``app``: fal's ``owner/app`` or Replicate's ``owner/model``; ``version``: a
        Replicate version id; ``pipeline_id``: FusionBrain's pipeline; ``secret_env``: the
        env var of FusionBrain's secret."""
        if service not in ("fal", "replicate", "fusionbrain"):
            raise InvalidRequest(
                f"hosted: unknown service {service!r}; use fal, replicate or fusionbrain"
            )
        if service == "fal" and not app:
            raise InvalidRequest("hosted fal: app is required (e.g. fal-ai/fast-sdxl)")
        if service == "replicate" and not (app or version):
            raise InvalidRequest("hosted replicate: app (owner/model) or version is required")
        if service == "fusionbrain" and not pipeline_id:
            raise InvalidRequest("hosted fusionbrain: pipeline_id is required")
        self.service = service
        self.secret = secret_from_env(secret_env, f"hosted {service}")
        options.setdefault("name", service)
        super().__init__(**options)
        self.app, self.version, self.pipeline_id = app, version, pipeline_id
        self.input = dict(input or {})
        self.allowed_hosts = list(allowed_hosts or [])
        self.poll_max_seconds = poll_max_seconds
        if service == "fusionbrain":
            self.capabilities = frozenset({Capability.txt2img, Capability.negative_prompt})
            self.executors = frozenset({Executor.automatic1111, Executor.kandinsky})

    def auth_headers(self) -> dict[str, str]:
        if self.api_key is None:
            return {}
        if self.service == "fal":
            return {"Authorization": f"Key {self.api_key}"}
        if self.service == "fusionbrain":
            return {"X-Key": f"Key {self.api_key}", "X-Secret": f"Secret {self.secret or ''}"}
        return {"Authorization": f"Bearer {self.api_key}"}

    # -- one job --------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        async with self.slot():
            # submitted whole even if cancelled meanwhile: then cancelled there at once
            submitted = await self._submit(request)
            done = await self.follow(
                self._until_done(submitted, request, context), context, interrupt=submitted.cancel
            )
            images = await self._images(submitted, done)
        context.progress(request.steps, request.steps, None)
        seeds = request.seeds[: len(images)]
        seeds += [request.seeds[-1]] * (len(images) - len(seeds))
        return GenerationResult(
            images=images, seeds=seeds, model=self.app or self.pipeline_id,
            info={"engine": f"{self.kind}:{self.service}", "request_id": submitted.id},
        )  # fmt: skip

    async def _submit(self, request: GenerationRequest) -> _Submitted:
        if self.service == "fal":
            body = {
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "image_size": {"width": request.width, "height": request.height},
                "num_inference_steps": request.steps,
                "guidance_scale": request.cfg_scale,
                "seed": request.seed,
                "num_images": request.batch_size,
                **self.input,
            }
            answer = (await self.call("POST", f"/{self.app}", json=body)).json()
            cancel_url = str(answer["cancel_url"])
            return _Submitted(
                id=str(answer["request_id"]),
                status_url=str(answer["status_url"]),
                result_url=str(answer["response_url"]),
                cancel=lambda: self.call("PUT", cancel_url),
            )
        if self.service == "replicate":
            body = {
                "input": {
                    "prompt": request.prompt,
                    "negative_prompt": request.negative_prompt,
                    "width": request.width,
                    "height": request.height,
                    "num_inference_steps": request.steps,
                    "guidance_scale": request.cfg_scale,
                    "seed": request.seed,
                    "num_outputs": request.batch_size,
                    **self.input,
                }
            }
            if self.version:
                body["version"] = self.version
                path = "/v1/predictions"
            else:
                path = f"/v1/models/{self.app}/predictions"
            prediction = (await self.call("POST", path, json=body)).json()
            urls = prediction.get("urls") or {}
            cancel_url = str(urls.get("cancel") or f"/v1/predictions/{prediction['id']}/cancel")
            return _Submitted(
                id=str(prediction["id"]),
                status_url=str(urls.get("get") or f"/v1/predictions/{prediction['id']}"),
                cancel=lambda: self.call("POST", cancel_url),
            )
        params = {
            "type": "GENERATE",
            "numImages": request.batch_size,
            "width": request.width,
            "height": request.height,
            "generateParams": {"query": request.prompt},
            **self.input,
        }
        if request.negative_prompt:
            params["negativePromptDecoder"] = request.negative_prompt
        files = {
            "pipeline_id": (None, str(self.pipeline_id)),
            "params": (None, json.dumps(params), "application/json"),
        }
        answer = (await self.call("POST", "/key/api/v1/pipeline/run", files=files)).json()
        uuid = str(answer["uuid"])
        return _Submitted(id=uuid, status_url=f"/key/api/v1/pipeline/status/{uuid}")

    async def _until_done(
        self, submitted: _Submitted, request: GenerationRequest, context: RunContext
    ) -> dict[str, Any]:
        delays = iter(poll_delays(first=self.poll_seconds, most=self.poll_max_seconds))
        while True:
            status = (await self.call("GET", submitted.status_url)).json()
            state = str(status.get("status", "")).upper()
            self._progress(status, request, context)
            if state in ("COMPLETED", "SUCCEEDED", "DONE"):
                return dict(status)
            if state in ("FAILED", "FAIL", "ERROR"):
                text = status.get("error") or status.get("errorDescription") or "the run failed"
                raise EngineError(f"backend {self.name!r}: {self.service} says: {text}")
            if state in ("CANCELED", "CANCELLED"):
                if context.cancelled:
                    raise Cancelled("the job was cancelled")
                raise EngineError(f"backend {self.name!r}: {self.service} cancelled the run")
            await asyncio.sleep(next(delays))

    def _progress(
        self, status: dict[str, Any], request: GenerationRequest, context: RunContext
    ) -> None:
        logs = status.get("logs")
        if isinstance(logs, list):  # fal: [{"message": ...}]
            logs = "\n".join(str(line.get("message", line)) for line in logs if line)
        if isinstance(logs, str) and (steps := _STEP.findall(logs)):
            step, total = (int(n) for n in steps[-1])
            if 0 < step <= total:
                context.progress(step, total, None)

    async def _images(self, submitted: _Submitted, done: dict[str, Any]) -> list[Image.Image]:
        if self.service == "fusionbrain":
            result = done.get("result") or {}
            if done.get("censored") or result.get("censored"):
                raise EngineRefused(
                    f"backend {self.name!r}: fusionbrain censored the result (its content filter)"
                )
            encoded = result.get("files") or done.get("images") or []
            return [await asyncio.to_thread(self.decode, str(b)) for b in encoded]
        if self.service == "fal":
            result = (await self.call("GET", str(submitted.result_url))).json()
            urls = [str(image["url"]) for image in result.get("images") or []]
        else:
            output = done.get("output")
            urls = [str(u) for u in (output if isinstance(output, list) else [output]) if u]
        images = [await self.fetch_image(url, allowed_hosts=self.allowed_hosts) for url in urls]
        if not images:
            raise EngineError(f"backend {self.name!r}: {self.service} returned no images")
        return images
