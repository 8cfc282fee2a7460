"""Every family through the same backend code: tiny SDXL, SD3, FLUX and Kandinsky models built
locally, saved as diffusers folders and loaded from a models directory like users' models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from easel.backends.diffusers.backend import DiffusersBackend
from easel.backends.diffusers.backend import create as diffusers_backend
from easel.errors import InvalidRequest, Unsupported
from tests.test_backend_diffusers import (
    Recorder,
    mask,
    max_difference,
    pixels,
    png,
    request,
    run,
)

pytest.importorskip("diffusers")

FAMILIES = {  # tiny builder -> the family the registry must find from the saved config
    "sdxl": "sdxl",
    "sd3": "sd3",
    "flux": "flux",
    "kandinsky22": "kandinsky22",
    "kandinsky3": "kandinsky3",
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from easel.tiny import make_tiny_controlnet, make_tiny_lora, make_tiny_pipeline

    root = tmp_path_factory.mktemp("families")
    for builder in FAMILIES:
        base = make_tiny_pipeline(root / f"tiny-{builder}", family=builder, seed=1)
        if builder in ("sdxl", "sd3", "flux"):  # peft comes with easel[diffusers]
            make_tiny_lora(root / "loras" / f"{builder}-style.safetensors", base, seed=5)
    make_tiny_controlnet(root / "controlnet" / "xl-canny", root / "tiny-sdxl")
    return root


@pytest.fixture(scope="module")
async def backend(family_models: Path) -> AsyncIterator[DiffusersBackend]:
    backend = diffusers_backend(str(family_models), hf_cache=False, device="cpu")
    await backend.start()
    yield backend
    await backend.close()


def model(builder: str) -> str:
    return f"tiny-{builder}"


async def test_the_family_comes_from_the_saved_config(backend: DiffusersBackend) -> None:
    found = {info.name: info.family for info in backend.models() if info.kind == "pipeline"}

    assert found == {model(builder): family for builder, family in FAMILIES.items()}


@pytest.mark.parametrize("builder", list(FAMILIES))
async def test_txt2img_is_deterministic_in_the_seed(
    backend: DiffusersBackend, builder: str
) -> None:
    recorder = Recorder()
    first = await run(backend, request(model=model(builder), seed=3), recorder)
    again = await run(backend, request(model=model(builder), seed=3))
    batch = await run(backend, request(model=model(builder), seed=3, batch_size=2))

    assert [image.size for image in batch.images] == [(64, 64), (64, 64)]
    assert pixels(first.images[0]) == pixels(again.images[0])
    assert max_difference(batch.images[0], first.images[0]) <= 2  # batched rounding
    assert pixels(batch.images[0]) != pixels(batch.images[1])
    assert recorder.calls[-1] == (3, 3)
    assert first.info["family"] == FAMILIES[builder]


@pytest.mark.parametrize("builder", list(FAMILIES))
async def test_img2img(backend: DiffusersBackend, builder: str) -> None:
    # strength 0.5 of 4 steps: flow pipelines start from pure noise above (steps-1)/steps
    req = request(model=model(builder), init_image=png(64, 64), strength=0.5, steps=4)
    result = await run(backend, req)
    other = await run(backend, req.model_copy(update={"init_image": png(64, 64, (9, 9, 9))}))

    assert result.info["mode"] == "img2img"
    assert pixels(result.images[0]) != pixels(other.images[0])


@pytest.mark.parametrize("builder", ["sdxl", "sd3", "flux"])
async def test_inpaint(backend: DiffusersBackend, builder: str) -> None:
    req = request(model=model(builder), init_image=png(64, 64), mask_image=mask(64, 64))
    result = await run(backend, req)

    assert (result.info["mode"], result.images[0].size) == ("inpaint", (64, 64))


@pytest.mark.parametrize("builder", ["kandinsky22", "kandinsky3"])
async def test_kandinsky_inpaint_needs_its_inpainting_model(
    backend: DiffusersBackend, builder: str
) -> None:
    with pytest.raises(Unsupported, match="cannot do inpaint"):
        backend.check(
            request(model=model(builder), init_image=png(64, 64), mask_image=mask(64, 64))
        )


async def test_kandinsky_mixes_prompts_and_images(backend: DiffusersBackend) -> None:
    recorder = Recorder()
    base = request(model=model("kandinsky22"), seed=4, steps=3)
    mixed = await run(backend, base.model_copy(update={"mix": [{"image": png(64, 64)}]}), recorder)
    heavier = await run(
        backend, base.model_copy(update={"mix": [{"image": png(64, 64), "weight": 4}]})
    )
    with_prompt = await run(backend, base.model_copy(update={"mix": [{"prompt": "a cat"}]}))

    assert mixed.info["mode"] == "mix"
    assert recorder.calls[-1] == (3, 3)
    assert len({pixels(r.images[0]) for r in (mixed, heavier, with_prompt)}) == 3


@pytest.mark.parametrize("builder", ["sdxl", "sd3", "flux", "kandinsky3"])
async def test_mix_is_unsupported_elsewhere(backend: DiffusersBackend, builder: str) -> None:
    with pytest.raises(Unsupported, match="cannot do mix"):
        backend.check(request(model=model(builder), mix=[{"prompt": "a cat"}]))


@pytest.mark.parametrize(
    ("builder", "latent"), [("sdxl", (8, 8)), ("sd3", (8, 8)), ("flux", (8, 8))]
)
async def test_previews_unpack_each_latent_layout(
    backend: DiffusersBackend, builder: str, latent: tuple[int, int]
) -> None:
    recorder = Recorder()
    await run(backend, request(model=model(builder), preview_every=1, steps=2), recorder)

    assert recorder.previews == [(1, latent), (2, latent)]


@pytest.mark.parametrize("builder", ["sdxl", "sd3", "flux"])
async def test_latent_upscale(backend: DiffusersBackend, builder: str) -> None:
    req = request(model=model(builder), upscale={"factor": 2, "strength": 0.5}, steps=2)
    result = await run(backend, req)

    assert result.images[0].size == (128, 128)


@pytest.mark.parametrize(
    ("builder", "scheduler", "class_name"),
    [
        ("sd3", "Euler", "FlowMatchEulerDiscreteScheduler"),
        ("sd3", "Heun", "FlowMatchHeunDiscreteScheduler"),
        ("flux", "Euler Karras", "FlowMatchEulerDiscreteScheduler"),
        ("flux", "LCM", "FlowMatchLCMScheduler"),
        ("sdxl", "DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler"),
        ("sdxl", "DPM++ 2M AYS", "DPMSolverMultistepScheduler"),
        ("sdxl", "Euler a Trailing", "EulerAncestralDiscreteScheduler"),
        ("kandinsky22", "DDPM", "DDPMScheduler"),
        ("kandinsky3", "DPM++ 2M", "DPMSolverMultistepScheduler"),
    ],
)
async def test_schedulers_per_family(
    backend: DiffusersBackend, builder: str, scheduler: str, class_name: str
) -> None:
    result = await run(backend, request(model=model(builder), scheduler=scheduler, steps=2))

    assert result.info["scheduler"] == class_name


async def test_scheduler_refusals_name_what_fits(backend: DiffusersBackend) -> None:
    with pytest.raises(Unsupported, match="valid schedulers for flow-matching models"):
        backend.check(request(model=model("flux"), scheduler="DPM++ 2M Karras"))
    with pytest.raises(Unsupported, match="drives only DDIMScheduler"):
        backend.check(request(model=model("kandinsky22"), scheduler="Euler a"))
    with pytest.raises(Unsupported, match="drives only DDIMScheduler"):
        backend.check(request(model=model("kandinsky3"), scheduler="UniPC"))


@pytest.mark.parametrize("builder", ["sdxl", "sd3"])
async def test_clip_skip(backend: DiffusersBackend, builder: str) -> None:
    plain = await run(backend, request(model=model(builder), seed=8))
    skipped = await run(backend, request(model=model(builder), seed=8, clip_skip=2))

    assert pixels(plain.images[0]) != pixels(skipped.images[0])


async def test_family_limits_are_4xx(backend: DiffusersBackend) -> None:
    with pytest.raises(Unsupported, match="has no CLIP layers to skip"):
        backend.check(request(model=model("flux"), clip_skip=2))
    with pytest.raises(Unsupported, match="does not take a negative prompt"):
        backend.check(request(model=model("flux"), negative_prompt="blur"))
    with pytest.raises(InvalidRequest, match="multiples of 16"):
        backend.check(request(model=model("flux"), width=72))
    with pytest.raises(InvalidRequest, match="multiples of 64"):
        backend.check(request(model=model("kandinsky3"), width=96))
    with pytest.raises(Unsupported, match="takes no ControlNet"):
        backend.check(
            request(model=model("kandinsky22"), controlnet={"name": "xl-canny", "image": png(8, 8)})
        )


@pytest.mark.parametrize("builder", ["sdxl", "sd3", "flux"])
async def test_lora_changes_then_restores(backend: DiffusersBackend, builder: str) -> None:
    req = request(model=model(builder), seed=6, steps=2)
    plain = await run(backend, req)
    styled = await run(backend, req.model_copy(update={"loras": [{"name": f"{builder}-style"}]}))
    after = await run(backend, req)

    assert pixels(styled.images[0]) != pixels(plain.images[0])
    assert pixels(after.images[0]) == pixels(plain.images[0])


async def test_sdxl_controlnet(backend: DiffusersBackend) -> None:
    req = request(model=model("sdxl"), seed=2, steps=2)
    plain = await run(backend, req)
    controlled = await run(
        backend, req.model_copy(update={"controlnet": {"name": "xl-canny", "image": png(64, 64)}})
    )

    assert pixels(controlled.images[0]) != pixels(plain.images[0])


def test_capabilities_per_model(backend: DiffusersBackend) -> None:
    from easel.backends import Capability

    flux = backend.capabilities_of(model("flux"))
    kandinsky = backend.capabilities_of(model("kandinsky3"))

    assert Capability.negative_prompt not in flux
    assert {Capability.inpaint, Capability.lora, Capability.controlnet} <= flux
    assert {Capability.txt2img, Capability.img2img, Capability.negative_prompt} <= kandinsky
    assert not {Capability.inpaint, Capability.lora, Capability.upscale} & kandinsky


async def test_a_kandinsky_payload_runs_on_a_kandinsky_model(
    backend: DiffusersBackend, tiny_model_dir: Path
) -> None:
    from easel.jobs import GenerationRequest
    from easel.payloads import Executor

    assert Executor.kandinsky in backend.executors  # Kandinsky pipelines are here
    payload = {"prompt": "a cat", "steps": 2, "w": 64, "h": 64, "seed": 3}
    sent = GenerationRequest.model_validate({"executor": "kandinsky", "payload": payload})
    result = await run(backend, sent)  # no model named: a Kandinsky one, not the first model
    assert result.model in {model("kandinsky22"), model("kandinsky3")}
    with pytest.raises(Unsupported, match="runs on a Kandinsky model"):
        backend.check(sent.model_copy(update={"model": model("sdxl")}))
    plain = diffusers_backend(str(tiny_model_dir), hf_cache=False, device="cpu")
    assert Executor.kandinsky not in plain.executors  # an SD model only
    with pytest.raises(Unsupported, match="cannot run kandinsky payloads"):
        plain.check(sent)


async def test_a_model_loads_ahead_of_its_jobs(backend: DiffusersBackend) -> None:
    """Model pressure: the fleet asks an idle backend to load a model before its jobs."""
    assert backend.preloads
    backend.cache.clear()  # whatever earlier tests left loaded
    assert not {m.name: m.loaded for m in backend.models()}[model("sd3")]
    await backend.load(model("sd3"))
    assert {m.name: m.loaded for m in backend.models()}[model("sd3")]
