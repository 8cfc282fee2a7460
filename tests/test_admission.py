"""Admission: limits, and routing a job to a backend that can run it."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from easel.backends.base import Capability
from easel.backends.mock import MockBackend
from easel.config import Limits
from easel.errors import InvalidRequest, ModelNotFound, Unsupported
from easel.jobs import GenerationRequest
from easel.queue.admission import admit, choose_backend


class TextOnly(MockBackend):
    """The mock, declaring fewer capabilities: a second engine that cannot do img2img."""

    name = "textonly"
    capabilities = frozenset({Capability.txt2img, Capability.seed})


def init_image() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_job_goes_to_the_first_backend_that_can_run_it() -> None:
    backends = {"textonly": TextOnly(), "mock": MockBackend()}
    plain = GenerationRequest(prompt="x")
    assert choose_backend(plain, backends, default="textonly").name == "textonly"
    edit = GenerationRequest(prompt="x", init_image=init_image())
    assert choose_backend(edit, backends, default="textonly").name == "mock"


def test_a_job_no_backend_can_run_is_unsupported() -> None:
    edit = GenerationRequest(prompt="x", init_image=init_image())
    with pytest.raises(Unsupported, match="img2img"):
        choose_backend(edit, {"textonly": TextOnly()}, default="textonly")
    named = edit.model_copy(update={"backend": "textonly"})
    with pytest.raises(Unsupported):
        choose_backend(named, {"textonly": TextOnly(), "mock": MockBackend()}, "mock")
    scheduled = GenerationRequest(prompt="x", scheduler="Euler a")
    with pytest.raises(Unsupported) as refused:
        choose_backend(scheduled, {"textonly": TextOnly(), "other": TextOnly()}, "textonly")
    assert refused.value.code == "unsupported" and "textonly" in refused.value.message


def test_models_and_backends_are_named_or_refused() -> None:
    backends = {"mock": MockBackend()}
    assert choose_backend(GenerationRequest(prompt="x", model="mock"), backends, "mock")
    with pytest.raises(ModelNotFound):
        choose_backend(GenerationRequest(prompt="x", model="sdxl"), backends, "mock")
    with pytest.raises(InvalidRequest, match="served backends are: mock"):
        choose_backend(GenerationRequest(prompt="x", backend="comfyui"), backends, "mock")


def test_admit_fixes_a_random_seed_and_keeps_a_given_one() -> None:
    backends = {"mock": MockBackend()}
    request, _ = admit(GenerationRequest(prompt="x"), backends, "mock", Limits())
    assert request.seed is not None
    given, _ = admit(GenerationRequest(prompt="x", seed=7), backends, "mock", Limits())
    assert given.seed == 7


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"width": 1024, "height": 1024}, "pixels"),
        ({"steps": 51}, "steps"),
        ({"batch_size": 3}, "batch_size"),
        ({"prompt": "x" * 11}, "prompt"),
        ({"negative_prompt": "x" * 11}, "negative_prompt"),
    ],
)
def test_limits_are_the_servers(fields: dict[str, object], words: str) -> None:
    limits = Limits(max_pixels=512 * 512, max_steps=50, max_batch_size=2, max_prompt_length=10)
    request = GenerationRequest(**{"prompt": "x", **fields})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match=words):
        admit(request, {"mock": MockBackend()}, "mock", limits)
