"""Sampler names -> diffusers scheduler classes and configs, per model family.

The names themselves (every tool's spelling) are read by :mod:`easel.samplers`; this module
says which diffusers class runs each sampler, which schedule modifiers that class can apply
(Karras, Exponential or Beta sigmas, Trailing spacing, AYS, Substep), and which families'
pipelines can drive it. :func:`resolve_sampler` answers at admission, from data alone (no
torch): a name either resolves to a :class:`SchedulerSpec` that runs, or is refused with a 4xx.

Align Your Steps runs on every class that takes Karras sigmas, through the same seam: the
class's Karras conversion is replaced by NVIDIA's published AYS sigmas, log-linearly
interpolated to the step count, so the scheduler's own code maps them to timesteps (and
interleaves them for second-order samplers). Euler a, which has no Karras option, gets the
AYS timesteps and their sigmas after its own ``set_timesteps``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from easel.backends.diffusers._quiet import quiet_warnings
from easel.errors import InvalidRequest, Unsupported
from easel.samplers import (
    A1111_SCHEDULE_TYPES,
    DIFFUSERS_CLASSES,
    SamplerName,
    Schedule,
    parse_sampler,
)

if TYPE_CHECKING:
    from easel.backends.diffusers._families import Family

quiet_scheduler_warnings = quiet_warnings
"""Kept for callers of the first version of this module."""


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class, its config overrides, and how to drive it."""

    class_name: str
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    requires: str | None = None
    ays: bool = False
    """Run Align-Your-Steps sigmas (see :func:`build_scheduler`)."""
    note: str | None = None
    """Set where the name has no exact diffusers equivalent: what runs instead."""
    sampler: SamplerName | None = None
    """What the user asked for, canonically (recorded with the result)."""
    ays_schedule: str | None = None
    """Which AYS schedule ("sd", "sdxl"): set by :func:`resolve_sampler` from the family."""

    @property
    def a1111(self) -> tuple[str, str]:
        """(sampler, schedule type) as A1111 writes them in infotext."""
        if self.sampler is None:
            return self.class_name, "Automatic"
        return self.sampler.a1111


@dataclass(frozen=True)
class _Sampler:
    class_name: str
    overrides: Mapping[str, Any]
    modifiers: frozenset[Schedule]
    requires: str | None = None


_K, _E, _B, _T, _A, _S = (
    Schedule.karras,
    Schedule.exponential,
    Schedule.beta,
    Schedule.trailing,
    Schedule.ays,
    Schedule.substep,
)
_SIGMAS = frozenset({_K, _E, _B})
_KARRAS_LIKE = _SIGMAS | {_T, _A}  # classes with use_karras_sigmas: AYS through that seam
_SDE = {"algorithm_type": "sde-dpmsolver++"}


def _s(
    class_name: str, modifiers: frozenset[Schedule], requires: str | None = None, **overrides: Any
) -> _Sampler:
    return _Sampler(class_name, MappingProxyType(overrides), modifiers, requires)


