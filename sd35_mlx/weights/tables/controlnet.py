"""ControlNet weight layouts: Stability's SD3.5 Large single files and diffusers folders.

Our names (the MLX module tree of `sd35_mlx.models.controlnet.ControlNet`):
    control_embedder.*  {t,y}_embedder.fc{1,2}.*  outputs.{i}.*
    image-only blocks:  blocks.{i}.adaLN.*  .attn.qkv.*  .attn.proj.*  .mlp.fc{1,2}.*
    joint blocks:       blocks.{i}.{x,context}.*  (as the MMDiT's), x_embedder.*  pos_embed
                        context_embedder.*

Layouts:
- Stability (`sd3.5_large_controlnet_{blur,canny,depth}.safetensors`): SAI's
  `ControlNetEmbedder` names, fused qkv, plus `control_type` (0 blur, 1 canny, 2 depth) and
  possibly an unused `pos_embed.proj` (the 8B ControlNets use the transformer's embedder).
- diffusers `SD3ControlNetModel` with image-only blocks (`SD3SingleTransformerBlock`, what
  diffusers' conversion script makes of the Stability files) or joint blocks
  (`JointTransformerBlock`, InstantX / Alimama), split q/k/v.
Unlike the MMDiT no block is context-pre-only, so no adaLN is stored with swapped halves.
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Mapping, Optional, Sequence, Tuple

import mlx.core as mx

from ...config import ControlNetConfig
from ...errors import WeightMappingError
from ...models.controlnet import ControlNet
from ..mapping import NetworkLayout, Rule, conv_to_nhwc, load_network
from .mmdit import _DIFFUSERS_RULES as _MMDIT_DIFFUSERS_RULES
from .mmdit import _wb, _wb_qkv

_EMBEDDERS: Tuple[Rule, ...] = (
    Rule("control_embedder.weight", ("pos_embed_input.proj.weight",), conv_to_nhwc),
    Rule("control_embedder.bias", ("pos_embed_input.proj.bias",)),
    *_wb("t_embedder.fc1", "time_text_embed.timestep_embedder.linear_1"),
    *_wb("t_embedder.fc2", "time_text_embed.timestep_embedder.linear_2"),
    *_wb("y_embedder.fc1", "time_text_embed.text_embedder.linear_1"),
    *_wb("y_embedder.fc2", "time_text_embed.text_embedder.linear_2"),
    *_wb("outputs.{i}", "controlnet_blocks.{i}"),
)

_B = "transformer_blocks.{i}."
_STABILITY_RULES: Tuple[Rule, ...] = (
    *_EMBEDDERS,
    *_wb("blocks.{i}.adaLN", _B + "adaLN_modulation.1"),
    *_wb("blocks.{i}.attn.qkv", _B + "attn.qkv"),
    *_wb("blocks.{i}.attn.proj", _B + "attn.proj"),
    *_wb("blocks.{i}.mlp.fc1", _B + "mlp.fc1"),
    *_wb("blocks.{i}.mlp.fc2", _B + "mlp.fc2"),
)

_DIFFUSERS_IMAGE_BLOCKS: Tuple[Rule, ...] = (
    *_wb("blocks.{i}.adaLN", _B + "norm1.linear"),
    *_wb_qkv("blocks.{i}.attn.qkv", _B + "attn.to_q", _B + "attn.to_k", _B + "attn.to_v"),
    *_wb("blocks.{i}.attn.proj", _B + "attn.to_out.0"),
    *_wb("blocks.{i}.mlp.fc1", _B + "ff.net.0.proj"),
    *_wb("blocks.{i}.mlp.fc2", _B + "ff.net.2"),
)


def _joint_block_rules() -> Tuple[Rule, ...]:
    """The MMDiT's diffusers block rules, minus the last-block special case: every
    ControlNet block keeps its context stream, stored in the plain (shift, scale) order."""
    rules = [r for r in _MMDIT_DIFFUSERS_RULES if r.target.startswith("blocks.") and r.when is None]
    rules += _wb("blocks.{i}.context.adaLN", _B + "norm1_context.linear")
    return tuple(rules)


_DIFFUSERS_JOINT_RULES: Tuple[Rule, ...] = (
    *_EMBEDDERS,
    Rule("x_embedder.weight", ("pos_embed.proj.weight",), conv_to_nhwc),
    Rule("x_embedder.bias", ("pos_embed.proj.bias",)),
    Rule("pos_embed", ("pos_embed.pos_embed",)),
    *_wb("context_embedder", "context_embedder"),
    *_joint_block_rules(),
)

CONTROL_TYPE_KEY = "control_type"
STABILITY = NetworkLayout(
    "Stability SD3.5 ControlNet single file", _STABILITY_RULES,
    # the type tag is read apart (read_control_type); SAI's own x_embedder is unused by the 8B nets
    ignore=(rf"{CONTROL_TYPE_KEY}\Z", r"pos_embed\.proj\.(weight|bias)\Z"),
)  # fmt: skip
DIFFUSERS = NetworkLayout("diffusers SD3ControlNetModel (joint blocks)", _DIFFUSERS_JOINT_RULES)
DIFFUSERS_IMAGE_ONLY = NetworkLayout(
    "diffusers SD3ControlNetModel (image-only blocks)", (*_EMBEDDERS, *_DIFFUSERS_IMAGE_BLOCKS)
)
LAYOUTS = (STABILITY, DIFFUSERS, DIFFUSERS_IMAGE_ONLY)


def layout_of(keys: Sequence[str]) -> NetworkLayout:
    """Stability files name the adaLN `adaLN_modulation.1` and fuse qkv; diffusers do neither,
    and their joint-block ControlNets alone have a `context_embedder`."""
    keys = list(keys)
    if not any(k.startswith("controlnet_blocks.") for k in keys):
        raise WeightMappingError(
            "not a ControlNet checkpoint: no controlnet_blocks.* tensors (is this a transformer, "
            "a LoRA or another model's ControlNet?)"
        )
    if any(k.endswith("adaLN_modulation.1.weight") for k in keys):
        return STABILITY
    return DIFFUSERS if any(k.startswith("context_embedder.") for k in keys) else DIFFUSERS_IMAGE_ONLY


# ---- configuration from the mapped (our-named) tensors ----
_BLOCK = re.compile(r"blocks\.(\d+)\.(?:x\.)?adaLN\.weight\Z")
_ATTN2 = re.compile(r"blocks\.(\d+)\.x\.attn2\.")


def _need(weights: Mapping[str, mx.array], key: str) -> Tuple[int, ...]:
    if key not in weights:
        raise WeightMappingError(f"cannot infer the ControlNet configuration: '{key}' is missing")
    return tuple(weights[key].shape)


def infer_config(weights: Mapping[str, mx.array], num_heads: Optional[int] = None) -> ControlNetConfig:
    """The ControlNetConfig that `weights` (our names) was trained with.

    num_heads: when known from elsewhere (a diffusers config.json, or the transformer the
    ControlNet belongs to: Stability builds it with the transformer's heads); else from the
    QK-norm width, else head size 64 as in every released model."""
    blocks = sorted(int(m.group(1)) for k in weights if (m := _BLOCK.match(k)))
    if not blocks or blocks != list(range(len(blocks))):
        raise WeightMappingError(
            f"cannot infer the ControlNet configuration: blocks found {blocks}, expected 0..N-1"
        )
    hidden, patch, _, control_channels = _need(weights, "control_embedder.weight")
    joint = "context_embedder.weight" in weights
    prefix = "blocks.0.x." if joint else "blocks.0."
    norm = weights.get(prefix + "attn.q_norm.weight")
    if num_heads is None:
        head_dim = norm.shape[0] if norm is not None else 64
        if hidden % head_dim:  # (a hidden size below the head size is not a multiple either)
            raise WeightMappingError(
                f"cannot infer the ControlNet's attention heads: hidden size {hidden} is not a multiple "
                f"of the head size {head_dim}; pass the heads explicitly (open_controlnet(..., num_heads=N))"
            )
        num_heads = hidden // head_dim
    pos_size = None
    in_channels = ControlNetConfig.in_channels  # image-only nets embed nothing themselves
    if joint:
        if "pos_embed" not in weights:
            raise WeightMappingError(
                "this joint ControlNet has no stored position table (pos_embed.pos_embed); only "
                "ControlNets with pos_embed_max_size set are supported"
            )
        rows = weights["pos_embed"].shape[1]
        pos_size = math.isqrt(rows)
        if pos_size * pos_size != rows:
            raise WeightMappingError(f"pos_embed has {rows} rows, not a square grid")
        in_channels = _need(weights, "x_embedder.weight")[3]
    return ControlNetConfig(
        depth=len(blocks),
        hidden_size=hidden,
        num_heads=num_heads,
        patch_size=patch,
        in_channels=in_channels,
        control_channels=control_channels,
        pooled_dim=_need(weights, "y_embedder.fc1.weight")[1],
        context_dim=_need(weights, "context_embedder.weight")[1] if joint else None,
        pos_embed_max_size=pos_size,
        qk_norm=norm is not None,
        dual_attention_layers=tuple(sorted({int(m.group(1)) for k in weights if (m := _ATTN2.match(k))})),
        mlp_ratio=_need(weights, prefix + "mlp.fc1.weight")[0] // hidden,
    )


def read_control_type(tensors: Mapping[str, mx.array]) -> Optional[int]:
    """Stability's type tag (0 blur, 1 canny, 2 depth), or None when the file has none."""
    tag = tensors.get(CONTROL_TYPE_KEY)
    return None if tag is None else int(round(float(tag.reshape(-1)[0].item())))


def load_controlnet(
    tensors: Mapping[str, mx.array],
    layout: Optional[NetworkLayout] = None,
    files: Sequence[str] = (),
    dtype: Optional[mx.Dtype] = None,
    config: Optional[ControlNetConfig] = None,
    num_heads: Optional[int] = None,
) -> ControlNet:
    """Map `tensors` (layout recognised from the keys unless given), infer the config, load."""
    layout = layout or layout_of(tensors)
    infer = partial(infer_config, num_heads=num_heads)
    return load_network(tensors, layout, ControlNet, infer, files=files, dtype=dtype, config=config)
