"""CLIP text encoders: HF transformers names (every official SD3 layout) -> ours.

The same names appear in diffusers `text_encoder/`, `text_encoder_2/`, in SAI
`text_encoders/clip_{l,g}.safetensors` (no prefix) and under
`text_encoders.clip_{l,g}.transformer.` in all-in-one checkpoints (docs/loading.md, "Tensor names in each layout").

Also the CLIP-L `text_projection` check (docs/text_encoders_clip.md): see `warn_if_clip_l_projected`.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Mapping, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ...config import CLIPConfig
from ...errors import CLIPProjectionWarning, InputError, WeightMappingError
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


# ---- CLIP-L's text_projection (docs/text_encoders_clip.md) -------------------------------------------------------
# SD3 conditions on CLIP-L's *unprojected* pooled vector: Stability's reference never projects
# it and its clip_l.safetensors has no projection. Diffusers' text_encoder/ carries one that is
# meant to be the identity (diffusers' own single-file loader injects torch.eye(768)) and
# applies it as stored. We apply it as stored too (diffusers is our parity oracle) and warn
# when it is not the identity. Skipping the matmul for an identity is not worth a second code
# path: it is 1.2 MFLOPs per prompt, 1e-4 of CLIP-L's ~13 GFLOPs over 77 tokens.

# The identity is exact in every float format (0 and 1 are representable), so a stored
# torch.eye deviates by exactly 0. The tolerance forgives one bf16 rounding of each diagonal
# entry (bf16 unit roundoff 2^-8) with a factor 2 to spare: a projection within it moves the
# pooled vector by at most 2^-7 of its norm, about two bf16 roundings of the vector itself.
IDENTITY_TOLERANCE = 2.0**-7


def _projection_weight(model: CLIPTextEncoder) -> Optional[mx.array]:
    if "text_projection" not in model:
        return None
    layer = model.text_projection
    if isinstance(layer, nn.QuantizedLinear):  # a converted folder may store it quantized
        from ...fast_quantized import dequantized_weight

        return dequantized_weight(layer, mx.float32)
    return layer.weight.astype(mx.float32)


def projection_deviation(model: CLIPTextEncoder) -> Optional[float]:
    """How far the `text_projection` W is from the identity: an upper bound on ‖W − I‖₂,
    i.e. on how much (relative to its norm) it can move the pooled vector.

    √(‖W − I‖₁ · ‖W − I‖∞) (max column sum times max row sum), which bounds the spectral
    norm and equals it for a diagonal deviation, without an SVD. None when the network has no
    projection; inf when W is not square. Evaluates only this one (D, D) matrix.
    """
    w = _projection_weight(model)
    if w is None:
        return None
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        return math.inf
    delta = mx.abs(w - mx.eye(w.shape[0], dtype=mx.float32))
    return float(mx.sqrt(delta.sum(axis=0).max() * delta.sum(axis=1).max()).item())


def clip_l_projection_note(model: CLIPTextEncoder, source: str) -> Optional[str]:
    """What a non-identity CLIP-L `text_projection` means (None when there is none or it is
    the identity within `IDENTITY_TOLERANCE`). `source` names the file(s) or folder in the message.
    Call it for the CLIP-L only: CLIP-G's projection is a real, learned one."""
    deviation = projection_deviation(model)
    if deviation is None or deviation <= IDENTITY_TOLERANCE:
        return None
    if math.isinf(deviation):
        how = f"it maps {model.config.hidden_size} -> {model.config.projection_dim} features"
    else:
        how = f"||W - I||_2 <= {deviation:.3g}; tolerance {IDENTITY_TOLERANCE:.3g}"
    return (
        f"CLIP-L text encoder ({source}): its text_projection is not the identity ({how}). SD3 "
        "conditions on the unprojected pooled CLIP-L vector, as Stability's reference does (its "
        "clip_l.safetensors has no projection), so with this file the pooled vector, and the "
        "images, differ from Stability's reference. sd35_mlx applies the projection as stored, "
        "as diffusers does. For Stability's behaviour, use a CLIP-L without text_projection "
        "(Stability's text_encoders/clip_l.safetensors)."
    )


def warn_if_clip_l_projected(model: CLIPTextEncoder, source: str, stacklevel: int = 1) -> Optional[str]:
    """Issue a `CLIPProjectionWarning` when the CLIP-L's projection is not the identity;
    returns the message (None: nothing to say). `stacklevel` as in `warnings.warn`, counted
    from this function's caller (1: the caller's line). Python shows a given text once per
    line it is attributed to, and the text names the source: each file warns once per process."""
    note = clip_l_projection_note(model, source)
    if note is not None:
        warnings.warn(note, CLIPProjectionWarning, stacklevel=stacklevel + 1)
    return note
