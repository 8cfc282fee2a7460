"""The diffusers backend against a tiny random Stable-Diffusion folder (64 px, a few steps)."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops

from easel.backends import RunContext
from easel.backends.diffusers import DiffusersBackend
from easel.backends.schedulers import (
    make_scheduler,
    resolve_scheduler,
    scheduler_names,
)
from easel.errors import Cancelled, GenerationError, InvalidRequest, ModelNotFound, Unsupported
from easel.images import encode_png_base64
from easel.jobs import GenerationRequest

# -- the scheduler table (pure: no torch) ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "class_name", "overrides"),
    [
        ("Euler", "EulerDiscreteScheduler", {}),
        ("euler A", "EulerAncestralDiscreteScheduler", {}),
        ("DPM++ 2M", "DPMSolverMultistepScheduler", {}),
        ("dpm++  2m karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
        ("UniPC", "UniPCMultistepScheduler", {}),
        ("LCM", "LCMScheduler", {}),
        ("ddimscheduler", "DDIMScheduler", {}),
        ("DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", {}),
    ],
)
def test_scheduler_names_resolve_case_insensitively(
    name: str, class_name: str, overrides: dict[str, Any]
) -> None:
    assert resolve_scheduler(name) == (class_name, overrides)


def test_unknown_scheduler_lists_valid_names() -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_scheduler("Eulerish")

    for name in ("Euler a", "DPM++ 2M Karras", "UniPC", "EulerDiscreteScheduler"):
        assert name in info.value.message
    assert {"Euler", "Euler a", "DDIM", "LMS", "Heun", "DPM++ 2M Karras", "LCM"} <= set(
        scheduler_names()
    )


@pytest.mark.skipif(importlib.util.find_spec("torchsde") is not None, reason="torchsde installed")
def test_scheduler_with_missing_package_says_what_to_install() -> None:
    with pytest.raises(Unsupported, match="pip install torchsde"):
        resolve_scheduler("DPM++ SDE Karras")


def test_modules_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = sys.modules['diffusers'] = None\n"
        "import easel.backends.diffusers, easel.backends.schedulers, easel.tiny\n"
        "from easel.backends.schedulers import resolve_scheduler\n"
        "print(resolve_scheduler('Euler a')[0])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "EulerAncestralDiscreteScheduler"


# -- the backend ---------------------------------------------------------------------------------


def request(**fields: Any) -> GenerationRequest:
    defaults: dict[str, Any] = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 3}
    return GenerationRequest(**{"seed": 7, **defaults, **fields})


def pixels(image: Image.Image) -> bytes:
    return image.tobytes()


class Recorder:
    """A RunContext whose progress calls are recorded, optionally cancelling at one step."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.context = RunContext(on_progress=self._on_progress)
        self.cancel_at = cancel_at

    def _on_progress(self, step: int, total: int, preview: Image.Image | None) -> None:
        self.calls.append((step, total))
        if step == self.cancel_at:
            self.context.cancel_event.set()


@pytest.fixture(scope="module")
async def backend(tiny_model_dir: Path) -> AsyncIterator[DiffusersBackend]:
    pytest.importorskip("diffusers")
    backend = DiffusersBackend(str(tiny_model_dir), device="cpu")
    await backend.start()
    yield backend
    await backend.close()


async def run(
    backend: DiffusersBackend, req: GenerationRequest, recorder: Recorder | None = None
) -> Any:
    backend.check(req)
    return await backend.generate(req, (recorder or Recorder()).context)


async def test_loads_the_folder_as_a_model(backend: DiffusersBackend, tiny_model_dir: Path) -> None:
    [info] = backend.models()

    assert info.name == tiny_model_dir.name == backend.default_model
    assert info.backend == "diffusers"
    assert info.family == "StableDiffusionPipeline"
    assert info.path == str(tiny_model_dir)
    assert info.loaded


async def test_txt2img_returns_the_batch_at_the_requested_size(backend: DiffusersBackend) -> None:
    result = await run(backend, request(width=64, height=48, batch_size=2, seed=5))

    assert [image.size for image in result.images] == [(64, 48), (64, 48)]
    assert all(image.mode == "RGB" for image in result.images)
    assert result.seeds == [5, 6]
    assert result.model == backend.models()[0].name
    assert result.info == {"scheduler": "EulerDiscreteScheduler"}


async def test_same_seed_same_pixels_other_seed_other_pixels(backend: DiffusersBackend) -> None:
    first = await run(backend, request(seed=11))
    again = await run(backend, request(seed=11))
    other = await run(backend, request(seed=12))

    assert pixels(first.images[0]) == pixels(again.images[0])
    assert pixels(first.images[0]) != pixels(other.images[0])


def max_difference(a: Image.Image, b: Image.Image) -> int:
    return max(ImageChops.difference(a, b).getextrema(), key=lambda band: band[1])[1]


async def test_batch_image_i_is_the_single_run_with_seed_plus_i(backend: DiffusersBackend) -> None:
    batch = await run(backend, request(seed=20, batch_size=3))
    singles = [(await run(backend, request(seed=20 + i))).images[0] for i in range(3)]

    # Same noise, but a batched forward pass rounds differently: at most 1/255 on few pixels.
    for i, single in enumerate(singles):
        assert max_difference(batch.images[i], single) <= 1
        assert max_difference(batch.images[i], singles[(i + 1) % 3]) > 16


