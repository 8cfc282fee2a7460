"""Images in and out: decode what clients send, checked by content, never by name."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, UnidentifiedImageError

from easel.errors import InvalidRequest

ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
MAX_DECODED_PIXELS = 4096 * 4096


def strip_data_url(data: str) -> str:
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    return data


def decode_base64_image(data: str, *, max_bytes: int = 20 * 1024 * 1024) -> Image.Image:
    """Base64 (or a data: URL) -> RGB image; any problem is an ``invalid_request``."""
    data = strip_data_url(data)
    if len(data) > max_bytes * 4 // 3 + 4:
        raise InvalidRequest(f"init_image is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("init_image is not valid base64") from None
    return decode_image_bytes(raw)


def refuse_bombs() -> None:
    """Make Pillow's decompression-bomb *warning* (an image over ``Image.MAX_IMAGE_PIXELS``,
    below twice that) an error in this process, as its ``DecompressionBombError`` above:
    a server never decodes such an image, and a warning would let it through. Called by the
    server at startup (a process-wide warnings filter; not done by importing easel)."""
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@contextmanager
def _opened(raw: bytes) -> Iterator[Image.Image]:
    """The image, opened lazily (its header read, nothing decoded) and checked: a format
    easel takes and at most :data:`MAX_DECODED_PIXELS`; any problem is ``invalid_request``."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format not in ACCEPTED_FORMATS:
                raise InvalidRequest(
                    f"image format {image.format} is not accepted; send PNG, JPEG or WebP"
                )
            if image.width * image.height > MAX_DECODED_PIXELS:
                raise InvalidRequest(
                    f"image is {image.width}x{image.height}; the most accepted is "
                    f"{MAX_DECODED_PIXELS} pixels"
                )
            yield image
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(
            f"the image has more than {MAX_DECODED_PIXELS} pixels; send a smaller one"
        ) from None
    except UnidentifiedImageError:
        raise InvalidRequest("the data is not an image; send PNG, JPEG or WebP") from None
    except (OSError, SyntaxError, ValueError):
        raise InvalidRequest("the image is truncated or corrupt; send it again") from None


def image_size(raw: bytes) -> tuple[int, int]:
    """Width and height from the image's header, checked as :func:`decode_image_bytes`
    checks them, without decoding the pixels."""
    with _opened(raw) as image:
        return image.size


def decode_image_bytes(raw: bytes) -> Image.Image:
    with _opened(raw) as image:
        image.load()
        return image.convert("RGB")


def encode_png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
