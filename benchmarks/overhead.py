"""What easel costs on top of diffusers: the same pipeline, seed and steps, raw and through easel.

    python benchmarks/overhead.py [--size 256] [--steps 20] [--runs 5] [--device cpu]

Builds a tiny random Stable-Diffusion folder (easel.tiny), then times, alternating so that
both see the same machine state:

- raw: ``pipe(prompt, num_inference_steps, width, height, generator)`` on a pipeline loaded
  with ``DiffusionPipeline.from_pretrained``, returning PIL images;
- easel: ``Runtime.submit`` of the same request to the embedded server (SQLite store, event
  bus, one diffusers worker) until the job's PNG and sidecar are on disk and ``succeeded``
  is announced.

Both use the same folder, scheduler (the model's Euler), seed and CPU generator, so they
compute the same image (checked). Prints the medians and the overhead ratio; target <= 3%.
The overhead is the median of the paired differences (each easel run minus the raw run just
before it) over the raw median: on a shared machine a slow moment then hits both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 1
CFG = 7.0  # easel's default (diffusers' is 7.5)


def raw_pipeline(folder: Path, device: str) -> Any:
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging

    logging.disable_progress_bar()
    dtype = torch.float32 if device == "cpu" else torch.float16
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=dtype)  # type: ignore[no-untyped-call]
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def raw_run(pipe: Any, size: int, steps: int) -> tuple[float, Any]:
    import torch

    began = time.perf_counter()
    image = pipe(
        prompt=PROMPT,
        num_inference_steps=steps,
        guidance_scale=CFG,
        width=size,
        height=size,
        generator=[torch.Generator("cpu").manual_seed(SEED)],
    ).images[0]
    return time.perf_counter() - began, image


async def easel_run(runtime: Any, size: int, steps: int) -> tuple[float, Path]:
    from easel.jobs import GenerationRequest, JobState

    request = GenerationRequest(
        prompt=PROMPT, width=size, height=size, steps=steps, seed=SEED, cfg_scale=CFG
    )
    began = time.perf_counter()
    job = await runtime.submit(request)
    done = await runtime.wait(job.id, timeout=600)
    elapsed = time.perf_counter() - began
    if done.state is not JobState.succeeded:
        raise SystemExit(f"easel job ended {done.state}: {done.error}")
    path = await runtime.image_path(job.id, 0)
    if not path.is_file():
        raise SystemExit(f"{path} is not on disk")
    return elapsed, path


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    from PIL import Image, ImageChops

    from easel.config import Settings
    from easel.runtime.facade import Runtime
    from easel.tiny import make_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_pipeline(Path(tmp) / "tiny-sd")
        pipe = raw_pipeline(folder, args.device)
        settings = Settings(
            data_dir=Path(tmp) / "data", backend="diffusers", model=str(folder), device=args.device
        )
        runtime = Runtime(settings)
        await runtime.start()
        try:
            raw_run(pipe, args.size, args.steps)  # warm-up: allocator, kernels, caches
            await easel_run(runtime, args.size, args.steps)
            raw_times, easel_times = [], []
            for _ in range(args.runs):
                seconds, raw_image = raw_run(pipe, args.size, args.steps)
                raw_times.append(seconds)
                seconds, path = await easel_run(runtime, args.size, args.steps)
                easel_times.append(seconds)
            with Image.open(path) as saved:
                same = ImageChops.difference(saved.convert("RGB"), raw_image).getbbox() is None
        finally:
            await runtime.stop()

    raw, through = statistics.median(raw_times), statistics.median(easel_times)
    # Paired: each easel run is compared with the raw run just before it, so that a slow
    # moment of a shared machine lands on both sides instead of on one median.
    overhead = statistics.median(e - r for r, e in zip(raw_times, easel_times, strict=True)) / raw
    print(
        f"tiny SD pipeline (easel.tiny), {args.size}x{args.size}, {args.steps} steps, "
        f"Euler, seed {SEED}, {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.runs} alternating runs"
    )
    print(f"raw diffusers call             {raw:8.3f} s   " + _spread(raw_times))
    print(f"easel submit -> PNG on disk    {through:8.3f} s   " + _spread(easel_times))
    print(
        f"overhead                       {overhead * 100:+7.1f} %   "
        "(median of paired differences / raw median; target <= 3%)"
    )
    print(f"same pixels as the raw call    {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


def _spread(times: list[float]) -> str:
    return f"(min {min(times):.3f}, max {max(times):.3f})"


if __name__ == "__main__":
    asyncio.run(main())
