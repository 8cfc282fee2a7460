"""Single-file checkpoints (the original LDM layout people download) load through the same
backend, with their components' configs taken from a local diffusers folder of the family."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from easel.backends import RunContext
from easel.backends.diffusers.backend import create as diffusers_backend
from easel.backends.diffusers.models import ModelFormat
from easel.errors import ModelNotFound
from tests.test_backend_diffusers import pixels, request, run

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from easel.tiny import save_tiny_single_file

    return save_tiny_single_file(
        tiny_model_dir, tmp_path_factory.mktemp("single") / "dreamy.safetensors"
    )


def models_with(tmp_path: Path, checkpoint: Path, config_folder: Path | None) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    os.symlink(checkpoint, root / "dreamy.safetensors")
    if config_folder is not None:
        os.symlink(config_folder, root / "base-sd")
    return root


async def test_single_file_gives_the_folders_pixels(
    checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    root = models_with(tmp_path, checkpoint, tiny_model_dir)
    backend = diffusers_backend(str(root), hf_cache=False, device="cpu")
    await backend.start()
    entry = backend.registry.get("dreamy")

    from_file = await run(backend, request(model="dreamy", seed=5))
    from_folder = await run(backend, request(model="base-sd", seed=5))

    assert (entry.format, entry.family) == (ModelFormat.single_file, "sd1")
    assert pixels(from_file.images[0]) == pixels(from_folder.images[0])
    assert from_file.model == "dreamy"


async def test_single_file_named_directly_with_its_config_in_name_json(
    checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "ckpt").mkdir()
    path = tmp_path / "ckpt" / "dreamy.safetensors"
    os.symlink(checkpoint, path)
    path.with_suffix(".json").write_text(json.dumps({"config": str(tiny_model_dir)}))
    backend = diffusers_backend(str(path), hf_cache=False, device="cpu")
    await backend.start()

    result = await run(backend, request(seed=5))

    assert result.model == "dreamy"
    assert backend.models()[0].loaded


async def test_single_file_without_a_config_folder_says_what_to_add(
    checkpoint: Path, tmp_path: Path
) -> None:
    root = models_with(tmp_path, checkpoint, None)
    backend = diffusers_backend(str(root), hf_cache=False, device="cpu")

    with pytest.raises(ModelNotFound, match="needs the configs of a diffusers folder"):
        await backend.generate(request(model="dreamy"), RunContext())
