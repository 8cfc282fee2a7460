"""Audio and image jobs share one queue: a fleet file with an image backend, a sound backend
and a real speech backend; two users' mixed jobs go each to a backend that can run it, in
fair order."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import soundfile

from easel.backends import registry
from easel.errors import Unsupported
from easel.fleet import load_settings
from easel.jobs import GenerationRequest, JobState
from easel.runtime.facade import Runtime

pytest.importorskip("hibari", reason="the speech extra: pip install 'easel[speech]'")

FLEET = """
data_dir = "{data}"

[[backends]]
name = "images"
kind = "mock"

[[backends]]
name = "sound"
kind = "mock-audio"
capabilities = ["txt2audio", "negative_prompt", "seed"]

[[backends]]
name = "voice"
kind = "hibari"
"""


async def test_a_fleet_serves_mixed_jobs_of_two_users(tmp_path: Path) -> None:
    config = tmp_path / "easel.toml"
    config.write_text(FLEET.format(data=tmp_path / "data"))
    settings = load_settings(config, kinds=registry.available())
    runtime = Runtime(settings)  # the fleet, built by the runtime from the file
    await runtime.start(workers=False)  # everything queued first: the order is the policy's
    try:
        jobs: list[tuple[str, dict[str, Any]]] = [
            ("ann", {"prompt": "a cat", "width": 64, "height": 64, "steps": 2}),
            ("ann", {"prompt": "a dog", "width": 64, "height": 64, "steps": 2}),
            ("ann", {"kind": "txt2audio", "prompt": "rain", "duration_seconds": 1, "steps": 2}),
            ("ann", {"kind": "txt2audio", "prompt": "wind", "duration_seconds": 1, "steps": 2}),
            ("ann", {"kind": "txt2speech", "text": "Hello from Ann."}),
            ("bob", {"kind": "txt2audio", "prompt": "surf", "duration_seconds": 1, "steps": 2}),
            ("bob", {"kind": "txt2audio", "prompt": "fire", "duration_seconds": 1, "steps": 2}),
            ("bob", {"kind": "txt2speech", "text": "Hello from Bob.", "audio_format": "flac"}),
            ("bob", {"prompt": "a fox", "width": 64, "height": 64, "steps": 2}),
        ]
        ids = []
        for user, body in jobs:
            request = GenerationRequest.model_validate({**body, "user_id": user})
            ids.append((await runtime.submit(request)).id)
        assert (await runtime.get(ids[3])).position is not None
        runtime.start_workers()
        done = [await runtime.wait(job_id, 60) for job_id in ids]
        assert all(job.state is JobState.succeeded for job in done), [job.error for job in done]
        # routing by capability: each kind to the backend that can run it
        expected = ["images", "images", "sound", "sound", "voice",
                    "sound", "sound", "voice", "images"]  # fmt: skip
        assert [job.backend for job in done] == expected
        assert [bool(job.audio) for job in done] == [b != "images" for b in expected]
        path, ref = await runtime.audio_path(done[7].id, 0)
        samples, rate = soundfile.read(path)
        assert ref.media_type == "audio/flac" and rate == 24_000
        assert 0.5 < len(samples) / rate < 4
        # a job no backend of the fleet can run is refused before it is queued
        with pytest.raises(Unsupported, match="voices are"):
            await runtime.submit(
                GenerationRequest.model_validate({"kind": "txt2speech", "text": "hi", "voice": "x"})
            )
        # fair share on the sound backend: the two users alternate (Ann's images went first)
        sound = sorted((job for job in done if job.backend == "sound"),
                       key=lambda job: job.started_at or 0)  # fmt: skip
        assert [job.user_id for job in sound] == ["bob", "ann", "bob", "ann"]
    finally:
        await asyncio.shield(runtime.stop())
