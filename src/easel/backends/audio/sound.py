"""Text to sound on diffusers' audio pipelines: Stable Audio Open, AudioLDM 2 (and AudioLDM,
MusicLDM), loaded from local diffusers folders like image models, never from a hub.

``easel serve --backend diffusers-audio --model /models/stable-audio-open-1.0`` (or
``--models-dir``: every audio pipeline folder in it). What a folder is comes from its
``model_index.json``; each family's limits (the longest clip, stereo or mono, the rate) come
from its component configs, so admission refuses what the model cannot make before it is
loaded. The pipeline is called with the keyword arguments its own signature accepts (its
length in seconds, ``negative_prompt``, ``callback``); a step callback reports progress and
stops a cancelled job by raising, so nothing is decoded for it. Pipelines are wrapped, never
patched: one call per pipeline at a time, in a thread.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easel.audio import AudioClip, conform
from easel.backends.base import Backend, Capability, GenerationResult, ModelInfo, RunContext
from easel.backends.diffusers._quiet import quiet_warnings
from easel.errors import BackendUnavailable, InvalidRequest, ModelNotFound, Unsupported
from easel.jobs import GenerationRequest

AUDIO_PIPELINES: dict[str, str] = {
    "StableAudioPipeline": "stable-audio",
    "AudioLDM2Pipeline": "audioldm2",
    "AudioLDMPipeline": "audioldm",
    "MusicLDMPipeline": "musicldm",
}
"""diffusers pipeline class -> easel family; a folder of any other class is not sound."""

_LENGTH_ARGUMENTS = ("audio_end_in_s", "audio_length_in_s")


@dataclass(frozen=True)
class AudioModel:
    """One audio pipeline folder and what its configs say it can make."""

    name: str
    path: Path
    family: str
    sample_rate: int | None
    channels: int
    max_seconds: float | None

    @classmethod
    def read(cls, path: Path) -> AudioModel:
        """From the folder's JSON configs alone (no torch): instant, before any load."""
        index = _json(path / "model_index.json")
        if index is None:
            raise ModelNotFound(f"{path} is not a diffusers folder (no model_index.json)")
        family = AUDIO_PIPELINES.get(str(index.get("_class_name")))
        if family is None:
            raise Unsupported(
                f"{path} holds a {index.get('_class_name')}, not an audio pipeline; audio "
                f"pipelines are: {', '.join(AUDIO_PIPELINES)}"
            )
        rate, channels, longest = None, 1, None
        if family == "stable-audio":
            vae = _json(path / "vae" / "config.json") or {}
            transformer = _json(path / "transformer" / "config.json") or {}
            rate = vae.get("sampling_rate")
            channels = int(vae.get("audio_channels", 2))
            hop = 1
            for ratio in vae.get("downsampling_ratios", []):
                hop *= int(ratio)
            if rate and transformer.get("sample_size"):
                longest = int(transformer["sample_size"]) * hop / int(rate)
        else:
            vocoder = _json(path / "vocoder" / "config.json") or {}
            rate = vocoder.get("sampling_rate")
        return cls(path.name, path, family, int(rate) if rate else None, channels, longest)


def find_audio_models(model: str | None, models_dir: str | None) -> list[AudioModel]:
    """The audio pipelines named: one folder (``model``), or each such folder in ``models_dir``."""
    found: list[AudioModel] = []
    if model is not None:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ModelNotFound(
                f"model {model!r} is not a local folder; easel loads audio pipelines from "
                "diffusers folders on disk and never downloads one"
            )
        found.append(AudioModel.read(path))
    if models_dir is not None:
        for path in sorted(Path(models_dir).expanduser().iterdir()):
            index = _json(path / "model_index.json") if path.is_dir() else None
            if index is not None and index.get("_class_name") in AUDIO_PIPELINES:
                found.append(AudioModel.read(path))
    return found


