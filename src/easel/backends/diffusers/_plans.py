"""Admission for the diffusers backend: a request checked against its model's family.

Everything a request can be refused for is decided here, from the registry and the family
table alone (no torch, nothing loaded), so a bad request is a 4xx before it costs GPU time.
The result, a :class:`Plan`, is what the run then follows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from easel.backends.diffusers._families import Family, Mode, family_of
from easel.backends.diffusers._lora import require_peft
from easel.backends.diffusers._options import Extras, read_extras
from easel.backends.diffusers._pipelines import DeviceOptions
from easel.backends.diffusers.models import ModelEntry, ModelKind, ModelRegistry, refuse_pickles
from easel.backends.diffusers.schedulers import SchedulerSpec, resolve_sampler
from easel.errors import InvalidRequest, ModelNotFound, Unsupported

MAX_MIX_ITEMS = 8


@dataclass(frozen=True)
class Plan:
    """A checked request: which model, which family, which options."""

    entry: ModelEntry
    family: Family
    extras: Extras
    scheduler: SchedulerSpec | None
    loras: tuple[tuple[ModelEntry, float], ...]
    controlnet: ModelEntry | None


def family_for(entry: ModelEntry) -> Family:
    """The model's family; an inpainting checkpoint (9-channel UNet) can only inpaint."""
    family = family_of(entry.family)
    if entry.variant == "inpaint":
        return replace(family, modes=frozenset({Mode.inpaint}))
    return family


def plan_request(
    request: Any, registry: ModelRegistry, default: str | None, options: DeviceOptions
) -> Plan:
    """``request`` checked against the model it names (or ``default``), or a 4xx."""
    name = request.model or default
    if name is None:
        raise ModelNotFound("no model is configured and the models directory is empty")
    entry = registry.get(name)
    refuse_pickles(entry, allowed=options.allow_pickle)
    family = family_for(entry)
    extras = read_extras(request)
    what = f"model {entry.name!r} ({family.label})"
    _check_mode_and_size(request, extras, family, what)
    spec = _scheduler(request, family, what)
    if extras.clip_skip is not None and not family.clip_skip:
        raise Unsupported(f"{what} has no CLIP layers to skip")
    layers = entry.text_layers or 12  # single files: SD's CLIP ViT-L has 12
    if extras.clip_skip is not None and extras.clip_skip > layers:
        raise InvalidRequest(
            f"clip_skip {extras.clip_skip} is deeper than the text encoder of {what} "
            f"({layers} layers); use 1 (none) to {layers}"
        )
    if extras.upscale is not None and (not family.upscale or extras.mode is not Mode.txt2img):
        raise Unsupported(f"{what} cannot upscale {extras.mode} (txt2img on SD/SDXL/SD3/FLUX)")
    if extras.loras:
        if not family.lora:
            raise Unsupported(f"{what} does not take LoRAs")
        require_peft()
        if options.fuse_qkv:
            raise Unsupported("LoRAs cannot apply to fused QKV projections (fuse_qkv is on)")
    loras = tuple(
        (_part(registry, lora.name, ModelKind.lora, family, what), lora.weight)
        for lora in extras.loras
    )
    controlnet = None
    if extras.controlnet is not None:
        if not family.controlnet:
            raise Unsupported(f"{what} takes no ControlNet")
        controlnet = _part(registry, extras.controlnet.name, ModelKind.controlnet, family, what)
    if len(extras.mix) > MAX_MIX_ITEMS:
        raise InvalidRequest(f"a mix takes at most {MAX_MIX_ITEMS} items")
    return Plan(entry, family, extras, spec, loras, controlnet)


def _check_mode_and_size(request: Any, extras: Extras, family: Family, what: str) -> None:
    if extras.mode not in family.modes:
        can = ", ".join(sorted(family.modes))
        raise Unsupported(f"{what} cannot do {extras.mode}; it can do: {can}")
    step = family.size_multiple
    if request.width % step or request.height % step:
        raise InvalidRequest(
            f"{what} needs width and height in multiples of {step} "
            f"(got {request.width}x{request.height})"
        )
    if request.negative_prompt and not family.negative_prompt:
        raise Unsupported(f"{what} does not take a negative prompt")
    if extras.mode in (Mode.img2img, Mode.inpaint) and int(request.steps * request.strength) < 1:
        raise InvalidRequest(
            f"{extras.mode} runs int(steps * strength) denoising steps, here "
            f"int({request.steps} * {request.strength}) = 0; raise steps or strength"
        )


def _scheduler(request: Any, family: Family, what: str) -> SchedulerSpec | None:
    if request.scheduler is None:
        return None
    return resolve_sampler(request.scheduler, family)


def _part(
    registry: ModelRegistry, name: str, kind: ModelKind, family: Family, what: str
) -> ModelEntry:
    """A LoRA or ControlNet by name, refused if made for another family."""
    entry = registry.get(name, kind)
    sd = {"sd1", "sd2"}
    compatible = entry.family in ("unknown", family.name) or {entry.family, family.name} <= sd
    if not compatible:
        raise Unsupported(f"{kind} {name!r} is made for {entry.family}, not for {what}")
    return entry
