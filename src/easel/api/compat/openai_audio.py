"""OpenAI-compatible speech: ``POST /v1/audio/speech`` runs as a ``txt2speech`` job.

A client of OpenAI's audio API (the ``openai`` SDK's ``audio.speech.create``) points its base
URL at ``<easel>/v1`` and gets easel's speech backends through the fair queue. The call
waits for the job and answers the audio bytes, as OpenAI's does. What maps to what:

- ``input`` is the text (the server's ``max_speech_characters`` applies), ``speed`` the
  speed, ``response_format`` the container: ``mp3`` (OpenAI's default), ``opus`` (Ogg Opus),
  ``flac``, ``wav`` or ``pcm`` (raw 16-bit little-endian mono at 24 kHz); ``aac`` is refused.
- ``model``: a model easel serves (``hibari``), or an OpenAI name (``tts-*``,
  ``gpt-4o*-tts*``), which means any backend that speaks.
- ``voice``: a voice easel serves (``GET /v1/models`` lists them, kind ``voice``), or one of
  OpenAI's stock voices (``alloy``, ``nova``...), which means the backend's default voice.
- ``instructions`` and ``stream_format: sse`` are refused: easel's voices cannot follow them.
- The user (for fairness) is ``user`` (easel extension), else the ``X-Easel-User`` header,
  else a hash of the Bearer token. easel extensions (``extra_body``): ``seed``, ``user``.
- Errors have OpenAI's shape, as on the images routes.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any, Literal

import numpy as np
import soundfile
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from easel.api.compat._shared import caller, run_to_end
from easel.api.compat.openai import ERROR_RESPONSES, OpenAIRoute
from easel.api.native import runtime_of
from easel.errors import Unsupported
from easel.jobs import MAX_SEED, AudioFormat, GenerationRequest, JobKind, JobState, job_error

OPENAI_SPEECH_MODELS = ("tts-", "gpt-4o-mini-tts", "gpt-4o-tts")
OPENAI_VOICES = frozenset(
    {
        "alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer",
        "verse", "marin", "cedar",
    }
)  # fmt: skip
PCM_SAMPLE_RATE = 24_000
"""OpenAI's ``pcm``: raw 16-bit little-endian mono samples at 24 kHz."""

_FORMATS: dict[str, AudioFormat] = {
    "mp3": AudioFormat.mp3,
    "opus": AudioFormat.opus,
    "flac": AudioFormat.flac,
    "wav": AudioFormat.wav,
    "pcm": AudioFormat.wav,
}

router = APIRouter(route_class=OpenAIRoute, tags=["openai"])


class SpeechBody(BaseModel):
    """OpenAI's speech request; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str = Field(min_length=1)
    voice: str
    instructions: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Literal["sse", "audio"] | None = None
    # easel extensions
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    user: str | None = None


@router.post(
    "/v1/audio/speech",
    response_class=Response,
    responses={200: {"content": {"audio/mpeg": {}, "audio/wav": {}}}, **ERROR_RESPONSES},
)
async def speech(body: SpeechBody, request: Request) -> Response:
    """Speak ``input`` (OpenAI ``audio.speech.create``); waits for the audio."""
    if body.response_format == "aac":
        raise Unsupported("aac is not available here; ask for mp3, opus, flac, wav or pcm")
    if body.instructions:
        raise Unsupported("easel's voices cannot follow instructions; leave instructions out")
    if body.stream_format == "sse":
        raise Unsupported("streaming speech as events is not supported; leave stream_format out")
    runtime = runtime_of(request)
    served = {voice for backend in runtime.backends.values() for voice in backend.voices()}
    params: dict[str, Any] = {
        "kind": JobKind.txt2speech,
        "prompt": body.input,
        "speed": body.speed,
        "audio_format": _FORMATS[body.response_format],
        "user_id": caller(request, body.user),
        "metadata": {"api": "openai"},
    }
    if body.voice in served or body.voice not in OPENAI_VOICES:
        params["voice"] = body.voice
    if not body.model.startswith(OPENAI_SPEECH_MODELS):
        params["model"] = body.model
    if body.seed is not None:
        params["seed"] = body.seed
    if body.response_format == "pcm":
        params.update(sample_rate=PCM_SAMPLE_RATE, channels=1)
    job = await run_to_end(runtime, GenerationRequest.model_validate(params))
    if job.state is not JobState.succeeded:
        raise job_error(job)
    path, ref = await runtime.audio_path(job.id, 0)
    data = await asyncio.to_thread(path.read_bytes)
    media_type = ref.media_type
    if body.response_format == "pcm":
        data = await asyncio.to_thread(_pcm, data)
        media_type = "audio/pcm"
    return Response(data, media_type=media_type, headers={"X-Easel-Job-Id": job.id})


def _pcm(wav: bytes) -> bytes:
    samples, _ = soundfile.read(io.BytesIO(wav), dtype="int16", always_2d=True)
    return np.ascontiguousarray(samples[:, 0]).astype("<i2").tobytes()
