"""Several compatible requests as one pipeline call: one prompt and one generator per image.

The queue groups jobs by a coarse key (model, size, steps, scheduler, cfg); the backend checks
everything the key cannot see (LoRAs, ControlNet, clip skip, mode...) and runs the group as one
call only when every request would run the same pipeline with the same settings. Image i of
request j then gets the same noise as when run alone (its own CPU generator), so results match
the requests run alone up to batched rounding.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from easel.backends.base import RunContext
from easel.backends.diffusers._families import Mode
from easel.backends.diffusers._previews import Previewer, StepCallback
from easel.errors import Cancelled


@dataclass(frozen=True)
class Merged:
    """What ``call_kwargs`` reads from a request, for a whole batch (one entry per image)."""

    prompt: list[str]
    negative_prompt: list[str] | None
    seeds: list[int]
    steps: int
    cfg_scale: float
    width: int
    height: int
    batch_size: int = 1  # images per prompt: every image has its own prompt entry
    init_image: None = None
    strength: float = 1.0
    counts: list[int] = field(default_factory=list)


def signature(plan: Any, request: Any) -> Hashable | None:
    """Requests with equal signatures run as one call; None: this one runs alone."""
    extras = plan.extras
    alone = (
        extras.mode is not Mode.txt2img
        or extras.controlnet is not None
        or extras.upscale is not None
        or extras.mix
        or (extras.clip_skip or 1) > 1
    )
    if alone:
        return None
    spec = plan.scheduler
    scheduler = spec and (spec.class_name, tuple(sorted(spec.overrides.items())), spec.ays)
    return (
        plan.entry.name,
        request.width,
        request.height,
        request.steps,
        request.cfg_scale,
        scheduler,
        tuple((entry.name, weight) for entry, weight in plan.loras),
        # SDXL zeroes a missing negative prompt but encodes an empty one: do not mix them
        bool(request.negative_prompt),
    )


def merge(requests: Sequence[Any]) -> Merged:
    counts = [r.batch_size for r in requests]
    negatives = any(r.negative_prompt for r in requests)
    return Merged(
        prompt=[r.prompt for r in requests for _ in range(r.batch_size)],
        negative_prompt=(
            [r.negative_prompt for r in requests for _ in range(r.batch_size)]
            if negatives
            else None
        ),
        seeds=[seed for r in requests for seed in r.seeds],
        steps=requests[0].steps,
        cfg_scale=requests[0].cfg_scale,
        width=requests[0].width,
        height=requests[0].height,
        counts=counts,
    )


def split(images: Sequence[Any], counts: Sequence[int]) -> list[list[Any]]:
    out, start = [], 0
    for count in counts:
        out.append(list(images[start : start + count]))
        start += count
    return out


def batch_callback(
    contexts: Sequence[RunContext],
    counts: Sequence[int],
    every: Sequence[int | None],
    previewer: Previewer | None,
) -> StepCallback:
    """Progress to every request's context, each with its own previews (of its first image,
    every ``every[i]`` steps); the run stops only when every request is cancelled."""
    offsets = [sum(counts[:i]) for i in range(len(counts))]

    def on_step_end(
        pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        total = int(getattr(pipe, "num_timesteps", None) or len(pipe.scheduler.timesteps))
        done = step + 1
        latents = callback_kwargs.get("latents")
        for context, offset, k in zip(contexts, offsets, every, strict=True):
            if context.cancelled:
                continue
            preview = None
            if (
                k
                and previewer is not None
                and latents is not None
                and (done % k == 0 or done == total)
            ):
                preview = previewer(latents, index=offset)
            context.progress(done, total, preview)
        if all(context.cancelled for context in contexts):
            raise Cancelled("every job of the batch was cancelled")
        return callback_kwargs

    return on_step_end
