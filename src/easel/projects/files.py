"""``config.yaml`` and ``prompts.yaml`` of a project, validated before anything runs.

Every key of the diffusers servers' format is read: generation keys become
:class:`~easel.jobs.GenerationRequest` fields (the sampler through
:func:`easel.samplers.from_diffusers_style`, the same table the server uses), the
``enable_*`` memory knobs become ``[diffusers]`` settings through
:data:`easel.config.KNOB_ALIASES` (applied when the project runs embedded; a server keeps
its own), and a key easel cannot honour is named in a warning and in each image's
metadata. Unknown keys are errors: a typo is never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from easel.config import KNOB_ALIASES, DiffusersOptions
from easel.errors import EaselError
from easel.samplers import from_diffusers_style, parse_sampler

CONFIG_FILE = "config.yaml"
PROMPTS_FILE = "prompts.yaml"


class ProjectFileError(Exception):
    """A project file that cannot be used: the file and each problem (key path: what)."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: {'; '.join(problems)}")
        self.path = path
        self.problems = problems


class Params(BaseModel):
    """Generation parameters as diffusers servers name them (easel's names work too)."""

    model_config = ConfigDict(extra="forbid")

    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    num_steps: int | None = Field(default=None, gt=0)
    steps: int | None = Field(default=None, gt=0, description="easel's name of num_steps.")
    guidance_scale: float | None = Field(default=None, ge=0, le=50)
    cfg_scale: float | None = Field(default=None, ge=0, le=50)
    scheduler_type: str | None = None
    karras_sigmas: bool | None = None
    scheduler: str | None = Field(default=None, description="Any sampler name easel reads.")
    scheduler_scale: float | None = None
    clip_skip: int | None = Field(
        default=None, ge=0, le=11, description="diffusers' convention: layers skipped (0: none)."
    )
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=0)
    enable_attention_slicing: bool | None = None
    enable_vae_slicing: bool | None = None
    enable_vae_tiling: bool | None = None
    enable_model_cpu_offload: bool | None = None
    enable_sequential_cpu_offload: bool | None = None


NOT_APPLIED = {
    "scheduler_scale": "easel's samplers have no scale setting; the sampler's own is used",
}
"""Keys of the format that easel reads but cannot honour, and why (warned, recorded)."""


class OllamaSettings(BaseModel):
    """Prompt expansion: an LLM writes the prompt from an instruction."""

    model_config = ConfigDict(extra="forbid")

    server_url: str = "http://localhost:11434"
    model: str = "llama2"
    system_message: str = ""
    prompt: str = Field(min_length=1, description="The instruction the LLM expands.")
    negative_prompt: str | None = None
    fallback_prompt: str | None = None
    timeout: float = Field(default=60.0, gt=0, description="Seconds before the fallback.")
    api: str = Field(default="chat", pattern="^(chat|generate|openai)$")


class ProjectConfig(BaseModel):
    """``config.yaml``."""

    model_config = ConfigDict(extra="forbid")

    server_url: str | None = None
    name: str = Field(min_length=1)
    model: str | None = Field(default=None, description="A model folder or a served name.")
    backend: str | None = None
    default_params: Params = Field(default_factory=Params)
    ollama: OllamaSettings | None = None


