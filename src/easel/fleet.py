"""The fleet file: which backends one deployment runs, declared in ``easel.toml``.

``[[backends]]`` entries name a backend, its kind (any kind of
:mod:`easel.backends.registry`), the options handed to that kind's factory, how many jobs
it runs at once (``slots``), the models it serves, capability overrides, tags and
timeouts. The file is the same TOML that holds every other setting (``--config`` or
``EASEL_CONFIG``). Without ``[[backends]]`` the single-backend settings (``--backend``,
``--model``...) make a one-entry fleet, so every deployment is a fleet.

A file that does not validate is refused at start by :func:`load_settings` with the file,
the key path and what is wrong (:class:`FleetFileError`), never a traceback.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from easel.payloads import Executor

if TYPE_CHECKING:
    from easel.config import Settings

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Timeouts(BaseModel):
    """How long easel waits on one backend before calling it a transient failure."""

    model_config = ConfigDict(extra="forbid")

    job_seconds: float | None = Field(
        default=None, gt=0, description="A longer run fails transiently (None: no limit)."
    )
    health_seconds: float = Field(default=5.0, gt=0, description="One health check, at most.")
    health_interval_seconds: float = Field(
        default=15.0, gt=0, description="Health checked this often (and when a run fails)."
    )


class BreakerSettings(BaseModel):
    """When a backend is taken out of routing, and when it is tried again."""

    model_config = ConfigDict(extra="forbid")

    failures: int = Field(
        default=3, ge=1, description="Consecutive transient failures that mark it down."
    )
    probe_seconds: float = Field(
        default=30.0, gt=0, description="A down backend is probed again after this long."
    )


class BackendSpec(BaseModel):
    """One ``[[backends]]`` entry."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN, description="Unique in the fleet; what requests name it by."
    )
    kind: str = Field(min_length=1, description="mock, diffusers, or any registered kind.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the kind's factory (model, device, url...).",
    )
    slots: int = Field(default=1, ge=1, description="Jobs it runs at once.")
    models: list[str] = Field(
        default_factory=list,
        description="Models it serves; empty: whatever the backend lists itself.",
    )
    capabilities: list[str] | None = Field(
        default=None, description="Replaces what the backend declares (txt2img, img2img...)."
    )
    executors: list[Executor] | None = Field(
        default=None,
        description="Engine payloads it runs (automatic1111, kandinsky, comfyui); replaces "
        "what the backend declares (a Kandinsky server behind a remote kind, say).",
    )
    tags: list[str] = Field(
        default_factory=list, description="Free labels a request may ask for (gpu, fast...)."
    )
    speed: float | None = Field(
        default=None, gt=0, description="Relative speed (1.0: reference) until measured."
    )
    timeouts: Timeouts = Field(default_factory=Timeouts)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)

    @field_validator("tags", "models")
    @classmethod
    def _no_blanks(cls, values: list[str]) -> list[str]:
        if any(not value.strip() for value in values):
            raise ValueError("entries must not be empty")
        return values


class Routing(BaseModel):
    """How the router trades model affinity against load (``[routing]``)."""

    model_config = ConfigDict(extra="forbid")

    affinity_slack_seconds: float = Field(
        default=10.0,
        ge=0,
        description="A backend with the model loaded is preferred while its wait exceeds "
        "the least-loaded one's by less than this plus the model's load time.",
    )
    balance_ratio: float = Field(
        default=16.0,
        ge=1,
        description="...and while its wait is less than this many times the least-loaded "
        "one's: a model moves only when both are exceeded.",
    )
    steal_ratio: float = Field(
        default=4.0,
        ge=1,
        description="balance_ratio for a backend out of work taking jobs queued elsewhere "
        "(it switches once for a run of jobs, not once per job).",
    )
    load_seconds: float = Field(
        default=10.0, ge=0, description="Assumed model load time until one is measured."
    )


