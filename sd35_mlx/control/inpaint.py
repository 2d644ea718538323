"""Inpainting: masks, the latent-space blend, and the inpainting ControlNet's control.

Masks (white = repaint) are read as diffusers' mask processor does: grayscale, resized to
the generation size with LANCZOS, [0, 1], binarized at 0.5 (≥ 0.5 → repaint). Defined
behaviour for odd masks:
- grey values are binarized at 0.5 (as diffusers); soften edges with `mask_blur` (a Gaussian
  blur of the mask before binarization, Pillow's GaussianBlur as diffusers' `blur` helper),
- a mask whose size differs from the init image's is resized with a warning when the aspect
  ratios agree (within 1 %), and refused when they do not (it could not line up),
- an all-black mask (nothing to repaint) is refused.

`StableDiffusion3InpaintPipeline` (16-channel transformer): after every step the known
region is put back: latents = (1 − m)·x̃ + m·latents with x̃ = σ_{i+1}·noise + (1 − σ_{i+1})·z₀
(the same initial noise) and x̃ = z₀ after the last step; m is the mask at latent size
(nearest: every 8th pixel).

`StableDiffusion3ControlNetInpaintingPipeline` (Alimama's 17-channel ControlNet): the control
is [VAE((image with the hole set to −1)) shifted and scaled, 1 − m]; no latent blend.
"""

from __future__ import annotations

import logging
import os
from typing import Tuple

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter

from ..errors import InputError
from .image import read_image

log = logging.getLogger(__name__)
ASPECT_TOLERANCE = 0.01


def _size_of(path: str | os.PathLike, what: str) -> Tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except Exception as e:
        raise InputError(f"cannot read {what} {path}: {e}") from e


def check_mask_size(mask_path: str | os.PathLike, image_path: str | os.PathLike) -> None:
    """Warn (resize) or refuse a mask whose size is not the image's (module docstring)."""
    mw, mh = _size_of(mask_path, "mask")
    iw, ih = _size_of(image_path, "init image")
    if (mw, mh) == (iw, ih):
        return
    if abs(mw / mh - iw / ih) > ASPECT_TOLERANCE * (iw / ih):
        raise InputError(
            f"the mask is {mw}x{mh} but the init image is {iw}x{ih}: different aspect ratios, so "
            "the mask cannot line up with the image. Make the mask from the image (same size)."
        )
    log.warning("mask is %dx%d, init image %dx%d: the mask is resized to match", mw, mh, iw, ih)


def read_mask(path: str | os.PathLike, width: int, height: int, blur: float = 0.0) -> np.ndarray:
    """The binarized mask (H, W) float32 in {0, 1}, 1 = repaint."""
    if blur < 0 or not np.isfinite(blur):
        raise InputError(f"mask blur must be a radius ≥ 0 (got {blur})")
    if blur > 0:
        a = read_image(path, width, height, what="mask", mode="L")[..., 0]
        img = Image.fromarray(np.round(a * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
        a = np.asarray(img, dtype=np.float32) / 255.0
    else:
        a = read_image(path, width, height, what="mask", mode="L")[..., 0]
    return binarize_mask(a, path)


def binarize_mask(a: np.ndarray, path: str | os.PathLike = "the mask") -> np.ndarray:
    """[0, 1] (H, W) -> {0, 1} at 0.5; refuses an all-black mask."""
    grey = int(((a > 0) & (a < 1)).sum())
    if grey:
        log.info("mask has %d grey pixels: binarized at 0.5 (≥ 0.5 repaints)", grey)
    m = (a >= 0.5).astype(np.float32)
    if not m.any():
        raise InputError(f"the mask {path} is all black: nothing to repaint (white marks what to repaint)")
    return m


def latent_mask(mask: np.ndarray, factor: int = 8) -> mx.array:
    """(H, W) pixel mask -> (1, H/8, W/8, 1) as torch's nearest interpolation picks it."""
    return mx.array(mask[::factor, ::factor].copy())[None, :, :, None]


def blend_known(latents: mx.array, image_latents: mx.array, noise: mx.array, mask: mx.array, sigma_next: float) -> mx.array:
    """Put the known region back after a step: x̃ = σ·noise + (1 − σ)·z₀ outside the mask."""
    known = image_latents if sigma_next == 0.0 else sigma_next * noise + (1.0 - sigma_next) * image_latents
    return (1.0 - mask) * known + mask * latents


def masked_pixels(image: mx.array, mask: np.ndarray, fill: float) -> mx.array:
    """(1, H, W, 3) image in [−1, 1] with the region to repaint set to `fill`."""
    keep = mx.array(mask < 0.5)[None, :, :, None]
    return mx.where(keep, image, mx.array(fill, dtype=image.dtype))
