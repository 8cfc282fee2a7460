"""One request -> one pipeline object and the keyword arguments of its call.

The pipeline for a mode comes from diffusers' AutoPipeline ``from_pipe`` (weights shared,
~1 ms); the arguments are filtered by the call's signature, so each family gets only what it
takes. Images from the client are decoded and sized here.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from PIL import Image

from easel.backends.diffusers._families import Family, Mode
from easel.backends.diffusers._options import Extras
from easel.backends.diffusers._previews import StepCallback
from easel.backends.diffusers.schedulers import SchedulerSpec
from easel.errors import InvalidRequest, Unsupported
from easel.images import decode_base64_image


def request_pipeline(base: Any, mode: Mode, scheduler: Any, controlnet: Any = None) -> Any:
    """A pipeline of its own for ``mode`` on ``base``'s weights, with its own scheduler."""
    from diffusers import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
    )

    auto = {
        Mode.img2img: AutoPipelineForImage2Image,
        Mode.inpaint: AutoPipelineForInpainting,
    }.get(mode, AutoPipelineForText2Image)
    extra = {"controlnet": controlnet} if controlnet is not None else {}
    try:
        pipe = auto.from_pipe(base, scheduler=scheduler, **extra)
    except ValueError as exc:
        what = f"{mode} with a ControlNet" if controlnet is not None else str(mode)
        raise Unsupported(f"{type(base).__name__} has no {what} pipeline in diffusers") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seeds: Sequence[int]) -> list[Any]:
    """One generator per image (image i is reproducible alone with seed + i), on the CPU so a
    seed gives the same noise on CPU, CUDA and MPS."""
    import torch

    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def image_arg(data: str, width: int, height: int, mode: str = "RGB") -> Image.Image:
    image = decode_base64_image(data)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image.convert(mode)


def call_kwargs(
    pipe: Any,
    request: Any,
    extras: Extras,
    spec: SchedulerSpec | None,
    family: Family,
    callback: StepCallback,
    *,
    output_type: str = "pil",
) -> dict[str, Any]:
    """The call's keyword arguments, keeping only those ``pipe.__call__`` takes."""
    width, height = request.width, request.height
    wanted: dict[str, Any] = {
        "prompt": request.prompt,
        # None, not "": SDXL zeroes the negative embedding only for a missing one.
        "negative_prompt": request.negative_prompt or None,
        "num_inference_steps": request.steps,
        "guidance_scale": request.cfg_scale,
        "num_images_per_prompt": request.batch_size,
        "generator": generators(request.seeds),
        "callback_on_step_end": callback,
        "output_type": output_type,
        "width": width,
        "height": height,
    }
    if extras.mode in (Mode.img2img, Mode.inpaint):
        wanted["image"] = image_arg(request.init_image, width, height)
        wanted["strength"] = request.strength
    if extras.mode is Mode.inpaint and extras.mask_image is not None:
        wanted["mask_image"] = image_arg(extras.mask_image, width, height, "L")
    if extras.clip_skip is not None and extras.clip_skip > 1:
        # A1111 counts the last layer as 1 ("clip skip 2" = penultimate); diffusers from 0.
        wanted["clip_skip"] = extras.clip_skip - 1
        if _flat_clip(pipe):
            wanted.update(_skipped_embeddings(pipe, request, extras.clip_skip - 1))
    if extras.controlnet is not None:
        control = image_arg(extras.controlnet.image, width, height)
        accepted = _parameters(pipe)
        wanted["control_image" if "control_image" in accepted else "image"] = control
        wanted["controlnet_conditioning_scale"] = extras.controlnet.scale
        wanted["control_guidance_start"] = extras.controlnet.start
        wanted["control_guidance_end"] = extras.controlnet.end
    required = {"mask_image", "strength"} if extras.mode is Mode.img2img else {"mask_image"}
    if "prompt_embeds" not in wanted:
        required.add("clip_skip")
    return _accepted(pipe, wanted, required)


def _flat_clip(pipe: Any) -> bool:
    """SD 1.x/2.x pipelines reach ``text_encoder.text_model``, which transformers 5 removed:
    their own clip_skip then fails, so easel encodes the prompt itself."""
    encoder = getattr(pipe, "text_encoder", None)
    return (
        getattr(pipe, "text_encoder_2", None) is None
        and hasattr(encoder, "final_layer_norm")
        and not hasattr(encoder, "text_model")
        and "prompt_embeds" in _parameters(pipe)
    )


def _skipped_embeddings(pipe: Any, request: Any, skip: int) -> dict[str, Any]:
    """What diffusers' SD ``encode_prompt`` computes for ``clip_skip``: the hidden states
    ``skip`` layers before the last, through the final layer norm."""
    import torch

    def encode(text: str) -> Any:
        tokens = pipe.tokenizer(
            [text] * request.batch_size,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = pipe.text_encoder(
                tokens.input_ids.to(pipe.text_encoder.device), output_hidden_states=True
            )
            return pipe.text_encoder.final_layer_norm(out.hidden_states[-(skip + 1)])

    return {
        "prompt": None,
        "negative_prompt": None,
        "num_images_per_prompt": 1,  # the embeddings are already one per image
        "prompt_embeds": encode(request.prompt),
        "negative_prompt_embeds": encode(request.negative_prompt or ""),
        "clip_skip": None,
    }


def _parameters(pipe: Any) -> Any:
    return inspect.signature(pipe.__call__).parameters


def _accepted(pipe: Any, wanted: dict[str, Any], required: set[str]) -> dict[str, Any]:
    accepted = _parameters(pipe)
    missing = sorted(k for k in wanted if k in required and k not in accepted)
    if missing:
        raise Unsupported(f"{type(pipe).__name__} does not take {', '.join(missing)}")
    return {key: value for key, value in wanted.items() if key in accepted}


def upscale_latents(latents: Any, family: Family, request: Any, factor: float) -> Any:
    """The first pass's latents, unpacked if packed, resized ``factor`` times (bilinear, as
    A1111's "Latent" upscaler), to a size the family accepts."""
    import torch.nn.functional as functional

    from easel.backends.diffusers._previews import Previewer

    latents = Previewer(family, request.width, request.height)._unpacked(latents)
    width, height = upscaled_size(request.width, request.height, factor, family)
    return functional.interpolate(latents, size=(height // 8, width // 8), mode="bilinear")


def upscaled_size(width: int, height: int, factor: float, family: Family) -> tuple[int, int]:
    step = family.size_multiple
    return (
        max(step, round(width * factor / step) * step),
        max(step, round(height * factor / step) * step),
    )


def mix_ingredients(request: Any, extras: Extras) -> tuple[list[Any], list[float]]:
    """The request's prompt (weight 1) and its mix items, for Kandinsky's prior."""
    items: list[Any] = [request.prompt]
    weights = [1.0]
    for item in extras.mix:
        if item.image is not None:
            items.append(image_arg(item.image, request.width, request.height))
        elif item.prompt is not None:
            items.append(item.prompt)
        else:  # read_extras refuses this
            raise InvalidRequest("each mix item needs an image or a prompt")
        weights.append(item.weight)
    return items, weights
