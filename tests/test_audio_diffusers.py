"""Text to sound on a real diffusers pipeline: a tiny, randomly initialised Stable Audio Open
built offline (as diffusers' own tests build theirs), saved as a folder and loaded through the
same code as the real model; beside an image backend in one queue."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from easel.backends.mock import MockBackend
from easel.config import Settings
from easel.errors import ModelNotFound, Unsupported
from easel.jobs import EventType, GenerationRequest, JobState
from easel.runtime.facade import Runtime

pytest.importorskip("diffusers")


@pytest.fixture(scope="session")
def tiny_audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from easel.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-stable-audio",
                              family="stable-audio")  # fmt: skip


@pytest.fixture(scope="module")
def audio_backend(tiny_audio_dir: Path) -> object:
    """One loaded pipeline for the module's runtimes (loading is the slow part)."""
    from easel.backends.audio.sound import DiffusersAudioBackend

    return DiffusersAudioBackend(model=str(tiny_audio_dir), device="cpu")


@pytest.fixture
async def runtime(tmp_path: Path, audio_backend: object) -> AsyncIterator[Runtime]:
    from easel.backends.audio.sound import DiffusersAudioBackend

    assert isinstance(audio_backend, DiffusersAudioBackend)
    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0.0)
    backends = {"mock": MockBackend(), "diffusers-audio": audio_backend}
    async with Runtime(settings, backends=backends) as runtime:
        yield runtime


def sound(**fields: object) -> GenerationRequest:
    body = {"kind": "txt2audio", "prompt": "a hammer on wood", "steps": 3, "seed": 5, **fields}
    return GenerationRequest.model_validate(body)


async def run(runtime: Runtime, request: GenerationRequest) -> tuple[object, np.ndarray, int]:
    view = await runtime.submit(request)
    job = await runtime.wait(view.id, 60)
    assert job.state is JobState.succeeded, job.error
    path, _ = await runtime.audio_path(job.id, 0)
    samples, rate = soundfile.read(path, always_2d=True)
    return job, samples, rate


async def test_a_clip_has_the_duration_rate_and_channels_asked(runtime: Runtime) -> None:
    job, samples, rate = await run(runtime, sound(duration_seconds=1.5))
    assert job.backend == "diffusers-audio"  # type: ignore[attr-defined]
    assert rate == 8000 and samples.shape == (12_000, 2)  # the model's own: 8 kHz stereo
    _, samples, rate = await run(
        runtime, sound(duration_seconds=1.25, sample_rate=16_000, channels=1, audio_format="flac")
    )
    assert rate == 16_000 and samples.shape == (20_000, 1)
    assert np.abs(samples).max() > 0


async def test_progress_steps_then_same_seed_same_samples(runtime: Runtime) -> None:
    request = sound(duration_seconds=1, steps=4, user_id="ann")
    async with runtime.bus.subscribe(user_id="ann") as events:
        view = await runtime.submit(request)
        steps = []
        async with asyncio.timeout(60):
            async for event in events:
                if event.type is EventType.progress:
                    steps.append((event.step, event.total))
                if event.type is EventType.succeeded:
                    break
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    first, _ = await runtime.audio_path(view.id, 0)
    _, again, _ = await run(runtime, request)
    _, other, _ = await run(runtime, sound(duration_seconds=1, steps=4, seed=6))
    original, _ = soundfile.read(first, always_2d=True)
    assert np.array_equal(original, again)
    assert not np.array_equal(original, other)


async def test_the_file_alone_reproduces_the_clip(runtime: Runtime) -> None:
    _, samples, _ = await run(
        runtime, sound(duration_seconds=0.75, negative_prompt="muffled", cfg_scale=4.5, seed=99)
    )
    jobs = await runtime.list_jobs(limit=1)
    path, ref = await runtime.audio_path(jobs[0].id, 0)
    with soundfile.SoundFile(path) as tagged:
        request = GenerationRequest.model_validate(json.loads(tagged.comment))
        assert tagged.title == "a hammer on wood"
    assert (request.negative_prompt, request.cfg_scale, request.seed) == ("muffled", 4.5, 99)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["model"] == "tiny-stable-audio" and sidecar["sample_rate"] == ref.sample_rate
    _, again, _ = await run(runtime, request)
    assert np.array_equal(samples, again)


