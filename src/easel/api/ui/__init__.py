"""The web page: submit, watch your queue, browse results, operate the queue.

Static files served by easel itself (no CDN, no build step): ``index.html`` and plain
JavaScript modules that call only easel's public API (REST + the ``/v1/events``
websocket), sending the service token the person typed when auth is on. The page and its
files need no token (``easel.api.auth`` leaves ``/`` and ``/ui/`` open); every call the
page makes does.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    """The page shell; the modules it loads do the rest (revalidated on each load)."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")
