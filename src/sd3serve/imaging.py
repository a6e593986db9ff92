"""Encoding generated images to the response formats: jpeg, png, webp, and base64."""

from __future__ import annotations

import base64
import io
from enum import StrEnum

from PIL import Image


class ImageFormat(StrEnum):
    jpeg = "jpeg"
    png = "png"
    webp = "webp"

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"


def encode_image(image: Image.Image, fmt: ImageFormat, quality: int) -> bytes:
    """The image's file bytes. Deterministic: the same pixels give the same bytes."""
    buf = io.BytesIO()
    if fmt is ImageFormat.jpeg:
        (image if image.mode == "RGB" else image.convert("RGB")).save(buf, format="JPEG", quality=quality)
    elif fmt is ImageFormat.webp:
        image.save(buf, format="WEBP", quality=quality, method=4)
    else:  # png ignores quality; compress_level trades size for speed on large images
        image.save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
