"""Scheduler names people use -> diffusers scheduler classes and configs.

One table for the names of Automatic1111 ("DPM++ 2M Karras"), ComfyUI ("dpmpp_2m" with
scheduler "karras", written ``dpmpp_2m_karras``), Draw Things ("Euler A Trailing", "UniPC AYS")
and diffusers' own class names. A name is a sampler plus at most one modifier: Karras,
Exponential or Beta sigmas, Trailing spacing, AYS (Align Your Steps) timesteps, or Substep.

Pure data plus one lazy constructor, so that admission can refuse an unknown scheduler with a
4xx before any model is touched, and without importing torch. Flow-matching models (SD3, FLUX)
have their own, shorter table: a noise-prediction sampler cannot drive them.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from easel.backends.diffusers._quiet import quiet_warnings
from easel.errors import InvalidRequest, Unsupported

quiet_scheduler_warnings = quiet_warnings
"""Kept for callers of the first version of this module."""


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class, its config overrides, and how to drive it."""

    class_name: str
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    requires: str | None = None
    ays: bool = False
    """Run Align-Your-Steps timesteps (passed to the pipeline call, not the config)."""
    note: str | None = None
    """Set where the name has no exact diffusers equivalent: what runs instead."""


@dataclass(frozen=True)
class _Sampler:
    class_name: str
    overrides: Mapping[str, Any]
    modifiers: frozenset[str]
    requires: str | None = None


_SIGMAS = frozenset({"Karras", "Exponential", "Beta"})
_SPACING = frozenset({"Trailing"})
_AYS = frozenset({"AYS"})
_ALL = _SIGMAS | _SPACING | _AYS
_SDE = {"algorithm_type": "sde-dpmsolver++"}


def _s(
    class_name: str, modifiers: frozenset[str], requires: str | None = None, **overrides: Any
) -> _Sampler:
    return _Sampler(class_name, MappingProxyType(overrides), modifiers, requires)


# Which modifier each class takes is what its __init__ / set_timesteps accept in diffusers
# (a test checks this table against the installed diffusers).
_SAMPLERS: Mapping[str, _Sampler] = MappingProxyType(
    {
        "Euler": _s("EulerDiscreteScheduler", _ALL),
        "Euler a": _s("EulerAncestralDiscreteScheduler", _SPACING),
        "Heun": _s("HeunDiscreteScheduler", _ALL),
        "DPM2": _s("KDPM2DiscreteScheduler", _SIGMAS | _SPACING),
        "DPM2 a": _s("KDPM2AncestralDiscreteScheduler", _SIGMAS | _SPACING),
        "DPM++ 2M": _s("DPMSolverMultistepScheduler", _ALL),
        "DPM++ 2M SDE": _s("DPMSolverMultistepScheduler", _ALL, **_SDE),
        "DPM++ 2M SDE Heun": _s("DPMSolverMultistepScheduler", _ALL, **_SDE, solver_type="heun"),
        "DPM++ 3M SDE": _s("DPMSolverMultistepScheduler", _ALL, **_SDE, solver_order=3),
        "DPM++ SDE": _s("DPMSolverSDEScheduler", _SIGMAS | _SPACING, "torchsde"),
        "DPM++ 2S": _s("DPMSolverSinglestepScheduler", _SIGMAS | _AYS),
        "LMS": _s("LMSDiscreteScheduler", _SIGMAS | _SPACING, "scipy"),
        "DDIM": _s("DDIMScheduler", _SPACING),
        "DDPM": _s("DDPMScheduler", _SPACING | _AYS),
        # PLMS is PNDM without its Runge-Kutta warm-up steps (which break below ~4 steps).
        "PLMS": _s("PNDMScheduler", _SPACING, skip_prk_steps=True),
        "PNDM": _s("PNDMScheduler", _SPACING, skip_prk_steps=True),
        "DEIS": _s("DEISMultistepScheduler", _SIGMAS | _SPACING),
        # diffusers' UniPC takes custom sigmas only for flow models: no AYS
        "UniPC": _s("UniPCMultistepScheduler", _SIGMAS | _SPACING),
        "LCM": _s("LCMScheduler", _SPACING | _AYS),
        "TCD": _s("TCDScheduler", _SPACING | _AYS),
    }
)

