"""A ComfyUI server as a backend: API-format workflows, its websocket, its history.

A job runs a workflow: the backend's ``workflow`` template (an API-format JSON file, as
ComfyUI's "Save (API Format)" writes it) with named placeholders filled in, or a raw
workflow the request carries (``executor = "comfyui"``, ``payload``; its sampler seed is
set to the seed easel records). Placeholders are string values ``"{{name}}"``: one that is
the whole value takes the field's type (``"{{seed}}"`` becomes a number), one inside a
longer string is replaced as text. Names: ``prompt``, ``negative_prompt``, ``seed``,
``steps``, ``cfg``, ``width``, ``height``, ``batch_size``, ``sampler``, ``scheduler``,
``checkpoint``, ``init_image`` (uploaded through ``/upload/image`` first), ``denoise``.
What the template holds decides what the backend can do (``init_image``: img2img).

The run follows the wire facts of a real server (``protocols/comfyui.md``): open
``/ws?clientId=C`` first, ``POST /prompt`` with that ``client_id`` (without it no execution
events are sent), relay ``progress`` as steps and binary preview frames (types 1 and 4)
as previews, fail on ``execution_error`` with the engine's exception text, and finish on
``executing`` with ``node: null`` (history is stored only then), reading the outputs from
``/history/{id}`` and fetching each image from ``/view``. Cancelling deletes the prompt
from ``/queue`` while it waits, or ``POST /interrupt`` with its id once it runs.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import struct
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from PIL import Image
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, WebSocketException

from easel.backends._remote import RemoteBackend
from easel.backends.base import Capability, GenerationResult, RunContext
from easel.errors import (
    BackendUnavailable,
    Cancelled,
    EngineError,
    InvalidRequest,
    Unsupported,
)
from easel.images import decode_base64_image
from easel.jobs import GenerationRequest, JobKind
from easel.payloads import SAMPLER_NODES, SEED_INPUTS, Executor, comfyui_nodes
from easel.samplers import SamplerName, parse_sampler

PLACEHOLDERS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "cfg",
    "width",
    "height",
    "batch_size",
    "sampler",
    "scheduler",
    "checkpoint",
    "init_image",
    "denoise",
)
PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4


def comfy_sampler(name: str) -> tuple[str, str]:
    """easel's sampler name -> ComfyUI's (``sampler_name``, ``scheduler``), from the one
    sampler table (:mod:`easel.samplers`); ComfyUI's own spellings are read too."""
    try:
        comfy = parse_sampler(name).comfyui
    except InvalidRequest as exc:
        raise Unsupported(f"ComfyUI cannot run sampler {name!r}: {exc.message}") from None
    if comfy is None:
        raise Unsupported(f"ComfyUI has no equivalent of sampler {name!r}")
    return comfy


def fill(template: Any, values: dict[str, Any]) -> Any:
    """The template with ``"{{name}}"`` placeholders replaced (see the module doc)."""
    if isinstance(template, dict):
        return {key: fill(value, values) for key, value in template.items()}
    if isinstance(template, list):
        return [fill(value, values) for value in template]
    if isinstance(template, str) and "{{" in template:
        stripped = template.strip()
        if stripped.startswith("{{") and stripped.endswith("}}"):
            name = stripped[2:-2].strip()
            if name in values:
                return values[name]
        for name, value in values.items():
            template = template.replace("{{" + name + "}}", str(value))
    return template


def placeholders_in(template: Any) -> set[str]:
    text = json.dumps(template)
    return {name for name in PLACEHOLDERS if "{{" + name + "}}" in text}