class PromptSet(BaseModel):
    """One named prompt of ``prompts.yaml``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[^/\\]+$")
    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    params: Params = Field(default_factory=Params)


class PromptsFile(BaseModel):
    """``prompts.yaml``."""

    model_config = ConfigDict(extra="forbid")

    prompt_sets: list[PromptSet] = Field(min_length=1)


@dataclass(frozen=True)
class Resolved:
    """A prompt set ready to submit: request fields, embedded settings, what was not applied."""

    request: dict[str, Any]
    diffusers: dict[str, Any]
    not_applied: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Project:
    """A loaded, validated project folder."""

    root: Path
    config: ProjectConfig
    prompt_sets: list[PromptSet]

    @property
    def name(self) -> str:
        return self.config.name

    def prompt_set(self, name: str) -> PromptSet:
        for prompt_set in self.prompt_sets:
            if prompt_set.name == name:
                return prompt_set
        names = ", ".join(p.name for p in self.prompt_sets)
        raise KeyError(f"no prompt set {name!r} in {self.root / PROMPTS_FILE}; sets: {names}")

    def resolve(self, prompt_set: PromptSet) -> Resolved:
        """The set's params over ``default_params``, mapped to easel's names."""
        defaults = self.config.default_params.model_dump(exclude_none=True)
        merged = defaults | prompt_set.params.model_dump(exclude_none=True)
        where = self.root / PROMPTS_FILE
        try:
            return _resolve(merged, prompt_set)
        except (EaselError, ValueError) as exc:
            message = exc.message if isinstance(exc, EaselError) else str(exc)
            raise ProjectFileError(where, [f"prompt_sets[{prompt_set.name}]: {message}"]) from None


def _resolve(merged: dict[str, Any], prompt_set: PromptSet) -> Resolved:
    request: dict[str, Any] = {"prompt": prompt_set.prompt}
    for ours, theirs in (("width", "width"), ("height", "height"), ("seed", "seed")):
        if theirs in merged:
            request[ours] = merged[theirs]
    if "num_steps" in merged or "steps" in merged:
        request["steps"] = merged.get("steps", merged.get("num_steps"))
    if "guidance_scale" in merged or "cfg_scale" in merged:
        request["cfg_scale"] = merged.get("cfg_scale", merged.get("guidance_scale"))
    if "scheduler" in merged:
        request["scheduler"] = parse_sampler(merged["scheduler"]).name
    elif "scheduler_type" in merged:
        request["scheduler"] = from_diffusers_style(
            merged["scheduler_type"], karras_sigmas=bool(merged.get("karras_sigmas"))
        )
    elif merged.get("karras_sigmas"):
        raise ValueError("karras_sigmas needs a scheduler_type to apply to")
    if "clip_skip" in merged:
        request["clip_skip"] = merged["clip_skip"] + 1  # diffusers' 1 is A1111's (easel's) 2
    negative = prompt_set.negative_prompt or merged.get("negative_prompt")
    if negative:
        request["negative_prompt"] = negative
    knobs = {key: merged[key] for key in KNOB_ALIASES if key in merged}
    diffusers = DiffusersOptions.model_validate(knobs).model_dump(exclude_defaults=True)
    not_applied = {key: why for key, why in NOT_APPLIED.items() if key in merged}
    return Resolved(request=request, diffusers=diffusers, not_applied=not_applied)


def load_project(root: Path) -> Project:
    """Both files of ``root``, validated; :class:`ProjectFileError` names what is wrong."""
    if not root.is_dir():
        raise ProjectFileError(root, ["not a project folder (it should hold config.yaml)"])
    config = ProjectConfig.model_validate(_read(root / CONFIG_FILE, ProjectConfig))
    prompts = PromptsFile.model_validate(_read(root / PROMPTS_FILE, PromptsFile))
    names = [p.name for p in prompts.prompt_sets]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ProjectFileError(
            root / PROMPTS_FILE, [f"prompt_sets: the name {n!r} is used twice" for n in duplicates]
        )
    project = Project(root=root, config=config, prompt_sets=prompts.prompt_sets)
    for prompt_set in project.prompt_sets:  # every set maps, or nothing runs
        project.resolve(prompt_set)
    return project


def _read(path: Path, model: type[BaseModel]) -> dict[str, Any]:
    """The YAML mapping of ``path`` checked against ``model``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProjectFileError(path, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectFileError(path, [f"cannot read it: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise ProjectFileError(path, [f"not valid YAML: {exc}".replace("\n", " ")]) from None
    if not isinstance(data, dict):
        raise ProjectFileError(path, ["should be a mapping of keys (key: value)"])
    try:
        model.model_validate(data)
    except ValidationError as exc:
        raise ProjectFileError(path, [_problem(error) for error in exc.errors()]) from None
    return data


def _problem(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (a typo? it would be ignored, so easel refuses it)"
    return f"{where}: {error['msg']}"
