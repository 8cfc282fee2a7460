"""The scheduler name table: pure lookups, and the table checked against installed diffusers."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from typing import Any

import pytest

from easel.backends.diffusers._families import FAMILIES
from easel.backends.diffusers._quiet import quiet_warnings
from easel.backends.diffusers.schedulers import (
    FLOW_SCHEDULERS,
    SCHEDULERS,
    ays_sigmas,
    ays_timesteps,
    lookup_scheduler,
    make_scheduler,
    resolve_scheduler,
    scheduler_names,
)
from easel.errors import InvalidRequest, Unsupported

KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}


@pytest.mark.parametrize(
    ("name", "class_name", "overrides"),
    [
        # Automatic1111
        ("Euler", "EulerDiscreteScheduler", {}),
        ("euler A", "EulerAncestralDiscreteScheduler", {}),
        ("DPM++ 2M", "DPMSolverMultistepScheduler", {}),
        ("dpm++  2m karras", "DPMSolverMultistepScheduler", KARRAS),
        ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {**SDE, **KARRAS}),
        ("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {**SDE, "solver_order": 3}),
        ("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", {**SDE, "solver_type": "heun"}),
        ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
        ("UniPC", "UniPCMultistepScheduler", {}),
        ("LCM", "LCMScheduler", {}),
        # ComfyUI: sampler_scheduler
        ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", KARRAS),
        ("euler_ancestral", "EulerAncestralDiscreteScheduler", {}),
        (
            "dpmpp_2m_sde_exponential",
            "DPMSolverMultistepScheduler",
            {**SDE, "use_exponential_sigmas": True},
        ),
        ("uni_pc_bh2", "UniPCMultistepScheduler", {}),
        ("dpmpp_2m_sgm_uniform", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
        ("euler_normal", "EulerDiscreteScheduler", {}),
        # Draw Things
        ("Euler A Trailing", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
        ("DPM++ 2M Trailing", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
        ("DDIM Trailing", "DDIMScheduler", {"timestep_spacing": "trailing"}),
        ("TCD Trailing", "TCDScheduler", {"timestep_spacing": "trailing"}),
        ("DPM++ 2M AYS", "DPMSolverMultistepScheduler", {}),
        ("Euler A Substep", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
        # diffusers class names: the class as the model's config says
        ("ddimscheduler", "DDIMScheduler", {}),
        ("DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", {}),
    ],
)
def test_names_resolve_case_insensitively(
    name: str, class_name: str, overrides: dict[str, Any]
) -> None:
    assert resolve_scheduler(name) == (class_name, overrides)


def test_ays_and_substep_are_flagged() -> None:
    assert lookup_scheduler("DPM++ 2M AYS").ays
    assert not lookup_scheduler("DPM++ 2M").ays
    assert "no diffusers equivalent" in (lookup_scheduler("Euler a Substep").note or "")


def test_unknown_scheduler_lists_valid_names() -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_scheduler("Eulerish")

    assert info.value.status == 422
    for name in ("Euler a", "DPM++ 2M Karras", "UniPC", "DPM++ 2M AYS", "EulerDiscreteScheduler"):
        assert name in info.value.message
    assert {"Euler", "Euler a", "DDIM", "LMS", "Heun", "DPM++ 2M Karras", "LCM"} <= set(
        scheduler_names()
    )


def test_a_modifier_the_sampler_cannot_take_is_unsupported() -> None:
    with pytest.raises(Unsupported, match="Euler a cannot run with Karras in diffusers"):
        resolve_scheduler("Euler a Karras")


def test_flow_models_have_their_own_table() -> None:
    assert resolve_scheduler("Euler Karras", flow=True) == (
        "FlowMatchEulerDiscreteScheduler",
        KARRAS,
    )
    assert resolve_scheduler("heun", flow=True)[0] == "FlowMatchHeunDiscreteScheduler"
    with pytest.raises(Unsupported, match="is for noise-prediction models"):
        resolve_scheduler("DPM++ 2M Karras", flow=True)
    with pytest.raises(Unsupported, match="is for flow-matching models"):
        resolve_scheduler("FlowMatchEulerDiscreteScheduler")


@pytest.mark.skipif(importlib.util.find_spec("torchsde") is not None, reason="torchsde installed")
def test_scheduler_with_missing_package_says_what_to_install() -> None:
    with pytest.raises(Unsupported, match="pip install torchsde"):
        resolve_scheduler("DPM++ SDE Karras")


def test_ays_timesteps_follow_the_paper_and_interpolate() -> None:
    sd_config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    ten = ays_timesteps("sd", 10, sd_config)
    many = ays_timesteps("sdxl", 30, sd_config)

    # the paper's SD 1.5 timesteps, as diffusers ships them, within rounding
    paper = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    assert all(abs(a - b) <= 1 for a, b in zip(ten, paper, strict=True))
    assert len(many) == 30 and many == sorted(set(many), reverse=True)
    assert ays_timesteps("sdxl", 4, sd_config)[0] == 999


# -- the table against the installed diffusers --------------------------------------------


def _diffusers_class(name: str) -> Any:
    import diffusers

    try:
        return getattr(diffusers, name)
    except (ImportError, AttributeError):
        return None


@pytest.mark.parametrize("name", [*SCHEDULERS, *FLOW_SCHEDULERS])
def test_every_name_builds_with_the_installed_diffusers(name: str) -> None:
    pytest.importorskip("diffusers")
    flow = name not in SCHEDULERS
    try:
        spec = lookup_scheduler(name, flow=flow)
    except Unsupported as exc:  # an optional package missing on this machine
        assert "pip install" in exc.message
        return
    cls = _diffusers_class(spec.class_name)
    config = {"num_train_timesteps": 1000, "steps_offset": 1}
    scheduler = make_scheduler(name, config, flow=flow)

    init = inspect.signature(cls.__init__).parameters
    assert set(spec.overrides) <= set(init), f"{cls.__name__} does not take {spec.overrides}"
    for key, value in spec.overrides.items():
        assert scheduler.config[key] == value
    if spec.ays:  # the published AYS sigmas drive it, whatever the class
        with quiet_warnings():
            scheduler.set_timesteps(7)
        assert float(scheduler.sigmas[0]) == pytest.approx(14.615, abs=0.01)
        assert type(scheduler).__name__ == cls.__name__


def test_kandinsky_schedulers_take_a_generator_in_step() -> None:
    pytest.importorskip("diffusers")
    allowed = FAMILIES["kandinsky22"].schedulers or frozenset()
    for name in allowed:
        assert "generator" in inspect.signature(_diffusers_class(name).step).parameters


def test_modules_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = sys.modules['diffusers'] = None\n"
        "import easel.backends.diffusers.backend, easel.backends.diffusers.schedulers\n"
        "import easel.tiny, easel.backends.diffusers.models\n"
        "from easel.backends.diffusers.schedulers import resolve_scheduler\n"
        "print(resolve_scheduler('Euler a')[0])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "EulerAncestralDiscreteScheduler"


def test_ays_sigmas_are_the_ones_diffusers_publishes() -> None:
    pytest.importorskip("diffusers")
    from diffusers.schedulers import AysSchedules  # type: ignore[attr-defined]

    assert [*ays_sigmas("sd"), 0.0] == AysSchedules["StableDiffusionSigmas"]
    assert [*ays_sigmas("sdxl"), 0.0] == AysSchedules["StableDiffusionXLSigmas"]
