"""Images in and out: decode what clients send, checked by content, never by name."""

from __future__ import annotations

import base64
import binascii
import io

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


def decode_image_bytes(raw: bytes) -> Image.Image:
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
            image.load()
            return image.convert("RGB")
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:
        raise InvalidRequest(
            f"the image has more than {MAX_DECODED_PIXELS} pixels; send a smaller one"
        ) from None
    except UnidentifiedImageError:
        raise InvalidRequest("the data is not an image; send PNG, JPEG or WebP") from None
    except (OSError, SyntaxError, ValueError):
        raise InvalidRequest("the image is truncated or corrupt; send it again") from None


def encode_png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
