"""The diffusers backend: one diffusers folder on disk (SD 1.x/2.x, SDXL, ...), run in a thread.

The loaded pipeline is only a holder of weights. Each request gets its own pipeline object
(``AutoPipelineFor*.from_pipe``, which shares the weights) and its own scheduler, because a
pipeline and a scheduler keep per-call state on ``self``: two calls on one object corrupt each
other. torch and diffusers are imported inside methods, so easel imports without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
from pathlib import Path
from typing import Any

from PIL import Image

from easel.backends.base import (
    Backend,
    Capability,
    GenerationResult,
    ModelInfo,
    RunContext,
    register,
)
from easel.backends.schedulers import lookup_scheduler, make_scheduler, quiet_scheduler_warnings
from easel.errors import (
    BackendUnavailable,
    Cancelled,
    EaselError,
    GenerationError,
    InvalidRequest,
    ModelNotFound,
    Unsupported,
)
from easel.images import decode_base64_image
from easel.jobs import GenerationRequest, JobKind

_DTYPES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


@register("diffusers")
class DiffusersBackend(Backend):
    """Serve one diffusers model folder; ``model`` is its path, the folder name its model name."""

    name = "diffusers"
    capabilities = frozenset(
        {
            Capability.txt2img,
            Capability.img2img,
            Capability.negative_prompt,
            Capability.seed,
            Capability.scheduler,
        }
    )

    def __init__(
        self, model: str, *, device: str = "auto", dtype: str | None = None, **_ignored: Any
    ) -> None:
        if dtype is not None and dtype.lower() not in _DTYPES:
            raise InvalidRequest(f"unknown dtype {dtype!r}; use one of: {', '.join(_DTYPES)}")
        self.path = Path(model).expanduser()
        self.model_name = self.path.name
        self.device_option = device
        self.dtype_option = _DTYPES[dtype.lower()] if dtype is not None else None
        self.device: str | None = None
        self._pipe: Any = None
        self._family: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._pipe is None:
            await asyncio.to_thread(self._load)

    async def close(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        del pipe
        gc.collect()
        if self.device is not None and self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _load(self) -> None:
        index = self._read_model_index()
        try:
            import torch
            from diffusers import DiffusionPipeline
        except ImportError as exc:
            raise ImportError(
                f"the diffusers backend needs torch and diffusers ({exc}); "
                "install them with: pip install 'easel[diffusers]'"
            ) from exc
        device = _pick_device(self.device_option)
        dtype_name = self.dtype_option or ("float16" if device.startswith("cuda") else "float32")
        try:
            pipe = DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
                self.path, local_files_only=True, dtype=getattr(torch, dtype_name)
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelNotFound(
                f"could not load a diffusers pipeline from {self.path}: {exc}"
            ) from exc
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self._family = str(index.get("_class_name", "unknown"))
        self.capabilities = _capabilities_of(pipe, type(self).capabilities)
        self.device, self._pipe = device, pipe

    def _read_model_index(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise ModelNotFound(
                f"model folder {str(self.path)!r} does not exist; easel loads diffusers folders "
                "from disk and never downloads (fetch one first, e.g. "
                f"`hf download <repo> --local-dir {self.path}`)"
            )
        index_file = self.path / "model_index.json"
        if not index_file.is_file():
            raise ModelNotFound(
                f"{str(self.path)!r} is not a diffusers folder (no model_index.json); "
                "single-file checkpoints must be converted to the diffusers layout first"
            )
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelNotFound(f"{index_file} is not readable JSON: {exc}") from exc
        if not isinstance(index, dict):
            raise ModelNotFound(f"{index_file} is not a diffusers model index")
        return index

    # -- what this backend serves ----------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        if self._family is None:
            with contextlib.suppress(ModelNotFound):
                self._family = str(self._read_model_index().get("_class_name", "unknown"))
        return [
            ModelInfo(
                name=self.model_name,
                backend=self.name,
                family=self._family or "unknown",
                path=str(self.path),
                loaded=self._pipe is not None,
            )
        ]

    def check(self, request: GenerationRequest) -> None:
        super().check(request)
        if request.model is not None and request.model not in (self.model_name, str(self.path)):
            raise ModelNotFound(
                f"model {request.model!r} is not served by this backend; "
                f"it serves {self.model_name!r}"
            )
        if request.negative_prompt and Capability.negative_prompt not in self.capabilities:
            raise Unsupported(f"model {self.model_name!r} does not take a negative prompt")
        if request.scheduler is not None:
            lookup_scheduler(request.scheduler)
        if request.kind is JobKind.img2img and int(request.steps * request.strength) < 1:
            raise InvalidRequest(
                f"img2img runs int(steps * strength) denoising steps, here "
                f"int({request.steps} * {request.strength}) = 0; raise steps or strength"
            )

    # -- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        self.check(request)
        if self._pipe is None:
            raise BackendUnavailable(f"model {self.model_name!r} is not loaded yet (start first)")
        try:
            return await asyncio.to_thread(self._run, request, context)
        except asyncio.CancelledError:
            # The thread cannot be killed; ask the pipeline to stop at its next step.
            context.cancel_event.set()
            raise

    def _run(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        import torch

        context.raise_if_cancelled()
        try:
            pipe = self._request_pipeline(request)
            kwargs = self._call_kwargs(pipe, request, context)
            with quiet_scheduler_warnings():
                output = pipe(**kwargs)
        except EaselError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            self._free_cache()
            raise GenerationError(
                f"out of {self.device} memory for {request.batch_size} image(s) of "
                f"{request.width}x{request.height}; try a smaller size or batch"
            ) from exc
        except Exception as exc:
            raise GenerationError(f"diffusers failed: {type(exc).__name__}: {exc}") from exc
        if context.cancelled:
            # An interrupted pipeline still decodes and returns its half-denoised latents.
            raise Cancelled("the job was cancelled")
        return GenerationResult(
            images=list(output.images),
            seeds=request.seeds,
            model=self.model_name,
            info={"scheduler": type(pipe.scheduler).__name__},
        )

    def _request_pipeline(self, request: GenerationRequest) -> Any:
        """A pipeline of its own for this request, sharing the loaded weights (~35 ms)."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

        base = self._pipe
        if request.scheduler is not None:
            scheduler = make_scheduler(request.scheduler, base.scheduler.config)
        else:  # a fresh copy all the same: schedulers keep per-run state too
            with quiet_scheduler_warnings():
                scheduler = type(base.scheduler).from_config(base.scheduler.config)
        auto = (
            AutoPipelineForImage2Image
            if request.kind is JobKind.img2img
            else AutoPipelineForText2Image
        )
        try:
            pipe = auto.from_pipe(base, scheduler=scheduler)
        except ValueError as exc:
            raise Unsupported(
                f"model {self.model_name!r} ({self._family}) has no {request.kind} pipeline"
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _call_kwargs(
        self, pipe: Any, request: GenerationRequest, context: RunContext
    ) -> dict[str, Any]:
        """The call's keyword arguments, keeping only those this pipeline's ``__call__`` takes."""
        import torch

        def on_step_end(
            p: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            # The real count: img2img runs fewer steps, Heun/DPM2 twice as many, PLMS one more.
            total = getattr(p, "num_timesteps", None) or len(p.scheduler.timesteps)
            context.progress(step + 1, int(total))
            if context.cancelled:
                p._interrupt = True
            return callback_kwargs

        wanted: dict[str, Any] = {
            "prompt": request.prompt,
            # None, not "": SDXL zeroes the negative embedding only for a missing one.
            "negative_prompt": request.negative_prompt or None,
            "num_inference_steps": request.steps,
            "guidance_scale": request.cfg_scale,
            "num_images_per_prompt": request.batch_size,
            # One generator per image: image i of a batch is reproducible alone with seed + i.
            # Noise drawn on the CPU: a seed gives the same image on CPU, CUDA and MPS.
            "generator": [torch.Generator("cpu").manual_seed(s) for s in request.seeds],
            "callback_on_step_end": on_step_end,
            "output_type": "pil",
        }
        if request.kind is JobKind.img2img:
            wanted["image"] = _init_image(request)
            wanted["strength"] = request.strength
        else:
            wanted["width"], wanted["height"] = request.width, request.height
        accepted = inspect.signature(pipe.__call__).parameters
        return {key: value for key, value in wanted.items() if key in accepted}

    def _free_cache(self) -> None:
        gc.collect()
        if self.device is not None and self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _init_image(request: GenerationRequest) -> Image.Image:
    """The client's image at the requested size: img2img output has the init image's size."""
    if request.init_image is None:  # GenerationRequest already refuses this
        raise InvalidRequest("img2img needs init_image (base64 PNG, JPEG or WebP)")
    image = decode_base64_image(request.init_image)
    if image.size != (request.width, request.height):
        image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
    return image


def _pick_device(option: str) -> str:
    """``auto`` is the best accelerator present: cuda, then mps, then cpu."""
    if option != "auto":
        return option
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _capabilities_of(pipe: Any, declared: frozenset[Capability]) -> frozenset[Capability]:
    """What this model can really do, derived as diffusers does: from the call signature."""
    from diffusers import AutoPipelineForImage2Image

    capabilities = set(declared)
    if "negative_prompt" not in inspect.signature(pipe.__call__).parameters:
        capabilities.discard(Capability.negative_prompt)
    try:
        AutoPipelineForImage2Image.from_pipe(pipe)
    except ValueError:
        capabilities.discard(Capability.img2img)
    return frozenset(capabilities)
