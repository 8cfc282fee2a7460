"""Generation parameters as text: Automatic1111's "infotext", which other tools read.

It is written into every result file, where each format keeps text: PNG's ``parameters``
text chunk (and ``easel``: the request as JSON); for JPEG and WebP, EXIF ``UserComment``
as A1111 writes it (so A1111's PNG-info reads it) and an XMP packet with both. It is also
served as A1111's ``info``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from html import escape, unescape
from typing import Any

from PIL import Image

from easel.constants import VERSION
from easel.jobs import GenerationRequest, Job, JobKind

_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def infotext(
    request: GenerationRequest,
    *,
    seed: int,
    model: str | None,
    scheduler: str | None,
    info: Mapping[str, Any] | None = None,
) -> str:
    """``prompt`` / ``Negative prompt: ...`` / ``Steps: 20, Sampler: ..., Seed: ...``.

    ``info`` is what the backend reported: A1111's sampler and schedule type ("DPM++ 2M",
    "Karras") go where A1111 writes them, the diffusers class and any substitution after.
    """
    info = info or {}
    fields: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": info.get("sampler") or scheduler or request.scheduler or "default",
    }
    if (schedule := info.get("schedule_type")) and schedule != "Automatic":
        fields["Schedule type"] = schedule
    fields |= {
        "CFG scale": _number(request.cfg_scale),
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
    }
    if model:
        fields["Model"] = model
    if request.kind is JobKind.img2img:
        fields["Denoising strength"] = _number(request.strength)
    if request.clip_skip and request.clip_skip > 1:
        fields["Clip skip"] = request.clip_skip
    if scheduler and info.get("sampler"):
        fields["Diffusers scheduler"] = scheduler
    if info.get("substitution"):
        fields["Substitution"] = info["substitution"]
    fields["Version"] = f"easel {VERSION}"
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def sidecar(
    job: Job,
    index: int,
    seed: int,
    *,
    model: str | None,
    scheduler: str | None,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What reproduces image ``index`` alone: the request with its own seed and batch 1.

    The server writes it beside each PNG; the client rebuilds the same one from a PNG's
    text chunk, so files written by either side look the same.
    """
    request = job.request.model_copy(update={"seed": seed, "batch_size": 1})
    params = request.model_dump(mode="json", exclude={"init_image"})
    if job.request.init_image:
        params["init_image_sha256"] = hashlib.sha256(job.request.init_image.encode()).hexdigest()
    recorded = {key: info[key] for key in RECORDED if info and key in info}
    return {
        "job_id": job.id,
        "index": index,
        "seed": seed,
        "backend": job.backend,
        "model": model,
        "scheduler": scheduler,
        **recorded,
        "created_at": job.created_at,
        "request": params,
        "infotext": infotext(request, seed=seed, model=model, scheduler=scheduler, info=info),
    }


RECORDED = ("sampler", "schedule_type", "scheduler_config", "sigmas", "substitution", "family")
"""What a backend reports about how an image was made that the sidecar keeps: the sampler
as A1111 names it, the diffusers class's config, AYS, substitutions."""


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


# -- the parameters inside image files ----------------------------------------------------

EXIF_IFD = 0x8769
"""The EXIF sub-IFD pointer tag."""
USER_COMMENT = 0x9286
"""EXIF ``UserComment``: where A1111 (via piexif) puts the infotext of JPEG and WebP files."""
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_XMP_NS = "https://github.com/easel/ns/1.0/"


@dataclass(frozen=True)
class EmbeddedParameters:
    """What a result file says about how it was made (either part may be missing)."""

    infotext: str | None
    request: dict[str, Any] | None


def user_comment(text: str) -> bytes:
    """EXIF ``UserComment`` bytes as piexif's ``UserComment.dump(text, "unicode")`` writes
    them (A1111 reads this back with ``piexif.helper.UserComment.load``)."""
    return _UNICODE_PREFIX + text.encode("utf-16-be")


def read_user_comment(raw: bytes) -> str:
    """The inverse of :func:`user_comment`; also the ASCII and unmarked forms."""
    if raw.startswith(_UNICODE_PREFIX):
        body = raw[len(_UNICODE_PREFIX) :]
        # piexif writes big-endian; a few writers use little-endian with a BOM
        if body.startswith(b"\xff\xfe"):
            return body[2:].decode("utf-16-le", errors="replace")
        return body.decode("utf-16-be", errors="replace")
    if raw.startswith(_ASCII_PREFIX):
        return raw[len(_ASCII_PREFIX) :].decode("ascii", errors="replace").rstrip("\x00")
    return raw.decode("utf-8", errors="replace").rstrip("\x00")


def xmp_packet(parameters: str, request: dict[str, Any]) -> bytes:
    """An XMP packet with the infotext and the request JSON (``easel:parameters``/``request``)."""
    description = (
        f'<rdf:Description rdf:about="" xmlns:easel="{_XMP_NS}">'
        f"<easel:parameters>{escape(parameters)}</easel:parameters>"
        f"<easel:request>{escape(json.dumps(request, sort_keys=True))}</easel:request>"
        "</rdf:Description>"
    )
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f"{description}</rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def read_xmp(packet: bytes | str) -> dict[str, str]:
    """``parameters`` and ``request`` from an easel XMP packet (empty for anyone else's)."""
    text = packet.decode("utf-8", errors="replace") if isinstance(packet, bytes) else packet
    found = {}
    for name in ("parameters", "request"):
        match = re.search(rf"<easel:{name}>(.*?)</easel:{name}>", text, re.DOTALL)
        if match:
            found[name] = unescape(match.group(1))
    return found


def read_embedded(image: Image.Image) -> EmbeddedParameters:
    """The parameters an opened PNG, JPEG or WebP carries: PNG text chunks, else EXIF
    ``UserComment`` and easel's XMP. Reads metadata only, never pixels."""
    infotext_: str | None = None
    request_text: str | None = None
    if isinstance(text := image.info.get("parameters"), str):
        infotext_ = text
    if isinstance(text := image.info.get("easel"), str):
        request_text = text
    if infotext_ is None:
        with contextlib.suppress(Exception):  # a broken EXIF block is no parameters
            raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
            if isinstance(raw, bytes) and raw:
                infotext_ = read_user_comment(raw)
    if (xmp := image.info.get("xmp")) and isinstance(xmp, bytes | str):
        found = read_xmp(xmp)
        infotext_ = infotext_ or found.get("parameters")
        request_text = request_text or found.get("request")
    request = None
    if request_text is not None:
        with contextlib.suppress(ValueError):
            loaded = json.loads(request_text)
            request = loaded if isinstance(loaded, dict) else None
    return EmbeddedParameters(infotext=infotext_ or None, request=request)


def read_parameters(data: bytes) -> EmbeddedParameters:
    """:func:`read_embedded` of encoded file bytes (blocks: call it in a thread)."""
    with Image.open(io.BytesIO(data)) as image:
        return read_embedded(image)
