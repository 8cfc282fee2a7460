"""Audio results as files: WAV by default, FLAC, Ogg Vorbis, Ogg Opus or MP3 on request.

Like an image, every clip carries its parameters twice: in a JSON sidecar, and in the
file's own tags (a WAV ``LIST``/``INFO`` chunk, Vorbis comments in FLAC and Ogg, ID3 in
MP3, all written by libsndfile through ``soundfile``): ``title`` is the prompt and
``comment`` the request as JSON, so a file reproduces alone. Everything here blocks.
"""

from __future__ import annotations

import io
import json
from typing import Any

import soundfile

from easel.audio import AudioClip, conform
from easel.backends.base import GenerationResult
from easel.constants import VERSION
from easel.jobs import OPUS_SAMPLE_RATES, AudioFormat, Job

_CONTAINERS: dict[AudioFormat, tuple[str, str, str]] = {
    AudioFormat.wav: ("WAV", "PCM_16", ".wav"),
    AudioFormat.flac: ("FLAC", "PCM_16", ".flac"),
    AudioFormat.ogg: ("OGG", "VORBIS", ".ogg"),
    AudioFormat.opus: ("OGG", "OPUS", ".opus"),
    AudioFormat.mp3: ("MP3", "MPEG_LAYER_III", ".mp3"),
}
MP3_SAMPLE_RATES = frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000})


def suffix(audio_format: AudioFormat) -> str:
    return _CONTAINERS[audio_format][2]


def writable(clip: AudioClip, audio_format: AudioFormat) -> AudioClip:
    """The clip at a rate the container can hold (Opus and MP3 know only some rates)."""
    if audio_format is AudioFormat.opus and clip.sample_rate not in OPUS_SAMPLE_RATES:
        return conform(clip, sample_rate=48_000)
    if audio_format is AudioFormat.mp3 and clip.sample_rate not in MP3_SAMPLE_RATES:
        return conform(clip, sample_rate=44_100)
    return clip


def encode_audio(clip: AudioClip, audio_format: AudioFormat, metadata: dict[str, Any]) -> bytes:
    """The clip in ``audio_format``, tagged with the prompt and the request as JSON."""
    container, subtype, _ = _CONTAINERS[audio_format]
    buffer = io.BytesIO()
    with soundfile.SoundFile(
        buffer,
        "w",
        samplerate=clip.sample_rate,
        channels=clip.channels,
        format=container,
        subtype=subtype,
    ) as sound:
        sound.title = metadata["request"]["prompt"][:1000]
        sound.comment = json.dumps(metadata["request"], sort_keys=True)
        sound.software = f"easel {VERSION}"
        if metadata.get("model"):
            sound.artist = str(metadata["model"])
        sound.write(clip.samples)
    return buffer.getvalue()


def read_tags(data: bytes) -> dict[str, str]:
    """The tags of an encoded clip (title, comment, software, artist)."""
    with soundfile.SoundFile(io.BytesIO(data)) as sound:
        return {
            key: value
            for key in ("title", "comment", "software", "artist")
            if (value := getattr(sound, key))
        }


def audio_sidecar(
    job: Job, result: GenerationResult, index: int, seed: int, clip: AudioClip
) -> dict[str, Any]:
    """What reproduces clip ``index`` alone: the request with its own seed and batch 1."""
    request = job.request.model_copy(update={"seed": seed, "batch_size": 1})
    return {
        "job_id": job.id,
        "index": index,
        "seed": seed,
        "backend": job.backend,
        "model": result.model,
        "created_at": job.created_at,
        "sample_rate": clip.sample_rate,
        "channels": clip.channels,
        "duration_seconds": round(clip.duration_seconds, 4),
        **{key: value for key, value in result.info.items() if key in {"voice", "clap_score"}},
        "request": request.model_dump(mode="json"),
    }
