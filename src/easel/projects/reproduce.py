"""The request that made an image, read back from the image (``easel reproduce``).

Sources, best first: a project's ``metadata/NNN.yaml`` beside the image's folder, easel's
JSON sidecar, the PNG's ``easel`` chunk (the request itself), then any Automatic1111-style
infotext (PNG ``parameters`` chunk, EXIF ``UserComment``), whose sampler and "Schedule
type" are joined through :func:`easel.samplers.join_sampler`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError

from easel.errors import InvalidRequest
from easel.jobs import GenerationRequest
from easel.results.metadata import parse_infotext, read_embedded
from easel.samplers import join_sampler

KEPT = set(GenerationRequest.model_fields) - {
    "user_id", "priority", "premium", "max_user_queue_size", "metadata", "include_images",
    "sync_with_s3", "backend", "model", "fallback", "tags", "batch_size", "preview_every",
}  # fmt: skip
"""What decides the pixels; who asked, where it ran and how it was delivered do not."""


@dataclass(frozen=True)
class Reproduction:
    """The request to send again, the backend and model that made the image, and from what."""

    request: dict[str, Any]
    backend: str | None
    model: str | None
    source: str


def reproduction_of(image: Path) -> Reproduction:
    """Read ``image``'s parameters; :class:`InvalidRequest` says when there are none."""
    try:
        with Image.open(image) as opened:
            embedded = read_embedded(opened)
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidRequest(f"cannot read {image} as an image: {exc}") from None
    fields = parse_infotext(embedded.infotext) if embedded.infotext else {}
    model = fields.get("Model")
    for path, loader in (
        (image.parent.parent / "metadata" / f"{image.stem}.yaml", yaml.safe_load),
        (image.with_suffix(".json"), json.loads),
    ):
        record = _record(path, loader) or {}
        request = record.get("parameters", record.get("request"))
        if isinstance(request, dict):
            return Reproduction(
                request=_kept(request),
                backend=record.get("backend"),
                model=record.get("model") or model,
                source=str(path),
            )
    if embedded.request is not None:
        return Reproduction(_kept(embedded.request), None, model, "the image's easel chunk")
    if embedded.infotext:
        return Reproduction(_from_infotext(fields), None, model, "the image's infotext")
    raise InvalidRequest(
        f"{image} carries no generation parameters (no PNG parameters chunk, EXIF "
        "UserComment or easel metadata beside it)"
    )


def _record(path: Path, loader: Any) -> dict[str, Any] | None:
    try:
        loaded = loader(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _kept(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("init_image_sha256") or request.get("kind") not in (None, "txt2img"):
        raise InvalidRequest(
            "this image was made from an init image (img2img/inpainting), which its metadata "
            "does not hold; reproduce it with easel generate --init-image"
        )
    return {key: value for key, value in request.items() if key in KEPT and value is not None}


def _from_infotext(fields: dict[str, str]) -> dict[str, Any]:
    """An A1111 infotext as an easel request (only what it states; easel's defaults else)."""
    if "Denoising strength" in fields:
        _kept({"kind": "img2img"})
    request: dict[str, Any] = {"prompt": fields.get("prompt", "")}
    if fields.get("negative_prompt"):
        request["negative_prompt"] = fields["negative_prompt"]
    numbers = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int)}
    numbers["Clip skip"] = ("clip_skip", int)
    try:
        for key, (name, kind) in numbers.items():
            if key in fields:
                request[name] = kind(fields[key])
        if "Size" in fields:
            width, height = fields["Size"].lower().split("x")
            request["width"], request["height"] = int(width), int(height)
    except ValueError as exc:
        raise InvalidRequest(f"the image's infotext has a malformed number: {exc}") from None
    sampler = fields.get("Sampler")
    if sampler and sampler != "default":
        request["scheduler"] = join_sampler(sampler, fields.get("Schedule type"))
    return request