class DiffusersAudioBackend(Backend):
    name = "diffusers-audio"
    capabilities = frozenset({Capability.txt2audio, Capability.negative_prompt, Capability.seed})

    def __init__(
        self,
        *,
        model: str | None = None,
        models_dir: str | None = None,
        device: str = "auto",
        **_options: object,
    ) -> None:
        self._models = {m.name: m for m in find_audio_models(model, models_dir)}
        if not self._models:
            raise InvalidRequest(
                "the diffusers-audio backend needs an audio pipeline: --model FOLDER or "
                "--models-dir with Stable Audio Open or AudioLDM 2 folders"
            )
        self.device = device
        self._pipelines: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {name: threading.Lock() for name in self._models}
        self._loading = threading.Lock()

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=m.name,
                backend=self.name,
                family=m.family,
                path=str(m.path),
                loaded=m.name in self._pipelines,
                description=_describe(m),
            )
            for m in self._models.values()
        ]

    def check(self, request: GenerationRequest) -> None:
        super().check(request)
        model = self._model_for(request)
        if model.family == "audioldm2" and (reason := audioldm2_blocked()) is not None:
            raise BackendUnavailable(f"model {model.name!r} cannot run here: {reason}")
        seconds = request.audio_seconds
        if model.max_seconds is not None and seconds > model.max_seconds:
            raise Unsupported(
                f"model {model.name!r} makes clips of at most {model.max_seconds:g} seconds "
                f"(asked: {seconds:g})"
            )

    def _model_for(self, request: GenerationRequest) -> AudioModel:
        name = request.model or next(iter(self._models))
        if name not in self._models:
            raise ModelNotFound(
                f"model {name!r} is not served by {self.name!r}; its models are: "
                f"{', '.join(self._models)}"
            )
        return self._models[name]

    async def start(self) -> None:
        await asyncio.to_thread(self._pipeline, next(iter(self._models.values())))

    async def close(self) -> None:
        self._pipelines.clear()

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        model = self._model_for(request)
        clips = await asyncio.to_thread(self._run, model, request, context)
        return GenerationResult(images=[], seeds=request.seeds, model=model.name, audio=clips)

    def _pipeline(self, model: AudioModel) -> Any:
        with self._loading:
            if model.name not in self._pipelines:
                from diffusers import DiffusionPipeline

                with quiet_warnings():
                    pipe = DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
                        model.path, local_files_only=True
                    )
                pipe.set_progress_bar_config(disable=True)
                self._pipelines[model.name] = pipe.to(_device(self.device))
            return self._pipelines[model.name]

    def _run(
        self, model: AudioModel, request: GenerationRequest, context: RunContext
    ) -> list[AudioClip]:
        """One pipeline call per seed, so clip ``i`` is reproducible alone with its seed."""
        pipe = self._pipeline(model)
        total = request.steps * len(request.seeds)
        clips = []
        with self._locks[model.name], quiet_warnings():
            for index, seed in enumerate(request.seeds):
                context.raise_if_cancelled()
                on_step = _on_step(context, request.steps * index, total)
                audios = pipe(**_call_arguments(pipe, request, seed, on_step)).audios
                clip = AudioClip.of(audios[0], _rate_of(pipe, model))
                clips.append(
                    conform(
                        clip,
                        sample_rate=request.sample_rate,
                        channels=request.channels,
                        seconds=request.audio_seconds,
                    )
                )
        return clips


def _call_arguments(
    pipe: Any, request: GenerationRequest, seed: int, on_step: Callable[[int], None]
) -> dict[str, Any]:
    """The request as the keyword arguments this pipeline's ``__call__`` accepts."""
    import torch

    accepted = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "num_inference_steps": request.steps,
        "guidance_scale": request.cfg_scale,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "np",
    }
    if request.negative_prompt:
        kwargs["negative_prompt"] = request.negative_prompt
    length = next((name for name in _LENGTH_ARGUMENTS if name in accepted), None)
    if length is not None:
        kwargs[length] = request.audio_seconds
    if "callback_on_step_end" in accepted:

        def on_step_end(_pipe: Any, step: int, _t: Any, tensors: dict[str, Any]) -> Any:
            on_step(step)
            return tensors

        kwargs["callback_on_step_end"] = on_step_end
    elif "callback" in accepted:
        kwargs.update(callback=lambda step, _t, _latents: on_step(step), callback_steps=1)
    return {name: value for name, value in kwargs.items() if name in accepted}


def audioldm2_blocked() -> str | None:
    """Why AudioLDM 2 cannot run with the installed transformers, if it cannot: its pipeline
    drives GPT-2 with a generation helper that transformers 5 no longer has on GPT2Model."""
    from transformers import GPT2Model

    if hasattr(GPT2Model, "_update_model_kwargs_for_generation"):
        return None
    return (
        "diffusers' AudioLDM2Pipeline needs GPT2Model._update_model_kwargs_for_generation, "
        "which transformers 5 removed; serve it from an environment with transformers<5"
    )


def _on_step(context: RunContext, done_before: int, total: int) -> Callable[[int], None]:
    """Progress after each step; a cancelled job stops here, before the next step (and
    before any decoding: the exception leaves the pipeline)."""

    def on_step(step: int) -> None:
        context.progress(done_before + step + 1, total, None)
        context.raise_if_cancelled()

    return on_step


def _rate_of(pipe: Any, model: AudioModel) -> int:
    if model.sample_rate is not None:
        return model.sample_rate
    for part in ("vae", "vocoder"):
        component = getattr(pipe, part, None)
        rate = getattr(getattr(component, "config", None), "sampling_rate", None)
        if rate:
            return int(rate)
    return 16_000


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _describe(model: AudioModel) -> str:
    parts = [f"{model.channels} channel{'s' if model.channels > 1 else ''}"]
    if model.sample_rate:
        parts.append(f"{model.sample_rate} Hz")
    if model.max_seconds:
        parts.append(f"up to {model.max_seconds:g} s")
    return ", ".join(parts)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
