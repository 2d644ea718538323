"""Images uploaded to /v1/images/edits: decoded, bounded, and written where only the server looks.

The pipeline reads its init image from a file, so an upload is re-encoded as a PNG under the
server's private temporary folder (a random name, removed when the job ends). The client's file
name is never used as a path; only its last component goes into the PNG metadata.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Tuple

from PIL import Image

from .errors import RequestError

MAX_UPLOAD_PIXELS = 8192 * 8192  # far above any SD3 size; PIL decodes lazily, so this is checked first
FORMATS = ("PNG", "JPEG", "WEBP")


def decode_upload(data: bytes, param: str, mode: str = "RGB") -> Image.Image:
    """An uploaded PNG / JPEG / WebP in `mode` (RGB; a mask: L), or a 400 that says what is wrong."""
    if not data:
        raise RequestError(f"{param} is empty", param=param, code="invalid_image")
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in FORMATS:
            raise RequestError(f"{param} must be a PNG, JPEG or WebP image (got {img.format})", param=param,
                               code="invalid_image_format")  # fmt: skip
        if img.width * img.height > MAX_UPLOAD_PIXELS:
            raise RequestError(f"{param} is {img.width}x{img.height}; at most {MAX_UPLOAD_PIXELS:,} pixels are accepted",
                               param=param, code="invalid_image")  # fmt: skip
        return img.convert(mode)
    except RequestError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"{param} is not a readable image ({e})", param=param, code="invalid_image") from None


def write_private_png(img: Image.Image, folder: Path) -> Path:
    fd, name = tempfile.mkstemp(suffix=".png", dir=folder)
    with os.fdopen(fd, "wb") as f:
        img.save(f, format="PNG")
    return Path(name)


def display_name(filename: str | None) -> str:
    """The last component of a client's file name, tamed, for the metadata only."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = re.sub(r"[^\w.\- ]", "_", base)[:100].strip(". ")
    return base or "upload.png"


def size_for(img: Image.Image) -> Tuple[int, int]:
    """The edit's default size: the image's, rounded down to multiples of 16."""
    return max(16, img.width // 16 * 16), max(16, img.height // 16 * 16)
