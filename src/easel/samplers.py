"""Sampler names as people type them -> one canonical name, and back to each tool's names.

Users arrive with names from Automatic1111 ("DPM++ 2M Karras", or sampler "DPM++ 2M" with
schedule type "Karras"), ComfyUI (sampler ``dpmpp_2m`` + scheduler ``karras``), Draw Things
("DPMPP2M Karras", "UniPC ays", or ``SamplerType`` 0-19), diffusers (class names such as
``DPMSolverMultistepScheduler``) and the config files of diffusers servers
(``scheduler_type: "dpmsolver++"`` with ``karras_sigmas: true``). This module reads all of
them into one :class:`SamplerName`: a sampler (A1111's spelling) plus at most one schedule
modifier, and writes it back out for A1111, ComfyUI and Draw Things.

Pure data, no torch: admission parses names before anything is loaded. What a given
*engine* can run (diffusers classes per model family, say) is that engine's business; see
:func:`easel.backends.diffusers.schedulers.resolve_sampler`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from easel.errors import InvalidRequest

CAPABILITY_PREFIX = "sampler:"
"""The router sees "runs this sampler" as a capability: ``sampler:DPM++ 2M Karras``, or
``sampler:*`` for every one; a backend listing none is not filtered by sampler."""


class Schedule(StrEnum):
    """How the steps' noise levels are spread (A1111's "schedule type")."""

    karras = "Karras"
    exponential = "Exponential"
    beta = "Beta"
    trailing = "Trailing"
    """Timesteps counted from the end (A1111 "SGM Uniform", ComfyUI ``sgm_uniform``)."""
    ays = "AYS"
    """NVIDIA's Align Your Steps sigmas (A1111 "Align Your Steps")."""
    substep = "Substep"
    """Draw Things' sub-step sampling; no other tool has it."""
    polyexponential = "Polyexponential"
    """A1111's "Polyexponential" (k-diffusion's polyexponential sigmas)."""
    kl_optimal = "KL Optimal"
    """A1111's "KL Optimal" (ComfyUI ``kl_optimal``)."""


SAMPLERS: tuple[str, ...] = (
    "Euler",
    "Euler a",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2M",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 3M SDE",
    "DPM++ SDE",
    "DPM++ 2S",
    "DPM++ 2S a",
    "DPM fast",
    "DPM adaptive",
    "Restart",
    "LMS",
    "DDIM",
    "DDIM CFG++",
    "DDPM",
    "PLMS",
    "PNDM",
    "DEIS",
    "UniPC",
    "LCM",
    "TCD",
)
"""Every sampler easel knows, in Automatic1111's spelling (the canonical one)."""

A1111_SAMPLERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "DPM++ 2M": ("k_dpmpp_2m",),
        "DPM++ SDE": ("k_dpmpp_sde",),
        "DPM++ 2M SDE": ("k_dpmpp_2m_sde",),
        "DPM++ 2M SDE Heun": ("k_dpmpp_2m_sde_heun",),
        "DPM++ 2S a": ("k_dpmpp_2s_a",),
        "DPM++ 3M SDE": ("k_dpmpp_3m_sde",),
        "Euler a": ("k_euler_a", "k_euler_ancestral"),
        "Euler": ("k_euler",),
        "LMS": ("k_lms",),
        "Heun": ("k_heun",),
        "DPM2": ("k_dpm_2",),
        "DPM2 a": ("k_dpm_2_a",),
        "DPM fast": ("k_dpm_fast",),
        "DPM adaptive": ("k_dpm_ad",),
        "Restart": ("restart",),
        "DDIM": ("ddim",),
        "DDIM CFG++": ("ddim_cfgpp",),
        "PLMS": ("plms",),
        "UniPC": ("unipc",),
        "LCM": ("lcm",),
    }
)
"""Automatic1111's own samplers (1.10, ``/sdapi/v1/samplers``) in its order, with the
aliases it lists: what an ``automatic1111`` engine runs. Every name and alias parses."""

A1111_SCHEDULE_TYPES: Mapping[Schedule, str] = MappingProxyType(
    {
        Schedule.karras: "Karras",
        Schedule.exponential: "Exponential",
        Schedule.beta: "Beta",
        Schedule.trailing: "SGM Uniform",
        Schedule.ays: "Align Your Steps",
        Schedule.polyexponential: "Polyexponential",
        Schedule.kl_optimal: "KL Optimal",
    }
)
"""A1111's "Schedule type" for each modifier (Substep has none)."""

