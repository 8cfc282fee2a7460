"""Generation parameters as text: Automatic1111's "infotext", which other tools read.

It is written into every PNG (text chunk ``parameters``) and served as A1111's ``info``.
"""

from __future__ import annotations

import re
from typing import Any

from easel import __version__
from easel.jobs import GenerationRequest, JobKind

_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def infotext(
    request: GenerationRequest, *, seed: int, model: str | None, scheduler: str | None
) -> str:
    """``prompt`` / ``Negative prompt: ...`` / ``Steps: 20, Sampler: ..., Seed: ...``."""
    fields: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": scheduler or request.scheduler or "default",
        "CFG scale": _number(request.cfg_scale),
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
    }
    if model:
        fields["Model"] = model
    if request.kind is JobKind.img2img:
        fields["Denoising strength"] = _number(request.strength)
    fields["Version"] = f"easel {__version__}"
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, str]:
    """The inverse of :func:`infotext`: ``prompt``, ``negative_prompt`` and each field."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(lines) > 1 or ":" in lines[-1] else ""
    fields = {key.strip(): _unquote(value.strip()) for key, value in _PAIR.findall(last)}
    body = lines[:-1] if fields else lines
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in body:
        if line.startswith("Negative prompt:"):
            target = negative
            line = line.removeprefix("Negative prompt:").strip()
        target.append(line)
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), **fields}


def _number(value: float) -> str:
    return f"{value:g}"


def _quote(value: Any) -> str:
    text = str(value)
    if "," in text or ":" in text or '"' in text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return text
