"""The mock backend serving real pictures from a folder, chosen by seed."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from easel.backends import registry
from easel.errors import InvalidRequest
from easel.jobs import GenerationRequest, JobState
from tests.engines import progress_of, run_job, runtime_with

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def pictures(folder: Path) -> Path:
    folder.mkdir()
    for index, color in enumerate(COLORS):
        Image.new("RGB", (100, 80), color).save(folder / f"{index}.png")
    (folder / "notes.txt").write_text("not a picture")
    return folder


async def test_the_seed_picks_the_picture_fitted_to_the_size(tmp_path: Path) -> None:
    mock = registry.create("mock", folder=pictures(tmp_path / "pics"), preview_every=2)
    async with runtime_with(tmp_path, mock) as runtime:
        request = GenerationRequest(prompt="x", width=64, height=64, steps=4, seed=4, batch_size=2)
        job, events = await run_job(runtime, request)
        assert job.state is JobState.succeeded
        paths = [runtime.storage.path(ref) for ref in job.images]
    got = []
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (64, 64)
            got.append(image.convert("RGB").getpixel((32, 32)))
    assert got == [COLORS[4 % 3], COLORS[5 % 3]]
    assert [e.step for e in progress_of(events) if e.preview] == [2]


def test_a_folder_without_pictures_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest, match="holds no PNG"):
        registry.create("mock", folder=tmp_path / "empty")
