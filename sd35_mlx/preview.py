"""Cheap step previews: a linear map from the 16 latent channels to RGB.

The map is measured from the model's own VAE (one tiny decode per channel), so it fits
any fine-tune; a preview then costs a matrix product instead of a VAE decode.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from PIL import Image


def calibrate(vae, size: int = 4) -> mx.array:
    """(17, 3): RGB response to each latent channel (rows 0–15) and the bias (row 16)."""
    channels = vae.config.latent_channels if hasattr(vae, "config") else 16
    basis = mx.concatenate([mx.eye(channels), mx.zeros((1, channels))], axis=0)  # (17, C)
    z = mx.broadcast_to(basis[:, None, None, :], (channels + 1, size, size, channels))
    dtype = next(iter(v.dtype for _, v in _flat(vae) if mx.issubdtype(v.dtype, mx.floating)), mx.float32)
    rgb = vae.decode(vae.from_latents(z).astype(dtype)).astype(mx.float32).mean(axis=(1, 2))  # (17, 3)
    bias = rgb[-1]
    return mx.concatenate([rgb[:-1] - bias, bias[None]], axis=0)


def latents_to_preview(latents: mx.array, projection: mx.array, upscale: int = 8) -> Image.Image:
    """First image of (B, h, w, 16) latents as a PIL preview of (h·upscale, w·upscale)."""
    rgb = latents[0].astype(mx.float32) @ projection[:-1] + projection[-1]
    arr = np.array(mx.clip(rgb / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.resize((img.width * upscale, img.height * upscale), Image.NEAREST) if upscale > 1 else img


def _flat(module):
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())
