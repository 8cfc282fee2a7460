"""Speech through easel's queue vs hibari called directly, and the cost of each audio format.

    python benchmarks/audio.py [--jobs 10]

1. The same sentences spoken by hibari in a loop, then as ``txt2speech`` jobs through an
   embedded easel (queue, worker, WAV + sidecar on disk, events): seconds of speech per
   second of wall time each way, and what easel adds per job.
2. Encoding 10 s of 24 kHz mono and of 44.1 kHz stereo in each container easel writes (with
   its tags): milliseconds and bytes, so a deployment can choose its default.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from easel.audio import AudioClip
from easel.backends.audio.speech import HibariBackend
from easel.config import Settings
from easel.jobs import AudioFormat, GenerationRequest, JobKind, JobState
from easel.results.audio import encode_audio, writable
from easel.runtime.facade import Runtime

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Queues are fair when every user gets a turn, whatever the size of their jobs.",
    "A server that speaks must also listen to the people waiting for it.",
]


def direct(jobs: int) -> tuple[float, float]:
    """(seconds of speech, wall seconds) for hibari alone."""
    from hibari import Hibari

    tts = Hibari()
    tts("Warm up.")
    spoken = 0.0
    began = time.perf_counter()
    for i in range(jobs):
        spoken += len(tts(SENTENCES[i % len(SENTENCES)], seed=i)) / 24_000
    return spoken, time.perf_counter() - began


async def through_easel(jobs: int, data: Path) -> tuple[float, float]:
    """(seconds of speech, wall seconds) for the same sentences as jobs, one worker."""
    runtime = Runtime(Settings(data_dir=data), backends={"hibari": HibariBackend()})
    async with runtime:
        warm = GenerationRequest(kind=JobKind.txt2speech, prompt="Warm up.")
        await runtime.wait((await runtime.submit(warm)).id, 60)
        began = time.perf_counter()
        ids = []
        for i in range(jobs):
            request = GenerationRequest(
                kind=JobKind.txt2speech, prompt=SENTENCES[i % len(SENTENCES)], seed=i
            )
            ids.append((await runtime.submit(request)).id)
        done = [await runtime.wait(job_id, 120) for job_id in ids]
        wall = time.perf_counter() - began
    if any(job.state is not JobState.succeeded for job in done):
        raise SystemExit("a job failed")
    return sum(job.audio[0].duration_seconds for job in done), wall


def formats() -> None:
    rng = np.random.default_rng(0)
    clips = {
        "10 s, 24 kHz mono": AudioClip(rng.uniform(-0.3, 0.3, (240_000, 1)).astype("f4"), 24_000),
        "10 s, 44.1 kHz stereo": AudioClip(
            rng.uniform(-0.3, 0.3, (441_000, 2)).astype("f4"), 44_100
        ),
    }
    request = GenerationRequest(kind=JobKind.txt2audio, prompt="rain", seed=1)
    metadata = {"request": request.model_dump(mode="json"), "model": "bench"}
    print(f"\n{'clip':<24}{'format':<8}{'ms':>8}{'KiB':>10}")
    for label, clip in clips.items():
        for audio_format in AudioFormat:
            fitted = writable(clip, audio_format)
            began = time.perf_counter()
            data = encode_audio(fitted, audio_format, metadata)
            ms = (time.perf_counter() - began) * 1000
            print(f"{label:<24}{audio_format.value:<8}{ms:>8.1f}{len(data) / 1024:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10)
    args = parser.parse_args()
    spoken, wall = direct(args.jobs)
    with tempfile.TemporaryDirectory() as data:
        queued_spoken, queued_wall = asyncio.run(through_easel(args.jobs, Path(data)))
    print(f"{'path':<22}{'speech s':>10}{'wall s':>9}{'x realtime':>12}{'per job s':>11}")
    for label, audio, seconds in (
        ("hibari directly", spoken, wall),
        ("easel txt2speech", queued_spoken, queued_wall),
    ):
        print(
            f"{label:<22}{audio:>10.1f}{seconds:>9.2f}{audio / seconds:>12.1f}"
            f"{seconds / args.jobs:>11.3f}"
        )
    print(f"easel adds {(queued_wall - wall) / args.jobs * 1000:.0f} ms per job")
    formats()


if __name__ == "__main__":
    main()
