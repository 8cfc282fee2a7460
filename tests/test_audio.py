"""Audio jobs in the one vocabulary: validation, limits, cost, files and their tags, the
audio route, and audio beside images in one queue (mock backends: no model needed)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from pydantic import ValidationError

from easel.audio import AudioClip, conform
from easel.backends.base import GenerationResult
from easel.backends.mock import MockAudioBackend, MockBackend
from easel.config import Limits, Settings
from easel.errors import BackendUnavailable, InvalidRequest, Unsupported
from easel.jobs import (
    AudioFormat,
    EventType,
    GenerationRequest,
    Job,
    JobKind,
    JobState,
)
from easel.queue.admission import admit
from easel.queue.run_times import RunTimes
from easel.results.audio import encode_audio, read_tags
from easel.results.files import LocalStorage
from easel.runtime.facade import Runtime
from tests.servers import run_job, serve


def audio(**fields: object) -> GenerationRequest:
    return GenerationRequest.model_validate({"kind": "txt2audio", "prompt": "rain", **fields})


# -- the vocabulary ----------------------------------------------------------------------


def test_fields_must_fit_the_kind() -> None:
    refusals = [
        ({"prompt": "a cat", "duration_seconds": 3}, "are for audio"),
        ({"prompt": "a cat", "audio_format": "flac"}, "are for audio"),
        ({"prompt": "a cat", "speed": 2}, "txt2speech only"),
        ({"kind": "txt2speech", "text": "hi", "negative_prompt": "x"}, "cannot be used"),
        ({"kind": "txt2audio", "prompt": "rain", "voice": "x"}, "txt2speech only"),
        ({"kind": "txt2audio", "prompt": "rain", "init_image": "AAAA"}, "cannot be used"),
        ({"kind": "txt2audio", "prompt": "rain", "channels": 3}, "less than or equal to 2"),
        (
            {"kind": "txt2audio", "prompt": "r", "audio_format": "opus", "sample_rate": 44100},
            "opus",
        ),
    ]
    for body, expected in refusals:
        with pytest.raises(ValidationError, match=expected):
            GenerationRequest.model_validate(body)
    speech = GenerationRequest.model_validate({"kind": "txt2speech", "text": "Hello."})
    assert speech.prompt == "Hello." and speech.kind is JobKind.txt2speech


def test_cost_is_per_second_of_audio() -> None:
    assert audio(duration_seconds=20, steps=10).cost == pytest.approx(
        2 * audio(duration_seconds=10, steps=10).cost
    )
    assert audio(steps=10).audio_seconds == 10  # the default clip length
    words = "one two three four five six"
    slow = GenerationRequest(kind=JobKind.txt2speech, prompt=words, speed=0.5)
    fast = GenerationRequest(kind=JobKind.txt2speech, prompt=words, speed=2.0)
    assert slow.cost == pytest.approx(4 * fast.cost)


def test_eta_of_audio_comes_from_seconds_of_audio_measured() -> None:
    times = RunTimes()
    times.observe("sound", audio(duration_seconds=5, steps=10), 2.0)
    # twice the audio, same steps: twice the time, from the one per-unit figure
    assert times.estimate("sound", audio(duration_seconds=10, steps=10)) == pytest.approx(4.0)


def test_limits_refuse_before_any_work() -> None:
    backends = {"mock": MockBackend(), "mock-audio": MockAudioBackend()}
    limits = Limits(max_audio_seconds=30, max_speech_characters=20)
    with pytest.raises(InvalidRequest, match="at most 30 seconds"):
        admit(audio(duration_seconds=31), backends, "mock", limits)
    with pytest.raises(InvalidRequest, match="at most 20 per request"):
        long = GenerationRequest(kind=JobKind.txt2speech, prompt="x" * 21)
        admit(long, backends, "mock", limits)
    request, backend = admit(audio(duration_seconds=30), backends, "mock", limits)
    assert backend.name == "mock-audio" and request.seed is not None
    with pytest.raises(Unsupported, match="cannot do txt2audio"):
        admit(audio(), {"mock": MockBackend()}, "mock", limits)


# -- files -------------------------------------------------------------------------------


def test_conform_resamples_remixes_and_fits_the_length() -> None:
    t = np.arange(16_000) / 16_000
    clip = AudioClip.of(np.sin(2 * np.pi * 440 * t), 16_000)
    out = conform(clip, sample_rate=44_100, channels=2, seconds=1.5)
    assert (out.sample_rate, out.channels, out.frames) == (44_100, 2, 66_150)
    # the tone survives resampling: its peak frequency is still 440 Hz
    spectrum = np.abs(np.fft.rfft(out.samples[:44_100, 0]))
    assert abs(int(spectrum.argmax()) - 440) <= 1
    assert not out.samples[44_100 + 10 :].any()  # padded with silence
    assert conform(out, channels=1).channels == 1


@pytest.mark.parametrize("audio_format", list(AudioFormat))
def test_every_format_carries_the_request_in_its_tags(audio_format: AudioFormat) -> None:
    rate = 48_000 if audio_format is AudioFormat.opus else 22_050
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, (rate, 2)).astype(np.float32)
    request = audio(seed=5, duration_seconds=1, audio_format=audio_format)
    metadata = {"request": request.model_dump(mode="json"), "model": "m"}
    data = encode_audio(AudioClip(samples, rate), audio_format, metadata)
    tags = read_tags(data)
    assert tags["title"] == "rain" and tags["artist"] == "m"
    assert GenerationRequest.model_validate(json.loads(tags["comment"])) == request
    with soundfile.SoundFile(io.BytesIO(data)) as sound:
        assert (sound.samplerate, sound.channels) == (rate, 2)


def test_storage_writes_clips_with_sidecars(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    request = audio(seed=9, batch_size=2, audio_format="opus")  # a 44.1 kHz model
    job = Job(request=request, backend="mock-audio")
    clips = [AudioClip(np.zeros((44_100, 1), np.float32), 44_100)] * 2
    refs = storage.save_audio(job, GenerationResult([], request.seeds, "m", audio=clips))
    assert [r.seed for r in refs] == [9, 10]
    assert refs[0].sample_rate == 48_000  # opus holds 48 kHz, not 44.1
    assert refs[0].media_type == "audio/ogg; codecs=opus" and refs[0].path.endswith(".opus")
    sidecar = json.loads(storage.path(refs[1]).with_suffix(".json").read_text())
    assert sidecar["request"]["seed"] == 10 and sidecar["request"]["batch_size"] == 1
    assert sidecar["sample_rate"] == 48_000 and sidecar["duration_seconds"] == 1.0


# -- through the queue and the API -------------------------------------------------------


def _mixed(tmp_path: Path, step_delay: float = 0.0) -> Runtime:
    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0.0)
    backends = {"mock": MockBackend(), "mock-audio": MockAudioBackend(step_delay=step_delay)}
    return Runtime(settings, backends=backends)


def test_audio_route_serves_the_file_with_its_media_type(tmp_path: Path) -> None:
    from easel.api import create_app

    with serve(create_app(runtime=_mixed(tmp_path))) as url, httpx.Client(base_url=url) as http:
        body = {"kind": "txt2audio", "prompt": "rain", "duration_seconds": 1.5, "steps": 2}
        body |= {"sample_rate": 32_000, "channels": 2, "audio_format": "flac", "seed": 3}
        job = run_job(url, body)
        job_id = job["id"]
        (ref,) = job["audio"]
        assert (ref["sample_rate"], ref["channels"], ref["duration_seconds"]) == (32_000, 2, 1.5)
        response = http.get(ref["url"])
        assert response.headers["content-type"] == "audio/flac"
        samples, rate = soundfile.read(io.BytesIO(response.content))
        assert samples.shape == (48_000, 2) and rate == 32_000
        missing = http.get(f"/v1/jobs/{job_id}/audio/1")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "audio_not_found"
        refused = http.post("/v1/jobs", json={**body, "duration_seconds": 61})
        assert refused.status_code == 422 and "at most 60 seconds" in refused.text


async def test_audio_and_image_jobs_share_one_fair_queue(tmp_path: Path) -> None:
    """Two users, mixed kinds: each job goes to the backend that can run it, and the
    users' jobs alternate in the one queue whatever their kinds."""
    runtime = _mixed(tmp_path)
    await runtime.start(workers=False)
    try:
        kinds: list[tuple[str, dict[str, object]]] = [
            ("ann", {"kind": "txt2audio", "prompt": "waves", "duration_seconds": 1, "steps": 2}),
            ("ann", {"prompt": "a cat", "width": 64, "height": 64, "steps": 2}),
            ("ann", {"kind": "txt2speech", "text": "hello there"}),
            ("bob", {"prompt": "a dog", "width": 64, "height": 64, "steps": 2}),
            ("bob", {"kind": "txt2audio", "prompt": "wind", "duration_seconds": 1, "steps": 2}),
        ]
        views = [
            await runtime.submit(GenerationRequest.model_validate({**body, "user_id": user}))
            for user, body in kinds
        ]
        assert [v.backend for v in views] == [
            "mock-audio",
            "mock",
            "mock-audio",
            "mock",
            "mock-audio",
        ]
        runtime.start_workers()
        jobs = [await runtime.wait(v.id, 20) for v in views]
        assert all(job.state is JobState.succeeded for job in jobs)
        assert [bool(job.audio) for job in jobs] == [True, False, True, False, True]
        assert [bool(job.images) for job in jobs] == [False, True, False, True, False]
        # each backend's worker takes its own jobs, in fair order between the two users
        audio_users = [j.user_id for j in sorted(jobs, key=lambda j: j.started_at or 0)
                       if j.backend == "mock-audio"]  # fmt: skip
        # bob's first job was a small image: his audio goes before ann's second clip
        assert audio_users == ["ann", "bob", "ann"]
    finally:
        await runtime.stop()


