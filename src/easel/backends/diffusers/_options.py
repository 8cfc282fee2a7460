"""The request fields only the diffusers backend reads, typed, read defensively.

``GenerationRequest`` is the one vocabulary and lives in ``easel.jobs`` (with the models of
these fields); this module gathers the fields only this backend reads (mask, LoRAs,
ControlNet, clip skip, previews, upscale, mix) into one validated view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from easel.backends.diffusers._families import Mode
from easel.config import DiffusersOptions
from easel.errors import InvalidRequest, describe_validation
from easel.jobs import ControlNetSpec, LoraSpec, MixItem, UpscaleSpec


class BackendOptions(DiffusersOptions):
    """Everything a diffusers backend is built with, typed and validated at once: the
    settings' options (``EASEL_DIFFUSERS__*``, a fleet entry) plus the model, its folder and
    the device. An option it does not know is refused, never ignored. A few values are
    checked by the device layer instead (``unknown dtype``...), whose messages list what is
    allowed."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    models_dir: str | None = None
    device: str = "auto"
    offload: str = "none"  # type: ignore[assignment]
    compile: str = "off"  # type: ignore[assignment]
    memory_budget: str | int | None = None  # type: ignore[assignment]

    @classmethod
    def of(cls, fields: Mapping[str, Any]) -> BackendOptions:
        """``fields`` validated, or ``invalid_request`` naming what is wrong."""
        try:
            return cls.model_validate(dict(fields))
        except ValidationError as exc:
            raise InvalidRequest(describe_validation(exc.errors())) from None


@dataclass(frozen=True)
class Extras:
    """The backend's view of one request, beyond the core fields."""

    mode: Mode
    mask_image: str | None = None
    loras: tuple[LoraSpec, ...] = ()
    controlnet: ControlNetSpec | None = None
    clip_skip: int | None = None
    preview_every: int | None = None
    upscale: UpscaleSpec | None = None
    mix: tuple[MixItem, ...] = ()


def read_extras(request: Any) -> Extras:
    """The optional fields of ``request`` (absent ones take their defaults), validated."""
    try:
        loras = tuple(_model(LoraSpec, x) for x in _seq(getattr(request, "loras", None)))
        controlnet = _optional(ControlNetSpec, getattr(request, "controlnet", None))
        upscale = _optional(UpscaleSpec, getattr(request, "upscale", None))
        mix = tuple(_model(MixItem, x) for x in _seq(getattr(request, "mix", None)))
    except ValidationError as exc:
        raise InvalidRequest(describe_validation(exc.errors())) from None
    mask = getattr(request, "mask_image", None)
    clip_skip = getattr(request, "clip_skip", None)
    if clip_skip is not None and (not isinstance(clip_skip, int) or not 1 <= clip_skip <= 12):
        raise InvalidRequest("clip_skip counts CLIP layers from the end: 1 (none) to 12")
    every = getattr(request, "preview_every", None)
    if every is not None and (not isinstance(every, int) or every < 0):
        raise InvalidRequest("preview_every is a number of steps (0: no previews)")
    for item in mix:
        if (item.image is None) == (item.prompt is None):
            raise InvalidRequest("each mix item needs exactly one of image or prompt")
    if controlnet is not None and controlnet.start >= controlnet.end:
        raise InvalidRequest("controlnet.start must be before controlnet.end")
    return Extras(
        mode=_mode(request, mask, mix),
        mask_image=mask,
        loras=loras,
        controlnet=controlnet,
        clip_skip=clip_skip,
        preview_every=every,  # 0: none, even where the worker previews by default
        upscale=upscale,
        mix=mix,
    )


def _mode(request: Any, mask: str | None, mix: Sequence[MixItem]) -> Mode:
    kind = str(getattr(request, "kind", "txt2img"))
    if kind == Mode.mix or mix:
        if not mix:
            raise InvalidRequest("a mix needs mix items (images or prompts, with weights)")
        return Mode.mix
    if kind == Mode.inpaint or mask is not None:
        if getattr(request, "init_image", None) is None or mask is None:
            raise InvalidRequest("inpainting needs init_image and mask_image (white = repaint)")
        return Mode.inpaint
    if kind == Mode.img2img:
        return Mode.img2img
    return Mode.txt2img


def _seq(value: Any) -> Sequence[Any]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise InvalidRequest(f"expected a list, got {type(value).__name__}")
    return value


def _model(cls: type[BaseModel], value: Any) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return cls.model_validate(value)


def _optional(cls: type[BaseModel], value: Any) -> Any:
    return None if value is None else _model(cls, value)
