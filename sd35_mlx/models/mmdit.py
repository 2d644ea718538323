"""The SD3 / SD3.5 MMDiT (and MMDiT-X) denoiser, channels-last.

    model = MMDiT(SD35_MEDIUM_MMDIT)
    v = model(latents, timestep, context, pooled)      # velocity, (B, H/8, W/8, 16)

The forward is split so that the conditioning can be precomputed for a whole schedule:

    c = model.conditioning(timestep, pooled)           # (B, H) = t_emb + y_emb
    mods = model.modulations(c)                        # every block's adaLN chunks + final
    v = model.forward_with_modulations(latents, context, mods, skip_layers)

For a known schedule every step's modulations fit in one packed table, after which the
weights only the conditioning needs (adaLN, timestep and pooled embedders: about a third
of the parameters) and the full position table can be dropped:

    table = model.modulation_table(timesteps, pooled)   # (steps, B, N, H), one batched pass
    model.cache_pos_embed(grid_h, grid_w); model.free_conditioning_weights(); model.free_pos_embed()
    v = model.forward_packed(latents, model.embed_context(context), table[i], skip_layers)

A model with freed weights raises `FreedWeightsError` where it would need them.
Nothing here synchronises with the host: shape checks use static shapes only.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import ContextManager, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..config import MMDiTConfig
from ..errors import InputError, SD35Error
from ..fast_quantized import dense_bytes, dequantized_together, quantized_layers
from .block_kernels import Stream, norm_modulate_streams, settle
from .mmdit_blocks import Chunks, JointBlock, ada_chunks

TIMESTEP_DIM = 256
BlockModulation = Tuple[Chunks, Chunks]
Modulations = Tuple[Tuple[BlockModulation, ...], Chunks]  # (per block, final layer)
BlockResiduals = Sequence[Optional[mx.array]]  # per joint block: added to x after it (ControlNet)


class FreedWeightsError(SD35Error, RuntimeError):
    """A part of the transformer was freed (after precomputing what it computes) and is needed."""


class FreedWeights(nn.Module):
    """Stands in for a submodule whose weights were dropped; calling it raises."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def __call__(self, *args, **kwargs):
        raise FreedWeightsError(
            f"the transformer's {self.what} weights were freed after its modulations were "
            "precomputed (Denoiser(..., free_adaln=True)); call it through that Denoiser, or "
            "reload the transformer to call it directly"
        )


class _PositionCache:
    """Cropped position tables by (grid_h, grid_w); a plain object, so never a parameter."""

    def __init__(self):
        self.tables: Dict[Tuple[int, int], mx.array] = {}


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


