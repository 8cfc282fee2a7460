"""What operators watch: readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from easel.api.native import runtime_of
from easel.errors import EaselError

router = APIRouter(tags=["operations"])


class Readiness(BaseModel):
    ready: bool
    store: str
    workers: int
    storage: str


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: see which part"}},
)
async def ready(request: Request) -> JSONResponse:
    """200 when the store answers, workers run (or this is an API-only process) and the
    output dir is writable; 503 with the failing part otherwise."""
    runtime = runtime_of(request)
    store = "ok"
    try:
        await asyncio.wait_for(runtime.store.stats(), timeout=2.0)
    except (EaselError, OSError, TimeoutError) as exc:
        store = f"unavailable: {exc}"
    root = runtime.storage.root
    storage = "ok" if root.is_dir() and os.access(root, os.W_OK) else f"not writable: {root}"
    expected = runtime.settings.concurrency > 0
    workers = sum(1 for worker in runtime.workers if not worker.stopping)
    ok = store == "ok" and storage == "ok" and (workers > 0 or not expected)
    body = Readiness(ready=ok, store=store, workers=workers, storage=storage)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
)
async def metrics(request: Request) -> Response:
    """Prometheus text format: queue depth per tier, wait and run times, final states, and
    each backend's state, slots in use, queued work and measured speed."""
    runtime = runtime_of(request)
    backends = await runtime.fleet.describe()
    body = await runtime.metrics.render(runtime.store, len(runtime.workers), backends)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
