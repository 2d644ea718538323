"""CLIP text encoder (CLIP-L/14 and OpenCLIP bigG/14) as SD3 uses it.

One class for both: causal pre-LN transformer with learned positions. SD3 takes the
penultimate layer's output (no final LayerNorm) as token embeddings and the last layer's
output, after the final LayerNorm, at the first EOS token as the pooled vector (projected
when the network has a `text_projection`). See docs/text.md, "What SD3 takes from each encoder".
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..config import CLIPConfig

_ACTIVATIONS = {
    "quick_gelu": nn.gelu_fast_approx,  # x * sigmoid(1.702 x), exactly OpenAI's quick_gelu
    "gelu": nn.gelu,  # exact erf GELU (OpenCLIP bigG)
}


class CLIPOutput(NamedTuple):
    hidden: mx.array  # (B, L, D): output of layer N-2, i.e. HF hidden_states[-2]
    pooled: mx.array  # (B, D or projection_dim)


class CLIPAttention(nn.Module):
    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.qkv = nn.Linear(dims, 3 * dims)  # q, k, v fused: one matmul instead of three
        self.out = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        o = mx.fast.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], scale=self.scale, mask="causal"
        )
        return self.out(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, dims: int, hidden: int, activation: str):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown CLIP activation {activation!r}; expected one of {list(_ACTIVATIONS)}"
            )
        self.fc1 = nn.Linear(dims, hidden)
        self.fc2 = nn.Linear(hidden, dims)
        self.act = _ACTIVATIONS[activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)  # mx.fast.layer_norm inside
        self.attn = CLIPAttention(d, config.num_heads)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(d, config.intermediate_size, config.activation)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPTextEncoder(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.position_embedding = mx.zeros((config.max_positions, d))
        self.layers = [CLIPLayer(config) for _ in range(config.num_layers)]
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(d, config.projection_dim, bias=False)

    def first_eos_index(self, input_ids: mx.array) -> mx.array:
        """(B,) index of the first EOS per row; the last position when a row has none.

        Explicit search: argmax tie-breaking is not something to rely on, and CLIP-L pads
        with EOS so a row holds many.
        """
        L = input_ids.shape[-1]
        positions = mx.arange(L)
        first = mx.min(mx.where(input_ids == self.config.eos_token_id, positions, L), axis=-1)
        return mx.minimum(first, L - 1)

    def __call__(self, input_ids: mx.array) -> CLIPOutput:
        L = input_ids.shape[-1]
        if L > self.config.max_positions:
            raise ValueError(f"CLIP takes at most {self.config.max_positions} tokens, got {L}")
        x = self.token_embedding(input_ids) + self.position_embedding[:L]
        penultimate = x  # with a single layer, HF hidden_states[-2] is the embeddings
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == last - 1:
                penultimate = x
        x = self.final_norm(x)
        idx = self.first_eos_index(input_ids)
        pooled = mx.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        if "text_projection" in self:  # CLIP-L's should be the identity: weights/tables/clip.py checks
            pooled = self.text_projection(pooled)
        return CLIPOutput(hidden=penultimate, pooled=pooled)