async def test_progress_reports_every_step_in_order(backend: DiffusersBackend) -> None:
    recorder = Recorder()
    await run(backend, request(steps=4), recorder)

    assert recorder.calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


async def test_cancel_midway_raises_cancelled_and_stops_early(backend: DiffusersBackend) -> None:
    recorder = Recorder(cancel_at=2)

    with pytest.raises(Cancelled):
        await run(backend, request(steps=4), recorder)
    assert recorder.calls == [(1, 4), (2, 4)]


async def test_failure_inside_the_pipeline_is_a_generation_error(backend: DiffusersBackend) -> None:
    def explode(step: int, total: int, preview: Image.Image | None) -> None:
        raise RuntimeError("boom")

    with pytest.raises(GenerationError, match="boom") as info:
        await backend.generate(request(), RunContext(on_progress=explode))
    assert isinstance(info.value.__cause__, RuntimeError)


def _png(width: int, height: int) -> str:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 3 % 256, y * 5 % 256, 128) for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return encode_png_base64(Image.open(buffer))


async def test_img2img_uses_the_init_image_at_the_requested_size(backend: DiffusersBackend) -> None:
    recorder = Recorder()
    req = request(init_image=_png(80, 56), width=64, height=64, steps=4, strength=0.5)
    result = await run(backend, req, recorder)
    again = await run(backend, req)
    other = await run(backend, req.model_copy(update={"init_image": _png(40, 40)}))

    assert [image.size for image in result.images] == [(64, 64)]
    assert pixels(result.images[0]) == pixels(again.images[0])
    assert pixels(result.images[0]) != pixels(other.images[0])
    assert recorder.calls == [(1, 2), (2, 2)]  # int(steps * strength) denoising steps


async def test_img2img_with_no_step_to_run_is_refused(backend: DiffusersBackend) -> None:
    with pytest.raises(InvalidRequest, match="strength"):
        backend.check(request(init_image=_png(8, 8), steps=2, strength=0.2))


async def test_unknown_scheduler_is_refused_at_check(backend: DiffusersBackend) -> None:
    with pytest.raises(InvalidRequest, match="valid schedulers are: Euler, Euler a"):
        backend.check(request(scheduler="warp drive"))


async def test_other_model_is_not_found_at_check(backend: DiffusersBackend) -> None:
    with pytest.raises(ModelNotFound, match="not served"):
        backend.check(request(model="sd-xl-base"))
    backend.check(request(model=backend.models()[0].name))


@pytest.mark.parametrize(
    ("name", "class_name"),
    [
        ("Euler a", "EulerAncestralDiscreteScheduler"),
        ("DDIM", "DDIMScheduler"),
        ("PLMS", "PNDMScheduler"),
        ("Heun", "HeunDiscreteScheduler"),
        ("DPM++ 2M Karras", "DPMSolverMultistepScheduler"),
        ("UniPC", "UniPCMultistepScheduler"),
        ("LCM", "LCMScheduler"),
        ("eulerdiscretescheduler", "EulerDiscreteScheduler"),
    ],
)
async def test_schedulers_from_the_table_generate(
    backend: DiffusersBackend, name: str, class_name: str
) -> None:
    recorder = Recorder()
    result = await run(backend, request(scheduler=name, steps=2), recorder)

    assert result.info["scheduler"] == class_name
    assert [image.size for image in result.images] == [(64, 64)]
    total = recorder.calls[-1][1]  # Heun runs 2 model calls per step, PLMS one more
    assert recorder.calls == [(step, total) for step in range(1, total + 1)]


async def test_a_scheduler_applies_to_its_request_only(backend: DiffusersBackend) -> None:
    plain = await run(backend, request(seed=3))
    await run(backend, request(seed=3, scheduler="DPM++ 2M Karras"))
    after = await run(backend, request(seed=3))

    assert after.info["scheduler"] == "EulerDiscreteScheduler"
    assert pixels(plain.images[0]) == pixels(after.images[0])


async def test_concurrent_requests_do_not_disturb_each_other(backend: DiffusersBackend) -> None:
    reqs = [request(seed=31, scheduler="Euler a"), request(seed=32, scheduler="UniPC", steps=4)]
    alone = [await run(backend, req) for req in reqs]
    together = await asyncio.gather(*(run(backend, req) for req in reqs))

    assert [pixels(r.images[0]) for r in together] == [pixels(r.images[0]) for r in alone]


async def test_the_scheduler_keeps_the_models_noise_schedule(backend: DiffusersBackend) -> None:
    scheduler = make_scheduler("DDIM", {"beta_end": 0.02, "steps_offset": 1, "clip_sample": False})

    assert scheduler.config.beta_end == 0.02
    assert scheduler.config.steps_offset == 1


async def test_missing_model_folder_is_model_not_found(tmp_path: Path) -> None:
    missing = DiffusersBackend(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFound, match="does not exist"):
        await missing.start()

    (tmp_path / "not-a-model").mkdir()
    not_diffusers = DiffusersBackend(str(tmp_path / "not-a-model"))
    with pytest.raises(ModelNotFound, match=r"no model_index\.json"):
        await not_diffusers.start()
    assert not not_diffusers.models()[0].loaded


async def test_hub_id_is_not_downloaded() -> None:
    with pytest.raises(ModelNotFound, match="never downloads"):
        await DiffusersBackend("runwayml/stable-diffusion-v1-5").start()
