"""The diffusers backend on a tiny random Stable-Diffusion model (64 px, a few steps): modes,
schedulers, clip skip, LoRA, ControlNet, previews, upscale, the pipeline cache."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy
import pytest
from PIL import Image, ImageChops
from pydantic import ValidationError

from easel.backends import RunContext, registry
from easel.backends.diffusers._options import read_extras
from easel.backends.diffusers.backend import DiffusersBackend
from easel.backends.diffusers.backend import create as diffusers_backend
from easel.errors import (
    Cancelled,
    GenerationError,
    InvalidRequest,
    ModelNotFound,
    Unsupported,
)
from easel.images import encode_png_base64
from easel.jobs import GenerationRequest

pytest.importorskip("diffusers")


Request = GenerationRequest


def request(**fields: Any) -> Request:
    defaults: dict[str, Any] = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 3}
    return Request(**{"seed": 7, **defaults, **fields})


def pixels(image: Image.Image) -> bytes:
    return image.tobytes()


def max_difference(a: Image.Image, b: Image.Image) -> int:
    bands = cast("tuple[tuple[int, int], ...]", ImageChops.difference(a, b).getextrema())
    return max(high for _low, high in bands)


def png(width: int, height: int, colour: tuple[int, int, int] | None = None) -> str:
    image = Image.new("RGB", (width, height), colour)
    if colour is None:
        image.putdata(
            [(x * 3 % 256, y * 5 % 256, 128) for y in range(height) for x in range(width)]
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return encode_png_base64(Image.open(buffer))


def mask(width: int, height: int) -> str:
    image = Image.new("L", (width, height), 0)
    image.paste(255, (0, 0, width // 2, height))  # repaint the left half
    return encode_png_base64(image)


class Recorder:
    """A RunContext whose progress calls are recorded, optionally cancelling at one step."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.previews: list[tuple[int, tuple[int, int]]] = []
        self.context = RunContext(on_progress=self._on_progress)
        self.cancel_at = cancel_at

    def _on_progress(self, step: int, total: int, preview: Image.Image | None) -> None:
        self.calls.append((step, total))
        if preview is not None:
            self.previews.append((step, preview.size))
        if step == self.cancel_at:
            self.context.cancel_event.set()


