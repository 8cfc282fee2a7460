"""The FastAPI application: one :class:`~easel.runtime.Runtime`, viewed over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from easel import __version__
from easel.api import errors, native
from easel.config import Settings
from easel.runtime import Runtime


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """The app starts its runtime (store, workers) on startup and stops it on shutdown."""
    settings = settings or (runtime.settings if runtime else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime or Runtime(settings)
        app.state.runtime = rt
        await rt.start()
        try:
            yield
        finally:
            await rt.stop()

    app = FastAPI(
        title="easel",
        version=__version__,
        description="A self-hosted generation server: one fair queue, many backends.",
        lifespan=lifespan,
        responses={
            422: {"model": errors.ErrorResponse, "description": "Invalid request"},
        },
    )
    errors.install(app)
    app.include_router(native.router)
    return app
