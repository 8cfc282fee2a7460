"""A stand-in for an Ollama server: Ollama itself (and a model for it) cannot run here.

It answers the two endpoints of Ollama's published HTTP API that prompt expansion uses,
non-streaming, in their documented shapes: ``POST /api/generate`` (``model``, ``prompt``,
``system`` -> ``{"model", "created_at", "response", "done": true, "done_reason"}``) and
``POST /api/chat`` (``model``, ``messages`` -> ``{"model", "created_at", "message":
{"role": "assistant", "content"}, "done": true, "done_reason"}``). An unknown model is a
404 ``{"error": "model '...' not found"}`` as Ollama answers it. The model ``hang`` never
answers (until the server stops), to exercise the client's timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

CREATED_AT = "2026-01-01T00:00:00.000000Z"


class OllamaStandIn:
    """The app plus what it was asked; ``answer`` is what the "LLM" says."""

    def __init__(self, answer: str, models: tuple[str, ...] = ("llama2", "hang")) -> None:
        self.answer = answer
        self.models = models
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.released = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app = FastAPI()
        self.app.post("/api/generate")(self.generate)
        self.app.post("/api/chat")(self.chat)

    async def _check(
        self, path: str, request: Request
    ) -> tuple[dict[str, Any], JSONResponse | None]:
        body = await request.json()
        self.requests.append((path, body))
        model = body.get("model", "")
        if model not in self.models:
            return body, JSONResponse({"error": f"model '{model}' not found"}, status_code=404)
        if model == "hang":
            self.loop = asyncio.get_running_loop()
            await self.released.wait()
        return body, None

    def release(self) -> None:
        """Let hanging requests end (call before the server stops)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.released.set)

    async def generate(self, request: Request) -> JSONResponse:
        body, refused = await self._check("/api/generate", request)
        if refused is not None:
            return refused
        return JSONResponse(
            {"model": body["model"], "created_at": CREATED_AT, "response": self.answer,
             "done": True, "done_reason": "stop"}
        )  # fmt: skip

    async def chat(self, request: Request) -> JSONResponse:
        body, refused = await self._check("/api/chat", request)
        if refused is not None:
            return refused
        message = {"role": "assistant", "content": self.answer}
        return JSONResponse(
            {"model": body["model"], "created_at": CREATED_AT, "message": message, "done": True,
             "done_reason": "stop"}
        )  # fmt: skip
