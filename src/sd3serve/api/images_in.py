"""Images that requests send in: base64 or an http(s) URL, checked before any of it is decoded.

Every problem is an InvalidRequest (400) that names the field: a URL that is not http(s) or resolves to a private
address (the webhook guard, ``webhook_delivery.target_problem``), a download over the byte limit or too slow, a
file that is not PNG, JPEG or WebP, a header that declares more pixels or a longer side than allowed (checked
before decoding: a decompression bomb is refused from its header), and a truncated or corrupt file.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from urllib.parse import urljoin

import httpx
import numpy as np
from PIL import Image, ImageOps

from sd3serve.blocking import run_blocking
from sd3serve.errors import InvalidRequest
from sd3serve.service import InitImage
from sd3serve.service.webhook_delivery import target_problem
from sd3serve.settings import Settings

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_REDIRECTS = 3
_DATA_URL = re.compile(r"^data:image/[a-z+.-]+;base64,", re.IGNORECASE)


def _limit_text(settings: Settings) -> str:
    return (f"at most {settings.max_image_bytes} bytes, {settings.max_image_pixels} pixels and "
            f"{settings.max_image_side} pixels a side")  # fmt: skip


def decode_base64(text: str, *, field: str, settings: Settings) -> bytes:
    """The bytes of a base64 image (a ``data:image/...;base64,`` prefix is allowed)."""
    text = _DATA_URL.sub("", text.strip(), count=1)
    if len(text) > (settings.max_image_bytes + 2) // 3 * 4 + 4:
        raise InvalidRequest(f"{field}: the image is too large; allowed: {_limit_text(settings)}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field}: not valid base64, nor an http(s) URL") from None
    if len(data) > settings.max_image_bytes:
        raise InvalidRequest(f"{field}: the image is too large; allowed: {_limit_text(settings)}")
    return data


async def fetch(url: str, *, field: str, settings: Settings) -> bytes:
    """The bytes at an http(s) URL that resolves to public addresses (each redirect checked again), up to the
    byte limit, within ``image_fetch_timeout_s``."""
    timeout = httpx.Timeout(settings.image_fetch_timeout_s)
    async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
        for _ in range(MAX_REDIRECTS + 1):
            problem = await run_blocking(target_problem, url, allow_private=settings.webhook_allow_private)
            if problem is not None:
                raise InvalidRequest(problem.replace("webhook_url", field, 1).replace(
                    "SD3SERVE_WEBHOOK_ALLOW_PRIVATE=true to allow private targets",
                    "SD3SERVE_WEBHOOK_ALLOW_PRIVATE=true to allow private addresses"))  # fmt: skip
            try:
                async with client.stream("GET", url, headers={"user-agent": "sd3serve"}) as r:
                    if r.is_redirect and "location" in r.headers:
                        url = urljoin(url, r.headers["location"])
                        continue
                    if r.status_code != 200:
                        raise InvalidRequest(f"{field}: fetching the image answered HTTP {r.status_code}")
                    declared = r.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > settings.max_image_bytes:
                        raise InvalidRequest(f"{field}: the image is too large; allowed: {_limit_text(settings)}")
                    chunks, size = [], 0
                    async for chunk in r.aiter_bytes():
                        size += len(chunk)
                        if size > settings.max_image_bytes:
                            raise InvalidRequest(f"{field}: the image is too large; allowed: {_limit_text(settings)}")
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.HTTPError as e:
                raise InvalidRequest(f"{field}: could not fetch the image ({type(e).__name__})") from None
        raise InvalidRequest(f"{field}: more than {MAX_REDIRECTS} redirects")


def decode_image(data: bytes, *, field: str, settings: Settings) -> Image.Image:
    """An RGB image from PNG, JPEG or WebP bytes within the limits (EXIF orientation applied; alpha on white)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(f"{field}: the image declares too many pixels; allowed: {_limit_text(settings)}") from None
    except Image.UnidentifiedImageError:
        raise InvalidRequest(f"{field}: not a PNG, JPEG or WebP image") from None
    except (OSError, SyntaxError, ValueError):
        raise InvalidRequest(f"{field}: the image file is corrupt") from None
    w, h = opened.size
    if w < 1 or h < 1 or w * h > settings.max_image_pixels or max(w, h) > settings.max_image_side:
        raise InvalidRequest(f"{field}: the image is {w}x{h}, too many pixels; allowed: {_limit_text(settings)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(f"{field}: the image file is truncated or corrupt") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image.convert("RGB")


def resized(image: Image.Image, width: int, height: int) -> InitImage:
    """The image scaled to exactly width x height (Lanczos), as the engine takes it."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return InitImage.from_array(np.asarray(image, dtype=np.uint8))


async def load_image(value: str, *, field: str, settings: Settings) -> Image.Image:
    """The decoded image of a request field: an http(s) URL is fetched, anything else read as base64."""
    if re.match(r"^https?://", value.strip(), re.IGNORECASE):
        data = await fetch(value.strip(), field=field, settings=settings)
    else:
        data = decode_base64(value, field=field, settings=settings)
    return await run_blocking(decode_image, data, field=field, settings=settings)
