"""SD3 / SD3.5 ControlNets, channels-last (docs/control.md).

    net = ControlNet(config)
    outs = net(tokens, control, timestep, pooled, context)   # config.depth × (B, N, H)

`tokens` are the image tokens the ControlNet starts from: for Stability's SD3.5 Large
ControlNets (image-only blocks, `config.joint` False) the *transformer's* embedded latents
(`MMDiT.embed_latents`), for diffusers-format joint ControlNets (InstantX, Alimama) the
ControlNet's own embedding (`net.embed_latents(latents)`). `control` is the control
latent (B, h, w, control_channels), NHWC; it enters through a patch embedder without any
position term. Output k is `outputs[k]` applied to the tokens after block k; which
transformer block receives which output is the residual rule's business
(`sd35_mlx.control.residuals`).
"""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..config import ControlNetConfig
from ..errors import InputError
from .mmdit import MLPEmbedder, center_crop_positions, timestep_embedding, TIMESTEP_DIM
from .block_kernels import norm_modulate, residual_norm_modulate
from .joint_heads import attention
from .mmdit_blocks import ImageStream, JointBlock


class ImageBlock(ImageStream):
    """An image-only DiT block (Stability's `DismantledBlock` on its own): adaLN-Zero,
    self-attention over the image tokens, MLP."""

    def __init__(self, hidden: int, num_heads: int, qk_norm: bool, mlp_ratio: int):
        super().__init__(hidden, num_heads, qk_norm, dual=False, mlp_ratio=mlp_ratio)

    def __call__(self, x: mx.array, c: mx.array) -> mx.array:
        m = self.modulation(c)
        q, k, v = self.attn.heads(norm_modulate(x, m[0], m[1]))
        x, h = residual_norm_modulate(x, self.attn.proj(attention(q, k, v)), m[2], m[3], m[4])
        return x + m[5] * self.mlp(h)


class ControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        h, p = config.hidden_size, config.patch_size
        if config.joint:
            if config.pos_embed_max_size is None:
                raise InputError("a joint ControlNet needs its own position table (pos_embed_max_size)")
            self.x_embedder = nn.Conv2d(config.in_channels, h, kernel_size=p, stride=p)
            self.pos_embed = mx.zeros((1, config.pos_embed_max_size**2, h))
            self.context_embedder = nn.Linear(config.context_dim, h)
        self.control_embedder = nn.Conv2d(config.control_channels, h, kernel_size=p, stride=p)
        self.t_embedder = MLPEmbedder(TIMESTEP_DIM, h)
        self.y_embedder = MLPEmbedder(config.pooled_dim, h)
        dual = set(config.dual_attention_layers)
        if config.joint:
            self.blocks = [
                JointBlock(h, config.num_heads, qk_norm=config.qk_norm, dual=i in dual,
                           pre_only=False, mlp_ratio=config.mlp_ratio)
                for i in range(config.depth)
            ]  # fmt: skip
        else:
            self.blocks = [
                ImageBlock(h, config.num_heads, config.qk_norm, config.mlp_ratio) for _ in range(config.depth)
            ]
        self.outputs = [nn.Linear(h, h) for _ in range(config.depth)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.control_embedder.weight.dtype

    def _patchify(self, conv: nn.Conv2d, x: mx.array) -> mx.array:
        b, height, width, _ = x.shape
        p = self.config.patch_size
        return conv(x.astype(self.dtype)).reshape(b, (height // p) * (width // p), -1)

    def embed_latents(self, latents: mx.array) -> mx.array:
        """A joint ControlNet's own patch embedding + centre-cropped position table."""
        if not self.config.joint:
            raise InputError(
                "this ControlNet continues the transformer's embedded latents "
                "(MMDiT.embed_latents); it has no patch embedder of its own"
            )
        p, size = self.config.patch_size, self.config.pos_embed_max_size
        gh, gw = latents.shape[1] // p, latents.shape[2] // p
        if gh > size or gw > size:
            raise InputError(
                f"latent {latents.shape[1]}x{latents.shape[2]} is larger than this ControlNet's "
                f"position table allows ({size * p} per side); use a smaller image size"
            )
        pos = center_crop_positions(self.pos_embed, size, gh, gw)
        return self._patchify(self.x_embedder, latents) + pos.astype(self.dtype)

    def conditioning(self, timestep: mx.array, pooled: mx.array) -> mx.array:
        """c = t_emb(σ·1000) + y_emb(pooled), (B, H)."""
        t = timestep_embedding(timestep).astype(self.dtype)
        return self.t_embedder(t) + self.y_embedder(pooled.astype(self.dtype))

    def __call__(
        self,
        tokens: mx.array,
        control: mx.array,
        timestep: mx.array,
        pooled: mx.array,
        context: Optional[mx.array] = None,
        scale: float | mx.array = 1.0,
    ) -> List[mx.array]:
        """tokens (B, N, H), control (B, h, w, Cc) NHWC, timestep (B,) = σ·1000, pooled
        (B, pooled_dim), context (B, L, context_dim) for joint ControlNets -> depth
        residuals (B, N, H), each multiplied by `scale`."""
        cfg = self.config
        if control.ndim != 4 or control.shape[-1] != cfg.control_channels:
            raise InputError(
                f"control latents must be NHWC with {cfg.control_channels} channels; got {tuple(control.shape)}"
            )
        if cfg.joint and context is None:
            raise InputError("this ControlNet attends to the prompt: pass context (B, L, context_dim)")
        x = tokens.astype(self.dtype) + self._patchify(self.control_embedder, control)
        c = self.conditioning(timestep, pooled)
        hidden: List[mx.array] = []
        if cfg.joint:
            ctx = self.context_embedder(context.astype(self.dtype))
            for block in self.blocks:
                x, ctx = block(x, ctx, block.modulation(c))
                hidden.append(x)
        else:
            for block in self.blocks:
                x = block(x, c)
                hidden.append(x)
        return [out(h) * scale for out, h in zip(self.outputs, hidden)]
