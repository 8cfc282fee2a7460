"""Draw Things' two binary formats, read and written by easel's own code.

**The configuration** of a generation is a FlatBuffers table (Draw Things'
``GenerationConfiguration``). FlatBuffers finds a field through the table's vtable at byte
``4 + 2 * id``, where ``id`` is the field's position in the schema; :data:`FIELDS` lists
the ids easel reads, and this module reads and writes them with the ``flatbuffers``
runtime only (no generated code). Sizes are in 64-pixel units, as Draw Things counts them.

**Images** travel as tensors: a 68-byte header of 17 little-endian uint32 (``[0]`` is 0, or
1012247 when the data is fpzip-compressed; ``[3]`` the element type; ``[5:9]`` batch,
height, width, channels), then the values, NHWC, in -1..1.

The server (``easel.api.compat.grpc``) and the client (``easel.client.grpc``) share this module.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import flatbuffers
from flatbuffers import encode, number_types, packer, table
from PIL import Image

from easel.errors import InvalidRequest
from easel.images import MAX_DECODED_PIXELS
from easel.samplers import DRAWTHINGS_SAMPLERS

SIZE_UNIT = 64
"""Draw Things counts width and height in 64-pixel units."""


class FIELDS:
    """Field ids of ``GenerationConfiguration`` (schema order; deprecated ones keep theirs)."""

    start_width = 1  # ushort, x64 pixels
    start_height = 2  # ushort, x64 pixels
    seed = 3  # uint
    steps = 4  # uint
    guidance_scale = 5  # float
    strength = 6  # float
    model = 7  # string
    sampler = 8  # SamplerType (byte), default 0
    batch_count = 9  # uint, default 1
    batch_size = 10  # uint, default 1
    seed_mode = 17  # SeedMode (byte)
    clip_skip = 18  # uint, default 1
    controls = 19  # [Control]
    loras = 20  # [LoRA]
    shift = 49  # float, default 1.0


class LORA_FIELDS:
    """Field ids of the ``LoRA`` table."""

    file = 0  # string
    weight = 1  # float, default 0.6


class CONTROL_FIELDS:
    """Field ids of the ``Control`` table (the ones easel uses)."""

    file = 0  # string
    weight = 1  # float, default 1
    guidance_start = 2  # float, default 0
    guidance_end = 3  # float, default 1


SAMPLERS = DRAWTHINGS_SAMPLERS
"""``SamplerType`` values in enum order: the one table in ``easel.samplers``."""


@dataclass(frozen=True)
class LoRA:
    """One ``LoRA`` entry: a LoRA file of the server's and its weight."""

    file: str
    weight: float = 0.6


@dataclass(frozen=True)
class Control:
    """One ``Control`` entry: a ControlNet file, its weight and the part of the steps it
    guides. Its input image travels in the request's ``hints``."""

    file: str
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0


@dataclass(frozen=True)
class Configuration:
    """The fields of a ``GenerationConfiguration`` that easel uses, in pixels."""

    width: int = 512
    height: int = 512
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.0
    strength: float = 1.0
    model: str | None = None
    sampler: str = SAMPLERS[0]
    batch_count: int = 1
    batch_size: int = 1
    clip_skip: int = 1
    shift: float = 1.0
    loras: tuple[LoRA, ...] = ()
    controls: tuple[Control, ...] = ()


def _vtable(field_id: int) -> int:
    return 4 + 2 * field_id