class ComfyUIBackend(RemoteBackend):
    kind = "comfyui"
    executors = frozenset({Executor.comfyui, Executor.automatic1111})

    def __init__(
        self,
        *,
        workflow: str | Path | dict[str, Any] | None = None,
        img2img_workflow: str | Path | dict[str, Any] | None = None,
        checkpoint: str | None = None,
        **options: Any,
    ) -> None:
        """``workflow``: the template (a path, or the workflow itself); ``img2img_workflow``:
        the one for img2img (else ``workflow``, if it has ``{{init_image}}``);
        ``checkpoint``: the ``{{checkpoint}}`` of requests that name no model."""
        super().__init__(**options)
        self.template = self._template(workflow)
        self.img2img_template = self._template(img2img_workflow)
        self.checkpoint = checkpoint
        self.queue_remaining: int | None = None
        found = placeholders_in([self.template, self.img2img_template])
        capabilities = {Capability.txt2img, Capability.seed, Capability.preview}
        if "init_image" in found:
            capabilities.add(Capability.img2img)
        if "negative_prompt" in found:
            capabilities.add(Capability.negative_prompt)
        if "sampler" in found:
            capabilities.add(Capability.scheduler)
        self.capabilities = frozenset(capabilities)
        if checkpoint and not self.configured_models:
            self.configured_models = [checkpoint]

    def _template(self, workflow: str | Path | dict[str, Any] | None) -> dict[str, Any] | None:
        if workflow is None:
            return None
        if isinstance(workflow, str | Path):
            path = Path(workflow)
            try:
                loaded = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise InvalidRequest(f"backend {self.name!r}: cannot read {path}: {exc}") from exc
        else:
            loaded = workflow
        try:
            comfyui_nodes(loaded)
        except (ValueError, AttributeError) as exc:
            raise InvalidRequest(f"backend {self.name!r}: workflow: {exc}") from None
        return dict(loaded)

    async def refresh(self) -> None:
        """``/system_stats`` (health), the checkpoints, and the queue's length."""
        await self.call("GET", "/system_stats")
        queue = (await self.call("GET", "/prompt")).json()
        self.queue_remaining = int((queue.get("exec_info") or {}).get("queue_remaining", 0))
        checkpoints = (await self.call("GET", "/models/checkpoints")).json()
        if isinstance(checkpoints, list):
            self.engine_models = [str(name) for name in checkpoints]

    def check(self, request: GenerationRequest) -> None:
        super().check(request)
        if request.executor is not Executor.comfyui and self.template is None:
            raise Unsupported(
                f"backend {self.name!r} has no workflow template; send a ComfyUI workflow "
                "(executor comfyui, payload) or give the backend a workflow"
            )

    def sampler_refusal(self, sampler: SamplerName, model: str | None) -> str | None:
        """ComfyUI runs the samplers with a KSampler name and scheduler."""
        return None if sampler.comfyui is not None else "ComfyUI's KSampler has no equivalent"

    async def workflow_for(self, request: GenerationRequest) -> dict[str, Any]:
        if request.executor is Executor.comfyui and request.payload is not None:
            graph = copy.deepcopy(request.payload)
            for node in comfyui_nodes(graph).values():
                inputs = node["inputs"]
                if node["class_type"] in SAMPLER_NODES or node["class_type"] == "RandomNoise":
                    for key in SEED_INPUTS:
                        if isinstance(inputs.get(key), int):
                            inputs[key] = request.seed
            return graph
        sampler, scheduler = comfy_sampler(request.scheduler or "euler")
        values: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "steps": request.steps,
            "cfg": request.cfg_scale,
            "width": request.width,
            "height": request.height,
            "batch_size": request.batch_size,
            "sampler": sampler,
            "scheduler": scheduler,
            "checkpoint": request.model or self.checkpoint or "",
            "denoise": request.strength if request.kind is not JobKind.txt2img else 1.0,
        }
        template = self.template
        if request.kind is not JobKind.txt2img and request.init_image:
            values["init_image"] = await self.upload(request.init_image)
            template = self.img2img_template or template
        filled: dict[str, Any] = fill(template, values)
        return filled

    async def upload(self, image: str) -> str:
        """An init image into ComfyUI's input folder; returns the name a LoadImage reads."""
        png = await asyncio.to_thread(_png, image)
        name = f"easel-{uuid.uuid4().hex}.png"
        response = await self.call(
            "POST",
            "/upload/image",
            files={"image": (name, png, "image/png")},
            data={"overwrite": "true", "type": "input"},
        )
        answer = response.json()
        subfolder = answer.get("subfolder") or ""
        return f"{subfolder}/{answer['name']}" if subfolder else str(answer["name"])

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        graph = await self.workflow_for(request)
        client_id = uuid.uuid4().hex
        async with self.slot(), self._socket(client_id) as socket:
            answer = await self.call(
                "POST", "/prompt", json={"prompt": graph, "client_id": client_id}
            )
            prompt_id = str(answer.json()["prompt_id"])
            run = _Run(self, prompt_id, socket, context)
            await self.follow(run.until_done(), context, interrupt=run.interrupt)
            outputs = await self._outputs(prompt_id)
            images = [await self._view(ref) for ref in outputs]
        if not images:
            raise EngineError(f"backend {self.name!r}: the workflow saved no images")
        seeds = request.seeds[: len(images)]
        seeds += [request.seeds[-1]] * (len(images) - len(seeds))
        return GenerationResult(
            images=images, seeds=seeds, model=request.model or self.checkpoint,
            info={"engine": self.kind, "prompt_id": prompt_id},
        )  # fmt: skip

    def _socket(self, client_id: str) -> Any:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        url = urlunsplit((scheme, parts.netloc, parts.path + "/ws", f"clientId={client_id}", ""))
        headers = {k: v for k, v in self.http.headers.items() if k.lower() == "authorization"}
        return _Connect(self, url, headers)

    async def _outputs(self, prompt_id: str) -> list[dict[str, Any]]:
        """The saved images of a finished prompt (history can lag a moment: asked again)."""
        for delay in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
            await asyncio.sleep(delay)
            history = (await self.call("GET", f"/history/{prompt_id}")).json()
            if prompt_id in history:
                outputs = history[prompt_id].get("outputs") or {}
                refs = [
                    ref
                    for output in outputs.values()
                    for ref in output.get("images") or []
                    if isinstance(ref, dict) and "filename" in ref
                ]
                saved = [ref for ref in refs if ref.get("type", "output") == "output"]
                return saved or refs
        raise EngineError(f"backend {self.name!r}: prompt {prompt_id} has no history")

    async def _view(self, ref: dict[str, Any]) -> Image.Image:
        params = {
            "filename": ref["filename"],
            "subfolder": ref.get("subfolder", ""),
            "type": ref.get("type", "output"),
        }
        response = await self.call("GET", "/view", params=params)
        return await asyncio.to_thread(self.decode, response.content)