# Flow matching (SD3, FLUX): the sigmas come from the model's shift, so only these apply.
_FLOW_SAMPLERS: Mapping[str, _Sampler] = MappingProxyType(
    {
        "Euler": _s("FlowMatchEulerDiscreteScheduler", _SIGMAS),
        "Heun": _s("FlowMatchHeunDiscreteScheduler", frozenset()),
        "LCM": _s("FlowMatchLCMScheduler", _SIGMAS),
    }
)

_MODIFIER_OVERRIDES: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "Karras": {"use_karras_sigmas": True},
        "Exponential": {"use_exponential_sigmas": True},
        "Beta": {"use_beta_sigmas": True},
        "Trailing": {"timestep_spacing": "trailing"},
        "AYS": {},
    }
)

# Other spellings -> the names above. Keys are normalised (see _key).
_SAMPLER_ALIASES = {
    "euler ancestral": "Euler a",
    "k euler": "Euler",
    "k euler a": "Euler a",
    "dpm 2": "DPM2",
    "dpm 2 a": "DPM2 a",
    "dpm 2 ancestral": "DPM2 a",
    "dpmpp 2m": "DPM++ 2M",
    "dpmpp 2m sde": "DPM++ 2M SDE",
    "dpmpp 2m sde heun": "DPM++ 2M SDE Heun",
    "dpmpp 3m sde": "DPM++ 3M SDE",
    "dpmpp sde": "DPM++ SDE",
    "dpmpp 2s": "DPM++ 2S",
    "k lms": "LMS",
    "uni pc": "UniPC",
    "unipc bh2": "UniPC",
    "uni pc bh2": "UniPC",
}
# ComfyUI's scheduler names and Draw Things' suffixes -> modifiers ("" = the default spacing).
_MODIFIER_ALIASES = {
    "karras": "Karras",
    "exponential": "Exponential",
    "beta": "Beta",
    "trailing": "Trailing",
    "sgm uniform": "Trailing",
    "ays": "AYS",
    "align your steps": "AYS",
    "substep": "Substep",
    "normal": "",
    "simple": "",
}
# Draw Things' "Substep" samplers split each step in sub-steps; diffusers has no such sampler.
_SUBSTEP = {"Euler a", "DPM++ SDE"}
_SUBSTEP_NOTE = (
    "Draw Things' substep sampling has no diffusers equivalent; this ran {name} with "
    "trailing spacing instead"
)


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").split()).casefold()


def _friendly_names(samplers: Mapping[str, _Sampler]) -> list[str]:
    names = list(samplers)
    for modifier in ("Karras", "Exponential", "Beta", "Trailing", "AYS"):
        names += [f"{n} {modifier}" for n, s in samplers.items() if modifier in s.modifiers]
    return names


SCHEDULERS: tuple[str, ...] = tuple(_friendly_names(_SAMPLERS))
"""Every friendly name of noise-prediction models (SD 1.x/2.x, SDXL, Kandinsky), listed to
users in this order; ``Substep`` and ComfyUI spellings are accepted besides."""
FLOW_SCHEDULERS: tuple[str, ...] = tuple(_friendly_names(_FLOW_SAMPLERS))
"""Every friendly name of flow-matching models (SD3, FLUX)."""

_CLASS_NAMES = tuple(dict.fromkeys(s.class_name for s in _SAMPLERS.values()))
_FLOW_CLASS_NAMES = tuple(dict.fromkeys(s.class_name for s in _FLOW_SAMPLERS.values()))


