"""TangoFlux (text to sound: flow matching, 44.1 kHz stereo, up to 30 s), where it can run.

It runs only when its package is installed (``pip install tangoflux``) and its weights are
already on this machine: ``declare-lab/TangoFlux`` and Stable Audio Open's autoencoder
(``stabilityai/stable-audio-open-1.0``, ``vae/``) in the Hugging Face cache. TangoFlux loads
both by hub name; easel checks the cache first and never lets it download. Otherwise the
backend is declared unavailable with the reason (what is missing, and how to provide it):
it lists no model and admission refuses its jobs with ``backend_unavailable``.

TangoFlux's ``generate`` has no step callback: progress is reported once, at the end, and a
cancel takes effect when the clip is done (its result is then discarded).
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from typing import Any

from easel.audio import AudioClip, conform
from easel.backends.base import Backend, Capability, GenerationResult, ModelInfo, RunContext
from easel.errors import BackendUnavailable, Unsupported
from easel.jobs import GenerationRequest

TANGOFLUX_REPO = "declare-lab/TangoFlux"
VAE_REPO = "stabilityai/stable-audio-open-1.0"
TANGOFLUX_SAMPLE_RATE = 44_100
TANGOFLUX_MAX_SECONDS = 30.0
_NEEDED = ((TANGOFLUX_REPO, "tangoflux.safetensors"), (TANGOFLUX_REPO, "config.json"),
           (VAE_REPO, "vae/config.json"))  # fmt: skip


def unavailable_reason(cache_dir: str | None = None) -> str | None:
    """Why TangoFlux cannot run here, or None when its package and weights are present."""
    if importlib.util.find_spec("tangoflux") is None:
        return "the tangoflux package is not installed (pip install tangoflux)"
    from huggingface_hub import try_to_load_from_cache

    missing = [
        f"{repo}/{name}"
        for repo, name in _NEEDED
        if not isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str)
    ]
    if missing:
        return (
            "its weights are not in the Hugging Face cache (easel never downloads): missing "
            + ", ".join(missing)
            + "; fetch them once with huggingface-cli download on a connected machine"
        )
    return None


class TangoFluxBackend(Backend):
    name = "tangoflux"
    capabilities = frozenset({Capability.txt2audio, Capability.seed})

    def __init__(
        self, *, device: str = "auto", cache_dir: str | None = None, **_options: object
    ) -> None:
        self.device = device
        self.reason = unavailable_reason(cache_dir)
        self._model: Any = None
        self._lock = threading.Lock()

    def models(self) -> list[ModelInfo]:
        if self.reason is not None:
            return []
        return [
            ModelInfo(
                name="tangoflux",
                backend=self.name,
                family="tangoflux",
                loaded=self._model is not None,
                description="44.1 kHz stereo, up to 30 s",
            )
        ]

    def check(self, request: GenerationRequest) -> None:
        if self.reason is not None:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable: {self.reason}")
        super().check(request)
        if request.negative_prompt:
            raise Unsupported("TangoFlux takes no negative_prompt; leave it out")
        if request.audio_seconds > TANGOFLUX_MAX_SECONDS:
            raise Unsupported(f"TangoFlux makes clips of at most {TANGOFLUX_MAX_SECONDS:g} s")

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        clips = await asyncio.to_thread(self._run, request, context)
        return GenerationResult(images=[], seeds=request.seeds, model="tangoflux", audio=clips)

    def _run(self, request: GenerationRequest, context: RunContext) -> list[AudioClip]:
        import torch

        clips = []
        with self._lock:
            model = self._load()
            for done, seed in enumerate(request.seeds, start=1):
                context.raise_if_cancelled()
                torch.manual_seed(seed)  # TangoFlux draws its noise from the global generator
                wave = model.generate(
                    request.prompt,
                    steps=request.steps,
                    duration=request.audio_seconds,
                    guidance_scale=request.cfg_scale,
                )
                clip = AudioClip.of(wave.float().cpu().numpy(), TANGOFLUX_SAMPLE_RATE)
                clips.append(
                    conform(
                        clip,
                        sample_rate=request.sample_rate,
                        channels=request.channels,
                        seconds=request.audio_seconds,
                    )
                )
                context.progress(done, len(request.seeds), None)
        return clips

    def _load(self) -> Any:
        if self._model is None:
            import huggingface_hub.constants
            import torch

            huggingface_hub.constants.HF_HUB_OFFLINE = True  # the cache only, never a download
            from tangoflux import TangoFluxInference

            device = self.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self._model = TangoFluxInference(name=TANGOFLUX_REPO, device=device)
        return self._model
