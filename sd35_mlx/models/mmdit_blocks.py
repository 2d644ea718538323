"""Joint (MMDiT / MMDiT-X) transformer blocks.

Each stream (image `x`, text `context`) owns its adaLN projection; `modulation(c)` turns
the conditioning vector into the chunks the block forward takes as input, so a caller can
compute every step's modulations up front (they depend only on the timestep and pooled
text) and free the adaLN weights afterwards.

Chunk order (SAI): shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
[, shift_msa2, scale_msa2, gate_msa2]; the last block's context stream has only
(shift_msa, scale_msa).
"""

from __future__ import annotations

from typing import Tuple

import mlx.core as mx
import mlx.nn as nn

from .block_kernels import NORM_EPS, Pending, Stream, gelu_tanh, gelu_tanh_pair, norm_modulate, norm_modulate_streams, settle
from .joint_heads import attention, heads, joint_attention

Chunks = Tuple[mx.array, ...]  # each (B, 1, H), ready to broadcast over tokens


def ada_chunks(linear: nn.Linear, c: mx.array, n: int) -> Chunks:
    """SiLU -> Linear(H, n*H) on c (B, H), split into n chunks of shape (B, 1, H), each
    contiguous (one copy here rather than one per use in the CUDA block kernels)."""
    out = linear(nn.silu(c))
    b, h = out.shape[0], out.shape[-1] // n
    by_chunk = mx.contiguous(out.reshape(b, n, h).transpose(1, 0, 2))  # (n, B, H)
    return tuple(by_chunk[k : k + 1].reshape(b, 1, h) for k in range(n))  # views: no gather per chunk


class Attention(nn.Module):
    """Fused qkv projection, optional per-head RMSNorm of q and k, optional output proj."""

    def __init__(self, hidden: int, num_heads: int, qk_norm: bool, out_proj: bool = True):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden // num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        if qk_norm:
            self.q_norm = nn.RMSNorm(head_dim, eps=NORM_EPS)
            self.k_norm = nn.RMSNorm(head_dim, eps=NORM_EPS)
        if out_proj:
            self.proj = nn.Linear(hidden, hidden)

    def heads(self, x: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
        """(B, L, H) -> q, k, v of shape (B, heads, L, head_dim), q/k normalised."""
        return heads(self, self.qkv(x))


class MLP(nn.Module):
    def __init__(self, hidden: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ratio * hidden)
        self.fc2 = nn.Linear(ratio * hidden, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(gelu_tanh(self.fc1(x)))


class ImageStream(nn.Module):
    """Image-token half of a joint block; MMDiT-X (`dual`) adds an image-only attention."""

    def __init__(self, hidden: int, num_heads: int, qk_norm: bool, dual: bool, mlp_ratio: int):
        super().__init__()
        self.num_chunks = 9 if dual else 6
        self.adaLN = nn.Linear(hidden, self.num_chunks * hidden)
        self.attn = Attention(hidden, num_heads, qk_norm)
        if dual:
            self.attn2 = Attention(hidden, num_heads, qk_norm)
        self.mlp = MLP(hidden, mlp_ratio)

    def modulation(self, c: mx.array) -> Chunks:
        return ada_chunks(self.adaLN, c, self.num_chunks)


class ContextStream(nn.Module):
    """Text-token half; in the last block (`pre_only`) it only supplies keys and values."""

    def __init__(self, hidden: int, num_heads: int, qk_norm: bool, pre_only: bool, mlp_ratio: int):
        super().__init__()
        self.num_chunks = 2 if pre_only else 6
        self.adaLN = nn.Linear(hidden, self.num_chunks * hidden)
        self.attn = Attention(hidden, num_heads, qk_norm, out_proj=not pre_only)
        if not pre_only:
            self.mlp = MLP(hidden, mlp_ratio)

    def modulation(self, c: mx.array) -> Chunks:
        return ada_chunks(self.adaLN, c, self.num_chunks)


class JointBlock(nn.Module):
    def __init__(
        self,
        hidden: int,
        num_heads: int,
        *,
        qk_norm: bool,
        dual: bool,
        pre_only: bool,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        self.dual = dual
        self.pre_only = pre_only
        self.x = ImageStream(hidden, num_heads, qk_norm, dual, mlp_ratio)
        self.context = ContextStream(hidden, num_heads, qk_norm, pre_only, mlp_ratio)

    def modulation(self, c: mx.array) -> Tuple[Chunks, Chunks]:
        """(image chunks, context chunks) for conditioning vector c (B, H)."""
        return self.x.modulation(c), self.context.modulation(c)

    def __call__(
        self, x: mx.array, ctx: mx.array, modulation: Tuple[Chunks, Chunks]
    ) -> Tuple[mx.array, mx.array]:
        """x (B, Lx, H), ctx (B, Lc, H) -> updated (x, ctx); ctx passes through unchanged
        in the last block, whose context output nobody uses."""
        x, ctx = self.forward_deferred(x, ctx, modulation)
        return settle(x), settle(ctx)

    def forward_deferred(self, x: Stream, ctx: Stream, modulation: Tuple[Chunks, Chunks]) -> Tuple[Stream, Stream]:
        """The block on streams that may carry a pending update (`block_kernels.Pending`),
        returning its MLP residuals pending too: the next block's LayerNorm adds them."""
        xm, cm = modulation
        (x, h_x), (ctx, h_c) = norm_modulate_streams((x, xm[0], xm[1]), (ctx, cm[0], cm[1]))
        # One attention over [context, image] tokens (joint_heads.py)
        ctx_attn, x_attn = joint_attention(self.context.attn, self.context.attn.qkv(h_c), self.x.attn, self.x.attn.qkv(h_x))
        y_x = self.x.attn.proj(x_attn)
        if self.dual:  # the second attention reads the block's input x, before the first's residual
            q2, k2, v2 = self.x.attn2.heads(norm_modulate(x, xm[6], xm[7]))
            x_stream = Pending(x + xm[2] * y_x, self.x.attn2.proj(attention(q2, k2, v2)), xm[8])
        else:
            x_stream = Pending(x, y_x, xm[2])
        if self.pre_only:
            ((x, h_x),) = norm_modulate_streams((x_stream, xm[3], xm[4]))
            return Pending(x, self.x.mlp(h_x), xm[5]), ctx
        # the residuals after attention, then the MLP's inputs
        (x, h_x), (ctx, h_c) = norm_modulate_streams(
            (x_stream, xm[3], xm[4]), (Pending(ctx, self.context.attn.proj(ctx_attn), cm[2]), cm[3], cm[4])
        )
        mlp_x, mlp_c = self.x.mlp, self.context.mlp
        g_x, g_c = gelu_tanh_pair(mlp_x.fc1(h_x), mlp_c.fc1(h_c))  # both streams' GELU in one launch
        return Pending(x, mlp_x.fc2(g_x), xm[5]), Pending(ctx, mlp_c.fc2(g_c), cm[5])