async def test_cancel_stops_the_pipeline(runtime: Runtime) -> None:
    request = sound(duration_seconds=1, steps=150, user_id="bob")
    async with runtime.bus.subscribe(user_id="bob") as events:
        view = await runtime.submit(request)
        async with asyncio.timeout(60):
            async for event in events:
                if event.type is EventType.progress and event.step == 2:
                    await runtime.cancel(view.id)
                if event.type is EventType.cancelled:
                    break
    job = await runtime.wait(view.id, 60)
    assert job.state is JobState.cancelled and job.audio == []
    # the backend is free again at once: the next job runs to the end
    await run(runtime, sound(duration_seconds=0.5))


async def test_refused_at_admission(runtime: Runtime) -> None:
    with pytest.raises(Unsupported, match=r"at most 2\.048 seconds"):
        await runtime.submit(sound(duration_seconds=3))
    with pytest.raises(ModelNotFound, match=r"served models are: .*tiny-stable-audio"):
        await runtime.submit(sound(model="stable-audio-open-1.0"))
    with pytest.raises(Unsupported, match="cannot do scheduler"):
        await runtime.submit(sound(scheduler="euler"))


def test_a_folder_that_is_not_sound_is_refused(tmp_path: Path) -> None:
    from easel.backends.audio.sound import DiffusersAudioBackend

    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(Unsupported, match="not an audio pipeline"):
        DiffusersAudioBackend(model=str(folder))
    with pytest.raises(ModelNotFound, match="never downloads"):
        DiffusersAudioBackend(model="stabilityai/stable-audio-open-1.0")


def test_the_audio_route_plays_it(tmp_path: Path, audio_backend: object) -> None:
    import httpx

    from easel.api import create_app
    from tests.servers import run_job, serve

    settings = Settings(data_dir=tmp_path / "data")
    runtime = Runtime(settings, backends={"diffusers-audio": audio_backend})  # type: ignore[dict-item]
    with serve(create_app(runtime=runtime)) as url:
        job = run_job(url, {"kind": "txt2audio", "prompt": "wind", "duration_seconds": 0.5,
                            "steps": 2, "audio_format": "ogg"})  # fmt: skip
        response = httpx.get(url + job["audio"][0]["url"])
    assert response.headers["content-type"] == "audio/ogg"
    with soundfile.SoundFile(io.BytesIO(response.content)) as clip:
        assert (clip.format, clip.subtype, clip.channels) == ("OGG", "VORBIS", 2)


async def test_clap_scores_each_clip_against_its_prompt(tmp_path: Path) -> None:
    """With ``clap_model`` set (here a tiny random CLAP, built offline) every audio result
    carries a clap_score on its ref and in its sidecar; the same clip scores the same."""
    from easel.backends.mock import MockAudioBackend
    from easel.tiny import make_tiny_clap

    clap = make_tiny_clap(tmp_path / "tiny-clap")
    settings = Settings(data_dir=tmp_path / "data", clap_model=clap)
    async with Runtime(settings, backends={"mock-audio": MockAudioBackend()}) as runtime:
        scores = []
        for _ in range(2):
            job, _, _ = await run(runtime, sound(duration_seconds=1, seed=3))
            (ref,) = job.audio  # type: ignore[attr-defined]
            assert ref.clap_score is not None and -1 <= ref.clap_score <= 1
            path, _ = await runtime.audio_path(job.id, 0)  # type: ignore[attr-defined]
            assert json.loads(path.with_suffix(".json").read_text())["clap_score"] == ref.clap_score
            scores.append(ref.clap_score)
    assert scores[0] == scores[1]


def test_audioldm2_is_refused_where_it_cannot_run(tmp_path: Path) -> None:
    """An AudioLDM 2 folder is recognised from its configs; with transformers 5 (whose
    GPT2Model lost the generation helper the pipeline calls) its jobs are refused at
    admission with the reason, instead of failing after they were accepted."""
    from transformers import GPT2Model

    from easel.backends.audio.sound import DiffusersAudioBackend
    from easel.errors import BackendUnavailable

    folder = tmp_path / "audioldm2-music"
    (folder / "vocoder").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDM2Pipeline"}))
    (folder / "vocoder" / "config.json").write_text(json.dumps({"sampling_rate": 16000}))
    backend = DiffusersAudioBackend(model=str(folder))
    (info,) = backend.models()
    assert (info.family, info.name) == ("audioldm2", "audioldm2-music")
    if hasattr(GPT2Model, "_update_model_kwargs_for_generation"):
        backend.check(sound())  # an older transformers: accepted
    else:
        with pytest.raises(BackendUnavailable, match="transformers 5"):
            backend.check(sound())
