"""Text to speech on hibari: real English voices whose weights ship inside the PyPI wheel.

``pip install easel[speech]`` (hibari-tts, Apache-2.0, with numpy and onnxruntime) and
``easel serve --backend hibari``. The voice "heart" is in the wheel; hibari's other voices
(fenrir, emma, fable, kore) are served when their files are already in hibari's cache
(``HIBARI_HOME``): easel never downloads one at run time. Output is 24 kHz mono; a request
may ask for another rate or stereo. One model per voice is loaded on first use.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from typing import Any

import numpy as np

from easel.audio import AudioClip, conform
from easel.backends.base import Backend, Capability, GenerationResult, ModelInfo, RunContext
from easel.errors import BackendUnavailable, Unsupported
from easel.jobs import GenerationRequest

HIBARI_MODEL = "hibari"
HIBARI_SAMPLE_RATE = 24_000
HIBARI_SPEEDS = (0.5, 2.0)
INSTALL_HINT = "install the speech extra: pip install 'easel[speech]'"


def hibari_installed() -> bool:
    return importlib.util.find_spec("hibari") is not None


def local_voices() -> list[str]:
    """hibari's voices whose model file is on this machine, the bundled default first."""
    from hibari.voices import DEFAULT, VOICES, voice_path

    found = []
    for name in VOICES:
        try:
            voice_path(name, download_missing=False)
        except (FileNotFoundError, ValueError):
            continue
        found.append(name)
    return sorted(found, key=lambda name: name != DEFAULT)


class HibariBackend(Backend):
    name = "hibari"
    capabilities = frozenset({Capability.txt2speech, Capability.seed})

    def __init__(self, *, threads: int = 1, **_options: object) -> None:
        self.threads = threads
        self._reason = (
            None if hibari_installed() else f"hibari-tts is not installed; {INSTALL_HINT}"
        )
        self._voices = local_voices() if self._reason is None else []
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def voices(self) -> list[str]:
        return list(self._voices)

    def models(self) -> list[ModelInfo]:
        if self._reason is not None:
            return []
        pipeline = ModelInfo(
            name=HIBARI_MODEL,
            backend=self.name,
            family="hibari",
            loaded=bool(self._loaded),
            description="English text to speech, 24 kHz (hibari-tts, Apache-2.0)",
        )
        voices = [
            ModelInfo(
                name=voice,
                backend=self.name,
                family="hibari",
                kind="voice",
                loaded=voice in self._loaded,
            )
            for voice in self._voices
        ]
        return [pipeline, *voices]

    def check(self, request: GenerationRequest) -> None:
        if self._reason is not None:
            raise BackendUnavailable(f"backend {self.name!r} cannot run: {self._reason}")
        super().check(request)
        if request.model not in (None, HIBARI_MODEL):
            raise Unsupported(f"backend {self.name!r} serves the model {HIBARI_MODEL!r} only")
        low, high = HIBARI_SPEEDS
        if not low <= request.speed <= high:
            raise Unsupported(f"hibari speaks at speeds from {low:g} to {high:g}")
        if request.voice is not None and request.voice not in self._voices:
            raise Unsupported(
                f"voice {request.voice!r} is not served here; voices are: {', '.join(self._voices)}"
            )

    async def start(self) -> None:
        if self._reason is None and self._voices:
            await asyncio.to_thread(self._model, self._voices[0])

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        voice = request.voice or self._voices[0]
        clips = await asyncio.to_thread(self._speak, request, voice, context)
        return GenerationResult(
            images=[], seeds=request.seeds, model=HIBARI_MODEL, audio=clips, info={"voice": voice}
        )

    def _model(self, voice: str) -> Any:
        with self._lock:
            if voice not in self._loaded:
                from hibari import Hibari

                self._loaded[voice] = Hibari(voice=voice, threads=self.threads)
            return self._loaded[voice]

    def _speak(
        self, request: GenerationRequest, voice: str, context: RunContext
    ) -> list[AudioClip]:
        """One clip per seed; progress is one step per sentence spoken."""
        tts = self._model(voice)
        sentences = tts.phonemize(request.prompt)
        if not sentences:
            raise Unsupported("the text has nothing to speak; send words")
        total = len(sentences) * len(request.seeds)
        clips, done = [], 0
        for seed in request.seeds:
            rng = np.random.default_rng(seed)
            parts = []
            for phonemes in sentences:
                context.raise_if_cancelled()
                parts.append(tts.from_ids(tts.ids(phonemes), request.speed, rng))
                done += 1
                context.progress(done, total, None)
            clip = AudioClip.of(np.concatenate(parts), HIBARI_SAMPLE_RATE)
            clips.append(conform(clip, sample_rate=request.sample_rate, channels=request.channels))
        return clips
