"""MMDiT weight layouts: diffusers `transformer/` folder and the Stability single file.

Our names (the MLX module tree of `sd35_mlx.models.mmdit.MMDiT`):
    x_embedder.{weight,bias}  pos_embed  {t,y}_embedder.fc{1,2}.*  context_embedder.*
    blocks.{i}.{x,context}.adaLN.*  .attn.qkv.*  .attn.{q,k}_norm.weight  .attn.proj.*
    blocks.{i}.x.attn2.*  blocks.{i}.{x,context}.mlp.fc{1,2}.*  final_layer.{adaLN,linear}.*

TRAP: diffusers stores the two 2-chunk modulations (last block's context norm, final norm)
as (scale, shift); SAI and we use (shift, scale), so exactly those four tensors are swapped.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import mlx.core as mx

from ...config import MMDiTConfig
from ...errors import WeightMappingError
from ...models.mmdit import MMDiT
from ..mapping import NetworkLayout, Rule, concat, conv_to_nhwc, identity, load_network, swap_halves

_WB = ("weight", "bias")


def _wb(target: str, source: str, transform=identity, when=None) -> Tuple[Rule, ...]:
    return tuple(Rule(f"{target}.{s}", (f"{source}.{s}",), transform, when=when) for s in _WB)


def _wb_qkv(target: str, q: str, k: str, v: str) -> Tuple[Rule, ...]:
    return tuple(Rule(f"{target}.{s}", (f"{q}.{s}", f"{k}.{s}", f"{v}.{s}"), concat) for s in _WB)


# ---- diffusers (SD3Transformer2DModel state dict) ----
def _is_last_block(groups: Dict[str, str], keys: frozenset) -> bool:
    return f"transformer_blocks.{int(groups['i']) + 1}.norm1.linear.weight" not in keys


def _not_last_block(groups: Dict[str, str], keys: frozenset) -> bool:
    return not _is_last_block(groups, keys)


_D = "transformer_blocks.{i}."
_DIFFUSERS_RULES: Tuple[Rule, ...] = (
    Rule("x_embedder.weight", ("pos_embed.proj.weight",), conv_to_nhwc),
    Rule("x_embedder.bias", ("pos_embed.proj.bias",)),
    Rule("pos_embed", ("pos_embed.pos_embed",)),
    *_wb("t_embedder.fc1", "time_text_embed.timestep_embedder.linear_1"),
    *_wb("t_embedder.fc2", "time_text_embed.timestep_embedder.linear_2"),
    *_wb("y_embedder.fc1", "time_text_embed.text_embedder.linear_1"),
    *_wb("y_embedder.fc2", "time_text_embed.text_embedder.linear_2"),
    *_wb("context_embedder", "context_embedder"),
    # image stream
    *_wb("blocks.{i}.x.adaLN", _D + "norm1.linear"),
    *_wb_qkv("blocks.{i}.x.attn.qkv", _D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v"),
    Rule("blocks.{i}.x.attn.q_norm.weight", (_D + "attn.norm_q.weight",)),
    Rule("blocks.{i}.x.attn.k_norm.weight", (_D + "attn.norm_k.weight",)),
    *_wb("blocks.{i}.x.attn.proj", _D + "attn.to_out.0"),
    *_wb_qkv("blocks.{i}.x.attn2.qkv", _D + "attn2.to_q", _D + "attn2.to_k", _D + "attn2.to_v"),
    Rule("blocks.{i}.x.attn2.q_norm.weight", (_D + "attn2.norm_q.weight",)),
    Rule("blocks.{i}.x.attn2.k_norm.weight", (_D + "attn2.norm_k.weight",)),
    *_wb("blocks.{i}.x.attn2.proj", _D + "attn2.to_out.0"),
    *_wb("blocks.{i}.x.mlp.fc1", _D + "ff.net.0.proj"),
    *_wb("blocks.{i}.x.mlp.fc2", _D + "ff.net.2"),
    # context stream
    *_wb("blocks.{i}.context.adaLN", _D + "norm1_context.linear", when=_not_last_block),
    *_wb("blocks.{i}.context.adaLN", _D + "norm1_context.linear", swap_halves, _is_last_block),
    *_wb_qkv(
        "blocks.{i}.context.attn.qkv",
        _D + "attn.add_q_proj",
        _D + "attn.add_k_proj",
        _D + "attn.add_v_proj",
    ),
    Rule("blocks.{i}.context.attn.q_norm.weight", (_D + "attn.norm_added_q.weight",)),
    Rule("blocks.{i}.context.attn.k_norm.weight", (_D + "attn.norm_added_k.weight",)),
    *_wb("blocks.{i}.context.attn.proj", _D + "attn.to_add_out"),
    *_wb("blocks.{i}.context.mlp.fc1", _D + "ff_context.net.0.proj"),
    *_wb("blocks.{i}.context.mlp.fc2", _D + "ff_context.net.2"),
    # final layer
    *_wb("final_layer.adaLN", "norm_out.linear", swap_halves),
    *_wb("final_layer.linear", "proj_out"),
)

# ---- Stability single file (`model.diffusion_model.` + SAI MMDiTX names) ----
_S = "joint_blocks.{i}."


def _sai_stream(ours: str, sai: str) -> Tuple[Rule, ...]:
    return (
        *_wb(f"blocks.{{i}}.{ours}.adaLN", _S + sai + ".adaLN_modulation.1"),
        *_wb(f"blocks.{{i}}.{ours}.attn.qkv", _S + sai + ".attn.qkv"),
        Rule(f"blocks.{{i}}.{ours}.attn.q_norm.weight", (_S + sai + ".attn.ln_q.weight",)),
        Rule(f"blocks.{{i}}.{ours}.attn.k_norm.weight", (_S + sai + ".attn.ln_k.weight",)),
        *_wb(f"blocks.{{i}}.{ours}.attn.proj", _S + sai + ".attn.proj"),
        *_wb(f"blocks.{{i}}.{ours}.mlp.fc1", _S + sai + ".mlp.fc1"),
        *_wb(f"blocks.{{i}}.{ours}.mlp.fc2", _S + sai + ".mlp.fc2"),
    )


_STABILITY_RULES: Tuple[Rule, ...] = (
    Rule("x_embedder.weight", ("x_embedder.proj.weight",), conv_to_nhwc),
    Rule("x_embedder.bias", ("x_embedder.proj.bias",)),
    Rule("pos_embed", ("pos_embed",)),
    *_wb("t_embedder.fc1", "t_embedder.mlp.0"),
    *_wb("t_embedder.fc2", "t_embedder.mlp.2"),
    *_wb("y_embedder.fc1", "y_embedder.mlp.0"),
    *_wb("y_embedder.fc2", "y_embedder.mlp.2"),
    *_wb("context_embedder", "context_embedder"),
    *_sai_stream("x", "x_block"),
    *_sai_stream("context", "context_block"),
    *_wb("blocks.{i}.x.attn2.qkv", _S + "x_block.attn2.qkv"),
    Rule("blocks.{i}.x.attn2.q_norm.weight", (_S + "x_block.attn2.ln_q.weight",)),
    Rule("blocks.{i}.x.attn2.k_norm.weight", (_S + "x_block.attn2.ln_k.weight",)),
    *_wb("blocks.{i}.x.attn2.proj", _S + "x_block.attn2.proj"),
    *_wb("final_layer.adaLN", "final_layer.adaLN_modulation.1"),
    *_wb("final_layer.linear", "final_layer.linear"),
)

DIFFUSERS = NetworkLayout("diffusers transformer/ (SD3Transformer2DModel)", _DIFFUSERS_RULES)
# Keys outside the prefix (VAE `first_stage_model.`, `loss.`, text encoders) belong to others.
STABILITY = NetworkLayout(
    "Stability single file (model.diffusion_model.*)", _STABILITY_RULES, "model.diffusion_model."
)
LAYOUTS = (DIFFUSERS, STABILITY)


# ---- configuration from the mapped (our-named) tensors ----
_BLOCK = re.compile(r"blocks\.(\d+)\.x\.adaLN\.weight\Z")
_ATTN2 = re.compile(r"blocks\.(\d+)\.x\.attn2\.")


def _need(weights: Mapping[str, mx.array], key: str) -> Tuple[int, ...]:
    if key not in weights:
        raise WeightMappingError(f"cannot infer the MMDiT configuration: '{key}' is missing")
    return tuple(weights[key].shape)


def infer_config(weights: Mapping[str, mx.array]) -> MMDiTConfig:
    """The MMDiTConfig that `weights` (our names, any layout mapped) was trained with."""
    blocks = sorted(int(m.group(1)) for k in weights if (m := _BLOCK.match(k)))
    if not blocks or blocks != list(range(len(blocks))):
        raise WeightMappingError(
            f"cannot infer the MMDiT configuration: joint blocks found {blocks}, expected 0..N-1"
        )
    hidden, patch, _, in_channels = _need(weights, "x_embedder.weight")  # (H, p, p, C)
    # Head size 64 in every released model; qk-norm weights state it when present.
    norm = weights.get("blocks.0.x.attn.q_norm.weight")
    head_dim = norm.shape[0] if norm is not None else 64
    rows = _need(weights, "pos_embed")[1]
    side = math.isqrt(rows)
    if side * side != rows:
        raise WeightMappingError(f"pos_embed has {rows} rows, not a square grid")
    return MMDiTConfig(
        depth=len(blocks),
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=_need(weights, "final_layer.linear.weight")[0] // (patch * patch),
        context_dim=_need(weights, "context_embedder.weight")[1],
        pooled_dim=_need(weights, "y_embedder.fc1.weight")[1],
        pos_embed_max_size=side,
        qk_norm=norm is not None,
        dual_attention_layers=tuple(
            sorted({int(m.group(1)) for k in weights if (m := _ATTN2.match(k))})
        ),
        mlp_ratio=_need(weights, "blocks.0.x.mlp.fc1.weight")[0] // hidden,
    )


def load_mmdit(
    tensors: Mapping[str, mx.array],
    layout: NetworkLayout,
    files: Sequence[str] = (),
    dtype: Optional[mx.Dtype] = None,
    config: Optional[MMDiTConfig] = None,
) -> MMDiT:
    """Map `tensors` from `layout`, infer the config (unless given), build and load an MMDiT."""
    return load_network(
        tensors, layout, MMDiT, infer_config, files=files, dtype=dtype, config=config
    )
