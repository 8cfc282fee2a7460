"""Scheduler names people use (WebUI style: "DPM++ 2M Karras") -> diffusers classes.

Pure data plus one lazy constructor, so that admission can refuse an unknown scheduler with a
4xx before any model is touched, and without importing torch.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from easel.errors import InvalidRequest, Unsupported


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class, its config overrides, and any package it needs."""

    class_name: str
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    requires: str | None = None


def _spec(
    class_name: str, overrides: Mapping[str, Any] | None = None, requires: str | None = None
) -> SchedulerSpec:
    return SchedulerSpec(class_name, MappingProxyType(dict(overrides or {})), requires)


_KARRAS: Mapping[str, Any] = {"use_karras_sigmas": True}
_SDE_2M: Mapping[str, Any] = {"algorithm_type": "sde-dpmsolver++"}
_SDE_2M_KARRAS: Mapping[str, Any] = {**_SDE_2M, **_KARRAS}
_PLMS: Mapping[str, Any] = {"skip_prk_steps": True}

SCHEDULERS: Mapping[str, SchedulerSpec] = MappingProxyType(
    {
        "Euler": _spec("EulerDiscreteScheduler"),
        "Euler a": _spec("EulerAncestralDiscreteScheduler"),
        "Euler Karras": _spec("EulerDiscreteScheduler", _KARRAS),
        "DDIM": _spec("DDIMScheduler"),
        "DDPM": _spec("DDPMScheduler"),
        # PLMS is PNDM without its Runge-Kutta warm-up steps (which break below ~4 steps).
        "PNDM": _spec("PNDMScheduler", _PLMS),
        "PLMS": _spec("PNDMScheduler", _PLMS),
        "LMS": _spec("LMSDiscreteScheduler", requires="scipy"),
        "LMS Karras": _spec("LMSDiscreteScheduler", _KARRAS, requires="scipy"),
        "Heun": _spec("HeunDiscreteScheduler"),
        "DPM2": _spec("KDPM2DiscreteScheduler"),
        "DPM2 a": _spec("KDPM2AncestralDiscreteScheduler"),
        "DPM2 Karras": _spec("KDPM2DiscreteScheduler", _KARRAS),
        "DPM2 a Karras": _spec("KDPM2AncestralDiscreteScheduler", _KARRAS),
        "DPM++ 2M": _spec("DPMSolverMultistepScheduler"),
        "DPM++ 2M Karras": _spec("DPMSolverMultistepScheduler", _KARRAS),
        "DPM++ 2M SDE": _spec("DPMSolverMultistepScheduler", _SDE_2M),
        "DPM++ 2M SDE Karras": _spec("DPMSolverMultistepScheduler", _SDE_2M_KARRAS),
        "DPM++ SDE": _spec("DPMSolverSDEScheduler", requires="torchsde"),
        "DPM++ SDE Karras": _spec("DPMSolverSDEScheduler", _KARRAS, requires="torchsde"),
        "DEIS": _spec("DEISMultistepScheduler"),
        "UniPC": _spec("UniPCMultistepScheduler"),
        "LCM": _spec("LCMScheduler"),
        "TCD": _spec("TCDScheduler"),
    }
)
"""Friendly names in the order they are listed to users."""

_CLASS_NAMES: tuple[str, ...] = tuple(dict.fromkeys(s.class_name for s in SCHEDULERS.values()))


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


def _build_index() -> dict[str, SchedulerSpec]:
    index = {_key(name): spec for name, spec in SCHEDULERS.items()}
    for class_name in _CLASS_NAMES:
        # A class name means the class as its config says, with none of our overrides.
        requires = next(s.requires for s in SCHEDULERS.values() if s.class_name == class_name)
        index[_key(class_name)] = _spec(class_name, requires=requires)
    return index


_INDEX = _build_index()


def scheduler_names() -> list[str]:
    """Every accepted name: friendly names first, then diffusers class names."""
    return [*SCHEDULERS, *_CLASS_NAMES]


def lookup_scheduler(name: str) -> SchedulerSpec:
    """The spec for ``name`` (case-insensitive); an unknown name is a 4xx listing valid names.

    A known scheduler whose extra package is not installed is :class:`Unsupported`, with the
    command that fixes it.
    """
    spec = _INDEX.get(_key(name))
    if spec is None:
        raise InvalidRequest(
            f"unknown scheduler {name!r}; valid schedulers are: {', '.join(SCHEDULERS)} "
            f"(or a diffusers class name: {', '.join(_CLASS_NAMES)})"
        )
    if spec.requires is not None and importlib.util.find_spec(spec.requires) is None:
        raise Unsupported(
            f"scheduler {name!r} needs the {spec.requires!r} package, which is not installed "
            f"on this server (pip install {spec.requires})"
        )
    return spec


def resolve_scheduler(name: str) -> tuple[str, dict[str, Any]]:
    """``name`` -> (diffusers class name, config overrides such as ``use_karras_sigmas``)."""
    spec = lookup_scheduler(name)
    return spec.class_name, dict(spec.overrides)


# numpy 2 deprecations that diffusers' schedulers trigger (``np.array(tensor)`` with torch 2.13)
# when they build their sigmas: harmless, not ours to fix, and fatal under ``-W error``.
_NUMPY_ARRAY_PROTOCOL = r"__array(_wrap)?__ (implementation doesn't accept|must accept)"


_quiet_lock = threading.Lock()
_quiet_users = 0
_quiet_saved: warnings.catch_warnings | None = None


@contextmanager
def quiet_scheduler_warnings() -> Iterator[None]:
    """Silence only the numpy deprecations that schedulers emit in ``__init__`` and steps.

    Warning filters are process-wide before Python 3.14, and runs overlap in threads: the
    first run in installs the filter and the last run out restores the filters, so one run
    ending never unsilences another that is still going.
    """
    global _quiet_users, _quiet_saved
    with _quiet_lock:
        if _quiet_users == 0:
            _quiet_saved = warnings.catch_warnings()
            _quiet_saved.__enter__()
            warnings.filterwarnings(
                "ignore", message=_NUMPY_ARRAY_PROTOCOL, category=DeprecationWarning
            )
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0 and _quiet_saved is not None:
                _quiet_saved.__exit__(None, None, None)
                _quiet_saved = None


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A new scheduler of the named kind, keeping the model's own noise schedule.

    ``base_config`` is the model's scheduler config (``pipe.scheduler.config``): betas and
    offsets come from it, the named kind only adds its overrides.
    """
    class_name, overrides = resolve_scheduler(name)
    import diffusers

    cls = getattr(diffusers, class_name)
    try:
        with quiet_scheduler_warnings():
            return cls.from_config(base_config, **overrides)
    except ImportError as exc:  # diffusers' placeholder for a missing optional dependency
        raise Unsupported(f"scheduler {name!r} cannot be used on this server: {exc}") from exc