# Which modifier each class takes is what its __init__ / set_timesteps accept in diffusers
# (a test checks this table against the installed diffusers).
_SAMPLERS: Mapping[str, _Sampler] = MappingProxyType(
    {
        "Euler": _s("EulerDiscreteScheduler", _KARRAS_LIKE),
        "Euler a": _s("EulerAncestralDiscreteScheduler", frozenset({_T, _A, _S})),
        "Heun": _s("HeunDiscreteScheduler", _KARRAS_LIKE),
        "DPM2": _s("KDPM2DiscreteScheduler", _KARRAS_LIKE),
        "DPM2 a": _s("KDPM2AncestralDiscreteScheduler", _KARRAS_LIKE),
        "DPM++ 2M": _s("DPMSolverMultistepScheduler", _KARRAS_LIKE),
        "DPM++ 2M SDE": _s("DPMSolverMultistepScheduler", _KARRAS_LIKE, **_SDE),
        "DPM++ 2M SDE Heun": _s(
            "DPMSolverMultistepScheduler", _KARRAS_LIKE, **_SDE, solver_type="heun"
        ),
        "DPM++ 3M SDE": _s("DPMSolverMultistepScheduler", _KARRAS_LIKE, **_SDE, solver_order=3),
        "DPM++ SDE": _s("DPMSolverSDEScheduler", _KARRAS_LIKE | {_S}, "torchsde"),
        "DPM++ 2S": _s("DPMSolverSinglestepScheduler", _SIGMAS | {_A}),
        "LMS": _s("LMSDiscreteScheduler", _KARRAS_LIKE, "scipy"),
        "DDIM": _s("DDIMScheduler", frozenset({_T})),
        "DDPM": _s("DDPMScheduler", frozenset({_T})),
        # PLMS is PNDM without its Runge-Kutta warm-up steps (which break below ~4 steps).
        "PLMS": _s("PNDMScheduler", frozenset({_T}), skip_prk_steps=True),
        "PNDM": _s("PNDMScheduler", frozenset({_T}), skip_prk_steps=True),
        "DEIS": _s("DEISMultistepScheduler", _KARRAS_LIKE),
        "UniPC": _s("UniPCMultistepScheduler", _KARRAS_LIKE),
        "LCM": _s("LCMScheduler", frozenset({_T})),
        "TCD": _s("TCDScheduler", frozenset({_T})),
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

_MODIFIER_OVERRIDES: Mapping[Schedule, Mapping[str, Any]] = MappingProxyType(
    {
        _K: {"use_karras_sigmas": True},
        _E: {"use_exponential_sigmas": True},
        _B: {"use_beta_sigmas": True},
        _T: {"timestep_spacing": "trailing"},
        _A: {},
        _S: {"timestep_spacing": "trailing"},
    }
)
_REQUIRES = {_B: "scipy"}  # diffusers' beta sigmas use scipy.stats
_SUBSTEP_NOTE = (
    "Draw Things' substep sampling has no diffusers equivalent; this ran {name} with "
    "trailing spacing instead"
)


def _friendly_names(samplers: Mapping[str, _Sampler]) -> list[str]:
    names = list(samplers)
    for modifier in Schedule:
        names += [f"{n} {modifier.value}" for n, s in samplers.items() if modifier in s.modifiers]
    return names


SCHEDULERS: tuple[str, ...] = tuple(_friendly_names(_SAMPLERS))
"""Every canonical name for noise-prediction models (SD 1.x/2.x, SDXL, Kandinsky), listed to
users in this order; every other tool's spelling of them is accepted besides."""
FLOW_SCHEDULERS: tuple[str, ...] = tuple(_friendly_names(_FLOW_SAMPLERS))
"""Every canonical name for flow-matching models (SD3, FLUX)."""

_CLASS_NAMES = tuple(dict.fromkeys(s.class_name for s in _SAMPLERS.values()))
_FLOW_CLASS_NAMES = tuple(dict.fromkeys(s.class_name for s in _FLOW_SAMPLERS.values()))


def scheduler_names(*, flow: bool = False, family: Family | None = None) -> list[str]:
    """Every accepted canonical name (for ``family`` if given): names, then class names."""
    if family is not None:
        flow = family.flow
    friendly, classes = (FLOW_SCHEDULERS, _FLOW_CLASS_NAMES) if flow else (SCHEDULERS, _CLASS_NAMES)
    if family is None:
        return [*friendly, *classes]
    return [n for n in (*friendly, *classes) if _refusal(n, family) is None]


def _refusal(name: str, family: Family) -> str | None:
    try:
        resolve_sampler(name, family)
    except InvalidRequest as exc:
        return exc.message
    return None


def resolve_sampler(
    name: str, family: Family | None = None, *, flow: bool = False
) -> SchedulerSpec:
    """``name`` (any tool's spelling) -> the scheduler that runs it on ``family``, or a 4xx.

    Called at admission: everything it accepts runs on that family's pipelines (a test runs
    every name on every family). Without ``family``, only the sampler table is consulted
    (``flow`` picks the flow-matching one).
    """
    if family is not None:
        flow = family.flow
    try:
        parsed = parse_sampler(name)
    except InvalidRequest:
        raise InvalidRequest(
            f"unknown scheduler {name!r}; valid schedulers for "
            f"{family.label + ' models' if family else 'this model'} are: "
            f"{', '.join(scheduler_names(flow=flow, family=family))} (any tool's spelling: "
            "DPMPP2M Karras, dpmpp_2m_karras, UniPC ays)"
        ) from None
    spec = _spec(name, parsed, flow)
    if family is not None:
        spec = _for_family(name, spec, family)
    needed = spec.requires
    if needed is not None and importlib.util.find_spec(needed) is None:
        raise Unsupported(
            f"scheduler {name!r} needs the {needed!r} package, which is not installed on this "
            f"server (pip install 'easel[diffusers]', or pip install {needed})"
        )
    return spec


def _spec(name: str, parsed: SamplerName, flow: bool) -> SchedulerSpec:
    samplers = _FLOW_SAMPLERS if flow else _SAMPLERS
    if parsed.diffusers_class is not None:  # the class as the model's config says
        owner = next((s for s in samplers.values() if s.class_name == parsed.diffusers_class), None)
        if owner is None:
            raise _wrong_table(name, flow)
        return SchedulerSpec(owner.class_name, requires=owner.requires, sampler=parsed)
    sampler = samplers.get(parsed.sampler)
    if sampler is None:
        raise _wrong_table(name, flow)
    modifier = parsed.schedule
    overrides = dict(sampler.overrides)
    note = None
    if modifier is not None:
        if modifier not in sampler.modifiers:
            takes = ", ".join(sorted(m.value for m in sampler.modifiers)) or "no schedule modifier"
            raise Unsupported(
                f"{parsed.sampler} cannot run with {modifier.value} in diffusers (it takes: "
                f"{takes}); valid names: {', '.join(_valid(flow))}"
            )
        overrides.update(_MODIFIER_OVERRIDES[modifier])
        if modifier is _S:
            note = _SUBSTEP_NOTE.format(name=parsed.sampler)
    return SchedulerSpec(
        sampler.class_name,
        MappingProxyType(overrides),
        _REQUIRES.get(modifier, sampler.requires) if modifier else sampler.requires,
        ays=modifier is _A,
        note=note,
        sampler=parsed,
    )


def _valid(flow: bool) -> tuple[str, ...]:
    return FLOW_SCHEDULERS if flow else SCHEDULERS


def _wrong_table(name: str, flow: bool) -> InvalidRequest:
    valid = (
        f"valid schedulers for {'flow-matching models (SD3, FLUX)' if flow else 'this model'} "
        f"are: {', '.join(_valid(flow))} (or a diffusers class name: "
        f"{', '.join(_FLOW_CLASS_NAMES if flow else _CLASS_NAMES)})"
    )
    kind = "noise-prediction models (SD, SDXL)" if flow else "flow-matching models"
    return Unsupported(f"scheduler {name!r} is for {kind} only; {valid}")


def _for_family(name: str, spec: SchedulerSpec, family: Family) -> SchedulerSpec:
    what = f"{family.label} models"
    modifier = spec.sampler.schedule if spec.sampler else None
    if family.schedulers is not None and spec.class_name not in family.schedulers:
        raise Unsupported(
            f"{what} cannot run {name!r}: their pipeline drives only "
            f"{', '.join(sorted(family.schedulers))} (and their variants)"
        )
    if modifier is not None and modifier in family.refused_schedules:
        raise Unsupported(
            f"{what} cannot run {name!r}: their noise schedule does not take "
            f"{modifier.value} sigmas in diffusers"
        )
    if spec.ays:
        if family.ays is None:
            raise Unsupported(
                f"Align Your Steps schedules exist for SD 1.x/2.x and SDXL, not {what}"
            )
        return SchedulerSpec(
            spec.class_name,
            spec.overrides,
            spec.requires,
            ays=True,
            note=spec.note,
            sampler=spec.sampler,
            ays_schedule=family.ays,
        )
    return spec


def sampler_record(spec: SchedulerSpec | None, scheduler: Any) -> dict[str, Any]:
    """What ran, for the sidecar and the infotext: A1111's sampler and schedule type
    ("UniPC", "Align Your Steps"), the diffusers class and its config, any substitution.

    Without a spec (the model's own scheduler), the names are read from the class and config.
    """
    cls = type(scheduler).__name__
    config = {k: _plain(v) for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    if spec is not None and spec.sampler is not None and spec.sampler.diffusers_class is None:
        sampler, schedule = spec.sampler.a1111
    else:
        sampler = DIFFUSERS_CLASSES.get(cls, cls)
        schedule = _schedule_of(config)
    record: dict[str, Any] = {
        "sampler": sampler,
        "schedule_type": schedule,
        "scheduler": cls,
        "scheduler_config": config,
    }
    if spec is not None and spec.ays:
        record["sigmas"] = f"Align Your Steps ({spec.ays_schedule or 'sd'})"
    if spec is not None and spec.note:
        record["scheduler_note"] = spec.note
        record["substitution"] = spec.note
    return record


def _schedule_of(config: Mapping[str, Any]) -> str:
    for key, schedule in (
        ("use_karras_sigmas", _K),
        ("use_exponential_sigmas", _E),
        ("use_beta_sigmas", _B),
    ):
        if config.get(key):
            return A1111_SCHEDULE_TYPES[schedule]
    if config.get("timestep_spacing") == "trailing":
        return A1111_SCHEDULE_TYPES[_T]
    return "Automatic"


def _plain(value: Any) -> Any:
    """A config value as JSON can hold it (tuples, numpy scalars, None)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return value.item()  # numpy / torch scalars
    except AttributeError:
        return str(value)


# -- the first version's API, kept for its callers ------------------------------------------


def lookup_scheduler(name: str, *, flow: bool = False) -> SchedulerSpec:
    """The spec for ``name`` in the noise-prediction (or ``flow``) table, no family checks."""
    return resolve_sampler(name, flow=flow)


def resolve_scheduler(name: str, *, flow: bool = False) -> tuple[str, dict[str, Any]]:
    """``name`` -> (diffusers class name, config overrides such as ``use_karras_sigmas``)."""
    spec = lookup_scheduler(name, flow=flow)
    return spec.class_name, dict(spec.overrides)


def make_scheduler(name: str, base_config: Mapping[str, Any], *, flow: bool = False) -> Any:
    """A new scheduler of the named kind, keeping the model's own noise schedule."""
    return build_scheduler(lookup_scheduler(name, flow=flow), base_config)


# -- building ------------------------------------------------------------------------------------


def build_scheduler(spec: SchedulerSpec, base_config: Mapping[str, Any]) -> Any:
    """The scheduler ``spec`` describes, on the model's noise schedule (``base_config``).

    Betas, shift and offsets come from ``base_config``; the spec only adds its overrides.
    """
    import diffusers

    cls = getattr(diffusers, spec.class_name)
    overrides = dict(spec.overrides)
    if spec.ays:
        cls = _ays_class(cls, spec.ays_schedule or "sd")
        if "use_karras_sigmas" in _init_parameters(cls):
            overrides["use_karras_sigmas"] = True  # the seam AYS sigmas come through
    try:
        with quiet_warnings():
            scheduler = cls.from_config(base_config, **overrides)
    except ImportError as exc:  # diffusers' placeholder for a missing optional dependency
        raise Unsupported(
            f"scheduler {spec.class_name} cannot be used on this server: {exc}"
        ) from exc
    return scheduler


def _init_parameters(cls: type) -> Mapping[str, Any]:
    import inspect

    return inspect.signature(cls).parameters


@cache
def _ays_class(cls: type, schedule: str) -> type:
    """``cls`` running the ``schedule`` AYS sigmas: a subclass, named after it for the record."""
    mixin = _KarrasSeam if "use_karras_sigmas" in _init_parameters(cls) else _AfterSetTimesteps
    attributes = {"__module__": __name__, "ays_sigmas": tuple(ays_sigmas(schedule))}
    return type(cls.__name__, (mixin, cls), attributes)


class _KarrasSeam:
    """Where the class would build Karras sigmas, it gets the AYS sigmas instead."""

    ays_sigmas: Sequence[float] = ()
    num_inference_steps: int

    def _convert_to_karras(self, in_sigmas: Any, num_inference_steps: int | None = None) -> Any:
        import numpy as np

        steps = num_inference_steps or self.num_inference_steps
        return np.array(log_linear(self.ays_sigmas, steps), dtype=np.float64)


class _AfterSetTimesteps:
    """For samplers without a sigma seam (Euler a): AYS timesteps and their sigmas, set
    after the class's own ``set_timesteps``."""

    ays_sigmas: Sequence[float] = ()

    def set_timesteps(self, num_inference_steps: int, device: Any = None, **kwargs: Any) -> None:
        import numpy as np
        import torch

        super().set_timesteps(num_inference_steps, device, **kwargs)  # type: ignore[misc]
        alphas = self.alphas_cumprod.numpy()  # type: ignore[attr-defined]
        table = ((1 - alphas) / alphas) ** 0.5
        sigmas = np.array(log_linear(self.ays_sigmas, num_inference_steps))
        timesteps = np.interp(np.log(sigmas), np.log(table), np.arange(len(table)))
        full = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(full)
        self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)
        self._step_index = None
        self._begin_index = None


# -- Align Your Steps ----------------------------------------------------------------------------


# The 10-step schedules of the AYS paper (NVIDIA, 2024), as diffusers ships them in
# ``diffusers.schedulers.AysSchedules`` (a test checks they agree), without the final 0.
_AYS_SIGMAS: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {
        "sd": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152),
        "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.38, 0.234, 0.113),
    }
)


def ays_sigmas(schedule: str) -> list[float]:
    """The published 10-step AYS sigmas; ``schedule`` is "sd" (SD 1.x/2.x) or "sdxl"."""
    if schedule not in _AYS_SIGMAS:
        raise Unsupported(f"AYS schedules exist for SD 1.x/2.x and SDXL only, not {schedule}")
    return list(_AYS_SIGMAS[schedule])


def ays_timesteps(schedule: str, steps: int, config: Mapping[str, Any]) -> list[int]:
    """AYS timesteps for ``steps`` steps: the paper's 10 sigmas, log-linearly interpolated
    (as ComfyUI does) and mapped back to the model's own timesteps."""
    sigmas = log_linear(ays_sigmas(schedule), steps)
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


def log_linear(points: Sequence[float], n: int) -> list[float]:
    """``n`` values along ``points``, interpolated linearly in log space."""
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