class FleetFileError(ValueError):
    """A settings file that cannot run: names the file, the key path and the problem."""

    def __init__(self, path: Path | str | None, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        where = str(path) if path is not None else "settings"
        super().__init__(f"{where}: " + "; ".join(problems))


def check_fleet(specs: list[BackendSpec]) -> list[str]:
    """What is wrong across entries (the model checks each alone): duplicate names."""
    problems = []
    seen: dict[str, int] = {}
    for index, spec in enumerate(specs):
        if spec.name in seen:
            problems.append(
                f"backends[{index}].name: {spec.name!r} is already the name of "
                f"backends[{seen[spec.name]}]; names must be unique"
            )
        seen.setdefault(spec.name, index)
    return problems


def check_kinds(specs: Iterable[BackendSpec], kinds: Collection[str]) -> list[str]:
    """Entries whose kind is not installed (the registry's kinds are passed in)."""
    return [
        f"backends[{index}].kind: unknown kind {spec.kind!r}; "
        f"available kinds are: {', '.join(sorted(kinds))}"
        for index, spec in enumerate(specs)
        if spec.kind not in kinds
    ]


def check_capabilities(specs: Iterable[BackendSpec], known: Collection[str]) -> list[str]:
    """Capability overrides that name no capability."""
    problems = []
    for index, spec in enumerate(specs):
        for position, name in enumerate(spec.capabilities or []):
            if name not in known:
                problems.append(
                    f"backends[{index}].capabilities[{position}]: unknown capability "
                    f"{name!r}; known capabilities are: {', '.join(sorted(known))}"
                )
    return problems


def describe(error: ValidationError) -> list[str]:
    """pydantic's errors as ``key.path[0].sub: what is wrong``, one per problem."""
    problems = []
    for item in error.errors():
        path = ""
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            from easel.config import valid_keys_at

            if valid := valid_keys_at(tuple(item["loc"])):
                message = f"{message}: unknown key; valid keys here: {', '.join(valid)}"
        problems.append(f"{path or '(top level)'}: {message}")
    return problems


def config_path(explicit: Path | str | None = None) -> Path | None:
    """``--config`` wins over ``EASEL_CONFIG``."""
    if explicit is not None:
        return Path(explicit)
    if named := os.environ.get("EASEL_CONFIG"):
        return Path(named)
    return None


def load_settings(
    path: Path | str | None = None,
    *,
    kinds: Collection[str] | None = None,
    capabilities: Collection[str] | None = None,
    **overrides: Any,
) -> Settings:
    """Settings from defaults < the TOML file < ``EASEL_*`` env vars < ``overrides``.

    Raises :class:`FleetFileError` (file, key path, problem) for anything that would fail
    later: unreadable or invalid TOML, unknown keys, bad values, duplicate backend names,
    and, when the caller passes the registry's ``kinds`` and ``capabilities`` (this layer
    imports no backend), unknown kinds or capabilities.
    """
    from easel.config import Settings, settings_file

    file = config_path(path)
    if file is not None:
        try:
            with file.open("rb") as handle:
                tomllib.load(handle)
        except OSError as exc:
            raise FleetFileError(file, [f"cannot read it: {exc.strerror or exc}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise FleetFileError(file, [f"not valid TOML: {exc}"]) from None
    token = settings_file.set(file)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise FleetFileError(file, describe(exc)) from None
    finally:
        settings_file.reset(token)
    problems = check_fleet(settings.backends)
    if kinds is not None:
        problems += check_kinds(settings.backends, kinds)
    if capabilities is not None:
        problems += check_capabilities(settings.backends, capabilities)
    if problems:
        raise FleetFileError(file, problems)
    return settings


def fleet_of(settings: Settings) -> list[BackendSpec]:
    """The deployment's backends: the file's ``[[backends]]``, else a one-entry fleet made
    from the single-backend settings (``--backend``, ``--model``, ``--models-dir``...)."""
    if settings.backends:
        return only(settings.backends, settings.only) if settings.only else list(settings.backends)
    kind = settings.resolved_backend
    options: dict[str, Any] = {"device": settings.device}
    if kind == "mock":
        options["step_delay"] = settings.mock_step_delay
        options["preview_every"] = settings.mock_preview_every
        options["seconds_per_megapixel_step"] = settings.mock_seconds_per_megapixel_step
        options["overhead_seconds"] = settings.mock_overhead_seconds
        options["load_seconds"] = settings.mock_load_seconds
        options["models"] = settings.mock_models
        if settings.mock_folder is not None:
            options["folder"] = str(settings.mock_folder)
    if kind == "diffusers":
        options.update(settings.diffusers.model_dump())
    if kind in {"diffusers", "diffusers-audio"} and settings.models_dir is not None:
        options["models_dir"] = str(settings.models_dir)
    if settings.model:
        options["model"] = settings.model
    return [BackendSpec(name=kind, kind=kind, options=options, slots=max(settings.concurrency, 1))]


def only(specs: list[BackendSpec], names: Collection[str]) -> list[BackendSpec]:
    """``--only a,b``: the named entries, in file order; unknown names are refused."""
    known = {spec.name for spec in specs}
    if missing := [name for name in names if name not in known]:
        raise FleetFileError(
            None,
            [
                f"--only: no backend named {', '.join(map(repr, missing))}; "
                f"the fleet has: {', '.join(spec.name for spec in specs)}"
            ],
        )
    return [spec for spec in specs if spec.name in names]
