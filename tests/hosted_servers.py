"""Stand-ins for hosted queue APIs (they are on the internet; tests run on loopback).

Each follows its service's published protocol (``/work/shared/protocols/engines.md``):

- fal's queue API: ``POST /{owner}/{app}`` -> ``request_id``, ``status_url``,
  ``response_url``, ``cancel_url``; ``GET .../requests/{id}/status`` -> ``IN_QUEUE``
  (``queue_position``) | ``IN_PROGRESS`` (``logs``) | ``COMPLETED``; ``GET
  .../requests/{id}`` -> ``{images: [{url, width, height, content_type}], seed}``;
  ``PUT .../requests/{id}/cancel`` -> ``CANCELLATION_REQUESTED`` | ``ALREADY_COMPLETED``.
  Auth: ``Authorization: Key <key>``.
- Replicate's predictions API: ``POST /v1/models/{owner}/{name}/predictions`` -> a
  prediction ``{id, status: starting|processing|succeeded|failed|canceled, output, error,
  logs, urls: {get, cancel}}``; ``GET /v1/predictions/{id}``; ``POST
  /v1/predictions/{id}/cancel``. Auth: ``Authorization: Bearer <key>``.
- FusionBrain (Kandinsky): ``POST /key/api/v1/pipeline/run`` (multipart ``pipeline_id``,
  ``params`` JSON) -> ``{uuid, status: INITIAL}``; ``GET /key/api/v1/pipeline/status/{uuid}``
  -> ``INITIAL | PROCESSING | DONE | FAIL`` with ``result: {files: [base64], censored}``.
  Auth: ``X-Key: Key <key>``, ``X-Secret: Secret <secret>``. A query containing "censor"
  comes back censored; one containing "fail" fails.

A run takes ``steps`` ticks of ``step_delay`` seconds; its images are served by the same
server (``/files/{id}-{i}.png``), or by ``file_host`` when given (another host).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image


@dataclass
class Run:
    id: str
    body: dict[str, Any]
    width: int
    height: int
    count: int
    seed: int
    steps: int
    step: int = 0
    state: str = "queued"  # queued, running, done, failed, cancelled
    error: str | None = None
    censored: bool = False


@dataclass
class Hosted:
    """What a test can inspect: runs by id, the auth headers seen, cancel calls."""

    service: str
    step_delay: float = 0.01
    runs: dict[str, Run] = field(default_factory=dict)
    auth: list[dict[str, str]] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    file_host: str | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self, run: Run) -> None:
        self.runs[run.id] = run
        task = asyncio.get_running_loop().create_task(self._advance(run))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _advance(self, run: Run) -> None:
        await asyncio.sleep(self.step_delay)
        if run.state != "queued":
            return
        run.state = "running"
        while run.step < run.steps and run.state == "running":
            await asyncio.sleep(self.step_delay)
            run.step += 1
        if run.state == "running":
            run.state = "failed" if run.error else "done"

    def image_urls(self, base: str, run: Run) -> list[str]:
        host = self.file_host or base
        return [f"{host}/files/{run.id}-{i}.png" for i in range(run.count)]


def _png(run: Run, index: int) -> bytes:
    rng = random.Random(run.seed + index)
    image = Image.new("RGB", (run.width, run.height), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def create_app(service: str, *, step_delay: float = 0.01, steps: int = 6) -> FastAPI:
    hosted = Hosted(service, step_delay)
    app = FastAPI()
    app.state.hosted = hosted

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def seen(request: Request) -> None:
        hosted.auth.append(
            {
                k: v
                for k, v in request.headers.items()
                if k in ("authorization", "x-key", "x-secret")
            }
        )

    @app.get("/files/{name}")
    async def files(name: str) -> Response:
        run_id, _, index = name.removesuffix(".png").rpartition("-")
        run = hosted.runs.get(run_id)
        if run is None:
            return Response(status_code=404)
        return Response(_png(run, int(index)), media_type="image/png")

    if service == "fal":

        @app.post("/{owner}/{name}")
        async def submit(owner: str, name: str, request: Request) -> dict[str, Any]:
            seen(request)
            body = await request.json()
            size = body.get("image_size") or {}
            run = Run(
                uuid.uuid4().hex, body, size.get("width", 1024), size.get("height", 768),
                body.get("num_images", 1), body.get("seed") or 0,
                body.get("num_inference_steps", steps),
            )  # fmt: skip
            hosted.start(run)
            root = f"{base(request)}/{owner}/{name}/requests/{run.id}"
            return {
                "request_id": run.id, "gateway_request_id": run.id,
                "status_url": f"{root}/status", "response_url": root,
                "cancel_url": f"{root}/cancel",
            }  # fmt: skip

        @app.get("/{owner}/{name}/requests/{run_id}/status")
        async def status(run_id: str, request: Request) -> dict[str, Any]:
            seen(request)
            run = hosted.runs[run_id]
            if run.state == "queued":
                return {"status": "IN_QUEUE", "queue_position": 0}
            if run.state == "running":
                logs = [{"message": f"{run.step}/{run.steps} steps"}] if run.step else []
                return {"status": "IN_PROGRESS", "logs": logs}
            return {"status": "COMPLETED", "logs": [], "metrics": {}}

        @app.get("/{owner}/{name}/requests/{run_id}")
        async def result(run_id: str, request: Request) -> dict[str, Any]:
            seen(request)
            run = hosted.runs[run_id]
            urls = hosted.image_urls(base(request), run)
            return {
                "images": [
                    {
                        "url": u,
                        "width": run.width,
                        "height": run.height,
                        "content_type": "image/png",
                    }
                    for u in urls
                ],
                "seed": run.seed,
            }

        @app.put("/{owner}/{name}/requests/{run_id}/cancel")
        async def cancel(run_id: str, request: Request) -> Response:
            seen(request)
            hosted.cancels.append(run_id)
            run = hosted.runs[run_id]
            if run.state in ("done", "failed"):
                return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
            run.state = "cancelled"
            return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    elif service == "replicate":

        def prediction(run: Run, request: Request) -> dict[str, Any]:
            status = {
                "queued": "starting", "running": "processing", "done": "succeeded",
                "failed": "failed", "cancelled": "canceled",
            }[run.state]  # fmt: skip
            root = f"{base(request)}/v1/predictions/{run.id}"
            return {
                "id": run.id,
                "status": status,
                "input": run.body["input"],
                "output": hosted.image_urls(base(request), run) if run.state == "done" else None,
                "error": run.error if run.state == "failed" else None,
                "logs": "".join(f"{i}/{run.steps} [00:00<00:00]\n" for i in range(1, run.step + 1)),
                "urls": {"get": root, "cancel": f"{root}/cancel"},
            }

        @app.post("/v1/models/{owner}/{name}/predictions")
        async def create(owner: str, name: str, request: Request) -> JSONResponse:
            seen(request)
            body = await request.json()
            given = body["input"]
            run = Run(
                uuid.uuid4().hex, body, given.get("width", 1024), given.get("height", 1024),
                given.get("num_outputs", 1), given.get("seed") or 0,
                given.get("num_inference_steps", steps),
            )  # fmt: skip
            if "fail" in given.get("prompt", ""):
                run.error = "CUDA out of memory (stand-in)"
            hosted.start(run)
            return JSONResponse(prediction(run, request), status_code=201)

        @app.get("/v1/predictions/{run_id}")
        async def get(run_id: str, request: Request) -> dict[str, Any]:
            seen(request)
            return prediction(hosted.runs[run_id], request)

        @app.post("/v1/predictions/{run_id}/cancel")
        async def cancel_prediction(run_id: str, request: Request) -> dict[str, Any]:
            seen(request)
            hosted.cancels.append(run_id)
            run = hosted.runs[run_id]
            if run.state in ("queued", "running"):
                run.state = "cancelled"
            return prediction(run, request)

    else:

        @app.post("/key/api/v1/pipeline/run")
        async def run_pipeline(request: Request) -> JSONResponse:
            seen(request)
            form = await request.form()
            params = json.loads(str(form["params"]))
            query = params["generateParams"]["query"]
            run = Run(
                uuid.uuid4().hex, {"pipeline_id": str(form["pipeline_id"]), "params": params},
                params["width"], params["height"], params.get("numImages", 1), 0, steps,
            )  # fmt: skip
            run.censored = "censor" in query
            if "fail" in query:
                run.error = "fail"
            hosted.start(run)
            return JSONResponse({"uuid": run.id, "status": "INITIAL"}, status_code=201)

        @app.get("/key/api/v1/pipeline/status/{run_id}")
        async def pipeline_status(run_id: str, request: Request) -> dict[str, Any]:
            seen(request)
            run = hosted.runs[run_id]
            if run.state == "queued":
                return {"uuid": run.id, "status": "INITIAL"}
            if run.state == "running":
                return {"uuid": run.id, "status": "PROCESSING"}
            if run.state == "failed":
                return {"uuid": run.id, "status": "FAIL", "errorDescription": "stand-in failure"}
            files = [base64.b64encode(_png(run, i)).decode() for i in range(run.count)]
            return {
                "uuid": run.id, "status": "DONE", "generationTime": 1,
                "result": {"files": [] if run.censored else files, "censored": run.censored},
            }  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        for task in list(hosted.tasks):
            task.cancel()

    app.router.lifespan_context = lifespan
    return app