COMFYUI_SAMPLERS: Mapping[str, str] = MappingProxyType(
    {
        "Euler": "euler",
        "Euler a": "euler_ancestral",
        "Heun": "heun",
        "DPM2": "dpm_2",
        "DPM2 a": "dpm_2_ancestral",
        "DPM++ 2M": "dpmpp_2m",
        "DPM++ 2M SDE": "dpmpp_2m_sde",
        "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun",
        "DPM++ 3M SDE": "dpmpp_3m_sde",
        "DPM++ SDE": "dpmpp_sde",
        "LMS": "lms",
        "DPM fast": "dpm_fast",
        "DPM adaptive": "dpm_adaptive",
        "DPM++ 2S a": "dpmpp_2s_ancestral",
        "DDIM": "ddim",
        "DDPM": "ddpm",
        "DEIS": "deis",
        "UniPC": "uni_pc",
        "LCM": "lcm",
    }
)
COMFYUI_SCHEDULERS: Mapping[Schedule | None, str] = MappingProxyType(
    {
        None: "normal",
        Schedule.karras: "karras",
        Schedule.exponential: "exponential",
        Schedule.beta: "beta",
        Schedule.trailing: "sgm_uniform",
        Schedule.kl_optimal: "kl_optimal",
    }
)

DRAWTHINGS_SAMPLERS: tuple[str, ...] = (
    "DPM++ 2M Karras",
    "Euler a",
    "DDIM",
    "PLMS",
    "DPM++ SDE Karras",
    "UniPC",
    "LCM",
    "Euler a Substep",
    "DPM++ SDE Substep",
    "TCD",
    "Euler a Trailing",
    "DPM++ SDE Trailing",
    "DPM++ 2M AYS",
    "Euler a AYS",
    "DPM++ SDE AYS",
    "DPM++ 2M Trailing",
    "DDIM Trailing",
    "UniPC Trailing",
    "UniPC AYS",
    "TCD Trailing",
)
"""Draw Things' ``SamplerType`` values in enum order (0-19), by their canonical names. Draw
Things spells them "DPMPP2M Karras", "Euler A AYS", ... (or ``DPMPP2MKarras`` in its schema);
every spelling parses."""

DIFFUSERS_CLASSES: Mapping[str, str] = MappingProxyType(
    {
        "EulerDiscreteScheduler": "Euler",
        "EulerAncestralDiscreteScheduler": "Euler a",
        "HeunDiscreteScheduler": "Heun",
        "KDPM2DiscreteScheduler": "DPM2",
        "KDPM2AncestralDiscreteScheduler": "DPM2 a",
        "DPMSolverMultistepScheduler": "DPM++ 2M",
        "DPMSolverSDEScheduler": "DPM++ SDE",
        "DPMSolverSinglestepScheduler": "DPM++ 2S",
        "LMSDiscreteScheduler": "LMS",
        "DDIMScheduler": "DDIM",
        "DDPMScheduler": "DDPM",
        "PNDMScheduler": "PNDM",
        "DEISMultistepScheduler": "DEIS",
        "UniPCMultistepScheduler": "UniPC",
        "LCMScheduler": "LCM",
        "TCDScheduler": "TCD",
        # flow matching (SD3, FLUX): the same samplers on another noise schedule
        "FlowMatchEulerDiscreteScheduler": "Euler",
        "FlowMatchHeunDiscreteScheduler": "Heun",
        "FlowMatchLCMScheduler": "LCM",
    }
)
"""diffusers scheduler classes -> the sampler each implements."""


def _key(text: str) -> str:
    """The spelling-free form: case, spaces, ``_``, ``-``, ``.`` ignored; "dpmpp" is "dpm++"."""
    squashed = "".join(c for c in text.casefold() if c not in " _-.\t")
    return squashed.replace("dpmpp", "dpm++").replace("dpmplusplus", "dpm++")


# Other spellings of samplers (already in key form) -> canonical names.
_SAMPLER_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "eulerancestral": "Euler a",
        "keuler": "Euler",
        "keulera": "Euler a",
        "keulerancestral": "Euler a",
        "kheun": "Heun",
        "kdpm2": "DPM2",
        "kdpm2a": "DPM2 a",
        "kdpm2ancestral": "DPM2 a",
        "dpm2ancestral": "DPM2 a",
        "klms": "LMS",
        "unipcbh2": "UniPC",
        "unipcbh1": "UniPC",
        "dpm++sdegpu": "DPM++ SDE",
        "dpm++2msdegpu": "DPM++ 2M SDE",
        "dpm++2msdeheungpu": "DPM++ 2M SDE Heun",
        "dpm++3msdegpu": "DPM++ 3M SDE",
        "dpm++2sancestral": "DPM++ 2S a",
        "dpmad": "DPM adaptive",
        "ddimcfgpp": "DDIM CFG++",
        # diffusers servers' ``scheduler_type`` values
        "dpmsolver++": "DPM++ 2M",
        "dpmsolvermultistep": "DPM++ 2M",
        "sdedpmsolver++": "DPM++ 2M SDE",
        "dpmsolversde": "DPM++ SDE",
        "dpmsolversinglestep": "DPM++ 2S",
        "dpm++singlestep": "DPM++ 2S",
        "eulerdiscrete": "Euler",
        "eulerancestraldiscrete": "Euler a",
        "heundiscrete": "Heun",
        "lmsdiscrete": "LMS",
        "deismultistep": "DEIS",
        "unipcmultistep": "UniPC",
    }
)
_BY_KEY: Mapping[str, str] = MappingProxyType(
    {_key(n): n for n in SAMPLERS}
    | dict(_SAMPLER_ALIASES)
    | {_key(c): s for c, s in DIFFUSERS_CLASSES.items()}
    | {_key(alias): n for n, aliases in A1111_SAMPLERS.items() for alias in aliases}
)
_CLASS_KEYS = frozenset(_key(c) for c in DIFFUSERS_CLASSES)

