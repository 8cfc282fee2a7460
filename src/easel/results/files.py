"""Where results go: images (PNG, WebP or JPEG) and audio files under an output dir,
each with its parameters twice.

The parameters are in a JSON sidecar (for programs) and inside the image in Automatic1111's
format (for people and other tools; see :mod:`easel.results.metadata`). Either is enough
to reproduce the image. Everything here blocks: the worker calls it in a thread.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from PIL.Image import Image
from PIL.PngImagePlugin import PngInfo

from easel.backends.base import GenerationResult
from easel.config import OutputSettings
from easel.constants import INLINE_CONTENT_MAX_BYTES
from easel.errors import AudioNotFound, ImageNotFound
from easel.jobs import AudioFormat, AudioRef, ImageFormat, ImageRef, Job
from easel.results import audio as audio_files
from easel.results.clap import ClapScorer
from easel.results.metadata import EXIF_IFD, USER_COMMENT, sidecar, user_comment, xmp_packet


class LocalStorage:
    def __init__(self, output_dir: Path | str, output: OutputSettings | None = None) -> None:
        self.root = Path(output_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.output = output or OutputSettings()
        self.scorer: ClapScorer | None = None
        """Scores each audio clip against its prompt (``clap_model``), when set."""

    def format_of(self, job: Job) -> ImageFormat:
        return job.request.output_format or ImageFormat(self.output.format)

    inline_max_bytes: int = INLINE_CONTENT_MAX_BYTES
    """The most result bytes an event carries inline (``include_images``); past it, URLs."""

    def inline(
        self, refs: Sequence[ImageRef | AudioRef], max_bytes: int | None = None
    ) -> list[str] | None:
        """The files of ``refs``, base64, when they fit in ``max_bytes`` together; else None."""
        paths = [self.path(ref) for ref in refs]
        limit = self.inline_max_bytes if max_bytes is None else max_bytes
        if sum(path.stat().st_size for path in paths) > limit:
            return None
        return [base64.b64encode(path.read_bytes()).decode() for path in paths]

    def save(self, job: Job, result: GenerationResult) -> list[ImageRef]:
        """Write every image and its sidecar; return refs in batch order."""
        day = time.strftime("%Y-%m-%d", time.gmtime(job.created_at))
        folder = self.root / day
        folder.mkdir(parents=True, exist_ok=True)
        refs = []
        format = self.format_of(job)
        for index, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
            scheduler = result.info.get("scheduler")
            metadata = sidecar(
                job, index, seed, model=result.model, scheduler=scheduler, info=result.info
            )
            stem = folder / f"{job.id}-{index}"
            data = encode_image(image, metadata, format, self.output, job.request.output_quality)
            _write_atomic(stem.with_suffix(format.suffix), data)
            _write_atomic(stem.with_suffix(".json"), json.dumps(metadata, indent=2).encode())
            refs.append(
                ImageRef(
                    index=index,
                    seed=seed,
                    width=image.width,
                    height=image.height,
                    path=str(stem.with_suffix(format.suffix).relative_to(self.root)),
                    url=f"/v1/jobs/{job.id}/images/{index}",
                )
            )
        return refs

    def save_audio(self, job: Job, result: GenerationResult) -> list[AudioRef]:
        """Write every clip (in the request's format) and its sidecar; refs in batch order."""
        audio_format = job.request.audio_format or AudioFormat.wav
        folder = self._folder(job)
        refs = []
        for index, (clip, seed) in enumerate(zip(result.audio, result.seeds, strict=True)):
            score = self.scorer.score(job.request.prompt, clip) if self.scorer else None
            clip = audio_files.writable(clip, audio_format)
            metadata = audio_files.audio_sidecar(job, result, index, seed, clip)
            if score is not None:
                metadata["clap_score"] = score
            stem = folder / f"{job.id}-{index}"
            target = stem.with_suffix(audio_files.suffix(audio_format))
            _write_atomic(target, audio_files.encode_audio(clip, audio_format, metadata))
            _write_atomic(stem.with_suffix(".json"), json.dumps(metadata, indent=2).encode())
            refs.append(
                AudioRef(
                    index=index,
                    seed=seed,
                    duration_seconds=round(clip.duration_seconds, 4),
                    sample_rate=clip.sample_rate,
                    channels=clip.channels,
                    format=audio_format,
                    media_type=audio_format.media_type,
                    path=str(target.relative_to(self.root)),
                    url=f"/v1/jobs/{job.id}/audio/{index}",
                    clap_score=score,
                )
            )
        return refs

    def _folder(self, job: Job) -> Path:
        folder = self.root / time.strftime("%Y-%m-%d", time.gmtime(job.created_at))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def path(self, ref: ImageRef | AudioRef) -> Path:
        """The file behind a ref, confined to the output dir (no traversal, no symlink out)."""
        candidate = (self.root / ref.path).resolve()
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            if isinstance(ref, AudioRef):
                raise AudioNotFound(f"audio {ref.index} of this job is not on disk")
            raise ImageNotFound(f"image {ref.index} of this job is not on disk")
        return candidate


def encode_image(
    image: Image,
    metadata: dict[str, Any],
    format: ImageFormat = ImageFormat.png,
    output: OutputSettings | None = None,
    quality: int | None = None,
) -> bytes:
    """The image in ``format`` with its parameters inside (blocks; Pillow's encoders let
    go of the GIL, so other threads, and the event loop, run meanwhile)."""
    output = output or OutputSettings()
    if format is ImageFormat.png:
        return encode_png(image, metadata, output.png_compress_level, output.png_strategy)
    exif = PILImage.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(metadata["infotext"])
    options: dict[str, Any] = {
        "exif": exif.tobytes(),
        "xmp": xmp_packet(metadata["infotext"], metadata["request"]),
    }
    if format is ImageFormat.jpeg:
        options["quality"] = quality or output.jpeg_quality
        image = image.convert("RGB") if image.mode not in {"RGB", "L"} else image
    else:
        options["quality"] = quality or output.webp_quality
        options["lossless"] = output.webp_lossless
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if format is ImageFormat.jpeg else "WEBP", **options)
    return buffer.getvalue()


PNG_STRATEGIES = {"default": 0, "filtered": 1, "huffman_only": 2, "rle": 3, "fixed": 4}
"""zlib's strategies (``Z_DEFAULT_STRATEGY`` ... ``Z_FIXED``), as Pillow's ``compress_type``."""


def encode_png(
    image: Image, metadata: dict[str, Any], compress_level: int = 1, strategy: str = "rle"
) -> bytes:
    """PNG bytes carrying the infotext (``parameters``) and the request as JSON (``easel``)."""
    info = PngInfo()
    info.add_text("parameters", metadata["infotext"])
    info.add_text("easel", json.dumps(metadata["request"], sort_keys=True))
    buffer = io.BytesIO()
    image.save(
        buffer,
        "PNG",
        pnginfo=info,
        compress_level=compress_level,
        compress_type=PNG_STRATEGIES[strategy],
    )
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file, fsync, rename: a crash never leaves half an image."""
    # unique per write: a job run twice (a lost lease) may write the same file at once
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
