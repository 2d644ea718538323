"""Tiled VAE decode/encode: bounded memory for large images.

The image is cut into overlapping tiles that are decoded (encoded) one at a time and blended
with cosine ramps across each overlap, so the weights of neighbouring tiles sum to one and
no seam shows. Peak memory follows the tile size; only the small output accumulator (3
channels for decode, 2x16 at 1/8 size for encode) grows with the image.

The VAE's GroupNorms and mid-block attention are global, so a tiled result is close to, not
equal to, the untiled one (each tile sees only its own statistics and context).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..backend import on_cpu
from ..config import SD3_VAE, VAEConfig
from ..errors import InputError
from .vae import VAE

DEFAULT_DECODE_TILE = 64  # latents (512 pixels)
DEFAULT_DECODE_OVERLAP = 16  # latents (128 pixels)
DEFAULT_ENCODE_TILE = 512  # pixels
DEFAULT_ENCODE_OVERLAP = 128  # pixels


def tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Starts of tiles of length `tile` covering [0, size) with overlaps of at least `overlap`.

    Tiles are spread evenly, so every overlap is about the same and the last one ends at `size`.
    """
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / (tile - overlap)) + 1
    return [round(k * (size - tile) / (n - 1)) for k in range(n)]


def _axis_weights(starts: Sequence[int], length: int, size: int, scale: int) -> List[mx.array]:
    """Per tile, a 1-D weight over its `length*scale` output samples.

    Across the overlap of tiles k and k+1, k ramps down as cos^2 and k+1 up as sin^2 of the
    same angle, so their sum is exactly 1. Samples at a tile's outer edge (hurt most by the
    convs' zero padding) get the least weight.
    """
    weights = []
    n_out = min(length, size) * scale
    for k, s in enumerate(starts):
        w = mx.ones((n_out,), dtype=mx.float32)
        pos = mx.arange(n_out, dtype=mx.float32)
        if k > 0:
            o = (starts[k - 1] + length - s) * scale  # overlap with the previous tile
            ramp = mx.sin(0.5 * math.pi * (pos + 0.5) / o) ** 2
            w = w * mx.where(pos < o, ramp, 1.0)
        if k + 1 < len(starts):
            o = (s + length - starts[k + 1]) * scale  # overlap with the next tile
            tail = pos - (n_out - o)
            ramp = mx.cos(0.5 * math.pi * (tail + 0.5) / o) ** 2
            w = w * mx.where(tail >= 0, ramp, 1.0)
        weights.append(w)
    return weights


def _check_tiling(tile: int, overlap: int, what: str) -> None:
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise InputError(f"{what}: need tile > overlap >= 0, got tile={tile}, overlap={overlap}")


def _blend_tiles(
    inputs: mx.array,
    run: Callable[[mx.array], Tuple[mx.array, ...]],
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
    out_channels: Sequence[int],
) -> Tuple[mx.array, ...]:
    """Run `run` on overlapping tiles of `inputs` and blend its outputs (fp32).

    Tiles are laid out on the latent grid (`tile`, `overlap` in latents); one latent is
    `in_scale` input samples and `out_scale` output samples along each side.
    """
    b = inputs.shape[0]
    h, w = inputs.shape[1] // in_scale, inputs.shape[2] // in_scale
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    wy = _axis_weights(rows, tile, h, out_scale)
    wx = _axis_weights(cols, tile, w, out_scale)
    accs = [mx.zeros((b, h * out_scale, w * out_scale, c), dtype=mx.float32) for c in out_channels]
    # the weights are separable and the tiles a grid, so the total weight is separable too
    sum_y = mx.zeros((h * out_scale,), dtype=mx.float32)
    sum_x = mx.zeros((w * out_scale,), dtype=mx.float32)
    for r, y in zip(wy, rows):
        sum_y[y * out_scale:(y + th) * out_scale] += r
    for c, x in zip(wx, cols):
        sum_x[x * out_scale:(x + tw) * out_scale] += c
    for i, y in enumerate(rows):
        for j, x in enumerate(cols):
            window = inputs[:, y * in_scale:(y + th) * in_scale, x * in_scale:(x + tw) * in_scale]
            outs = run(window)
            w2d = (wy[i][:, None] * wx[j][None, :])[None, :, :, None]
            ys = slice(y * out_scale, (y + th) * out_scale)
            xs = slice(x * out_scale, (x + tw) * out_scale)
            for acc, out in zip(accs, outs):
                acc[:, ys, xs, :] += out.astype(mx.float32) * w2d
            mx.eval(accs)  # one tile at a time: its activations are freed before the next
    total = (sum_y[:, None] * sum_x[None, :])[None, :, :, None]
    return tuple(acc / total for acc in accs)