# Schedule names (key form) of every tool; None = the model's default spacing.
_SCHEDULE_ALIASES: Mapping[str, Schedule | None] = MappingProxyType(
    {
        "karras": Schedule.karras,
        "exponential": Schedule.exponential,
        "beta": Schedule.beta,
        "trailing": Schedule.trailing,
        "sgmuniform": Schedule.trailing,
        "ays": Schedule.ays,
        "alignyoursteps": Schedule.ays,
        "substep": Schedule.substep,
        "polyexponential": Schedule.polyexponential,
        "kloptimal": Schedule.kl_optimal,
        "normal": None,
        "simple": None,
        "ddimuniform": None,
        "ddim": None,
        "uniform": None,
        "automatic": None,
        "default": None,
    }
)
_SUFFIXES = sorted(_SCHEDULE_ALIASES, key=len, reverse=True)


@dataclass(frozen=True)
class SamplerName:
    """A sampler plus at most one schedule modifier, whatever tool's spelling it came in."""

    sampler: str
    """The sampler in A1111's spelling: "DPM++ 2M", "Euler a", "UniPC"."""
    schedule: Schedule | None = None
    diffusers_class: str | None = None
    """Set when the user named a diffusers class: run it as the model's config says."""

    @property
    def name(self) -> str:
        """easel's canonical spelling: "DPM++ 2M Karras", "UniPC AYS", or the class name."""
        if self.diffusers_class is not None:
            return self.diffusers_class
        return f"{self.sampler} {self.schedule.value}" if self.schedule else self.sampler

    @property
    def a1111(self) -> tuple[str, str]:
        """(sampler, schedule type) as A1111 1.9+ writes them: ("DPM++ 2M", "Karras");
        the schedule is "Automatic" for none (and for Substep, which A1111 lacks)."""
        schedule = A1111_SCHEDULE_TYPES.get(self.schedule) if self.schedule else None
        return self.sampler, schedule or "Automatic"

    @property
    def a1111_label(self) -> str:
        """The one name A1111 takes as ``sampler_name`` in every version: "DPM++ 2M Karras",
        "UniPC Align Your Steps" (1.9+ splits the schedule type off; older ones knew the
        Karras names whole)."""
        sampler, schedule = self.a1111
        return sampler if schedule == "Automatic" else f"{sampler} {schedule}"

    @property
    def in_a1111(self) -> bool:
        """Whether Automatic1111 itself has this sampler and schedule type (a diffusers
        class runs there as the sampler it implements)."""
        if self.sampler not in A1111_SAMPLERS:
            return False
        return self.schedule is None or self.schedule in A1111_SCHEDULE_TYPES

    @property
    def comfyui(self) -> tuple[str, str] | None:
        """(sampler_name, scheduler) for ComfyUI's KSampler, or None where it has no pair
        (AYS is a separate node there; Substep does not exist)."""
        sampler = COMFYUI_SAMPLERS.get(self.sampler)
        if sampler is None or self.schedule not in COMFYUI_SCHEDULERS:
            return None
        return sampler, COMFYUI_SCHEDULERS[self.schedule]

    @property
    def drawthings(self) -> int | None:
        """Draw Things' ``SamplerType`` value, or None where it has no such sampler."""
        try:
            return DRAWTHINGS_SAMPLERS.index(self.name)
        except ValueError:
            return None


