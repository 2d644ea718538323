"""Control images into control latents, as the reference pipelines prepare them.

1. The file is read as RGB and resized to the generation size with LANCZOS (diffusers'
   `VaeImageProcessor.preprocess`, Stability's `Image.resize(…, LANCZOS)`): a ∈ [0, 1].
2. VAE input: 2a − 1, except canny maps for Stability's SD3.5 Large ControlNets, which
   Stability encodes as 127.5·a + 0.5 (`sd3_infer.py vae_encode`; the HF card's
   `SD3CannyImageProcessor` agrees) — diffusers' plain pipeline would use 2a − 1.
3. VAE encode, the posterior mean (the references sample it; the mean is their expectation
   and makes a run reproducible), then (z − 0.0609)·1.5305, or z·1.5305 for ControlNets
   trained without the shift (InstantX: `force_zeros_for_pooled_projection`).
The inpainting ControlNet's control is built in `sd35_mlx.control.inpaint`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from PIL import Image

from ..errors import InputError


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_image(path: str | os.PathLike, width: int, height: int, *, what: str, mode: str = "RGB") -> np.ndarray:
    """An image file resized (LANCZOS) to width x height, as float32 in [0, 1] (H, W, channels)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        with Image.open(path) as img:
            img = img.convert(mode)
    except Exception as e:
        raise InputError(f"cannot read {what} {path}: {e}") from e
    if img.size != (width, height):
        img = img.resize((width, height), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr if arr.ndim == 3 else arr[..., None]


def vae_input(a: np.ndarray, *, stability_canny: bool) -> mx.array:
    """[0, 1] (H, W, 3) -> the VAE input (1, H, W, 3) for a ControlNet (see module docstring)."""
    x = a * 127.5 + 0.5 if stability_canny else 2.0 * a - 1.0
    return mx.array(x.astype(np.float32))[None]


def encode_control(vae, pixels: mx.array, *, shift: bool, dtype: mx.Dtype, tile: Optional[int] = None) -> mx.array:
    """VAE-encoded control latents (1, h, w, 16), float32; `tile`: the pipeline's encode tile."""
    from ..models.vae_tiling import encode_mean

    mean = encode_mean(vae, pixels.astype(dtype), tile)
    z = mean.astype(mx.float32)
    return vae.to_latents(z) if shift else z * vae.config.scaling_factor