def center_crop_positions(table: mx.array, size: int, grid_h: int, grid_w: int) -> mx.array:
    """The centre grid_h x grid_w of a stored (1, size*size, H) position table -> (1, h*w, H)."""
    top, left = (size - grid_h) // 2, (size - grid_w) // 2
    grid = table.reshape(size, size, -1)
    return grid[top : top + grid_h, left : left + grid_w].reshape(1, grid_h * grid_w, -1)


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

    def __call__(self, x: Stream, modulation: Chunks) -> mx.array:
        shift, scale = modulation
        ((_, h),) = norm_modulate_streams((x, shift, scale))
        return self.linear(h)


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
        self._positions = _PositionCache()
        # Quantized layers (fast_quantized.DequantizingLinear) of a block de-quantize in one
        # launch, their 16-bit weights alive together for the block: set by the Denoiser.
        self.dequantize_per_block = False

    @property
    def dtype(self) -> mx.Dtype:
        return self.x_embedder.weight.dtype

    # ---- what has been freed ----
    @property
    def conditioning_freed(self) -> bool:
        return isinstance(self.t_embedder, FreedWeights)

    @property
    def pos_embed_freed(self) -> bool:
        return "pos_embed" not in self

    def free_conditioning_weights(self) -> None:
        """Drop the adaLN projections and the timestep/pooled embedders (only
        `conditioning`/`modulations` use them). Afterwards the model runs only from
        precomputed modulations; the plain call raises `FreedWeightsError`."""
        self.t_embedder = FreedWeights("timestep embedder")
        self.y_embedder = FreedWeights("pooled-text embedder")
        for block in self.blocks:
            block.x.adaLN = FreedWeights("adaLN")
            block.context.adaLN = FreedWeights("adaLN")
        self.final_layer.adaLN = FreedWeights("adaLN")

    def cache_pos_embed(self, grid_h: int, grid_w: int) -> mx.array:
        """Crop the position table for this patch grid once, as its own (evaluated) array."""
        key = (grid_h, grid_w)
        cached = self._positions.tables.get(key)
        if cached is None:
            crop = self._crop_pos_embed(grid_h, grid_w).astype(self.dtype)
            # `+ 0` makes a new buffer: a plain slice could be a view that keeps the full
            # table alive after free_pos_embed.
            cached = mx.add(crop, mx.zeros((), dtype=crop.dtype))
            mx.eval(cached)
            self._positions.tables[key] = cached
        return cached

    def free_pos_embed(self) -> None:
        """Drop the full (P*P, H) position table; grids cached with `cache_pos_embed` keep working."""
        if "pos_embed" in self:
            del self["pos_embed"]

    def clear_pos_embed_cache(self) -> None:
        self._positions.tables.clear()

    # ---- conditioning (depends on timestep and pooled text only) ----
    def conditioning(self, timestep: mx.array, pooled: mx.array) -> mx.array:
        """c = t_emb + y_emb, (B, H). timestep: float σ·1000, shape (B,) or scalar."""
        if pooled.ndim != 2 or pooled.shape[-1] != self.config.pooled_dim:
            raise InputError(
                f"pooled must be (batch, {self.config.pooled_dim}); got {tuple(pooled.shape)}"
            )
        self._require_conditioning()
        t = mx.array(timestep) if not isinstance(timestep, mx.array) else timestep
        t_freq = timestep_embedding(t).astype(self.dtype)
        return self.t_embedder(t_freq) + self.y_embedder(pooled.astype(self.dtype))

    def modulations(self, c: mx.array) -> Modulations:
        """Every block's adaLN chunks and the final layer's (shift, scale) for c."""
        self._require_conditioning()
        return tuple(b.modulation(c) for b in self.blocks), self.final_layer.modulation(c)

    def _require_conditioning(self) -> None:
        if self.conditioning_freed:
            self.t_embedder()  # raises FreedWeightsError with the explanation

    # ---- packed modulations: one (B, N, H) array per step ----
    @property
    def modulation_counts(self) -> List[Tuple[int, int]]:
        """(image chunks, context chunks) per block; the final layer adds 2."""
        return [(b.x.num_chunks, b.context.num_chunks) for b in self.blocks]

    @property
    def num_modulation_chunks(self) -> int:
        return sum(a + b for a, b in self.modulation_counts) + 2

    def pack_modulations(self, modulations: Modulations) -> mx.array:
        """Modulations -> (B, N, H), chunks in block order (image, context), final last."""
        block_mods, final_mod = modulations
        chunks = [c for xm, cm in block_mods for c in (*xm, *cm)] + list(final_mod)
        return mx.concatenate(chunks, axis=1)

    def unpack_modulations(self, packed: mx.array) -> Modulations:
        """(B, N, H) -> Modulations; chunks are (B, 1, H) views of one (N, B, H) copy.

        Why the copy: a chunk sliced straight from (B, N, H) is strided across the batch, and
        the CUDA block kernels (block_kernels.py) need contiguous rows, so each of a step's
        ~200 uses would copy its chunk; transposed once, every chunk is a contiguous block."""
        if packed.ndim != 3 or packed.shape[1] != self.num_modulation_chunks:
            raise InputError(
                f"packed modulations must be (batch, {self.num_modulation_chunks}, hidden); "
                f"got {tuple(packed.shape)}"
            )
        b, _, h = packed.shape
        by_chunk = mx.contiguous(packed.transpose(1, 0, 2))
        k = 0

        def take(n: int) -> Chunks:
            nonlocal k
            # slices + reshapes are views (an integer index would be a gather kernel per chunk)
            out = tuple(by_chunk[k + j : k + j + 1].reshape(b, 1, h) for j in range(n))
            k += n
            return out

        blocks = tuple((take(nx), take(nc)) for nx, nc in self.modulation_counts)
        return blocks, take(2)

    def modulation_table(self, timesteps: mx.array, pooled: mx.array) -> mx.array:
        """Packed modulations for S timesteps and a batch of B pooled vectors, in one
        batched pass -> (S, B, N, H); row [s, b] equals the plain model's modulations for
        timestep s and pooled row b."""
        t = timesteps.reshape(-1).astype(mx.float32)
        s, b = t.shape[0], pooled.shape[0]
        c = self.conditioning(mx.repeat(t, b), mx.tile(pooled, (s, 1)))
        packed = self.pack_modulations(self.modulations(c))
        return packed.reshape(s, b, *packed.shape[1:])

    # ---- token stream ----
    def cropped_pos_embed(self, grid_h: int, grid_w: int) -> mx.array:
        """Center crop of the stored (P, P) table to the patch grid -> (1, h*w, H)."""
        cached = self._positions.tables.get((grid_h, grid_w))
        if cached is not None:
            return cached
        return self._crop_pos_embed(grid_h, grid_w)

    def _crop_pos_embed(self, grid_h: int, grid_w: int) -> mx.array:
        size = self.config.pos_embed_max_size
        if grid_h > size or grid_w > size:
            p = self.config.patch_size
            raise InputError(
                f"latent {grid_h * p}x{grid_w * p} is larger than this model's positional table "
                f"allows: the largest latent side is {size * p} (an image side of {size * p * 8} "
                "pixels). Use a smaller image size."
            )
        if self.pos_embed_freed:
            cached = sorted(self._positions.tables)
            raise FreedWeightsError(
                f"the full position table was freed; only the patch grids {cached} were kept "
                f"(asked for {grid_h}x{grid_w}). Reload the transformer for other sizes."
            )
        return center_crop_positions(self.pos_embed, size, grid_h, grid_w)

    def _check_latents(self, latents: mx.array) -> None:
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

    def embed_latents(self, latents: mx.array) -> mx.array:
        """Latents (B, h, w, C) -> image tokens (B, h/p * w/p, H): patch embedding plus the
        cropped position table (what Stability's SD3.5 Large ControlNets start from too)."""
        p = self.config.patch_size
        b, height, width, _ = latents.shape
        gh, gw = height // p, width // p
        x = self.x_embedder(latents.astype(self.dtype)).reshape(b, gh * gw, -1)
        return x + self.cropped_pos_embed(gh, gw).astype(self.dtype)

    def embed_context(self, context: mx.array) -> mx.array:
        """Text tokens (B, L, context_dim) -> (B, L, H); the same at every step."""
        if context.ndim != 3 or context.shape[-1] != self.config.context_dim:
            raise InputError(
                f"context must be (batch, tokens, {self.config.context_dim}); "
                f"got {tuple(context.shape)}"
            )
        return self.context_embedder(context.astype(self.dtype))

    def forward_with_modulations(
        self,
        latents: mx.array,
        context: mx.array,
        modulations: Modulations,
        skip_layers: Sequence[int] = (),
    ) -> mx.array:
        """The transformer given precomputed modulations; returns the velocity (NHWC)."""
        self._check_latents(latents)
        return self.forward_embedded(latents, self.embed_context(context), modulations, skip_layers)

    def forward_packed(
        self,
        latents: mx.array,
        context_tokens: mx.array,
        packed: mx.array,
        skip_layers: Sequence[int] = (),
        residuals: Optional[BlockResiduals] = None,
    ) -> mx.array:
        """`forward_embedded` with modulations packed as (B, N, H) (a modulation-table row)."""
        return self.forward_embedded(
            latents, context_tokens, self.unpack_modulations(packed), skip_layers, residuals
        )

    def forward_embedded(
        self,
        latents: mx.array,
        context_tokens: mx.array,
        modulations: Modulations,
        skip_layers: Sequence[int] = (),
        residuals: Optional[BlockResiduals] = None,
    ) -> mx.array:
        """The transformer given embedded text tokens (`embed_context`) and modulations.

        residuals: the ControlNet hook, one entry per joint block, added to the image
        tokens after that block (None: nothing). Which block gets which ControlNet output
        is the ControlNet's rule (sd35_mlx.control.residuals), not the transformer's.
        """
        self._check_latents(latents)
        h = self.config.hidden_size
        if context_tokens.ndim != 3 or context_tokens.shape[-1] != h:
            raise InputError(
                f"embedded context must be (batch, tokens, {h}); got {tuple(context_tokens.shape)}"
            )
        skip = set(skip_layers)
        if any(not 0 <= i < len(self.blocks) for i in skip):
            raise InputError(f"skip_layers {sorted(skip)} outside 0..{len(self.blocks) - 1}")
        if residuals is not None and len(residuals) != len(self.blocks):
            raise InputError(f"residuals has {len(residuals)} entries for {len(self.blocks)} blocks")
        cfg, dtype = self.config, self.dtype
        p = cfg.patch_size
        b, height, width, _ = latents.shape
        gh, gw = height // p, width // p

        x = self.embed_latents(latents)
        ctx = context_tokens.astype(dtype)
        fewest_rows = b * min(gh * gw, ctx.shape[1])  # what a quantized layer of a block sees at least

        block_mods, final_mod = modulations
        for i, block in enumerate(self.blocks):  # x and ctx may carry a pending MLP residual
            if i not in skip:
                with self._block_weights(block, fewest_rows):
                    x, ctx = block.forward_deferred(x, ctx, block_mods[i])
            if residuals is not None and residuals[i] is not None:
                x = settle(x) + residuals[i].astype(dtype)

        out = self.final_layer(x, final_mod)  # (B, h*w, p*p*C), ordered (p_row, p_col, C)
        c_out = cfg.out_channels
        out = out.reshape(b, gh, gw, p, p, c_out).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, height, width, c_out)

    def block_dense_bytes(self) -> int:
        """The most a block's shared de-quantization holds at once (0 when nothing is quantized)."""
        return max((dense_bytes(self._forward_quantized(b)) for b in self.blocks), default=0)

    def _block_weights(self, block: JointBlock, rows: int) -> ContextManager:
        """With `dequantize_per_block`, a quantized block's layers share one de-quantization."""
        if not self.dequantize_per_block:
            return nullcontext()
        return dequantized_together(self._forward_quantized(block), rows)

    @staticmethod
    def _forward_quantized(block: JointBlock) -> List[nn.QuantizedLinear]:
        """The quantized layers a block's forward runs: not the adaLN projections (the
        modulations come precomputed)."""
        return quantized_layers(block, skip=("adaLN",))

    def __call__(
        self,
        latents: mx.array,
        timestep: mx.array,
        context: mx.array,
        pooled: mx.array,
        skip_layers: Sequence[int] = (),
        residuals: Optional[BlockResiduals] = None,
    ) -> mx.array:
        """latents (B, H/8, W/8, C) NHWC, timestep (B,) = σ·1000 (float), context (B, L, 4096),
        pooled (B, 2048) -> velocity (B, H/8, W/8, C) in the weights' dtype."""
        self._check_latents(latents)
        ctx = self.embed_context(context)  # checks context before any work
        c = self.conditioning(timestep, pooled)
        return self.forward_embedded(latents, ctx, self.modulations(c), skip_layers, residuals)