async def test_audio_progress_and_cancel(tmp_path: Path) -> None:
    runtime = _mixed(tmp_path, step_delay=0.02)
    async with runtime:
        request = audio(duration_seconds=1, steps=150, user_id="ann")
        async with runtime.bus.subscribe(user_id="ann") as events:
            view = await runtime.submit(request)
            async with asyncio.timeout(20):
                async for event in events:
                    if event.type is EventType.progress and event.step == 3:
                        assert event.total == 150
                        await runtime.cancel(view.id)
                    if event.type is EventType.cancelled:
                        break
        job = await runtime.wait(view.id, 20)
        assert job.state is JobState.cancelled and job.audio == []


# -- clients -----------------------------------------------------------------------------


@pytest.fixture
def mixed_server(tmp_path: Path) -> Iterator[str]:
    from easel.api import create_app

    with serve(create_app(runtime=_mixed(tmp_path))) as url:
        yield url


async def test_async_client_generates_audio_and_speech(mixed_server: str, tmp_path: Path) -> None:
    from easel.client import AsyncClient

    steps: list[int] = []
    async with AsyncClient(mixed_server, user_id="ann") as client:
        client.on("progress", lambda event: steps.append(event.step))
        job = await client.generate_audio(
            "rain on a tin roof", duration_seconds=2, steps=3, channels=2, seed=4, timeout=30
        )
        assert job.state is JobState.succeeded and job.request.kind is JobKind.txt2audio
        assert steps == [1, 2, 3]
        (path,) = await client.save_audio(job, tmp_path / "out")
        samples, rate = soundfile.read(path)
        assert samples.shape == (32_000, 2) and rate == 16_000
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert GenerationRequest.model_validate(sidecar["request"]).seed == 4
        speech = await client.generate_speech("Hi there.", voice="high", audio_format="ogg")
        assert speech.request.voice == "high" and speech.audio[0].media_type == "audio/ogg"
        assert (await client.audio(speech))[:4] == b"OggS"