def decode_configuration(data: bytes) -> Configuration:
    """The FlatBuffer -> :class:`Configuration`; a damaged buffer is ``invalid_request``."""
    if len(data) < 8:
        raise InvalidRequest("configuration is not a GenerationConfiguration FlatBuffer")
    try:
        buffer = bytearray(data)
        root = table.Table(buffer, encode.Get(packer.uoffset, buffer, 0))

        def scalar(field_id: int, flags: Any, default: Any) -> Any:
            offset = root.Offset(_vtable(field_id))
            value = root.Get(flags, root.Pos + offset) if offset else default
            # float32 -> the short decimal it was written as (0.6, not 0.6000000238)
            return float(f"{value:.6g}") if isinstance(value, float) else value

        def tables(field_id: int) -> Iterator[table.Table]:
            offset = root.Offset(_vtable(field_id))
            if not offset:
                return
            start = root.Vector(offset)
            for index in range(root.VectorLen(offset)):
                yield table.Table(buffer, root.Indirect(start + 4 * index))

        def field(entry: table.Table, field_id: int, flags: Any, default: Any) -> Any:
            offset = entry.Offset(_vtable(field_id))
            value = entry.Get(flags, entry.Pos + offset) if offset else default
            return float(f"{value:.6g}") if isinstance(value, float) else value

        def text(entry: table.Table, field_id: int) -> str:
            offset = entry.Offset(_vtable(field_id))
            return entry.String(entry.Pos + offset).decode() if offset else ""

        loras = tuple(
            LoRA(
                text(e, LORA_FIELDS.file),
                field(e, LORA_FIELDS.weight, number_types.Float32Flags, 0.6),
            )
            for e in tables(FIELDS.loras)
        )
        controls = tuple(
            Control(
                text(e, CONTROL_FIELDS.file),
                field(e, CONTROL_FIELDS.weight, number_types.Float32Flags, 1.0),
                field(e, CONTROL_FIELDS.guidance_start, number_types.Float32Flags, 0.0),
                field(e, CONTROL_FIELDS.guidance_end, number_types.Float32Flags, 1.0),
            )
            for e in tables(FIELDS.controls)
        )
        model_offset = root.Offset(_vtable(FIELDS.model))
        model = root.String(root.Pos + model_offset).decode() if model_offset else None
        sampler = scalar(FIELDS.sampler, number_types.Int8Flags, 0)
        config = Configuration(
            width=scalar(FIELDS.start_width, number_types.Uint16Flags, 0) * SIZE_UNIT,
            height=scalar(FIELDS.start_height, number_types.Uint16Flags, 0) * SIZE_UNIT,
            seed=scalar(FIELDS.seed, number_types.Uint32Flags, 0),
            steps=scalar(FIELDS.steps, number_types.Uint32Flags, 0),
            guidance_scale=scalar(FIELDS.guidance_scale, number_types.Float32Flags, 0.0),
            strength=scalar(FIELDS.strength, number_types.Float32Flags, 0.0),
            model=model or None,
            sampler=SAMPLERS[sampler] if 0 <= sampler < len(SAMPLERS) else str(sampler),
            batch_count=scalar(FIELDS.batch_count, number_types.Uint32Flags, 1),
            batch_size=scalar(FIELDS.batch_size, number_types.Uint32Flags, 1),
            clip_skip=scalar(FIELDS.clip_skip, number_types.Uint32Flags, 1),
            shift=scalar(FIELDS.shift, number_types.Float32Flags, 1.0),
            loras=loras,
            controls=controls,
        )
    except (IndexError, struct.error, UnicodeDecodeError, TypeError, ValueError):
        raise InvalidRequest(
            "configuration is not a readable GenerationConfiguration FlatBuffer"
        ) from None
    if config.sampler not in SAMPLERS:
        raise InvalidRequest(
            f"sampler {config.sampler} is not a known Draw Things sampler (0-{len(SAMPLERS) - 1})"
        )
    return config


