"""A stand-in ComfyUI server for tests: ComfyUI itself (torch, its nodes) cannot run here.

It follows the protocol a real ComfyUI 0.3.64 server was observed to speak
(``/work/shared/protocols/comfyui.md``) for a handful of nodes (CheckpointLoaderSimple,
CLIPTextEncode, EmptyLatentImage, LoadImage, VAEEncode, KSampler, VAEDecode, SaveImage):
``POST /prompt`` validates (400 ``invalid_prompt`` / ``prompt_no_outputs`` with
``node_errors``) and queues; one prompt runs at a time; ``/ws?clientId=`` gets ``status``
on connect and, for prompts posted with that ``client_id`` only, ``execution_start``,
``execution_cached``, ``executing``, ``progress`` per KSampler step, binary preview frames
(type 1, PNG) every ``preview_every`` steps, ``executed`` for SaveImage,
``execution_success`` | ``execution_error`` | ``execution_interrupted``, ``status``, and
last ``executing`` with ``node: null`` (history is stored just before it). ``/history``,
``/view`` (400 for ``..``, 404 for a missing file), ``/queue`` (delete), ``/interrupt``
(by ``prompt_id``: only the running prompt), ``/upload/image``, ``/system_stats``,
``/models/checkpoints``, ``GET /prompt``. A checkpoint named ``missing.safetensors``
fails at run time with ``execution_error`` (FileNotFoundError), as a real loader does.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from PIL import Image

KNOWN_NODES = {
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "LoadImage",
    "VAEEncode",
    "KSampler",
    "VAEDecode",
    "SaveImage",
}
CHECKPOINTS = ["tiny.safetensors", "missing.safetensors"]


@dataclass
class StandIn:
    """What a test can look at afterwards: prompts received, interrupts, deletions."""

    root: Path
    step_delay: float = 0.01
    preview_every: int = 2
    prompts: list[dict[str, Any]] = field(default_factory=list)
    interrupts: list[str | None] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    history: dict[str, dict[str, Any]] = field(default_factory=dict)
    sockets: dict[str, WebSocket] = field(default_factory=dict)
    pending: list[tuple[int, str, dict[str, Any], str | None]] = field(default_factory=list)
    running: str | None = None
    interrupted: str | None = None
    counter: int = 0
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


def create_app(root: Path, *, step_delay: float = 0.01, preview_every: int = 2) -> FastAPI:
    state = StandIn(root, step_delay, preview_every)
    (root / "output").mkdir(parents=True, exist_ok=True)
    (root / "input").mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        state.wakeup = asyncio.Event()
        runner = asyncio.create_task(_run_forever(state))
        yield
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    app = FastAPI(lifespan=lifespan)
    app.state.comfy = state

    @app.post("/prompt")
    async def post_prompt(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return Response("invalid JSON", status_code=500, media_type="text/plain")
        graph = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(graph, dict):
            return _error(400, "no_prompt", "No prompt provided")
        for node_id, node in graph.items():
            if node.get("class_type") not in KNOWN_NODES:
                return _error(
                    400,
                    "invalid_prompt",
                    f"Cannot execute because node {node.get('class_type')} does not exist.",
                    {"node_id": node_id},
                )
        if not any(node["class_type"] == "SaveImage" for node in graph.values()):
            return _error(400, "prompt_no_outputs", "Prompt has no outputs")
        prompt_id = str(uuid.uuid4())
        state.counter += 1
        state.prompts.append(body)
        state.pending.append((state.counter, prompt_id, graph, body.get("client_id")))
        state.wakeup.set()
        return JSONResponse({"prompt_id": prompt_id, "number": state.counter, "node_errors": {}})

    @app.get("/prompt")
    async def get_prompt() -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": _remaining(state)}}

    @app.get("/queue")
    async def get_queue() -> dict[str, Any]:
        running = [[0, state.running, {}, {}, []]] if state.running else []
        pending = [[n, p, g, {}, []] for n, p, g, _ in state.pending]
        return {"queue_running": running, "queue_pending": pending}

    @app.post("/queue")
    async def post_queue(request: Request) -> Response:
        body = await request.json()
        for prompt_id in body.get("delete", []):
            before = len(state.pending)
            state.pending = [item for item in state.pending if item[1] != prompt_id]
            if len(state.pending) < before:
                state.deleted.append(prompt_id)
        return Response(status_code=200)

    @app.post("/interrupt")
    async def interrupt(request: Request) -> Response:
        body: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            body = await request.json()
        wanted = body.get("prompt_id") if isinstance(body, dict) else None
        state.interrupts.append(wanted)
        if state.running is not None and wanted in (None, state.running):
            state.interrupted = state.running
        return Response(status_code=200)

    @app.get("/history/{prompt_id}")
    async def history(prompt_id: str) -> dict[str, Any]:
        return {prompt_id: state.history[prompt_id]} if prompt_id in state.history else {}

    @app.get("/view")
    async def view(filename: str, subfolder: str = "", type: str = "output") -> Response:
        if ".." in filename or ".." in subfolder:
            return Response(status_code=400)
        path = state.root / type / subfolder / filename
        if not path.is_file():
            return Response(status_code=404)
        return Response(path.read_bytes(), media_type="image/png")

    @app.post("/upload/image")
    async def upload(
        image: Annotated[UploadFile, File()],
        overwrite: Annotated[str, Form()] = "false",
        type: Annotated[str, Form()] = "input",
    ) -> dict[str, str]:
        name = Path(image.filename or "upload.png").name
        (state.root / "input" / name).write_bytes(await image.read())
        return {"name": name, "subfolder": "", "type": "input"}

    @app.get("/system_stats")
    async def system_stats() -> dict[str, Any]:
        return {"system": {"os": "posix", "comfyui_version": "0.3.64-standin"}, "devices": []}

    @app.get("/models/checkpoints")
    async def checkpoints() -> list[str]:
        return CHECKPOINTS

    @app.websocket("/ws")
    async def ws(socket: WebSocket, clientId: str | None = None) -> None:
        await socket.accept()
        sid = clientId or uuid.uuid4().hex
        state.sockets[sid] = socket
        await socket.send_json(
            {
                "type": "status",
                "data": {
                    "status": {"exec_info": {"queue_remaining": _remaining(state)}},
                    "sid": sid,
                },
            }
        )
        try:
            while True:
                await socket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            if state.sockets.get(sid) is socket:
                del state.sockets[sid]

    return app


def _error(status: int, type: str, message: str, extra: dict[str, Any] | None = None) -> Response:
    body = {
        "error": {"type": type, "message": message, "details": "", "extra_info": extra or {}},
        "node_errors": {},
    }
    return JSONResponse(body, status_code=status)


def _remaining(state: StandIn) -> int:
    return len(state.pending) + (1 if state.running else 0)


async def _run_forever(state: StandIn) -> None:
    while True:
        await state.wakeup.wait()
        state.wakeup.clear()
        while state.pending:
            _, prompt_id, graph, client_id = state.pending.pop(0)
            state.running = prompt_id
            try:
                await _execute(state, prompt_id, graph, client_id)
            finally:
                state.running = None
                state.interrupted = None


async def _execute(
    state: StandIn, prompt_id: str, graph: dict[str, Any], client_id: str | None
) -> None:
    async def send(kind: str, data: dict[str, Any]) -> None:
        socket = state.sockets.get(client_id or "")
        if socket is not None:
            with contextlib.suppress(Exception):
                await socket.send_json({"type": kind, "data": data})

    async def send_bytes(data: bytes) -> None:
        socket = state.sockets.get(client_id or "")
        if socket is not None:
            with contextlib.suppress(Exception):
                await socket.send_bytes(data)

    async def broadcast_status() -> None:
        for socket in list(state.sockets.values()):
            with contextlib.suppress(Exception):
                await socket.send_json(
                    {
                        "type": "status",
                        "data": {"status": {"exec_info": {"queue_remaining": _remaining(state)}}},
                    }
                )

    await broadcast_status()
    await send("execution_start", {"prompt_id": prompt_id})
    await send("execution_cached", {"nodes": [], "prompt_id": prompt_id})
    executed: list[str] = []
    outputs: dict[str, Any] = {}
    width, height, batch, seed, color = 512, 512, 1, 0, None
    status = "success"
    for node_id, node in graph.items():
        inputs, kind = node["inputs"], node["class_type"]
        await send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
        if kind == "CheckpointLoaderSimple" and inputs.get("ckpt_name") == "missing.safetensors":
            await send(
                "execution_error",
                {
                    "prompt_id": prompt_id, "node_id": node_id, "node_type": kind,
                    "executed": executed, "exception_type": "FileNotFoundError",
                    "exception_message": f"Model in folder 'checkpoints' with filename "
                    f"'{inputs['ckpt_name']}' not found.", "traceback": [],
                },
            )  # fmt: skip
            status = "error"
            break
        if kind == "EmptyLatentImage":
            width, height = int(inputs["width"]), int(inputs["height"])
            batch = int(inputs.get("batch_size", 1))
        if kind == "LoadImage":
            with Image.open(state.root / "input" / inputs["image"]) as image:
                width, height = image.size
                color = image.convert("RGB").resize((1, 1)).getpixel((0, 0))
        if kind == "KSampler":
            seed, steps = int(inputs["seed"]), int(inputs["steps"])
            for step in range(1, steps + 1):
                if state.interrupted == prompt_id:
                    break
                await asyncio.sleep(state.step_delay)
                await send(
                    "progress",
                    {"value": step, "max": steps, "prompt_id": prompt_id, "node": node_id},
                )
                if state.preview_every and step % state.preview_every == 0:
                    await send_bytes(struct.pack(">II", 1, 2) + _png(_picture(seed, 64, 64, color)))
            if state.interrupted == prompt_id:
                await send(
                    "execution_interrupted",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": kind,
                        "executed": executed,
                    },
                )
                status = "error"
                break
        if kind == "SaveImage":
            prefix = str(inputs.get("filename_prefix", "ComfyUI"))
            subfolder, _, stem = prefix.rpartition("/")
            images = []
            for index in range(batch):
                filename = f"{stem}_{uuid.uuid4().hex[:8]}_{index:05}_.png"
                folder = state.root / "output" / subfolder
                folder.mkdir(parents=True, exist_ok=True)
                (folder / filename).write_bytes(_png(_picture(seed + index, width, height, color)))
                images.append({"filename": filename, "subfolder": subfolder, "type": "output"})
            outputs[node_id] = {"images": images}
            await send(
                "executed",
                {
                    "node": node_id,
                    "display_node": node_id,
                    "output": {"images": images},
                    "prompt_id": prompt_id,
                },
            )
        executed.append(node_id)
    if status == "success":
        await send("execution_success", {"prompt_id": prompt_id})
    state.history[prompt_id] = {
        "prompt": [0, prompt_id, graph, {}, list(outputs)],
        "outputs": outputs if status == "success" else {},
        "status": {"status_str": status, "completed": status == "success", "messages": []},
        "meta": {},
    }
    state.running = None
    await broadcast_status()
    await send("executing", {"node": None, "prompt_id": prompt_id})


def _picture(seed: int, width: int, height: int, color: Any) -> Image.Image:
    rng = random.Random(seed)
    fill = color or tuple(rng.randrange(256) for _ in range(3))
    return Image.new("RGB", (width, height), fill)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
