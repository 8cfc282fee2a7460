"""Every sampler name users type x every model family (tiny pipelines): each is refused at
admission with a 4xx, or it runs. Zero accepted-then-failed.

Names that resolve to the same scheduler (class, config, AYS schedule) on a family run once:
what can fail at run time depends only on that, and admission's answer for every spelling
is checked to be that same scheduler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from easel.backends.base import RunContext
from easel.backends.diffusers.backend import DiffusersBackend
from easel.backends.diffusers.backend import create as diffusers_backend
from easel.backends.diffusers.schedulers import FLOW_SCHEDULERS, SCHEDULERS
from easel.errors import EaselError
from easel.jobs import GenerationRequest
from easel.samplers import A1111_SAMPLERS, DIFFUSERS_CLASSES, DRAWTHINGS_SAMPLERS

pytest.importorskip("diffusers")

TINY = ("sd", "sd2", "sdxl", "sd3", "flux", "flux-dev", "kandinsky22", "kandinsky3")

# Draw Things' own spellings (its client's table and its schema's enum names).
DRAWTHINGS_SPELLINGS = (
    "DPMPP2M Karras",
    "Euler A",
    "DPMPP SDE Karras",
    "Euler A Substep",
    "DPMPP SDE Substep",
    "Euler A Trailing",
    "DPMPP SDE Trailing",
    "DPMPP2M AYS",
    "Euler A AYS",
    "DPMPP SDE AYS",
    "DPMPP2M Trailing",
    "UniPC ays",
    "UniPCAYS",
    "DPMPP2MKarras",
    "EulerAAYS",
)
A1111_NAMES = (
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "LMS Karras",
    "DPM2 a Karras",
    "Euler a",
    *A1111_SAMPLERS,  # A1111's whole list: diffusers lacks "DPM fast", "Restart"... (refused)
    "Euler KL Optimal",
    "DPM++ 2M Polyexponential",
    "k_dpmpp_2s_a",
)
COMFYUI_PAIRS = (
    "euler_ancestral_karras",
    "dpmpp_2m_sde_gpu_exponential",
    "dpmpp_2m_sgm_uniform",
    "uni_pc_bh2",
    "lms_karras",
    "dpm_2_ancestral_normal",
    "heun_beta",
    "ddim_ddim_uniform",
)
DIFFUSERS_STYLE = ("dpmsolver++", "sde-dpmsolver++", "euler_a", "kdpm2", "dpmsolver_singlestep")

NAMES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *SCHEDULERS,
            *FLOW_SCHEDULERS,
            *DIFFUSERS_CLASSES,
            *DRAWTHINGS_SAMPLERS,
            *DRAWTHINGS_SPELLINGS,
            *A1111_NAMES,
            *COMFYUI_PAIRS,
            *DIFFUSERS_STYLE,
        ]
    )
)


@pytest.fixture(scope="module")
async def backend(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DiffusersBackend]:
    from easel.tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("matrix")
    for family in TINY:
        make_tiny_pipeline(root / f"tiny-{family}", family=family, seed=1)
    backend = diffusers_backend(str(root), hf_cache=False, device="cpu")
    await backend.start()
    yield backend
    await backend.close()


def _request(family: str, scheduler: str, steps: int = 3) -> GenerationRequest:
    return GenerationRequest(
        prompt="a fox",
        width=64,
        height=64,
        steps=steps,
        seed=1,
        scheduler=scheduler,
        model=f"tiny-{family}",
    )


def _key(spec: Any) -> tuple[Any, ...]:
    return (spec.class_name, tuple(sorted(spec.overrides.items())), spec.ays, spec.ays_schedule)


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~100 runs of 64 px, 3 steps, on the SD families
@pytest.mark.parametrize("family", TINY)
async def test_every_name_runs_or_is_refused_at_admission(
    backend: DiffusersBackend, family: str
) -> None:
    runs: dict[tuple[Any, ...], str] = {}
    refused: dict[str, str] = {}
    for name in NAMES:
        request = _request(family, name)
        try:
            backend.check(request)
        except EaselError as exc:
            assert 400 <= exc.status < 500, (name, exc)
            refused[name] = exc.message
            continue
        spec = backend._plan(request).scheduler
        runs.setdefault(_key(spec), name)

    failed = {}
    for name in runs.values():
        try:
            result = await backend.generate(_request(family, name), RunContext())
        except EaselError as exc:
            failed[name] = f"{exc.code}: {exc.message}"
            continue
        assert result.images[0].size == (64, 64)

    assert failed == {}, f"accepted on {family}, then failed"
    assert runs, f"nothing runs on {family}"
    if not family.startswith("kandinsky"):  # whose pipelines drive only DDIM-like samplers
        assert "Euler" not in refused, refused["Euler"]
    if family in ("sd", "sd2", "sdxl"):  # every Draw Things sampler, in both spellings
        for name in (*DRAWTHINGS_SAMPLERS, *DRAWTHINGS_SPELLINGS):
            assert name not in refused, (name, refused.get(name))