def parse_sampler(name: str) -> SamplerName:
    """Any tool's spelling of a sampler (case-insensitive) -> :class:`SamplerName`.

    "DPMPP2M Karras", "dpmpp_2m_karras", "DPM++ 2M Karras" and "dpm++ 2m karras" are one
    name; so are "UniPC ays" and "UniPC AYS". An unknown name is ``invalid_request``, listing
    the valid ones.
    """
    key = _key(name)
    if key in _BY_KEY:
        cls = next((c for c in DIFFUSERS_CLASSES if _key(c) == key), None)
        return SamplerName(_BY_KEY[key], None, cls)
    for suffix in _SUFFIXES:
        base = key.removesuffix(suffix)
        if base != key and base in _BY_KEY and base not in _CLASS_KEYS:
            return SamplerName(_BY_KEY[base], _SCHEDULE_ALIASES[suffix])
    raise InvalidRequest(
        f"unknown sampler {name!r}; valid samplers are {', '.join(SAMPLERS)}, optionally "
        "followed by a schedule (Karras, Exponential, Beta, Trailing, AYS, Substep), or a "
        "diffusers scheduler class name"
    )


A1111_SCHEDULERS: Mapping[str, str] = MappingProxyType(
    {
        "automatic": "Automatic",
        "uniform": "Uniform",
        "karras": "Karras",
        "exponential": "Exponential",
        "polyexponential": "Polyexponential",
        "sgm_uniform": "SGM Uniform",
        "kl_optimal": "KL Optimal",
        "align_your_steps": "Align Your Steps",
        "simple": "Simple",
        "normal": "Normal",
        "ddim": "DDIM",
        "beta": "Beta",
    }
)
"""A1111's ``scheduler`` values (name -> label, ``/sdapi/v1/schedulers``, 1.10's list):
each is one of the schedule aliases above ("uniform", "simple", "normal" and "ddim" are
the model's own spacing here)."""


def a1111_sampler(sampler: str | None, scheduler: str | None) -> str | None:
    """A1111's ``sampler_name`` + ``scheduler`` -> easel's one name ("DPM++ 2M Karras"),
    read through this module's one table: an unknown sampler or schedule is
    ``invalid_request`` (A1111's own doors answer it in A1111's shape)."""
    if not sampler:
        return None
    return parse_sampler(join_sampler(sampler, scheduler)).name


def known_sampler(name: str) -> bool:
    """Whether any tool's spelling of ``name`` is a sampler easel knows."""
    try:
        parse_sampler(name)
    except InvalidRequest:
        return False
    return True


def join_sampler(sampler: str, schedule: str | None) -> str:
    """A sampler and a separate schedule (A1111's ``scheduler``, ComfyUI's ``scheduler``)
    as one name: ("DPM++ 2M", "Karras") -> "DPM++ 2M Karras"; a default schedule adds
    nothing. An unknown schedule is ``invalid_request``."""
    if not schedule:
        return sampler
    key = _key(schedule)
    if key not in _SCHEDULE_ALIASES:
        valid = ", ".join(sorted({*A1111_SCHEDULE_TYPES.values(), *COMFYUI_SCHEDULERS.values()}))
        raise InvalidRequest(
            f"unknown schedule {schedule!r}; valid schedules are: {valid}, AYS, Trailing"
        )
    modifier = _SCHEDULE_ALIASES[key]
    if modifier is None or _already(sampler, modifier):
        return sampler
    return f"{sampler} {modifier.value}"


def _already(sampler: str, modifier: Schedule) -> bool:
    """Whether ``sampler`` names ``modifier`` itself ("DPM++ 2M Karras" + Karras, "UniPC
    Align Your Steps" + AYS: A1111 clients send both)."""
    try:
        return parse_sampler(sampler).schedule is modifier
    except InvalidRequest:
        return False


def from_diffusers_style(
    scheduler_type: str,
    *,
    karras_sigmas: bool = False,
    exponential_sigmas: bool = False,
    beta_sigmas: bool = False,
    timestep_spacing: str | None = None,
) -> str:
    """The config style of diffusers servers -> an easel sampler name.

    ``scheduler_type: "dpmsolver++"`` with ``karras_sigmas: true`` is "DPM++ 2M Karras";
    ``timestep_spacing: "trailing"`` adds Trailing. At most one modifier applies.
    """
    parsed = parse_sampler(scheduler_type)
    flags = [
        (karras_sigmas, Schedule.karras),
        (exponential_sigmas, Schedule.exponential),
        (beta_sigmas, Schedule.beta),
        (timestep_spacing == "trailing", Schedule.trailing),
    ]
    chosen = [schedule for on, schedule in flags if on]
    if parsed.schedule is not None:
        chosen.insert(0, parsed.schedule)
    if len(set(chosen)) > 1:
        raise InvalidRequest(
            f"{scheduler_type!r} can take one noise schedule, not "
            f"{' and '.join(s.value for s in chosen)}"
        )
    if timestep_spacing not in (None, "trailing", "leading", "linspace"):
        raise InvalidRequest(
            f"timestep_spacing {timestep_spacing!r} is not one of leading, linspace, trailing"
        )
    base = SamplerName(parsed.sampler, chosen[0] if chosen else None)
    return base.name