def scheduler_names(*, flow: bool = False) -> list[str]:
    """Every accepted name: friendly names first, then diffusers class names."""
    if flow:
        return [*FLOW_SCHEDULERS, *_FLOW_CLASS_NAMES]
    return [*SCHEDULERS, *_CLASS_NAMES]


def _parse(name: str, samplers: Mapping[str, _Sampler]) -> tuple[str, str] | None:
    """``name`` -> (sampler, modifier) or None; the modifier is "" for none."""
    by_key = {_key(n): n for n in samplers} | {
        k: v for k, v in _SAMPLER_ALIASES.items() if v in samplers
    }
    key = _key(name)
    if key in by_key:
        return by_key[key], ""
    for suffix, modifier in _MODIFIER_ALIASES.items():
        if key.endswith(" " + suffix) and (base := by_key.get(key[: -len(suffix) - 1])):
            return base, modifier
    return None


def lookup_scheduler(name: str, *, flow: bool = False) -> SchedulerSpec:
    """The spec for ``name`` (case-insensitive); an unknown name is a 4xx listing valid names.

    ``flow`` selects the table of flow-matching models. A known scheduler whose extra package
    is not installed is :class:`Unsupported`, with the command that fixes it.
    """
    samplers = _FLOW_SAMPLERS if flow else _SAMPLERS
    spec = _class_spec(name, flow) or _named_spec(name, samplers)
    if spec is None:
        parsed = _parse(name, samplers)
        if parsed is not None:  # a sampler we have, with a modifier diffusers cannot apply
            sampler, modifier = parsed
            takes = ", ".join(sorted(samplers[sampler].modifiers)) or "no modifier"
            raise Unsupported(
                f"{sampler} cannot run with {modifier} in diffusers (it takes: {takes})"
            )
        raise _unknown(name, flow)
    if spec.requires is not None and importlib.util.find_spec(spec.requires) is None:
        raise Unsupported(
            f"scheduler {name!r} needs the {spec.requires!r} package, which is not installed "
            f"on this server (pip install {spec.requires})"
        )
    return spec


def _unknown(name: str, flow: bool) -> InvalidRequest:
    friendly, classes = (FLOW_SCHEDULERS, _FLOW_CLASS_NAMES) if flow else (SCHEDULERS, _CLASS_NAMES)
    valid = (
        f"valid schedulers for {'flow-matching models (SD3, FLUX)' if flow else 'this model'} "
        f"are: {', '.join(friendly)} (or a diffusers class name: {', '.join(classes)})"
    )
    other = _named_spec(name, _SAMPLERS if flow else _FLOW_SAMPLERS) or _class_spec(name, not flow)
    if other is not None:
        kind = "noise-prediction models (SD, SDXL)" if flow else "flow-matching models"
        return Unsupported(f"scheduler {name!r} is for {kind} only; {valid}")
    return InvalidRequest(f"unknown scheduler {name!r}; {valid}")


def _class_spec(name: str, flow: bool) -> SchedulerSpec | None:
    """A class name means the class as the model's config says, with none of our overrides."""
    samplers = _FLOW_SAMPLERS if flow else _SAMPLERS
    for sampler in samplers.values():
        if _key(sampler.class_name) == _key(name):
            return SchedulerSpec(sampler.class_name, requires=sampler.requires)
    return None


def _named_spec(name: str, samplers: Mapping[str, _Sampler]) -> SchedulerSpec | None:
    parsed = _parse(name, samplers)
    if parsed is None:
        return None
    base, modifier = parsed
    sampler = samplers[base]
    overrides = dict(sampler.overrides)
    note = None
    if modifier == "Substep":
        if base not in _SUBSTEP or samplers is _FLOW_SAMPLERS:
            return None
        overrides.update(_MODIFIER_OVERRIDES["Trailing"])
        note = _SUBSTEP_NOTE.format(name=base)
    elif modifier:
        if modifier not in sampler.modifiers:
            return None
        overrides.update(_MODIFIER_OVERRIDES[modifier])
    return SchedulerSpec(
        sampler.class_name,
        MappingProxyType(overrides),
        "scipy" if modifier == "Beta" else sampler.requires,
        ays=modifier == "AYS",
        note=note,
    )


