"""Engine payloads a request may carry, and the easel fields read from them.

A request-balancer client sends a raw engine payload (``executor`` + ``payload``): an
Automatic1111 txt2img/img2img body, a Kandinsky one (``prompt``, ``steps``,
``guidance_scale``, ``width``/``height`` or ``w``/``h``...; ``images_texts`` + ``weights``
for a mix), or a ComfyUI API-format workflow. An engine of that kind gets the payload
unchanged (except the seed easel records); other backends run the easel fields read here
(an A1111 or Kandinsky payload is also a plain txt2img/img2img/mix request). Either way
admission checks those fields against the server's limits, so a payload cannot ask for
more than a native request may.
"""

from __future__ import annotations

import base64
import binascii
from enum import StrEnum
from typing import Any

from easel import samplers
from easel.errors import InvalidRequest

SEED_RANGE = 2**32
"""easel's seeds are 0..2**32-1 (as ``jobs.MAX_SEED``)."""


class Executor(StrEnum):
    """The engine whose API a ``payload`` is written for."""

    automatic1111 = "automatic1111"
    kandinsky = "kandinsky"
    comfyui = "comfyui"


def a1111_sampler(sampler: str | None, scheduler: str | None) -> str | None:
    """A1111's ``sampler_name`` + ``scheduler`` -> easel's one name ("DPM++ 2M Karras"),
    through :mod:`easel.samplers`' one table; unknown ones are a ``ValueError`` (a
    payload's validation error)."""
    try:
        return samplers.a1111_sampler(sampler, scheduler)
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None


def fields_from(executor: Executor, payload: dict[str, Any]) -> dict[str, Any]:
    """The easel request fields a payload asks for (what limits and local backends see)."""
    if executor is Executor.automatic1111:
        return _a1111_fields(payload)
    if executor is Executor.kandinsky:
        return _kandinsky_fields(payload)
    return _comfyui_fields(payload)


def _number(payload: dict[str, Any], key: str, default: Any) -> Any:
    value = payload.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"payload.{key} must be a number")
    return value


def _a1111_fields(payload: dict[str, Any]) -> dict[str, Any]:
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("payload.prompt must be a non-empty string")
    width, height = int(_number(payload, "width", 512)), int(_number(payload, "height", 512))
    seed = int(_number(payload, "seed", -1))
    if seed > SEED_RANGE - 1:  # A1111 takes any integer; easel's seeds are 32-bit
        seed %= SEED_RANGE
    fields: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": str(payload.get("negative_prompt") or ""),
        # A1111 rounds sizes down to multiples of 8 itself
        "width": max(width - width % 8, 8),
        "height": max(height - height % 8, 8),
        "steps": int(_number(payload, "steps", 50)),
        "cfg_scale": float(_number(payload, "cfg_scale", 7.0)),
        "seed": None if seed < 0 else seed,
        "batch_size": int(_number(payload, "batch_size", 1)) * int(_number(payload, "n_iter", 1)),
    }
    sampler = payload.get("sampler_name") or payload.get("sampler_index")
    if sampler:
        fields["scheduler"] = a1111_sampler(str(sampler), payload.get("scheduler"))
    override = payload.get("override_settings") or {}
    if isinstance(override, dict) and override.get("sd_model_checkpoint"):
        fields["model"] = str(override["sd_model_checkpoint"]).split(" [")[0]
    images = payload.get("init_images")
    if images:
        if not isinstance(images, list) or not isinstance(images[0], str):
            raise ValueError("payload.init_images must be a list of base64 images")
        fields["kind"] = "img2img"
        fields["init_image"] = images[0]
        fields["strength"] = float(_number(payload, "denoising_strength", 0.75))
        if isinstance(mask := payload.get("mask"), str) and mask:
            fields["kind"] = "inpaint"
            fields["mask_image"] = mask
    return fields


_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"GIF8")


def looks_like_image(text: str) -> bool:
    """Whether a Kandinsky ``images_texts`` entry is a base64 image (else it is a prompt)."""
    if text.startswith("data:image/"):
        return True
    if len(text) < 64 or " " in text:
        return False
    try:
        head = base64.b64decode(text[:64], validate=True)
    except (binascii.Error, ValueError):
        return False
    return head.startswith(_IMAGE_MAGIC)


