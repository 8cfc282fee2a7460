"""The Draw Things Python client's script API, on easel's gRPC client.

Scripts written for the community Draw Things client (``DrawThingsClient(address)``,
``ImageGenerationConfig``, ``generate_image``, ``save_images``, ``StreamingProgressHandler``,
``quick_generate``) run against easel or a Draw Things server by changing their import to
``from easel.client.grpc import ...``. Scheduler names are Draw Things' ("UniPC ays",
"DPMPP2M Karras", "Euler A Trailing"), read case-insensitively through easel's one sampler
table; ``generate_image`` returns PNG bytes, which ``save_images`` writes as they are.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL.Image import Image

from easel.errors import InvalidRequest
from easel.proto.drawthings import SAMPLERS, Configuration, encode_configuration
from easel.samplers import parse_sampler

STAGES = {
    "text_encoded": "Text Encoded",
    "image_encoded": "Image Encoded",
    "sampling": "Sampling",
    "image_decoded": "Image Decoded",
    "second_pass_image_encoded": "Second Pass Image Encoded",
    "second_pass_sampling": "Second Pass Sampling",
    "second_pass_image_decoded": "Second Pass Image Decoded",
    "face_restored": "Face Restored",
    "image_upscaled": "Image Upscaled",
}
"""Signposts -> the stage names ``progress_callback(stage, step)`` receives."""


def drawthings_sampler(name: str) -> str:
    """A scheduler name in any spelling -> Draw Things' sampler ("UniPC ays" -> "UniPC AYS")."""
    index = parse_sampler(name).drawthings
    if index is None:
        raise InvalidRequest(
            f"Draw Things has no scheduler {name!r}; its schedulers are: {', '.join(SAMPLERS)}"
        )
    return SAMPLERS[index]


@dataclass
class ImageGenerationConfig:
    """A generation's settings, with the Draw Things client's field names. ``seed`` None
    draws one; sizes are pixels, multiples of 64. LoRAs and controls are not sent yet."""

    model: str = ""
    steps: int = 20
    width: int = 512
    height: int = 512
    cfg_scale: float = 7.0
    scheduler: str = "DPMPP2M Karras"
    seed: int | None = None
    strength: float = 1.0
    batch_count: int = 1
    batch_size: int = 1
    seed_mode: int = 2
    clip_skip: int = 1
    shift: float = 1.0
    loras: list[Any] = field(default_factory=list)
    controls: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = random.randrange(2**32)
        self.sampler = drawthings_sampler(self.scheduler)

    def to_configuration(self) -> Configuration:
        return Configuration(
            width=self.width,
            height=self.height,
            seed=self.seed or 0,
            steps=self.steps,
            guidance_scale=self.cfg_scale,
            strength=self.strength,
            model=self.model or None,
            sampler=self.sampler,
            batch_count=self.batch_count,
            batch_size=self.batch_size,
            clip_skip=self.clip_skip,
            shift=self.shift,
        )

    def to_flatbuffer(self) -> bytes:
        """The ``GenerationConfiguration`` FlatBuffer a Draw Things server reads."""
        return encode_configuration(self.to_configuration())


class StreamingProgressHandler:
    """Prints progress as a Draw Things script shows it; pass ``on_progress`` as the
    ``progress_callback`` of ``generate_image``."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.current_step = 0
        self.current_stage = ""

    def on_progress(self, stage: str, step: int) -> None:
        self.current_stage, self.current_step = stage, step
        if stage == "Sampling":
            percent = step / self.total_steps * 100 if self.total_steps else 100.0
            print(f"\r{stage}: {step}/{self.total_steps} ({percent:.1f}%)", end="", flush=True)
        elif stage == "Second Pass Sampling":
            print(f"\r{stage}: step {step}", end="", flush=True)
        else:
            print(f"\n{stage}", flush=True)

    def on_complete(self) -> None:
        print("\nGeneration complete!", flush=True)


def png_bytes(image: Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def save_images(
    images: list[bytes], output_dir: str | Path = ".", prefix: str = "generated"
) -> list[str]:
    """Write each image as ``{prefix}_{n}.png`` (n from 1); returns the paths."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, data in enumerate(images, start=1):
        path = folder / f"{prefix}_{number}.png"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


ProgressCallback = Callable[[str, int], object]
PreviewCallback = Callable[[bytes], object]
