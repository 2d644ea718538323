"""Inpainting a crop around the mask (diffusers' `padding_mask_crop`), then pasting it back.

With `mask_crop_padding = p` (as diffusers' `StableDiffusion3InpaintPipeline`):
1. the box: the tight bounding box of the mask's non-black pixels, grown by p on each side
   (within the image), then grown along its short side to the generation's aspect ratio
   (centred, shifted back inside the image);
2. the init image and the mask are cropped to the box and resized to the generation size with
   "fill" (scaled to fit, the uncovered border filled by stretching the edge rows/columns);
3. after decoding, the result is resized with "crop" (scaled to cover, centre-cropped) to the
   box, pasted into the original image at the box, and the original is composited over it with
   the inverted, unbinarized mask as alpha: pixels outside the mask are exactly the original's.
So a small mask on a large photo is repainted at full model resolution.
"""

from __future__ import annotations

import os
from typing import Tuple

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ..errors import InputError

Box = Tuple[int, int, int, int]


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> Box:
    """(x1, y1, x2, y2) as diffusers' `VaeImageProcessor.get_crop_region`."""
    m = np.asarray(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.nonzero(m.any(axis=0))[0], np.nonzero(m.any(axis=1))[0]
    if cols.size == 0:
        raise InputError("the mask is all black: nothing to repaint (white marks what to repaint)")
    x1, x2 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w)
    y1, y2 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, diff: int, size: int) -> Tuple[int, int]:
    a -= diff // 2
    b += diff - diff // 2
    if b >= size:
        a, b = a - (b - size), size
    if a < 0:
        a, b = 0, b - a
    return a, min(b, size)


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to fit inside width x height, centre, and fill the border from the edge pixels."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
    return res


def resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height and centre-crop."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


def _image_and_mask(image_path: str | os.PathLike, mask_path: str | os.PathLike, blur: float) -> Tuple[Image.Image, Image.Image]:
    """The image (RGB) and its mask (L) at the image's size, the mask blurred by `blur` — read the
    same way for the crop and for pasting the result back, so both see the same mask."""
    with Image.open(image_path) as im, Image.open(mask_path) as mk:
        image, mask = im.convert("RGB"), mk.convert("L")
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.LANCZOS)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return image, mask


def cropped_inputs(image_path: str | os.PathLike, mask_path: str | os.PathLike, width: int, height: int,
                   pad: int, blur: float = 0.0) -> Tuple[np.ndarray, np.ndarray, Box]:  # fmt: skip
    """(image (H, W, 3) in [0, 1], mask (H, W) in [0, 1], box) at the generation size; `blur`
    softens the mask first (as `mask_blur` does without the crop)."""
    image, mask = _image_and_mask(image_path, mask_path, blur)
    box = crop_region(mask, width, height, pad)
    img = np.asarray(resize_fill(image.crop(box), width, height), dtype=np.float32) / 255.0
    m = np.asarray(resize_fill(mask.crop(box), width, height).convert("L"), dtype=np.float32) / 255.0
    return img, m, box


def paste_back(generated: Image.Image, image_path: str | os.PathLike, mask_path: str | os.PathLike, box: Box,
               blur: float = 0.0) -> Image.Image:  # fmt: skip
    """diffusers' `apply_overlay`: the crop's result in place, the original outside the mask
    (the mask blurred as for the crop, so soft edges blend)."""
    original, mask = _image_and_mask(image_path, mask_path, blur)
    keep = Image.new("RGBa", original.size)
    keep.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    x1, y1, x2, y2 = box
    base = Image.new("RGBA", original.size)
    base.paste(resize_crop(generated, x2 - x1, y2 - y1), (x1, y1))
    out = base.convert("RGB").convert("RGBA")
    out.alpha_composite(keep.convert("RGBA"))
    return out.convert("RGB")