def _kandinsky_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """Kandinsky 2.x/3 payloads (the original library's, Runpod's and FusionBrain-like)."""
    fields: dict[str, Any] = {
        "negative_prompt": str(
            payload.get("negative_decoder_prompt") or payload.get("negative_prompt") or ""
        ),
        "width": int(_number(payload, "width", _number(payload, "w", 512))),
        "height": int(_number(payload, "height", _number(payload, "h", 512))),
        "cfg_scale": float(_number(payload, "guidance_scale", 4.0)),
        "batch_size": int(_number(payload, "num_images", _number(payload, "batch_size", 1))),
    }
    steps = payload.get("steps", payload.get("num_steps", payload.get("decoder_steps")))
    if steps is not None:
        fields["steps"] = int(_number({"steps": steps}, "steps", 50))
    seed = payload.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
        fields["seed"] = seed
    for side in ("width", "height"):
        fields[side] = max(fields[side] - fields[side] % 8, 8)
    items = payload.get("images_texts")
    if items is not None:
        weights = payload.get("weights") or [1.0] * len(items)
        if (
            not isinstance(items, list)
            or not isinstance(weights, list)
            or len(items) != len(weights)
        ):
            raise ValueError("payload.images_texts and payload.weights must be lists of one length")
        mix = []
        for item, weight in zip(items, weights, strict=True):
            if not isinstance(item, str) or not item:
                raise ValueError("each of payload.images_texts must be a prompt or a base64 image")
            key = "image" if looks_like_image(item) else "prompt"
            mix.append({key: item, "weight": weight})
        fields["kind"] = "mix"
        fields["mix"] = mix
        prompts = [m["prompt"] for m in mix if "prompt" in m]
        fields["prompt"] = str(payload.get("prompt") or " + ".join(prompts) or "image mix")
        return fields
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("payload.prompt must be a non-empty string")
    fields["prompt"] = prompt
    image = payload.get("image") or payload.get("init_image")
    if isinstance(image, str) and image:
        fields["kind"] = "img2img"
        fields["init_image"] = image
        fields["strength"] = float(_number(payload, "strength", 0.75))
    return fields


def comfyui_nodes(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The nodes of an API-format workflow (``{"id": {"class_type", "inputs"}}``)."""
    nodes = {
        key: node
        for key, node in workflow.items()
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict) and "class_type" in node
    }
    if not nodes:
        raise ValueError(
            'payload is not a ComfyUI API-format workflow ({"<id>": {"class_type", "inputs"}}); '
            "export it with 'Save (API Format)'"
        )
    return nodes


SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
SEED_INPUTS = ("seed", "noise_seed")


def _comfyui_fields(workflow: dict[str, Any]) -> dict[str, Any]:
    nodes = comfyui_nodes(workflow)
    fields: dict[str, Any] = {}
    sampler: dict[str, Any] = next(
        (n["inputs"] for n in nodes.values() if n["class_type"] in SAMPLER_NODES), {}
    )

    def text_of(link: Any) -> str | None:
        if isinstance(link, list) and link and str(link[0]) in nodes:
            text = nodes[str(link[0])]["inputs"].get("text")
            return text if isinstance(text, str) else None
        return None

    fields["prompt"] = text_of(sampler.get("positive")) or next(
        (
            n["inputs"]["text"]
            for n in nodes.values()
            if isinstance(n["inputs"].get("text"), str) and n["inputs"]["text"].strip()
        ),
        "(ComfyUI workflow)",
    )
    fields["negative_prompt"] = text_of(sampler.get("negative")) or ""
    for key, name in (("steps", "steps"), ("cfg", "cfg_scale")):
        if isinstance(sampler.get(key), int | float):
            fields[name] = sampler[key]
    for key in SEED_INPUTS:
        if isinstance(sampler.get(key), int):
            fields["seed"] = sampler[key]
    for node in nodes.values():
        inputs = node["inputs"]
        if node["class_type"].startswith("EmptyLatentImage") or node["class_type"].startswith(
            "EmptySD3LatentImage"
        ):
            for key in ("width", "height", "batch_size"):
                if isinstance(inputs.get(key), int):
                    fields[key] = inputs[key]
    return fields