def test_sync_client_and_cli_make_audio(mixed_server: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from easel.cli import app
    from easel.client import Client

    with Client(mixed_server) as client:
        job = client.generate_audio("wind", duration_seconds=1, steps=2, audio_format="flac")
        assert client.audio(job)[:4] == b"fLaC"
    result = CliRunner().invoke(
        app,
        ["generate", "Say hello.", "--speech", "--voice", "plain", "--server", mixed_server,
         "--output-dir", str(tmp_path), "--audio-format", "mp3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (clip,) = tmp_path.glob("*.mp3")
    assert json.loads(clip.with_suffix(".json").read_text())["request"]["kind"] == "txt2speech"
    refused = CliRunner().invoke(
        app, ["generate", "x", "--audio", "--speech", "--server", mixed_server]
    )
    assert refused.exit_code == 2 and "not both" in refused.output


def test_tangoflux_is_declared_unavailable_with_its_reason(tmp_path: Path) -> None:
    """Here the tangoflux package is not installed: the backend says so, lists no model,
    and its jobs are refused at admission; another sound backend still takes them."""
    from easel.backends.audio.tangoflux import TangoFluxBackend

    tango = TangoFluxBackend()
    assert tango.reason is not None and "pip install tangoflux" in tango.reason
    assert tango.models() == []
    backends = {"tangoflux": tango, "mock-audio": MockAudioBackend()}
    limits = Limits()
    with pytest.raises(BackendUnavailable, match=r"tangoflux.*unavailable.*not installed"):
        admit(audio(backend="tangoflux"), backends, "tangoflux", limits)
    _, backend = admit(audio(), backends, "tangoflux", limits)
    assert backend.name == "mock-audio"
    from easel.api import create_app

    settings = Settings(data_dir=tmp_path / "data")
    with serve(create_app(runtime=Runtime(settings, backends=backends))) as url:
        refused = httpx.post(f"{url}/v1/jobs", json={"kind": "txt2audio", "prompt": "rain",
                                                      "backend": "tangoflux"})  # fmt: skip
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "backend_unavailable"


def test_the_cost_book_prices_audio_by_its_length() -> None:
    """Measured clips of 1, 2 and 3 seconds price an unseen 6 s clip at about 6 s; two
    lengths of the same steps are two shapes, never one price."""
    from easel.queue.estimates import CostBook, Shape

    book = CostBook()
    for seconds in (1, 2, 3):
        book.observe(Shape.of("sound", audio(duration_seconds=seconds, steps=10)), seconds * 1.0)
    one = book.price(Shape.of("sound", audio(duration_seconds=1, steps=10)))
    six = book.price(Shape.of("sound", audio(duration_seconds=6, steps=10)))
    assert one is not None and one.mid == pytest.approx(1.0)
    assert six is not None and six.mid == pytest.approx(6.0, rel=0.05)


async def test_queued_audio_jobs_get_etas(tmp_path: Path) -> None:
    runtime = _mixed(tmp_path, step_delay=0.005)
    async with runtime:
        for seconds in (0.5, 1.0, 1.5):  # three lengths measured: unseen ones are priced
            job = await runtime.submit(audio(duration_seconds=seconds, steps=4, user_id="ann"))
            assert (await runtime.wait(job.id, 20)).state is JobState.succeeded
        blocker = await runtime.submit(audio(duration_seconds=1, steps=150, user_id="cat"))
        short = await runtime.submit(audio(duration_seconds=2, steps=4, user_id="ann"))
        long = await runtime.submit(audio(duration_seconds=4, steps=4, user_id="bob"))
        for view in (short, long):
            assert view.position is not None and view.eta_seconds is not None
            assert view.average_seconds is not None and view.average_seconds > 0
        await runtime.cancel(blocker.id)


async def test_audio_through_redis_between_two_processes_parts(
    tmp_path: Path, redis_url: str
) -> None:
    """An API runtime (no workers) and a worker runtime sharing one Redis and one output
    dir: the clip's ref travels through the Redis store and bus like an image's."""
    prefix, out = f"audio:{tmp_path.name}:", tmp_path / "out"

    def settings(name: str, concurrency: int) -> Settings:
        return Settings(
            data_dir=tmp_path / name, concurrency=concurrency, redis_url=redis_url,
            redis_prefix=prefix, output_dir=out,
        )  # fmt: skip

    api = Runtime(settings("api", 0), backends={"mock-audio": MockAudioBackend()})
    worker = Runtime(settings("worker", 1), backends={"mock-audio": MockAudioBackend()})
    async with api, worker:
        view = await api.submit(audio(duration_seconds=1, steps=2, audio_format="flac"))
        job = await api.wait(view.id, 30)
        assert job.state is JobState.succeeded and job.audio[0].media_type == "audio/flac"
        path, ref = await api.audio_path(job.id, 0)
        samples, rate = soundfile.read(path)
        assert rate == ref.sample_rate and len(samples) == rate
