"""The FastAPI application: one :class:`~easel.runtime.facade.Runtime`, viewed over HTTP (and gRPC).

Every surface is a view of the same runtime: the native API, Server-Sent Events, the
OpenAI, Automatic1111 and pipeline compatibility routers and, when a port is given, the
Draw Things gRPC service, started and stopped with the app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from easel.api import errors, native, operations, sse, ui
from easel.api.auth import BodyLimit, TokenAuth
from easel.api.compat import a1111, openai, openai_audio, pipeline
from easel.api.limits import QueryLimit
from easel.config import Settings
from easel.constants import VERSION
from easel.images import refuse_bombs
from easel.runtime.facade import Runtime
from easel.runtime.logs import protect_server_loggers
from easel.safety.gate import service_tokens


def create_app(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    grpc_port: int | None = None,
    grpc_tls: tuple[Path, Path] | None = None,
) -> FastAPI:
    """The app starts its runtime (store, workers) on startup and stops it on shutdown.

    ``grpc_port`` also serves Draw Things' gRPC service on ``settings.host`` (0: a free
    port, found afterwards in ``app.state.grpc_port``); None serves no gRPC. ``grpc_tls``:
    (certificate chain, private key) PEM files: the gRPC port then speaks TLS.
    """
    settings = settings or (runtime.settings if runtime else Settings())
    protect_server_loggers()  # tokens in websocket URLs never reach uvicorn's log lines
    refuse_bombs()  # an image Pillow warns about is refused, never decoded

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime or Runtime(settings)
        app.state.runtime = rt
        await rt.start()
        grpc_server = None
        try:
            if grpc_port is not None:
                from easel.api.compat.grpc import start_server

                grpc_server, app.state.grpc_port = await start_server(
                    rt, settings.host, grpc_port, grpc_tls
                )
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)
            await rt.stop()

    app = FastAPI(
        title="easel",
        version=VERSION,
        description=(
            "A self-hosted generation server: one fair queue, many backends. Besides its own "
            "API it speaks OpenAI's images and speech APIs (`/v1/images/*`, `/v1/audio/speech`), "
            "Automatic1111's "
            "(`/sdapi/v1/*`), a text-to-image microservice's (`/pipeline/*`) and, on its "
            "gRPC port, Draw Things' `ImageGenerationService`."
        ),
        lifespan=lifespan,
        responses={
            400: {"model": errors.ErrorResponse, "description": "Malformed request (not JSON)"},
            422: {"model": errors.ErrorResponse, "description": "Invalid request"},
        },
    )
    errors.install(app)
    if settings.safety.tokens:
        app.add_middleware(TokenAuth, tokens=service_tokens(settings.safety))
    app.add_middleware(BodyLimit, max_bytes=settings.safety.max_body_bytes)
    app.add_middleware(QueryLimit)  # outermost
    app.include_router(native.router)
    app.include_router(operations.router)
    app.include_router(sse.router)
    app.include_router(openai.router)
    app.include_router(openai_audio.router)
    app.include_router(a1111.router)
    app.include_router(a1111.internal)
    app.include_router(pipeline.router)
    ui.install(app)
    return app