def encode_configuration(config: Configuration) -> bytes:
    """:class:`Configuration` -> the FlatBuffer a Draw Things server reads."""
    for name, value in (("width", config.width), ("height", config.height)):
        if value <= 0 or value % SIZE_UNIT:
            raise InvalidRequest(f"{name} must be a positive multiple of {SIZE_UNIT} (got {value})")
    if config.sampler not in SAMPLERS:
        raise InvalidRequest(
            f"sampler {config.sampler!r} is not a Draw Things sampler; they are: "
            + ", ".join(SAMPLERS)
        )
    builder = flatbuffers.Builder(256)
    model = builder.CreateString(config.model) if config.model else None
    loras = _vector(builder, [_lora(builder, lora) for lora in config.loras])
    controls = _vector(builder, [_control(builder, control) for control in config.controls])
    builder.StartObject(FIELDS.shift + 1)
    builder.PrependUint16Slot(FIELDS.start_width, config.width // SIZE_UNIT, 0)
    builder.PrependUint16Slot(FIELDS.start_height, config.height // SIZE_UNIT, 0)
    builder.PrependUint32Slot(FIELDS.seed, config.seed, 0)
    builder.PrependUint32Slot(FIELDS.steps, config.steps, 0)
    builder.PrependFloat32Slot(FIELDS.guidance_scale, config.guidance_scale, 0.0)
    builder.PrependFloat32Slot(FIELDS.strength, config.strength, 0.0)
    if model is not None:
        builder.PrependUOffsetTRelativeSlot(FIELDS.model, model, 0)
    builder.PrependInt8Slot(FIELDS.sampler, SAMPLERS.index(config.sampler), 0)
    builder.PrependUint32Slot(FIELDS.batch_count, config.batch_count, 1)
    builder.PrependUint32Slot(FIELDS.batch_size, config.batch_size, 1)
    builder.PrependUint32Slot(FIELDS.clip_skip, config.clip_skip, 1)
    if controls is not None:
        builder.PrependUOffsetTRelativeSlot(FIELDS.controls, controls, 0)
    if loras is not None:
        builder.PrependUOffsetTRelativeSlot(FIELDS.loras, loras, 0)
    builder.PrependFloat32Slot(FIELDS.shift, config.shift, 1.0)
    builder.Finish(builder.EndObject())
    return bytes(builder.Output())


def _lora(builder: flatbuffers.Builder, lora: LoRA) -> int:
    file = builder.CreateString(lora.file)
    builder.StartObject(LORA_FIELDS.weight + 1)
    builder.PrependUOffsetTRelativeSlot(LORA_FIELDS.file, file, 0)
    builder.PrependFloat32Slot(LORA_FIELDS.weight, lora.weight, 0.6)
    return int(builder.EndObject())


def _control(builder: flatbuffers.Builder, control: Control) -> int:
    file = builder.CreateString(control.file)
    builder.StartObject(CONTROL_FIELDS.guidance_end + 1)
    builder.PrependUOffsetTRelativeSlot(CONTROL_FIELDS.file, file, 0)
    builder.PrependFloat32Slot(CONTROL_FIELDS.weight, control.weight, 1.0)
    builder.PrependFloat32Slot(CONTROL_FIELDS.guidance_start, control.guidance_start, 0.0)
    builder.PrependFloat32Slot(CONTROL_FIELDS.guidance_end, control.guidance_end, 1.0)
    return int(builder.EndObject())


def _vector(builder: flatbuffers.Builder, offsets: list[int]) -> int | None:
    """A vector of tables (built before the table that holds it, as FlatBuffers wants)."""
    if not offsets:
        return None
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return int(builder.EndVector())


# -- tensors -------------------------------------------------------------------------------

HEADER = struct.Struct("<17I")
FPZIP_MAGIC = 1012247
_CPU_MEMORY = 0x1
_NHWC = 0x02
_FLOAT16 = 0x20000
_FLOAT32 = 0x04000

# uint8 -> the two bytes of float16(i / 127.5 - 1): encoding is two C-speed translations
_HALF = [struct.pack("<e", i / 127.5 - 1) for i in range(256)]
_LOW = bytes(h[0] for h in _HALF)
_HIGH = bytes(h[1] for h in _HALF)


def encode_tensor(image: Image.Image) -> bytes:
    """An RGB image -> an uncompressed float16 NHWC tensor in -1..1 (blocks: use a thread)."""
    rgb = image.convert("RGB")
    raw = rgb.tobytes()
    values = bytearray(2 * len(raw))
    values[0::2] = raw.translate(_LOW)
    values[1::2] = raw.translate(_HIGH)
    header = HEADER.pack(0, _CPU_MEMORY, _NHWC, _FLOAT16, 0, 1, rgb.height, rgb.width, 3, *[0] * 8)
    return header + bytes(values)


def tensor_shape(data: bytes) -> tuple[int, int, int]:
    """(width, height, channels) from a tensor's header alone: checked before decoding."""
    if len(data) < HEADER.size:
        raise InvalidRequest("the image tensor is shorter than its 68-byte header")
    words = HEADER.unpack_from(data)
    height, width, channels = words[6], words[7], words[8]
    if not (height and width and channels in (1, 3, 4)):
        raise InvalidRequest(f"cannot read a {width}x{height}x{channels} image tensor")
    return width, height, channels


def decode_tensor(data: bytes, max_pixels: int = MAX_DECODED_PIXELS) -> Image.Image:
    """A tensor -> an RGB image; fpzip-compressed ones need the ``fpzip`` package. Values
    are read one channel at a time into 4-byte floats, never as a tuple of Python floats
    (which costs ~8x the tensor's size)."""
    width, height, channels = tensor_shape(data)
    if width * height > max_pixels:
        raise InvalidRequest(
            f"the image tensor is {width}x{height}; at most {max_pixels} pixels are accepted"
        )
    words = HEADER.unpack_from(data)
    bands = []
    for plane in _planes(words, memoryview(data)[HEADER.size :], width * height, channels):
        # F -> L truncates and clips: +0.5 rounds
        band = Image.frombytes("F", (width, height), plane).point(lambda v: v * 127.5 + 128.0)
        bands.append(band.convert("L"))
    if len(bands) == 1:
        return bands[0].convert("RGB")
    return Image.merge("RGB", bands)


def decode_preview(data: bytes) -> Image.Image | None:
    """A preview tensor -> an image when it is RGB (easel's); Draw Things sends latents,
    which only the model that made them can turn into pixels: None."""
    if len(data) < HEADER.size or HEADER.unpack_from(data)[8] != 3:
        return None
    return decode_tensor(data)


def _planes(
    words: tuple[int, ...], payload: memoryview, pixels: int, channels: int
) -> Iterator[bytes]:
    """Float32 bytes of each of the first (up to) three channels."""
    count = pixels * channels
    if words[0] == FPZIP_MAGIC:
        try:
            import fpzip
        except ImportError:
            raise InvalidRequest(
                "this image tensor is fpzip-compressed; to read it, pip install fpzip"
            ) from None
        flat = fpzip.decompress(bytes(payload), order="C").reshape(-1)[:count]
        for channel in range(min(channels, 3)):
            yield flat[channel::channels].astype("<f4").tobytes()
        return
    kind = "e" if words[3] & _FLOAT16 or not words[3] & _FLOAT32 else "f"
    size = struct.calcsize(kind) * count
    if len(payload) < size:
        raise InvalidRequest(f"the image tensor holds {len(payload)} bytes; {size} expected")
    values = payload[:size]
    try:
        import numpy
    except ImportError:  # numpy comes with easel[diffusers]; without it, slower, as lean
        pixel = struct.Struct(f"<{channels}{kind}")
        for channel in range(min(channels, 3)):
            yield array("f", (value[channel] for value in pixel.iter_unpack(values))).tobytes()
        return
    flat = numpy.frombuffer(values, dtype="<f2" if kind == "e" else "<f4")
    for channel in range(min(channels, 3)):
        yield flat[channel::channels].astype("<f4").tobytes()
