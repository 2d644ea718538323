"""The SD3 / SD3.5 MMDiT (and MMDiT-X) denoiser, channels-last.

    model = MMDiT(SD35_MEDIUM_MMDIT)
    v = model(latents, timestep, context, pooled)      # velocity, (B, H/8, W/8, 16)

The forward is split so that the conditioning can be precomputed for a whole schedule:

    c = model.conditioning(timestep, pooled)           # (B, H) = t_emb + y_emb
    mods = model.modulations(c)                        # every block's adaLN chunks + final
    v = model.forward_with_modulations(latents, context, mods, skip_layers)

Nothing here synchronises with the host: shape checks use static shapes only.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..config import MMDiTConfig
from ..errors import InputError
from .mmdit_blocks import Chunks, JointBlock, ada_chunks, layer_norm, modulate

TIMESTEP_DIM = 256
BlockModulation = Tuple[Chunks, Chunks]
Modulations = Tuple[Tuple[BlockModulation, ...], Chunks]  # (per block, final layer)


def timestep_embedding(
    t: mx.array, dim: int = TIMESTEP_DIM, max_period: float = 10000.0
) -> mx.array:
    """[cos, sin] sinusoid of float timesteps (B,) -> (B, dim), always in float32.

    In bf16, values near 1000 are 4 apart and the high frequencies would be noise.
    """
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32).reshape(-1, 1) * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (timestep and pooled-text embedders)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.silu(self.fc1(x)))


class FinalLayer(nn.Module):
    """LayerNorm (no affine) -> modulate(shift, scale) -> Linear(H, p*p*C_out)."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.adaLN = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)

    def modulation(self, c: mx.array) -> Chunks:
        return ada_chunks(self.adaLN, c, 2)  # (shift, scale)

    def __call__(self, x: mx.array, modulation: Chunks) -> mx.array:
        shift, scale = modulation
        return self.linear(modulate(layer_norm(x), shift, scale))


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        h, p = config.hidden_size, config.patch_size
        self.x_embedder = nn.Conv2d(config.in_channels, h, kernel_size=p, stride=p)
        # The stored table (1, P*P, H) is loaded from the checkpoint and center-cropped.
        self.pos_embed = mx.zeros((1, config.pos_embed_max_size**2, h))
        self.t_embedder = MLPEmbedder(TIMESTEP_DIM, h)
        self.y_embedder = MLPEmbedder(config.pooled_dim, h)
        self.context_embedder = nn.Linear(config.context_dim, h)
        dual = set(config.dual_attention_layers)
        self.blocks = [
            JointBlock(
                h,
                config.num_heads,
                qk_norm=config.qk_norm,
                dual=i in dual,
                pre_only=i == config.depth - 1,
                mlp_ratio=config.mlp_ratio,
            )
            for i in range(config.depth)
        ]
        self.final_layer = FinalLayer(h, p, config.out_channels)

    @property
    def dtype(self) -> mx.Dtype:
        return self.x_embedder.weight.dtype

    # ---- conditioning (depends on timestep and pooled text only) ----
    def conditioning(self, timestep: mx.array, pooled: mx.array) -> mx.array:
        """c = t_emb + y_emb, (B, H). timestep: float σ·1000, shape (B,) or scalar."""
        if pooled.ndim != 2 or pooled.shape[-1] != self.config.pooled_dim:
            raise InputError(
                f"pooled must be (batch, {self.config.pooled_dim}); got {tuple(pooled.shape)}"
            )
        t = mx.array(timestep) if not isinstance(timestep, mx.array) else timestep
        t_freq = timestep_embedding(t).astype(self.t_embedder.fc1.weight.dtype)
        return self.t_embedder(t_freq) + self.y_embedder(pooled.astype(self.dtype))

    def modulations(self, c: mx.array) -> Modulations:
        """Every block's adaLN chunks and the final layer's (shift, scale) for c."""
        return tuple(b.modulation(c) for b in self.blocks), self.final_layer.modulation(c)

    # ---- token stream ----
    def cropped_pos_embed(self, grid_h: int, grid_w: int) -> mx.array:
        """Center crop of the stored (P, P) table to the patch grid -> (1, h*w, H)."""
        size = self.config.pos_embed_max_size
        if grid_h > size or grid_w > size:
            p = self.config.patch_size
            raise InputError(
                f"latent {grid_h * p}x{grid_w * p} is larger than this model's positional table "
                f"allows: the largest latent side is {size * p} (an image side of {size * p * 8} "
                "pixels). Use a smaller image size."
            )
        top, left = (size - grid_h) // 2, (size - grid_w) // 2
        table = self.pos_embed.reshape(size, size, -1)
        return table[top : top + grid_h, left : left + grid_w].reshape(1, grid_h * grid_w, -1)

    def _check_inputs(self, latents: mx.array, context: mx.array) -> None:
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.in_channels:
            raise InputError(
                f"latents must be NHWC (batch, height, width, {cfg.in_channels}); "
                f"got {tuple(latents.shape)}"
            )
        if latents.shape[1] % cfg.patch_size or latents.shape[2] % cfg.patch_size:
            raise InputError(
                f"latent height and width must be multiples of {cfg.patch_size} (image sides "
                f"multiples of {8 * cfg.patch_size} pixels); "
                f"got {latents.shape[1]}x{latents.shape[2]}"
            )
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise InputError(
                f"context must be (batch, tokens, {cfg.context_dim}); got {tuple(context.shape)}"
            )

    def forward_with_modulations(
        self,
        latents: mx.array,
        context: mx.array,
        modulations: Modulations,
        skip_layers: Sequence[int] = (),
    ) -> mx.array:
        """The transformer given precomputed modulations; returns the velocity (NHWC)."""
        self._check_inputs(latents, context)
        skip = set(skip_layers)
        if any(not 0 <= i < len(self.blocks) for i in skip):
            raise InputError(f"skip_layers {sorted(skip)} outside 0..{len(self.blocks) - 1}")
        cfg, dtype = self.config, self.dtype
        p = cfg.patch_size
        b, height, width, _ = latents.shape
        gh, gw = height // p, width // p

        x = self.x_embedder(latents.astype(dtype)).reshape(b, gh * gw, -1)
        x = x + self.cropped_pos_embed(gh, gw).astype(dtype)
        ctx = self.context_embedder(context.astype(dtype))

        block_mods, final_mod = modulations
        for i, block in enumerate(self.blocks):
            if i not in skip:
                x, ctx = block(x, ctx, block_mods[i])

        out = self.final_layer(x, final_mod)  # (B, h*w, p*p*C), ordered (p_row, p_col, C)
        c_out = cfg.out_channels
        out = out.reshape(b, gh, gw, p, p, c_out).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, height, width, c_out)

    def __call__(
        self,
        latents: mx.array,
        timestep: mx.array,
        context: mx.array,
        pooled: mx.array,
        skip_layers: Sequence[int] = (),
    ) -> mx.array:
        """latents (B, H/8, W/8, C) NHWC, timestep (B,) = σ·1000 (float), context (B, L, 4096),
        pooled (B, 2048) -> velocity (B, H/8, W/8, C) in the weights' dtype."""
        c = self.conditioning(timestep, pooled)
        return self.forward_with_modulations(latents, context, self.modulations(c), skip_layers)