@pytest.fixture(scope="module")
def models_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD model, two LoRAs, a ControlNet and a tiny preview autoencoder."""
    from easel.tiny import make_tiny_controlnet, make_tiny_lora, make_tiny_preview_vae

    root = tmp_path_factory.mktemp("sd-models")
    os.symlink(tiny_model_dir, root / tiny_model_dir.name)
    if importlib_spec("peft"):
        make_tiny_lora(root / "loras" / "ink.safetensors", tiny_model_dir, seed=1)
        make_tiny_lora(root / "loras" / "neon.safetensors", tiny_model_dir, seed=2)
        make_tiny_lora(root / "loras" / "xl-only.safetensors", tiny_model_dir, seed=3)
        (root / "loras" / "xl-only.json").write_text('{"model_type": "SDXL"}')
    make_tiny_controlnet(root / "controlnet" / "depth", tiny_model_dir)
    make_tiny_preview_vae(root / "taesd")
    return root


def importlib_spec(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
async def backend(tiny_model_dir: Path, models_dir: Path) -> AsyncIterator[DiffusersBackend]:
    backend = diffusers_backend(
        str(tiny_model_dir), models_dir=str(models_dir), hf_cache=False, device="cpu"
    )
    await backend.start()
    yield backend
    await backend.close()


async def run(
    backend: DiffusersBackend, req: GenerationRequest, recorder: Recorder | None = None
) -> Any:
    backend.check(req)
    return await backend.generate(req, (recorder or Recorder()).context)


# -- the model -------------------------------------------------------------------------------


async def test_serves_the_folder_as_the_default_model(
    backend: DiffusersBackend, tiny_model_dir: Path
) -> None:
    [info] = [model for model in backend.models() if model.kind == "pipeline"]

    assert info.name == tiny_model_dir.name == backend.default_model
    assert (info.backend, info.family, info.path) == ("diffusers", "sd1", str(tiny_model_dir))
    assert info.loaded


async def test_missing_model_folder_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        await diffusers_backend(str(tmp_path / "nope")).start()

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match=r"no model_index\.json"):
        await diffusers_backend(str(tmp_path / "empty"), hf_cache=False).start()


async def test_hub_id_is_not_downloaded() -> None:
    with pytest.raises(ModelNotFound, match="never downloads"):
        await diffusers_backend("runwayml/stable-diffusion-v1-5", hf_cache=False).start()


async def test_other_model_is_not_found_at_check(backend: DiffusersBackend) -> None:
    with pytest.raises(ModelNotFound, match="Available models: tiny-sd"):
        backend.check(request(model="sd-xl-base"))
    backend.check(request(model=backend.models()[0].name))


# -- txt2img -------------------------------------------------------------------------------


async def test_txt2img_returns_the_batch_at_the_requested_size(backend: DiffusersBackend) -> None:
    result = await run(backend, request(width=64, height=48, batch_size=2, seed=5))

    assert [image.size for image in result.images] == [(64, 48), (64, 48)]
    assert all(image.mode == "RGB" for image in result.images)
    assert result.seeds == [5, 6]
    assert result.model == "tiny-sd"
    assert result.info["scheduler_config"]["beta_schedule"] == "scaled_linear"
    assert {k: v for k, v in result.info.items() if k != "scheduler_config"} == {
        "sampler": "Euler",
        "schedule_type": "Automatic",
        "scheduler": "EulerDiscreteScheduler",
        "family": "sd1",
        "mode": "txt2img",
    }


async def test_same_seed_same_pixels_other_seed_other_pixels(backend: DiffusersBackend) -> None:
    first = await run(backend, request(seed=11))
    again = await run(backend, request(seed=11))
    other = await run(backend, request(seed=12))

    assert pixels(first.images[0]) == pixels(again.images[0])
    assert pixels(first.images[0]) != pixels(other.images[0])


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
    assert recorder.previews == []  # off unless asked for


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


async def test_concurrent_requests_do_not_disturb_each_other(backend: DiffusersBackend) -> None:
    reqs = [request(seed=31, scheduler="Euler a"), request(seed=32, scheduler="UniPC", steps=4)]
    alone = [await run(backend, req) for req in reqs]
    together = await asyncio.gather(*(run(backend, req) for req in reqs))

    # Two runs at once share torch's CPU thread pool, so float sums may be reduced in another
    # order and some pixels move by a few levels; a scheduler disturbed by the other request
    # gives another picture altogether (a mean difference of tens of levels).
    for mixed, solo in zip(together, alone, strict=True):
        difference = numpy.abs(
            numpy.asarray(mixed.images[0], dtype=numpy.int16)
            - numpy.asarray(solo.images[0], dtype=numpy.int16)
        )
        assert difference.mean() < 4.0


# -- img2img, inpaint, modes ----------------------------------------------------------------


async def test_img2img_uses_the_init_image_at_the_requested_size(backend: DiffusersBackend) -> None:
    recorder = Recorder()
    req = request(init_image=png(80, 56), width=64, height=64, steps=4, strength=0.5)
    result = await run(backend, req, recorder)
    again = await run(backend, req)
    other = await run(backend, req.model_copy(update={"init_image": png(40, 40)}))

    assert [image.size for image in result.images] == [(64, 64)]
    assert pixels(result.images[0]) == pixels(again.images[0])
    assert pixels(result.images[0]) != pixels(other.images[0])
    assert recorder.calls == [(1, 2), (2, 2)]  # int(steps * strength) denoising steps
    assert result.info["mode"] == "img2img"


async def test_img2img_with_no_step_to_run_is_refused(backend: DiffusersBackend) -> None:
    with pytest.raises(InvalidRequest, match="strength"):
        backend.check(request(init_image=png(8, 8), steps=2, strength=0.2))


async def test_inpaint_repaints_only_the_masked_part(backend: DiffusersBackend) -> None:
    init = png(64, 64)
    result = await run(
        backend, request(init_image=init, mask_image=mask(64, 64), strength=1.0, steps=4)
    )
    image = result.images[0]
    original = Image.open(io.BytesIO(__import__("base64").b64decode(init))).convert("RGB")

    assert result.info["mode"] == "inpaint"
    assert image.size == (64, 64)
    left, right = (0, 0, 24, 64), (40, 0, 64, 64)  # away from the mask edge
    assert max_difference(image.crop(left), original.crop(left)) > 32
    # the kept half went through the VAE (lossy) but was not repainted
    assert max_difference(image.crop(right), original.crop(right)) < max_difference(
        image.crop(left), original.crop(left)
    )


async def test_inpaint_needs_an_init_image() -> None:
    with pytest.raises(ValidationError, match="inpaint needs init_image"):
        request(mask_image=mask(64, 64))


async def test_mix_is_unsupported_on_stable_diffusion(backend: DiffusersBackend) -> None:
    with pytest.raises(Unsupported, match="cannot do mix; it can do: img2img, inpaint, txt2img"):
        backend.check(request(mix=[{"prompt": "a cat"}]))


# -- schedulers -------------------------------------------------------------------------------


async def test_unknown_scheduler_is_refused_at_check(backend: DiffusersBackend) -> None:
    with pytest.raises(InvalidRequest, match=r"Stable Diffusion 1\.x models are: Euler, Euler a"):
        backend.check(request(scheduler="warp drive"))
    with pytest.raises(Unsupported, match="is for flow-matching models only"):
        backend.check(request(scheduler="FlowMatchEulerDiscreteScheduler"))


@pytest.mark.parametrize(
    ("name", "class_name"),
    [
        ("Euler a", "EulerAncestralDiscreteScheduler"),
        ("DDIM", "DDIMScheduler"),
        ("PLMS", "PNDMScheduler"),
        ("Heun", "HeunDiscreteScheduler"),
        ("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler"),
        ("DPM++ 2M Karras", "DPMSolverMultistepScheduler"),
        ("dpmpp_2m_sde_karras", "DPMSolverMultistepScheduler"),
        ("DPM++ 3M SDE Exponential", "DPMSolverMultistepScheduler"),
        ("DPM++ 2S", "DPMSolverSinglestepScheduler"),
        ("DEIS", "DEISMultistepScheduler"),
        ("UniPC", "UniPCMultistepScheduler"),
        ("UniPC Trailing", "UniPCMultistepScheduler"),
        ("Euler A Trailing", "EulerAncestralDiscreteScheduler"),
        ("DDPM", "DDPMScheduler"),
        ("LCM", "LCMScheduler"),
        ("TCD", "TCDScheduler"),
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


@pytest.mark.parametrize(
    "name", ["DPM++ 2M AYS", "Euler AYS", "UniPC ays", "Euler A AYS", "DPMPP SDE AYS"]
)
async def test_ays_runs_the_align_your_steps_schedule(backend: DiffusersBackend, name: str) -> None:
    recorder = Recorder()
    plain = await run(backend, request(scheduler=name[:-4], steps=4, seed=2))
    ays = await run(backend, request(scheduler=name, steps=4, seed=2), recorder)

    assert recorder.calls[-1][1] >= 4  # DPM++ SDE calls the model twice per step
    assert pixels(ays.images[0]) != pixels(plain.images[0])
    assert ays.info["schedule_type"] == "Align Your Steps"
    assert ays.info["sigmas"] == "Align Your Steps (sd)"


async def test_ays_where_diffusers_cannot_is_refused(backend: DiffusersBackend) -> None:
    with pytest.raises(Unsupported, match="DDIM cannot run with AYS in diffusers"):
        backend.check(request(scheduler="DDIM AYS"))


async def test_substep_runs_the_nearest_sampler_and_says_so(backend: DiffusersBackend) -> None:
    result = await run(backend, request(scheduler="Euler A Substep", steps=2))

    assert result.info["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert "no diffusers equivalent" in result.info["scheduler_note"]


async def test_a_scheduler_applies_to_its_request_only(backend: DiffusersBackend) -> None:
    plain = await run(backend, request(seed=3))
    await run(backend, request(seed=3, scheduler="DPM++ 2M Karras"))
    after = await run(backend, request(seed=3))

    assert after.info["scheduler"] == "EulerDiscreteScheduler"
    assert pixels(plain.images[0]) == pixels(after.images[0])


# -- clip skip, previews, upscale -------------------------------------------------------------


async def test_clip_skip_changes_the_text_conditioning(backend: DiffusersBackend) -> None:
    plain = await run(backend, request(seed=4))
    one = await run(backend, request(seed=4, clip_skip=1))  # A1111: 1 = the last layer
    two = await run(backend, request(seed=4, clip_skip=2))
    two_again = await run(backend, request(seed=4, clip_skip=2, batch_size=2))

    assert pixels(one.images[0]) == pixels(plain.images[0])
    assert pixels(two.images[0]) != pixels(plain.images[0])
    assert max_difference(two_again.images[0], two.images[0]) <= 1


async def test_previews_arrive_every_k_steps_at_latent_size(backend: DiffusersBackend) -> None:
    recorder = Recorder()
    await run(backend, request(steps=5, width=64, height=48, preview_every=2), recorder)

    assert recorder.previews == [(2, (8, 6)), (4, (8, 6)), (5, (8, 6))]  # and the last step


async def test_previews_through_a_tiny_autoencoder_are_full_size(
    tiny_model_dir: Path, models_dir: Path
) -> None:
    backend = diffusers_backend(
        str(tiny_model_dir), models_dir=str(models_dir), hf_cache=False, device="cpu",
        preview_every=1, preview_vae="taesd",
    )  # fmt: skip
    recorder = Recorder()
    await run(backend, request(steps=2), recorder)

    assert recorder.previews == [(1, (64, 64)), (2, (64, 64))]
    quiet = Recorder()
    await run(backend, request(steps=2, preview_every=0), quiet)  # a request can opt out
    assert quiet.previews == []


async def test_latent_upscale_runs_a_second_pass_at_twice_the_size(
    backend: DiffusersBackend,
) -> None:
    recorder = Recorder()
    req = request(steps=4, width=64, height=48, upscale={"factor": 2, "strength": 0.5})
    result = await run(backend, req, recorder)

    assert [image.size for image in result.images] == [(128, 96)]
    assert recorder.calls == [(step, 6) for step in range(1, 7)]  # 4 + int(4 * 0.5)


async def test_upscale_is_for_txt2img(backend: DiffusersBackend) -> None:
    with pytest.raises(Unsupported, match="cannot upscale img2img"):
        backend.check(request(init_image=png(64, 64), upscale={"factor": 2}))


# -- LoRA ---------------------------------------------------------------------------------------


async def test_lora_changes_the_output_and_unloading_restores_it(
    backend: DiffusersBackend,
) -> None:
    plain = await run(backend, request(seed=9))
    ink = await run(backend, request(seed=9, loras=[{"name": "loras/ink"}]))
    half = await run(backend, request(seed=9, loras=[{"name": "ink", "weight": 0.5}]))
    both = await run(backend, request(seed=9, loras=[{"name": "ink"}, {"name": "neon"}]))
    after = await run(backend, request(seed=9))
    ink_again = await run(backend, request(seed=9, loras=[{"name": "loras/ink"}]))

    assert ink.info["loras"] == [{"name": "loras/ink", "weight": 1.0}]
    assert len({pixels(r.images[0]) for r in (plain, ink, half, both)}) == 4
    assert pixels(after.images[0]) == pixels(plain.images[0])
    assert pixels(ink_again.images[0]) == pixels(ink.images[0])


async def test_concurrent_lora_requests_each_get_their_own_set(backend: DiffusersBackend) -> None:
    reqs = [
        request(seed=5),
        request(seed=5, loras=[{"name": "ink"}]),
        request(seed=5, loras=[{"name": "neon"}]),
    ]
    alone = [pixels((await run(backend, req)).images[0]) for req in reqs]
    together = await asyncio.gather(*(run(backend, req) for req in reqs))

    assert [pixels(r.images[0]) for r in together] == alone


async def test_lora_refusals(backend: DiffusersBackend) -> None:
    with pytest.raises(ModelNotFound, match="Available loras: loras/ink"):
        backend.check(request(loras=[{"name": "nope"}]))
    with pytest.raises(Unsupported, match="made for sdxl"):
        backend.check(request(loras=[{"name": "xl-only"}]))
    with pytest.raises(InvalidRequest, match="weight"):  # whatever the request model holds
        read_extras(SimpleNamespace(kind="txt2img", loras=[{"name": "ink", "weight": 9}]))


# -- ControlNet -------------------------------------------------------------------------------


async def test_controlnet_follows_the_control_image(backend: DiffusersBackend) -> None:
    plain = await run(backend, request(seed=2))
    red = await run(backend, request(seed=2, controlnet={"name": "depth", "image": png(64, 64)}))
    green = await run(
        backend, request(seed=2, controlnet={"name": "depth", "image": png(32, 32, (0, 200, 0))})
    )
    off = await run(
        backend, request(seed=2, controlnet={"name": "depth", "image": png(64, 64), "scale": 0})
    )

    assert pixels(red.images[0]) != pixels(plain.images[0])
    assert pixels(red.images[0]) != pixels(green.images[0])
    assert max_difference(off.images[0], plain.images[0]) <= 1  # scale 0: no control


async def test_controlnet_img2img_and_inpaint(backend: DiffusersBackend) -> None:
    control = {"name": "depth", "image": png(64, 64)}
    i2i = await run(backend, request(init_image=png(64, 64), controlnet=control, strength=0.7))
    inpaint = await run(
        backend, request(init_image=png(64, 64), mask_image=mask(64, 64), controlnet=control)
    )

    assert (i2i.info["mode"], inpaint.info["mode"]) == ("img2img", "inpaint")


async def test_missing_controlnet_is_model_not_found(backend: DiffusersBackend) -> None:
    with pytest.raises(ModelNotFound, match="Available controlnets: controlnet/depth"):
        backend.check(request(controlnet={"name": "canny", "image": png(8, 8)}))


# -- the pipeline cache -------------------------------------------------------------------


async def test_lru_cache_evicts_the_least_recently_used_model_under_a_budget(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    for name in ("a", "b", "c"):
        os.symlink(tiny_model_dir, root / name)
    one_model = 6_000_000  # the tiny model's weights are ~4.4 MB: room for one
    small = diffusers_backend(str(root), hf_cache=False, device="cpu", memory_budget=one_model)
    await small.start()

    await run(small, request(model="a"))
    await run(small, request(model="b"))
    assert small.cache.names == ["b"]
    loaded = {m.name: m.loaded for m in small.models() if m.kind == "pipeline"}
    assert loaded == {"a": False, "b": True, "c": False}

    big = diffusers_backend(str(root), hf_cache=False, device="cpu", memory_budget="1GB")
    await big.start()
    for name in ("a", "b", "c", "a"):
        await run(big, request(model=name))
    assert big.cache.names == ["b", "c", "a"]  # least recently used first
    assert big.cache.nbytes == 3 * small.cache.nbytes


def test_models_in_use_and_the_latest_are_never_evicted() -> None:
    import torch

    from easel.backends.diffusers._pipelines import PipelineCache

    def weights() -> torch.nn.Module:
        return torch.nn.Linear(16, 16)  # 1,088 bytes: over the budget alone

    cache = PipelineCache(budget=1000)
    with cache.use("a", weights) as a, cache.use("b", weights):
        assert cache.names == ["a", "b"]  # both in use: over budget, nothing evicted
    assert a.nbytes == 1088
    assert cache.names == ["b"]  # the most recent stays, or every request would reload it


# -- batches of compatible requests ------------------------------------------------------------


async def test_a_batch_is_one_call_matching_each_request_alone(backend: DiffusersBackend) -> None:
    reqs = [
        request(prompt="a red fox", seed=40),
        request(prompt="a blue whale", seed=41, batch_size=2),
        request(prompt="a green frog", seed=50, preview_every=3),
    ]
    recorders = [Recorder() for _ in reqs]
    together = await backend.generate_batch(reqs, [r.context for r in recorders])
    alone = [await run(backend, req) for req in reqs]

    assert [r.info["batched_with"] for r in together] == [3, 3, 3]
    assert [len(r.images) for r in together] == [1, 2, 1]
    assert [r.seeds for r in together] == [[40], [41, 42], [50]]
    for batched, single in zip(together, alone, strict=True):
        for a, b in zip(batched.images, single.images, strict=True):
            assert max_difference(a, b) <= 1
    assert all(r.calls == [(1, 3), (2, 3), (3, 3)] for r in recorders)
    assert recorders[2].previews == [(3, (8, 8))]


async def test_incompatible_requests_of_a_batch_run_alone(backend: DiffusersBackend) -> None:
    reqs = [request(seed=60), request(seed=61, init_image=png(64, 64), strength=0.7)]
    recorders = [Recorder(), Recorder(cancel_at=1)]
    results = await backend.generate_batch(reqs, [r.context for r in recorders])

    assert "batched_with" not in results[0].info
    assert pixels(results[0].images[0]) == pixels((await run(backend, reqs[0])).images[0])
    assert results[1].images == []  # cancelled: the worker discards it


# -- device and memory knobs -----------------------------------------------------------------


async def test_memory_and_speed_knobs_keep_the_image(
    backend: DiffusersBackend, tiny_model_dir: Path
) -> None:
    knobs = diffusers_backend(
        str(tiny_model_dir), hf_cache=False, device="cpu", attention_slicing=True,
        vae_slicing=True, vae_tiling=True, channels_last=True, fuse_qkv=True, warmup=["64x48"],
    )  # fmt: skip
    await knobs.start()  # loads, then warms up at 64x48
    plain = await run(backend, request(seed=13, batch_size=2))
    tuned = await run(knobs, request(seed=13, batch_size=2))

    assert knobs.models()[0].loaded
    for a, b in zip(plain.images, tuned.images, strict=True):
        assert max_difference(a, b) <= 2  # fused projections round differently
    with pytest.raises(Unsupported, match="fused QKV"):
        knobs.check(request(loras=[{"name": "ink"}]))


async def test_bfloat16_runs_on_the_cpu(tiny_model_dir: Path) -> None:
    half = diffusers_backend(str(tiny_model_dir), hf_cache=False, device="cpu", dtype="bf16")
    result = await run(half, request(seed=13))

    assert result.images[0].size == (64, 64)


@pytest.mark.parametrize(
    ("option", "message"),
    [({"dtype": "fp8"}, "unknown dtype"), ({"offload": "disk"}, "offload must be one of"),
     ({"compile": "max"}, "compile must be one of"), ({"memory_budget": "lots"}, "not a size")],
)  # fmt: skip
def test_bad_worker_options_are_refused(option: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        diffusers_backend("tiny-sd", hf_cache=False, **option)


async def test_offload_needs_an_accelerator(tiny_model_dir: Path) -> None:
    offloaded = diffusers_backend(
        str(tiny_model_dir), hf_cache=False, device="cpu", offload="model"
    )

    with pytest.raises(InvalidRequest, match="nothing to offload"):
        await offloaded.start()


def test_memory_budget_sizes() -> None:
    from easel.backends.diffusers._pipelines import parse_bytes

    assert parse_bytes("12GB") == 12 * 1024**3
    assert parse_bytes("512 MiB") == 512 * 1024**2
    assert parse_bytes("1.5g") == int(1.5 * 1024**3)
    assert parse_bytes(1000) == 1000
    assert parse_bytes("auto") is None


def test_an_unknown_option_is_refused_not_ignored() -> None:
    with pytest.raises(InvalidRequest, match="flux_capacitor: Extra inputs are not permitted"):
        registry.create("diffusers", model="tiny-sd", flux_capacitor=True)


async def test_clip_skip_deeper_than_the_text_encoder_is_refused_at_admission(
    backend: DiffusersBackend,
) -> None:
    with pytest.raises(InvalidRequest, match=r"clip_skip 4 is deeper .* \(3 layers\); use 1"):
        backend.check(request(clip_skip=4))
    result = await run(backend, request(clip_skip=3, steps=1))  # the deepest it has
    assert result.images[0].size == (64, 64)
