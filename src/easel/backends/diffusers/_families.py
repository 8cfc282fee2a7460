"""What each model family can do, as data: modes, options, latent layout, preview colours.

Admission refuses what a family cannot do from this table, before any model is loaded; at run
time the pipeline's own call signature has the last word (only accepted keywords are passed).
Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType

from easel.samplers import Schedule


class Mode(StrEnum):
    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"
    mix = "mix"


RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    modes: frozenset[Mode]
    flow: bool = False
    """Flow matching (SD3, FLUX): its own scheduler table."""
    negative_prompt: bool = True
    clip_skip: bool = False
    lora: bool = False
    controlnet: bool = False
    upscale: bool = False
    """Latent upscale ("hires fix"): a second img2img pass on upscaled latents."""
    ays: str | None = None
    """Which Align-Your-Steps schedule fits ("sd", "sdxl"), if any."""
    size_multiple: int = 8
    latent_channels: int = 4
    packed: bool = False
    """FLUX packs 2x2 latent patches into tokens."""
    latent_rgb: tuple[RGB, ...] | None = None
    """latent channel -> RGB weights for cheap previews (ComfyUI's published fits)."""
    latent_rgb_bias: RGB = (0.0, 0.0, 0.0)
    schedulers: frozenset[str] | None = None
    """The scheduler classes its pipelines can drive, where not all of them."""
    refused_schedules: frozenset[Schedule] = frozenset()
    """Schedule modifiers its noise schedule cannot take (found by the names x families test)."""


_ALL_BUT_MIX = frozenset({Mode.txt2img, Mode.img2img, Mode.inpaint})

# Kandinsky's loops never call ``scale_model_input`` (Euler-like samplers need it) and pass a
# generator to ``step`` (UniPC, DEIS, PNDM, Heun take none).
_KANDINSKY_SCHEDULERS = frozenset(
    {
        "DDIMScheduler",
        "DDPMScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "LCMScheduler",
        "TCDScheduler",
    }
)

_SD_RGB: tuple[RGB, ...] = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_RGB: tuple[RGB, ...] = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SD3_RGB: tuple[RGB, ...] = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)
_FLUX_RGB: tuple[RGB, ...] = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)

_SD1 = Family(
    "sd1",
    "Stable Diffusion 1.x",
    _ALL_BUT_MIX,
    clip_skip=True,
    lora=True,
    controlnet=True,
    upscale=True,
    ays="sd",
    latent_rgb=_SD_RGB,
)

FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        "sd1": _SD1,
        "sd2": replace(_SD1, name="sd2", label="Stable Diffusion 2.x"),
        "sdxl": Family(
            "sdxl",
            "Stable Diffusion XL",
            _ALL_BUT_MIX,
            clip_skip=True,
            lora=True,
            controlnet=True,
            upscale=True,
            ays="sdxl",
            latent_rgb=_SDXL_RGB,
            latent_rgb_bias=(0.1084, -0.0175, -0.0011),
        ),
        "sd3": Family(
            "sd3",
            "Stable Diffusion 3/3.5",
            _ALL_BUT_MIX,
            flow=True,
            clip_skip=True,
            lora=True,
            controlnet=True,
            upscale=True,
            size_multiple=16,  # VAE 8 x transformer patch 2
            latent_channels=16,
            latent_rgb=_SD3_RGB,
            latent_rgb_bias=(0.2394, 0.2135, 0.1925),
        ),
        "flux": Family(
            "flux",
            "FLUX.1",
            _ALL_BUT_MIX,
            flow=True,
            # FLUX is guidance-distilled: a negative prompt needs "true CFG", twice the cost.
            negative_prompt=False,
            lora=True,
            controlnet=True,
            upscale=True,
            size_multiple=16,  # VAE 8 x 2x2 packing
            latent_channels=16,
            packed=True,
            latent_rgb=_FLUX_RGB,
            # FluxPipeline passes its own sigmas to set_timesteps; FlowMatchHeun takes none.
            schedulers=frozenset({"FlowMatchEulerDiscreteScheduler", "FlowMatchLCMScheduler"}),
            latent_rgb_bias=(-0.0329, -0.0718, -0.0851),
        ),
        "kandinsky22": Family(
            "kandinsky22",
            "Kandinsky 2.2",
            # inpainting needs its separate 9-channel decoder (a variant="inpaint" model)
            frozenset({Mode.txt2img, Mode.img2img, Mode.mix}),
            size_multiple=64,  # its MoVQ rounds sizes up to 64
            schedulers=_KANDINSKY_SCHEDULERS,
        ),
        "kandinsky3": Family(
            "kandinsky3",
            "Kandinsky 3",
            frozenset({Mode.txt2img, Mode.img2img}),
            size_multiple=64,
            schedulers=_KANDINSKY_SCHEDULERS,
            # its squared-cosine betas: these sigmas round to repeated timesteps (IndexError)
            refused_schedules=frozenset({Schedule.karras, Schedule.exponential, Schedule.beta}),
        ),
    }
)


def family_of(name: str) -> Family:
    """The family called ``name``; an unknown family can only do plain txt2img."""
    return FAMILIES.get(name) or Family(name, name, frozenset({Mode.txt2img}))
