"""The SD3 / SD3.5 16-channel VAE (AutoencoderKL), NHWC, pure MLX.

Module tree (our parameter names; see sd35_mlx/weights/tables/vae.py for the layouts):

    encoder.conv_in
    encoder.down.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,shortcut}   level i = resolution 1/2**i
    encoder.down.{i}.downsample.conv                                 all levels but the last
    encoder.mid.{resnet1,attention,resnet2}
    encoder.norm_out, encoder.conv_out
    decoder.conv_in, decoder.mid, decoder.norm_out, decoder.conv_out
    decoder.up.{i}.resnets.{j}, decoder.up.{i}.upsample.conv          level i as in the encoder

Decoder levels share the encoder's numbering (level 0 = full resolution, run last), which is
Stability's `up.{i}` order and the reverse of diffusers' `up_blocks`.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..backend import KERNELS, on_cpu
from ..config import VAEConfig
from ..errors import InputError, SD35Error

LOGVAR_RANGE = (-30.0, 20.0)


# Compile GroupNorm (+ SiLU) on GPUs (switch: backend.KERNELS.group_norm): the fp32 statistics
# and the affine/SiLU tail are a dozen memory passes over the decoder's largest tensors
# unfused. Not on CPU, where the compiled graph holds more memory at once (measured) and is
# not faster.


# Up to this many positions the statistics are reduced in two stages (SMALL_CHUNKS partial
# means first): one reduction over all positions leaves too few outputs to fill a GPU (H100,
# 128² x 512: 0.63 -> 0.31 ms); above it the single reduction is faster.
SMALL_POSITIONS = 128 * 128
SMALL_CHUNKS = 16


def _group_stats_mean(xg: mx.array) -> mx.array:
    """Mean over positions (axis 1) and channels within a group (axis 3) of (B, P, G, C/G)."""
    b, p, g, cg = xg.shape
    if p <= SMALL_POSITIONS and p % SMALL_CHUNKS == 0 and p >= 4 * SMALL_CHUNKS:
        partial = xg.reshape(b, SMALL_CHUNKS, p // SMALL_CHUNKS, g, cg).mean(axis=2)  # equal chunks: exact
        return partial.mean(axis=(1, 3), keepdims=True)
    # Two single-axis reductions: one reduction over axes (1, 3) together hits a slow
    # strided kernel on CUDA (103 ms vs 0.25 ms for a 512²x256 tensor on an H100).
    return xg.mean(axis=1, keepdims=True).mean(axis=3, keepdims=True)


def group_norm(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float, silu: bool) -> mx.array:
    """PyTorch-ordered GroupNorm of NHWC `x` in fp32, optionally followed by SiLU."""
    b, h, w, c = x.shape
    xg = x.astype(mx.float32).reshape(b, h * w, groups, c // groups)
    mean = _group_stats_mean(xg)
    d = xg - mean
    var = _group_stats_mean(mx.square(d))
    y = (d * mx.rsqrt(var + eps)).reshape(b, h, w, c)
    y = y * weight.astype(mx.float32) + bias.astype(mx.float32)
    if silu:
        y = y.astype(x.dtype).astype(mx.float32)  # SiLU of the rounded norm, as the unfused modules
        y = y * mx.sigmoid(y)
    return y.astype(x.dtype)


@functools.cache
def _compiled_group_norm(groups: int, eps: float, silu: bool):
    return mx.compile(functools.partial(group_norm, groups=groups, eps=eps, silu=silu))


def fused_group_norm(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float, silu: bool) -> mx.array:
    """`group_norm` as one compiled function per (groups, eps, silu)."""
    return _compiled_group_norm(groups, eps, silu)(x, weight, bias)


class GroupNorm(nn.Module):
    """PyTorch-ordered GroupNorm (channels split into contiguous groups), computed in fp32.

    Statistics over H*W*C/groups values in bf16 lose too much precision, so the input is
    upcast; the result comes back in the input's dtype. `silu=True` applies SiLU after it.
    """

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__()
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels not divisible by {groups} groups")
        self.groups = groups
        self.eps = eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array, silu: bool = False, fused: Optional[bool] = None) -> mx.array:
        """fused: compile (default: on GPUs, unless backend.KERNELS.group_norm is off)."""
        if fused is None:
            fused = KERNELS.group_norm and not on_cpu()
        norm = fused_group_norm if fused else group_norm
        return norm(x, self.weight, self.bias, self.groups, self.eps, silu)


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))); a 1x1 shortcut when channels change."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(groups, cout, eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.shortcut = nn.Linear(cin, cout)  # a 1x1 conv on channels-last data

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        if "shortcut" in self:
            x = self.shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions (mid block only), residual."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = self.norm(x).reshape(b, 1, h * w, c)
        y = mx.fast.scaled_dot_product_attention(
            self.q(y), self.k(y), self.v(y), scale=c**-0.5
        )
        return x + self.out(y).reshape(b, h, w, c)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.resnet1 = ResnetBlock(channels, channels, groups, eps)
        self.attention = Attention(channels, groups, eps)
        self.resnet2 = ResnetBlock(channels, channels, groups, eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self.resnet2(self.attention(self.resnet1(x)))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv (halves even sides)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return self.conv(x.reshape(b, 2 * h, 2 * w, c))


class Level(nn.Module):
    """The resnets of one resolution level, plus its resampler (absent where there is none)."""

    def __init__(self, channels_in: int, channels: int, n_resnets: int, cfg: VAEConfig,
                 resample: Optional[str]):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = [
            ResnetBlock(channels_in if j == 0 else channels, channels, g, eps)
            for j in range(n_resnets)
        ]
        if resample == "down":
            self.downsample = Downsample(channels)
        elif resample == "up":
            self.upsample = Upsample(channels)

    def __call__(self, x: mx.array) -> mx.array:
        for r in self.resnets:
            x = r(x)
        if "downsample" in self:
            x = self.downsample(x)
        if "upsample" in self:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = [
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg,
                  "down" if i < n - 1 else None)
            for i in range(n)
        ]  # fmt: skip
        self.mid = MidBlock(ch[-1], cfg.norm_num_groups, cfg.norm_eps)
        self.norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(self.norm_out(x, silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], cfg.norm_num_groups, cfg.norm_eps)
        # level i receives the channels of level i+1 (the one run before it)
        self.up = [
            Level(ch[min(i + 1, n - 1)], ch[i], cfg.layers_per_block + 1, cfg,
                  "up" if i > 0 else None)
            for i in range(n)
        ]  # fmt: skip
        self.norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(self.norm_out(x, silu=True))


class VAE(nn.Module):
    """AutoencoderKL with SD3 latent scaling. Images are NHWC in [-1, 1]; latents NHWC.

    `with_encoder=False` builds the decoder only (text-to-image needs nothing else).
    """

    def __init__(self, config: VAEConfig, with_encoder: bool = True):
        super().__init__()
        self.config = config
        if with_encoder:
            self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def has_encoder(self) -> bool:
        return "encoder" in self

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD3)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    def drop_encoder(self) -> None:
        """Free the encoder's weights (e.g. after img2img encoding is done)."""
        if self.has_encoder:
            del self["encoder"]

    def encode(self, images: mx.array) -> Tuple[mx.array, mx.array]:
        """(B, H, W, C) images in [-1, 1] -> (mean, logvar), each (B, H/8, W/8, latent)."""
        if not self.has_encoder:
            raise SD35Error(
                "this VAE has no encoder (decoder-only weights, or drop_encoder() was "
                "called); load the full VAE to encode images"
            )
        _check_nhwc(images, self.config.in_channels, "images")
        moments = self.encoder(images.astype(self.encoder.conv_in.weight.dtype))
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: mx.array) -> mx.array:
        """(B, h, w, latent) unscaled VAE latents -> (B, 8h, 8w, C) images, about [-1, 1].

        Takes what `encode` gives (use `from_latents` first on diffusion-model latents);
        the result is in the weights' dtype.
        """
        _check_nhwc(z, self.config.latent_channels, "latents")
        return self.decoder(z.astype(self.dtype))

    @staticmethod
    def sample(mean: mx.array, logvar: mx.array, key: Optional[mx.array] = None) -> mx.array:
        """A draw from the posterior N(mean, exp(logvar))."""
        noise = mx.random.normal(mean.shape, dtype=mean.dtype, key=key)
        return mean + mx.exp(0.5 * logvar) * noise

    def to_latents(self, z: mx.array) -> mx.array:
        """VAE space -> diffusion-model space: (z - shift) * scale."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_latents(self, latents: mx.array) -> mx.array:
        """Diffusion-model space -> VAE space: latents / scale + shift."""
        return latents / self.config.scaling_factor + self.config.shift_factor


def _check_nhwc(x: mx.array, channels: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise InputError(
            f"VAE {what} must be (batch, height, width, {channels}) channels-last; "
            f"got shape {tuple(x.shape)}"
        )


def count_parameters(module: nn.Module) -> int:
    """Number of scalars in a module's parameters (no evaluation needed)."""
    from mlx.utils import tree_flatten

    total = 0
    for _, p in tree_flatten(module.parameters()):
        n = 1
        for s in p.shape:
            n *= s
        total += n
    return total


__all__: List[str] = ["VAE", "Encoder", "Decoder", "GroupNorm", "count_parameters", "LOGVAR_RANGE"]
