"""T5-XXL encoder: HF-transformers names -> our `T5Encoder` names.

The same HF names appear in three places (docs/loading.md, "Tensor names in each layout"):
- diffusers `text_encoder_3/` (sharded; only `shared.weight` for the embedding),
- SAI `text_encoders/t5xxl_fp16.safetensors` (no prefix; BOTH `shared.weight` and the tied
  duplicate `encoder.embed_tokens.weight`),
- single files with encoders inside, prefix `text_encoders.t5xxl.transformer.`.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import mlx.core as mx

from ...config import T5Config
from ...errors import WeightMappingError
from ...models.t5 import T5Encoder
from ..mapping import NetworkLayout, Rule, concat, load_network

_ATTN = "encoder.block.{i}.layer.0.SelfAttention."
_FF = "encoder.block.{i}.layer.1.DenseReluDense."

RULES = (
    # Either name; when both exist (SAI file) `shared.weight` wins, the duplicate is consumed.
    Rule("embed.weight", ("shared.weight",), aliases=(("encoder.embed_tokens.weight",),)),
    # Stored in block 0 only; shared by every block.
    Rule(
        "relative_attention_bias.weight",
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
    ),
    Rule("blocks.{i}.attn_norm.weight", ("encoder.block.{i}.layer.0.layer_norm.weight",)),
    Rule(
        "blocks.{i}.attn.qkv.weight",
        (_ATTN + "q.weight", _ATTN + "k.weight", _ATTN + "v.weight"),
        concat,  # one fused projection: one matmul instead of three
    ),
    Rule("blocks.{i}.attn.o.weight", (_ATTN + "o.weight",)),
    Rule("blocks.{i}.ff_norm.weight", ("encoder.block.{i}.layer.1.layer_norm.weight",)),
    Rule("blocks.{i}.ff.wi_0.weight", (_FF + "wi_0.weight",)),
    Rule("blocks.{i}.ff.wi_1.weight", (_FF + "wi_1.weight",)),
    Rule("blocks.{i}.ff.wo.weight", (_FF + "wo.weight",)),
    Rule("final_norm.weight", ("encoder.final_layer_norm.weight",)),
)

DIFFUSERS = NetworkLayout("diffusers text_encoder_3/ (T5-XXL)", RULES)
STABILITY = NetworkLayout("SAI text_encoders/t5xxl_fp16.safetensors (T5-XXL)", RULES)
SINGLE_FILE = STABILITY.with_prefix(
    "text_encoders.t5xxl.transformer.", "single file, T5-XXL under text_encoders.t5xxl.transformer."
)


def infer_config(weights: Mapping[str, mx.array], hf_config: Optional[dict] = None) -> T5Config:
    """Derive the T5Config from our-named (mapped) tensors' shapes.

    `relative_attention_max_distance` and `layer_norm_eps` are not visible in shapes: they
    come from `hf_config` (a diffusers `text_encoder_3/config.json` dict) or the T5 defaults.
    """
    hf = hf_config or {}
    act = hf.get("feed_forward_proj", "gated-gelu")
    if act != "gated-gelu":
        raise WeightMappingError(
            f"T5 config has feed_forward_proj={act!r}; only T5 v1.1 'gated-gelu' (SD3's T5-XXL) "
            "is supported."
        )
    needed = ("embed.weight", "relative_attention_bias.weight", "blocks.0.attn.o.weight",
              "blocks.0.ff.wi_0.weight")  # fmt: skip
    absent = [k for k in needed if k not in weights]
    if absent:
        raise WeightMappingError(
            f"cannot infer the T5 configuration: no tensor for {', '.join(absent)} "
            "(is this a complete T5 encoder checkpoint?)"
        )
    vocab, d_model = weights["embed.weight"].shape
    buckets, heads = weights["relative_attention_bias.weight"].shape
    layers = sum(1 for k in weights if k.startswith("blocks.") and k.endswith(".attn.o.weight"))
    inner = weights["blocks.0.attn.o.weight"].shape[1]
    d_ff = weights["blocks.0.ff.wi_0.weight"].shape[0]
    defaults = T5Config()
    return T5Config(
        d_model=d_model,
        num_layers=layers,
        num_heads=heads,
        d_kv=inner // heads,
        d_ff=d_ff,
        vocab_size=vocab,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=hf.get(
            "relative_attention_max_distance", defaults.relative_attention_max_distance
        ),
        layer_norm_eps=hf.get("layer_norm_epsilon", defaults.layer_norm_eps),
    )


def load_t5(
    tensors: Mapping[str, mx.array],
    layout: NetworkLayout,
    files: Sequence[str] = (),
    dtype: Optional[mx.Dtype] = None,
    hf_config: Optional[dict] = None,
) -> T5Encoder:
    """Map `tensors` (source names) through `layout`, infer the config, build and load."""
    return load_network(
        tensors, layout, T5Encoder, lambda w: infer_config(w, hf_config), files=files, dtype=dtype
    )