def decode_tiled(
    vae: VAE,
    latents: mx.array,
    tile: int = DEFAULT_DECODE_TILE,
    overlap: int = DEFAULT_DECODE_OVERLAP,
) -> mx.array:
    """`vae.decode` in overlapping tiles of `tile` latents (overlap in latents too).

    Falls back to the plain call when the latents fit in one tile. Same input and output as
    `vae.decode` (unscaled VAE latents in, images in the weights' dtype out).
    """
    _check_tiling(tile, overlap, "decode_tiled")
    if latents.ndim != 4:
        raise InputError(f"decode_tiled: latents must be (B, h, w, C), got {tuple(latents.shape)}")
    _, h, w, _ = latents.shape
    if h <= tile and w <= tile:
        return vae.decode(latents)
    (images,) = _blend_tiles(
        latents, lambda z: (vae.decode(z),), tile, overlap, 1, vae.downscale,
        [vae.config.in_channels],
    )  # fmt: skip
    return images.astype(vae.dtype)


def encode_tiled(
    vae: VAE,
    images: mx.array,
    tile: int = DEFAULT_ENCODE_TILE,
    overlap: int = DEFAULT_ENCODE_OVERLAP,
) -> Tuple[mx.array, mx.array]:
    """`vae.encode` in overlapping tiles of `tile` pixels; returns blended (mean, logvar).

    `tile`, `overlap` and the image sides must be multiples of the VAE's downscale (8) so the
    tiles fall on the latent grid. Falls back to the plain call when the image fits in a tile.
    """
    _check_tiling(tile, overlap, "encode_tiled")
    if images.ndim != 4:
        raise InputError(f"encode_tiled: images must be (B, H, W, C), got {tuple(images.shape)}")
    _, h, w, _ = images.shape
    if h <= tile and w <= tile:
        return vae.encode(images)
    f = vae.downscale
    if tile % f or overlap % f or h % f or w % f:
        raise InputError(
            f"encode_tiled: tile ({tile}), overlap ({overlap}) and image size ({h}x{w}) must be "
            f"multiples of {f}"
        )
    lat = vae.config.latent_channels
    mean, logvar = _blend_tiles(images, vae.encode, tile // f, overlap // f, f, 1, [lat, lat])
    return mean.astype(vae.dtype), logvar.astype(vae.dtype)


def encode_mean(vae: VAE, images: mx.array, tile: Optional[int] = None) -> mx.array:
    """The encode's mean (the deterministic latents): whole, or in `tile`-pixel tiles with a
    quarter-tile overlap when a memory plan tiles the VAE."""
    if tile is None:
        return vae.encode(images)[0]
    return encode_tiled(vae, images, tile=tile, overlap=tile // 4)[0]


# ---- memory estimate (for a memory planner) ----
# Bytes per (output pixel x C1 channel) of an untiled decode's conv activations, C1 being
# block_out_channels[1] (256 for SD3: the full-resolution upsampler and the first level-0
# resnet read that many channels at full resolution; every other stage is smaller).
# CPU: measured 123-126 for fp32 and bf16 (two widths, three sizes), +15% margin
# (tests/test_vae_tiling.py checks that it bounds the measured peak). MLX's CPU conv
# unfolds its input 9x in fp32 whatever the weights' dtype.
# GPU: measured on an H100 (MLX 0.32.4 CUDA, bf16): 17 for an untiled 1024² decode and 40
# for one 512² tile (benchmarks/bench_memory.py); the larger one +10%, scaled with the
# dtype. Apple silicon is not measured yet.
CONV_BYTES_CPU = 144.0
# The same per (pixel x C0 channel) for an untiled encode, C0 = block_out_channels[0] (the
# encoder's full-resolution width, 128 for SD3). CPU: measured 143-159 (fp32 / bf16, three
# sizes; tests/test_vae_tiling.py), +15%. GPU: 25.5 measured in bf16 on an H200 (1024², the
# control image's encode in benchmarks/bench_memory.py: 3.42 GB above the encoder's weights),
# +15%, per 16-bit byte.
ENCODE_CONV_BYTES_CPU = 184.0


def _encode_conv_bytes_gpu(dtype_bytes: int) -> float:
    return 14.7 * dtype_bytes


def _conv_bytes_gpu(dtype_bytes: int) -> float:
    return 20.0 * dtype_bytes + 4.0


def decode_activation_bytes(
    height: int,
    width: int,
    config: VAEConfig = SD3_VAE,
    dtype_bytes: int = 2,
    batch: int = 1,
    device: Optional[mx.Device] = None,
) -> int:
    """Estimated peak activation memory of one untiled `vae.decode` to height x width pixels.

        convs     = batch * H * W * C1 * k          k = CONV_BYTES_CPU (144) on CPU,
                                                     20 * dtype_bytes + 4 (44 bf16) on GPU
        attention = 2 * batch * N^2 * dtype_bytes    N = (H/8) * (W/8): the mid block's
                                                     single-head N x N score matrix, x2 margin
        estimate  = max(convs, attention)           (they peak at different stages)

    SD3 at 1024x1024 in bf16: convs 1M px * 256 * 44 = 11.8 GB on GPU (39 GB on CPU),
    attention 2 * 16384^2 * 2 = 1.1 GB. Weights are not included.
    """
    c1 = config.block_out_channels[min(1, len(config.block_out_channels) - 1)]
    return _activation_bytes(height, width, config, c1, CONV_BYTES_CPU, _conv_bytes_gpu(dtype_bytes), dtype_bytes,
                             batch, device)  # fmt: skip


def encode_activation_bytes(height: int, width: int, config: VAEConfig = SD3_VAE, dtype_bytes: int = 2,
                            device: Optional[mx.Device] = None) -> int:  # fmt: skip
    """Estimated peak activation memory of one untiled `vae.encode` of one height x width image.

    The decode's model with the encoder's full-resolution width C0 = block_out_channels[0]
    (128 for SD3; the encoder's widest tensors are its first level's, where the decoder's are
    C1 wide) and ENCODE_CONV_BYTES_CPU (184) on CPU, 14.7 per 16-bit byte on GPU (see above).
    The mid block's attention is the same. SD3 at 1024x1024 in bf16: convs 1M px * 128 * 29.4
    = 3.9 GB on GPU.
    Weights are not included.
    """
    c0 = config.block_out_channels[0]
    return _activation_bytes(height, width, config, c0, ENCODE_CONV_BYTES_CPU, _encode_conv_bytes_gpu(dtype_bytes),
                             dtype_bytes, 1, device)  # fmt: skip


def _activation_bytes(height: int, width: int, config: VAEConfig, channels: int, k_cpu: float, k_gpu: float,
                      dtype_bytes: int, batch: int, device: Optional[mx.Device]) -> int:  # fmt: skip
    """max(convs, attention) of an untiled pass whose widest full-resolution tensors have `channels`."""
    device = device or mx.default_device()
    k = k_cpu if on_cpu(device) else k_gpu
    f = 2 ** (len(config.block_out_channels) - 1)
    convs = k * batch * height * width * channels
    n = (height // f) * (width // f)
    attention = 2.0 * batch * n * n * dtype_bytes
    return int(max(convs, attention))


def should_tile(
    height: int,
    width: int,
    budget_bytes: int,
    config: VAEConfig = SD3_VAE,
    dtype_bytes: int = 2,
    batch: int = 1,
    device: Optional[mx.Device] = None,
) -> bool:
    """Whether an untiled decode to height x width pixels would exceed `budget_bytes`."""
    need = decode_activation_bytes(height, width, config, dtype_bytes, batch, device)
    return need > budget_bytes


def decode_tile_for_budget(
    budget_bytes: int,
    config: VAEConfig = SD3_VAE,
    dtype_bytes: int = 2,
    batch: int = 1,
    device: Optional[mx.Device] = None,
    minimum: int = 16,
) -> int:
    """The largest square decode tile (latents, a multiple of 8, >= `minimum`) within budget."""
    f = 2 ** (len(config.block_out_channels) - 1)
    tile = minimum
    while decode_activation_bytes(
        (tile + 8) * f, (tile + 8) * f, config, dtype_bytes, batch, device
    ) <= budget_bytes and tile < 1024:
        tile += 8
    return tile
