"""T5 v1.1 encoder (SD3's `text_encoder_3`, T5-XXL) in MLX.

Per block: RMS norm -> self-attention (no biases, unscaled, plus a relative position bias
computed once from one table and shared by all blocks) -> residual; RMS norm -> gated FF
`wo(gelu_tanh(wi_0 x) * wi_1 x)` -> residual. A final RMS norm ends the stack.

Precision. T5 v1.1 activations overflow fp16 (the residual stream reaches ~1e5+). So:
- the residual stream is always fp32; sub-layer outputs are added to it in fp32;
- norms are computed in fp32 (`mx.fast.rms_norm` on the fp32 stream) and cast to the
  compute dtype;
- compute dtype = bf16 for bf16 weights, else fp32. fp16 weights are only a storage format:
  matmuls take fp32 activations (MLX promotes the fp16 weight), so nothing can overflow.
Output: the compute dtype (fp32 for fp32/fp16 weights, bf16 for bf16 weights).

Layer streaming: `embed_tokens`, `position_bias`, `run_blocks` and `final_norm` are separate
pieces, so a caller can load one block's weights, run it and free it.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import T5Config
from .block_kernels import gelu_tanh


@lru_cache(maxsize=16)
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets of (key - query), shape (length, length), int32.

    Mesh-TF / HF formula; the log is taken in float32 like the references so that the
    truncation lands on the same side at the bucket edges.
    """
    pos = np.arange(length, dtype=np.int64)
    rel = pos[None, :] - pos[:, None]  # key - query
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) on the small (exact) positions, unused
        scaled = (
            np.log(dist.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(half - max_exact)
        )
    large = max_exact + np.where(dist < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    buckets += np.where(dist < max_exact, dist, large)
    return buckets.astype(np.int32)


def compute_dtype_for(weight_dtype: mx.Dtype) -> mx.Dtype:
    """bf16 weights compute in bf16; everything else (fp32, fp16) computes in fp32."""
    return mx.bfloat16 if weight_dtype == mx.bfloat16 else mx.float32


class T5RMSNorm(nn.Module):
    """T5 layer norm: no mean subtraction, no bias. Computed in fp32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, h: mx.array, out_dtype: mx.Dtype) -> mx.array:
        w = self.weight.astype(mx.float32)
        return mx.fast.rms_norm(h.astype(mx.float32), w, self.eps).astype(out_dtype)


class T5SelfAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        self.qkv = nn.Linear(config.d_model, 3 * inner, bias=False)  # q, k, v fused
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.d_kv).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # T5 attention is unscaled (no 1/sqrt(d_kv)); the position bias is the additive mask.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias.astype(q.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class T5GatedFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(gelu_tanh(self.wi_0(x)) * self.wi_1(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.attn_norm = T5RMSNorm(config.d_model, config.layer_norm_eps)
        self.attn = T5SelfAttention(config)
        self.ff_norm = T5RMSNorm(config.d_model, config.layer_norm_eps)
        self.ff = T5GatedFF(config)

    def __call__(self, h: mx.array, bias: mx.array) -> mx.array:
        """h: fp32 residual stream (B, L, d_model); returns the updated fp32 stream."""
        dtype = compute_dtype_for(self.attn_norm.weight.dtype)
        h = h + self.attn(self.attn_norm(h, dtype), bias).astype(mx.float32)
        h = h + self.ff(self.ff_norm(h, dtype)).astype(mx.float32)
        return h


class T5Encoder(nn.Module):
    """T5 v1.1 encoder stack: `__call__(input_ids (B, L) int) -> (B, L, d_model)`."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        # HF keeps this table in block 0; it is shared by every block, so it lives here.
        self.relative_attention_bias = nn.Embedding(
            config.relative_attention_num_buckets, config.num_heads
        )
        self.blocks = [T5Block(config) for _ in range(config.num_layers)]
        self.final_norm = T5RMSNorm(config.d_model, config.layer_norm_eps)

    @property
    def block_count(self) -> int:
        return len(self.blocks)

    @property
    def compute_dtype(self) -> mx.Dtype:
        return compute_dtype_for(self.final_norm.weight.dtype)

    def embed_tokens(self, input_ids: mx.array) -> mx.array:
        """Token embeddings as the fp32 residual stream (B, L, d_model)."""
        return self.embed(input_ids).astype(mx.float32)

    def position_bias(self, length: int) -> mx.array:
        """Relative position bias (1, heads, L, L) in the compute dtype."""
        c = self.config
        buckets = relative_position_buckets(
            length, c.relative_attention_num_buckets, c.relative_attention_max_distance
        )
        values = self.relative_attention_bias(mx.array(buckets))  # (L, L, heads)
        return values.transpose(2, 0, 1)[None].astype(self.compute_dtype)

    @staticmethod
    def run_blocks(h: mx.array, bias: mx.array, blocks: Iterable[T5Block]) -> mx.array:
        for block in blocks:
            h = block(h, bias)
        return h

    def __call__(self, input_ids: mx.array) -> mx.array:
        h = self.embed_tokens(input_ids)
        bias = self.position_bias(input_ids.shape[1])
        h = self.run_blocks(h, bias, self.blocks)
        return self.final_norm(h, self.compute_dtype)