class _Connect:
    """``async with``: the websocket, with connection failures mapped as HTTP's are."""

    def __init__(self, backend: ComfyUIBackend, url: str, headers: dict[str, str]) -> None:
        self.backend, self.url, self.headers = backend, url, headers
        self.socket: ClientConnection | None = None

    async def __aenter__(self) -> ClientConnection:
        try:
            self.socket = await connect(
                self.url,
                additional_headers=self.headers,
                open_timeout=self.backend.connect_timeout,
                max_size=64 * 1024 * 1024,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidStatus) as exc:
            raise BackendUnavailable(
                f"backend {self.backend.name!r}: its websocket is unreachable "
                f"({type(exc).__name__})"
            ) from exc
        return self.socket

    async def __aexit__(self, *exc: object) -> None:
        if self.socket is not None:
            await self.socket.close()


class _Run:
    """One prompt's messages on the socket, until ``executing`` with ``node: null``."""

    def __init__(
        self,
        backend: ComfyUIBackend,
        prompt_id: str,
        socket: ClientConnection,
        context: RunContext,
    ) -> None:
        self.backend, self.prompt_id, self.socket, self.context = (
            backend, prompt_id, socket, context,
        )  # fmt: skip
        self.started = False
        self.step = (0, 0)

    async def until_done(self) -> None:
        try:
            async for message in self.socket:
                if isinstance(message, bytes):
                    self._preview(message)
                elif self._handle(json.loads(message)):
                    return
        except WebSocketException as exc:
            raise BackendUnavailable(
                f"backend {self.backend.name!r}: the websocket closed midway ({exc})"
            ) from exc
        raise BackendUnavailable(f"backend {self.backend.name!r}: the websocket closed midway")

    def _handle(self, message: dict[str, Any]) -> bool:
        kind, data = message.get("type"), message.get("data") or {}
        if kind == "status":
            info = (data.get("status") or {}).get("exec_info") or {}
            if "queue_remaining" in info:
                self.backend.queue_remaining = int(info["queue_remaining"])
            return False
        if data.get("prompt_id") != self.prompt_id:
            return False
        if kind == "execution_start":
            self.started = True
        elif kind == "progress":
            self.step = (int(data.get("value") or 0), int(data.get("max") or 0))
            self.context.progress(*self.step, None)
        elif kind == "execution_error":
            raise EngineError(
                f"backend {self.backend.name!r}: node {data.get('node_id')} "
                f"({data.get('node_type')}) failed: {data.get('exception_type', '')}: "
                f"{data.get('exception_message', '')}".strip()
            )
        elif kind == "execution_interrupted":
            if self.context.cancelled:
                raise Cancelled("the job was cancelled")
            raise EngineError(f"backend {self.backend.name!r}: the engine interrupted the run")
        elif kind == "executing" and data.get("node") is None:
            return True
        return False

    def _preview(self, frame: bytes) -> None:
        if len(frame) < 8 or not self.step[1]:
            return
        (event,) = struct.unpack_from(">I", frame)
        if event == PREVIEW_IMAGE:
            data = frame[8:]
        elif event == PREVIEW_IMAGE_WITH_METADATA:
            (size,) = struct.unpack_from(">I", frame, 4)
            try:
                metadata = json.loads(frame[8 : 8 + size])
            except json.JSONDecodeError:
                return
            if metadata.get("prompt_id") not in (None, self.prompt_id):
                return
            data = frame[8 + size :]
        else:
            return
        try:
            preview = self.backend.decode(data)
        except Exception:  # a frame we cannot read is no reason to fail the job
            return
        self.context.progress(*self.step, preview)

    async def interrupt(self) -> None:
        """Delete the prompt while it waits; interrupt it (by id) once it runs."""
        if not self.started:
            await self.backend.call("POST", "/queue", json={"delete": [self.prompt_id]})
        await self.backend.call("POST", "/interrupt", json={"prompt_id": self.prompt_id})


def _png(image: str) -> bytes:
    buffer = io.BytesIO()
    decode_base64_image(image).save(buffer, "PNG")
    return buffer.getvalue()
