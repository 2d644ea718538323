"""CLIP text encoders: HF transformers names (every official SD3 layout) -> ours.

The same names appear in diffusers `text_encoder/`, `text_encoder_2/`, in SAI
`text_encoders/clip_{l,g}.safetensors` (no prefix) and under
`text_encoders.clip_{l,g}.transformer.` in all-in-one checkpoints (spec §2.1, §2.2, §2.5).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import mlx.core as mx

from ...config import CLIPConfig
from ...errors import InputError, WeightMappingError
from ...models.clip import CLIPTextEncoder
from ..mapping import NetworkLayout, Rule, concat, load_network

_L = "text_model.encoder.layers.{i}."

RULES = (
    Rule("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
    Rule("position_embedding", ("text_model.embeddings.position_embedding.weight",)),
    *(
        Rule(
            f"layers.{{i}}.attn.qkv.{p}",
            tuple(f"{_L}self_attn.{n}_proj.{p}" for n in "qkv"),
            concat,
        )
        for p in ("weight", "bias")
    ),
    *(
        Rule(f"layers.{{i}}.{ours}.{p}", (f"{_L}{theirs}.{p}",))
        for ours, theirs in (
            ("attn.out", "self_attn.out_proj"),
            ("norm1", "layer_norm1"),
            ("norm2", "layer_norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        )
        for p in ("weight", "bias")
    ),
    Rule("final_norm.weight", ("text_model.final_layer_norm.weight",)),
    Rule("final_norm.bias", ("text_model.final_layer_norm.bias",)),
    Rule("text_projection.weight", ("text_projection.weight",)),
)

# A non-persistent buffer that older transformers versions saved; derived, not learned.
IGNORE = (r"text_model\.embeddings\.position_ids\Z",)

DIFFUSERS = NetworkLayout(
    "diffusers CLIP text encoder (text_encoder/ or text_encoder_2/)", RULES, "", IGNORE
)
STABILITY = NetworkLayout(
    "SAI text_encoders/clip_l.safetensors or clip_g.safetensors", RULES, "", IGNORE
)

SINGLE_FILE_ENCODERS = ("clip_l", "clip_g")


def single_file(which: str) -> NetworkLayout:
    """Layout of one CLIP inside an all-in-one checkpoint (`which`: "clip_l" or "clip_g")."""
    if which not in SINGLE_FILE_ENCODERS:
        raise InputError(
            f"unknown single-file CLIP encoder {which!r}; expected one of {SINGLE_FILE_ENCODERS}"
        )
    prefix = f"text_encoders.{which}.transformer."
    return NetworkLayout(f"single-file {which} (prefix {prefix})", RULES, prefix, IGNORE)


_LEGACY_EOS = 2  # official SD3 config.json files still carry it; the real EOS is 49407
_DEFAULT_EOS = 49407
_ACTIVATION_BY_WIDTH = {768: "quick_gelu", 1280: "gelu"}  # OpenAI CLIP-L, OpenCLIP bigG


def infer_config(weights: Mapping[str, mx.array], hf_config: Optional[dict] = None) -> CLIPConfig:
    """Derive the config from our-named tensors' shapes (+ a diffusers config.json if given).

    Shapes give sizes; heads are hidden // 64 (both official encoders) unless `hf_config`
    says otherwise; the activation comes from `hf_config["hidden_act"]`, else from width.
    """
    hf = hf_config or {}
    try:
        vocab, hidden = weights["token_embedding.weight"].shape
        positions = weights["position_embedding"].shape[0]
        intermediate = weights["layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise WeightMappingError(
            f"cannot infer the CLIP configuration: no tensor {e} after mapping"
        )
    layer_ids = {int(m.group(1)) for k in weights if (m := re.match(r"layers\.(\d+)\.", k))}
    projection = weights.get("text_projection.weight")

    activation = hf.get("hidden_act") or _ACTIVATION_BY_WIDTH.get(hidden)
    if activation is None:
        raise WeightMappingError(
            f"cannot tell the activation of a CLIP text encoder of width {hidden} (only 768 = "
            "CLIP-L quick_gelu and 1280 = CLIP-G gelu are known); pass its config.json as hf_config"
        )
    eos = hf.get("eos_token_id")
    if not isinstance(eos, int) or eos == _LEGACY_EOS:
        eos = _DEFAULT_EOS
    return CLIPConfig(
        hidden_size=hidden,
        num_layers=max(layer_ids) + 1,
        num_heads=int(hf.get("num_attention_heads") or hidden // 64),
        intermediate_size=intermediate,
        activation=activation,
        vocab_size=vocab,
        max_positions=positions,
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        projection_dim=None if projection is None else projection.shape[0],
        eos_token_id=eos,
    )


def load_clip(
    tensors: Mapping[str, mx.array],
    layout: NetworkLayout,
    files: Sequence[str] = (),
    dtype: Optional[mx.Dtype] = None,
    hf_config: Optional[dict] = None,
    config: Optional[CLIPConfig] = None,
) -> CLIPTextEncoder:
    """Map `tensors` through `layout`, infer the config (unless given), build and load."""
    return load_network(
        tensors, layout, CLIPTextEncoder, lambda w: infer_config(w, hf_config),
        files=files, dtype=dtype, config=config,
    )  # fmt: skip
