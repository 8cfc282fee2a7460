"""Results on the client's disk: where each PNG goes, and the sidecar that reproduces it.

Everything here blocks; the async client calls it in a thread.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from easel.jobs import AudioRef, ImageRef, Job
from easel.results.metadata import parse_infotext, read_parameters, sidecar


def image_targets(target: Path, job: Job, prefix: str | None = None) -> list[Path]:
    """An existing directory gets ``<prefix or job id>-<index>.png`` files; any other path
    is the file itself, suffixed ``-1``, ``-2``... when the batch has more than one image."""
    return _targets(target, job.id, job.images, prefix)


def audio_targets(target: Path, job: Job, prefix: str | None = None) -> list[Path]:
    """Like :func:`image_targets` for audio clips, each with the suffix the server gave it."""
    return _targets(target, job.id, job.audio, prefix)


def _targets(
    target: Path, job_id: str, refs: Sequence[ImageRef | AudioRef], prefix: str | None
) -> list[Path]:
    suffixes = [Path(ref.path).suffix or ".png" for ref in refs]
    if target.is_dir():
        return [
            target / f"{prefix or job_id}-{ref.index}{suffix}"
            for ref, suffix in zip(refs, suffixes, strict=True)
        ]
    if len(refs) == 1:
        return [target.with_suffix(suffixes[0])]
    return [
        target.with_stem(f"{target.stem}-{ref.index + 1}").with_suffix(suffix)
        for ref, suffix in zip(refs, suffixes, strict=True)
    ]


def result_targets(target: Path, job: Job) -> list[Path]:
    """Where a job's results go: its audio clips if it made sound, else its images."""
    return audio_targets(target, job) if job.audio else image_targets(target, job)


def audio_sidecar(job: Job, ref: AudioRef) -> dict[str, Any]:
    """What reproduces clip ``index`` alone: the request with its seed and batch size 1."""
    request = job.request.model_copy(update={"seed": ref.seed, "batch_size": 1})
    return {
        "job_id": job.id,
        "index": ref.index,
        "seed": ref.seed,
        "backend": job.backend,
        "sample_rate": ref.sample_rate,
        "channels": ref.channels,
        "duration_seconds": ref.duration_seconds,
        "request": request.model_dump(mode="json"),
    }


def client_sidecar(job: Job, ref: ImageRef, png: bytes) -> dict[str, Any]:
    """The server's own sidecar format, rebuilt from the job and the PNG's text chunk."""
    parameters = read_parameters(png).infotext
    fields = parse_infotext(parameters) if parameters else {}
    return sidecar(job, ref.index, ref.seed, model=fields.get("Model"), scheduler=None)


def write_image(path: Path, png: bytes, metadata: dict[str, Any]) -> None:
    """The result (an image or a clip) and its ``.json`` sidecar next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, png)
    _write(path.with_suffix(".json"), json.dumps(metadata, indent=2).encode())


def copy_image(source: Path, path: Path) -> None:
    """A PNG the embedded runtime stored, with the sidecar it wrote beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    shutil.copyfile(source.with_suffix(".json"), path.with_suffix(".json"))


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