def resolve_scheduler(name: str, *, flow: bool = False) -> tuple[str, dict[str, Any]]:
    """``name`` -> (diffusers class name, config overrides such as ``use_karras_sigmas``)."""
    spec = lookup_scheduler(name, flow=flow)
    return spec.class_name, dict(spec.overrides)


def make_scheduler(name: str, base_config: Mapping[str, Any], *, flow: bool = False) -> Any:
    """A new scheduler of the named kind, keeping the model's own noise schedule.

    ``base_config`` is the model's scheduler config (``pipe.scheduler.config``): betas, shift
    and offsets come from it, the named kind only adds its overrides.
    """
    return build_scheduler(lookup_scheduler(name, flow=flow), base_config)


def build_scheduler(spec: SchedulerSpec, base_config: Mapping[str, Any]) -> Any:
    """The scheduler ``spec`` describes, on the model's noise schedule (``base_config``)."""
    import diffusers

    cls = getattr(diffusers, spec.class_name)
    try:
        with quiet_warnings():
            return cls.from_config(base_config, **spec.overrides)
    except ImportError as exc:  # diffusers' placeholder for a missing optional dependency
        raise Unsupported(
            f"scheduler {spec.class_name} cannot be used on this server: {exc}"
        ) from exc


# -- Align Your Steps ----------------------------------------------------------------------------

# The 10-step schedules of the AYS paper (NVIDIA, 2024), as diffusers ships them.
_AYS_SIGMAS: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {
        "sd": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152),
        "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.38, 0.234, 0.113),
    }
)


def ays_timesteps(schedule: str, steps: int, config: Mapping[str, Any]) -> list[int]:
    """AYS timesteps for ``steps`` steps: the paper's 10 sigmas, log-linearly interpolated
    (as ComfyUI does) and mapped back to the model's own timesteps.

    ``schedule`` is "sd" (SD 1.x/2.x) or "sdxl"; ``config`` the model's scheduler config.
    """
    if schedule not in _AYS_SIGMAS:
        raise Unsupported(f"AYS schedules exist for SD 1.x/2.x and SDXL only, not {schedule}")
    sigmas = _log_linear(_AYS_SIGMAS[schedule], steps)
    table = _model_sigmas(config)
    timesteps: list[int] = []
    for sigma in sigmas:
        t = min(range(len(table)), key=lambda i: abs(math.log(table[i]) - math.log(sigma)))
        # strictly decreasing: with many steps, neighbours can round to the same timestep
        if timesteps and t >= timesteps[-1]:
            t = timesteps[-1] - 1
        timesteps.append(max(t, 0))
    if len(set(timesteps)) != len(timesteps):
        raise InvalidRequest(f"AYS cannot spread {steps} steps; use at most 100 steps")
    return timesteps


def _log_linear(points: Sequence[float], n: int) -> list[float]:
    if n == len(points):
        return list(points)
    logs = [math.log(p) for p in points]
    out = []
    for i in range(n):
        x = i * (len(points) - 1) / max(n - 1, 1)
        lo = min(int(x), len(points) - 2)
        frac = x - lo
        out.append(math.exp(logs[lo] * (1 - frac) + logs[lo + 1] * frac))
    return out


def _model_sigmas(config: Mapping[str, Any]) -> list[float]:
    """sigma(t) for every training timestep, from the config's beta schedule."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    if config.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = [
            (math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * i / (n - 1)) ** 2
            for i in range(n)
        ]
    else:
        betas = [start + (end - start) * i / (n - 1) for i in range(n)]
    sigmas, alpha = [], 1.0
    for beta in betas:
        alpha *= 1 - beta
        sigmas.append(math.sqrt((1 - alpha) / alpha))
    return sigmas
