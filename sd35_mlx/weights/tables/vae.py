"""The 16-channel VAE: diffusers `vae/`, Stability `first_stage_model.*` and our names (docs/vae.md, "Our names and the index reversal").

Our decoder numbers its levels like the encoder (0 = full resolution), which is Stability's
`decoder.up.{i}`; diffusers' `decoder.up_blocks.{i}` runs in the other order, so its rules
reverse the index. The reversal needs the number of levels, so those rules exist once per
level count and each applies only to a checkpoint with that many `up_blocks`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Dict, Mapping, Optional, Sequence, Tuple

import mlx.core as mx

from ...config import VAEConfig
from ...errors import WeightMappingError
from ...models.vae import VAE
from ..mapping import (
    NetworkLayout, Rule, apply_rules, conv_to_nhwc, identity, load_into, squeeze_1x1,
)  # fmt: skip

_WB = ("weight", "bias")
_MAX_LEVELS = 8  # reversal rules are generated for 1.._MAX_LEVELS decoder levels


def _conv(target: str, source: str, **kw) -> Tuple[Rule, ...]:
    return (Rule(f"{target}.weight", (f"{source}.weight",), conv_to_nhwc, **kw),
            Rule(f"{target}.bias", (f"{source}.bias",), **kw))  # fmt: skip


def _same_shape(target: str, source: str, transform=identity, **kw) -> Tuple[Rule, ...]:
    """Norms (and Linear-like weights through `transform`): weight and bias."""
    return (Rule(f"{target}.weight", (f"{source}.weight",), transform, **kw),
            Rule(f"{target}.bias", (f"{source}.bias",), **kw))  # fmt: skip


def _resnet(ours: str, theirs: str, shortcut: str, **kw) -> Tuple[Rule, ...]:
    return (
        *_same_shape(f"{ours}.norm1", f"{theirs}.norm1", **kw),
        *_conv(f"{ours}.conv1", f"{theirs}.conv1", **kw),
        *_same_shape(f"{ours}.norm2", f"{theirs}.norm2", **kw),
        *_conv(f"{ours}.conv2", f"{theirs}.conv2", **kw),
        *_same_shape(f"{ours}.shortcut", f"{theirs}.{shortcut}", squeeze_1x1, **kw),
    )


def _attention(ours: str, theirs: str, names: Dict[str, Tuple[str, ...]]) -> Tuple[Rule, ...]:
    """`names`: our sub-module -> the source's name(s) for it (later ones are aliases)."""
    rules = []
    for sub, (first, *others) in names.items():
        transform = identity if sub == "norm" else squeeze_1x1  # 1x1 convs become Linears
        for p in _WB:
            rules.append(Rule(f"{ours}.{sub}.{p}", (f"{theirs}.{first}.{p}",), transform,
                              aliases=tuple((f"{theirs}.{o}.{p}",) for o in others)))  # fmt: skip
    return tuple(rules)


def _network(side: str, *, mid: Dict[str, str], attention: Dict[str, Tuple[str, ...]],
             norm_out: str, shortcut: str) -> Tuple[Rule, ...]:
    """Rules shared by encoder and decoder: conv_in, mid block, output norm and conv."""
    return (
        *_conv(f"{side}.conv_in", f"{side}.conv_in"),
        *_resnet(f"{side}.mid.resnet1", f"{side}.{mid['resnet1']}", shortcut),
        *_attention(f"{side}.mid.attention", f"{side}.{mid['attention']}", attention),
        *_resnet(f"{side}.mid.resnet2", f"{side}.{mid['resnet2']}", shortcut),
        *_same_shape(f"{side}.norm_out", f"{side}.{norm_out}"),
        *_conv(f"{side}.conv_out", f"{side}.conv_out"),
    )


# ---- Stability (SAI `sd3_impls.py` names, `first_stage_model.` in single files) ----
_SAI_ATTENTION = {"norm": ("norm",), "q": ("q",), "k": ("k",), "v": ("v",), "out": ("proj_out",)}
_SAI_MID = {"resnet1": "mid.block_1", "attention": "mid.attn_1", "resnet2": "mid.block_2"}

STABILITY_RULES: Tuple[Rule, ...] = (
    *_network("encoder", mid=_SAI_MID, attention=_SAI_ATTENTION, norm_out="norm_out",
              shortcut="nin_shortcut"),
    *_resnet("encoder.down.{i}.resnets.{j}", "encoder.down.{i}.block.{j}", "nin_shortcut"),
    *_conv("encoder.down.{i}.downsample.conv", "encoder.down.{i}.downsample.conv"),
    *_network("decoder", mid=_SAI_MID, attention=_SAI_ATTENTION, norm_out="norm_out",
              shortcut="nin_shortcut"),
    *_resnet("decoder.up.{i}.resnets.{j}", "decoder.up.{i}.block.{j}", "nin_shortcut"),
    *_conv("decoder.up.{i}.upsample.conv", "decoder.up.{i}.upsample.conv"),
)  # fmt: skip


# ---- diffusers (`vae/diffusion_pytorch_model.safetensors`) ----
# Old diffusers files name the attention query/key/value/proj_attn; diffusers still loads them.
_DF_ATTENTION = {
    "norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"),
    "v": ("to_v", "value"), "out": ("to_out.0", "proj_attn"),
}  # fmt: skip
_DF_MID = {"resnet1": "mid_block.resnets.0", "attention": "mid_block.attentions.0",
           "resnet2": "mid_block.resnets.1"}  # fmt: skip
_UP_BLOCK = re.compile(r"decoder\.up_blocks\.(\d+)\.")


@lru_cache(maxsize=8)
def _decoder_levels(keys: frozenset) -> int:
    return len({m.group(1) for k in keys if (m := _UP_BLOCK.match(k))})


def _reversed_up_blocks(levels: int) -> Tuple[Rule, ...]:
    """diffusers up_blocks.{i} -> our up.{levels-1-i}, for checkpoints with `levels` levels."""

    def when(groups: Dict[str, str], keys: frozenset) -> bool:
        return _decoder_levels(keys) == levels

    def rename(groups: Dict[str, str]) -> Dict[str, str]:
        return {**groups, "i": str(levels - 1 - int(groups["i"]))}

    kw = dict(when=when, rename=rename)
    return (
        *_resnet("decoder.up.{i}.resnets.{j}", "decoder.up_blocks.{i}.resnets.{j}",
                 "conv_shortcut", **kw),
        *_conv("decoder.up.{i}.upsample.conv", "decoder.up_blocks.{i}.upsamplers.0.conv", **kw),
    )  # fmt: skip


DIFFUSERS_RULES: Tuple[Rule, ...] = (
    *_network("encoder", mid=_DF_MID, attention=_DF_ATTENTION, norm_out="conv_norm_out",
              shortcut="conv_shortcut"),
    *_resnet("encoder.down.{i}.resnets.{j}", "encoder.down_blocks.{i}.resnets.{j}",
             "conv_shortcut"),
    *_conv("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    *_network("decoder", mid=_DF_MID, attention=_DF_ATTENTION, norm_out="conv_norm_out",
              shortcut="conv_shortcut"),
    *(r for n in range(1, _MAX_LEVELS + 1) for r in _reversed_up_blocks(n)),
)  # fmt: skip


# ---- ours (a converted folder stores exactly tree_flatten(VAE(...).parameters())) ----
def _our_names() -> Tuple[str, ...]:
    params = []
    for side, blocks, resample in (("encoder", "down", "downsample"), ("decoder", "up", "upsample")):
        parts = ["conv_in", "conv_out", "norm_out", "mid.attention.norm", "mid.attention.q",
                 "mid.attention.k", "mid.attention.v", "mid.attention.out",
                 f"{blocks}.{{i}}.{resample}.conv"]  # fmt: skip
        for r in ("mid.resnet1", "mid.resnet2", f"{blocks}.{{i}}.resnets.{{j}}"):
            parts += [f"{r}.{m}" for m in ("norm1", "conv1", "norm2", "conv2", "shortcut")]
        params += [f"{side}.{p}.{wb}" for p in parts for wb in _WB]
    return tuple(params)


MLX_RULES: Tuple[Rule, ...] = tuple(Rule(n, (n,)) for n in _our_names())

DIFFUSERS = NetworkLayout("diffusers vae/ (AutoencoderKL)", DIFFUSERS_RULES)
STABILITY = NetworkLayout(
    "Stability single file (first_stage_model.*)", STABILITY_RULES, prefix="first_stage_model."
)
STABILITY_STANDALONE = STABILITY.with_prefix("", "Stability VAE file (encoder.*/decoder.*)")
MLX = NetworkLayout("sd35_mlx converted vae", MLX_RULES)


# ---- configuration from shapes ----
def _levels(weights: Mapping[str, mx.array], pattern: str) -> Dict[int, Dict[int, mx.array]]:
    """{level: {resnet: conv1.weight}} for keys like `encoder.down.{i}.resnets.{j}.conv1.weight`."""
    rx = re.compile(pattern)
    out: Dict[int, Dict[int, mx.array]] = {}
    for k, v in weights.items():
        if m := rx.fullmatch(k):
            out.setdefault(int(m.group(1)), {})[int(m.group(2))] = v
    return out


def _channels(levels: Dict[int, Dict[int, mx.array]], side: str) -> Tuple[int, ...]:
    if sorted(levels) != list(range(len(levels))) or not levels:
        raise WeightMappingError(f"cannot infer the VAE {side} levels: found {sorted(levels)}")
    return tuple(int(levels[i][0].shape[0]) for i in range(len(levels)))


def _resnets_per_level(levels: Dict[int, Dict[int, mx.array]], side: str) -> int:
    counts = {len(v) for v in levels.values()}
    if len(counts) != 1:
        raise WeightMappingError(f"VAE {side} levels have different resnet counts: {sorted(counts)}")
    return counts.pop()


def infer_config(weights: Mapping[str, mx.array], hf_config: Optional[dict] = None) -> VAEConfig:
    """VAEConfig from our-named tensors' shapes; groups, eps and latent scaling from `hf_config`.

    `hf_config` is a diffusers vae/config.json dict. GroupNorm's group count cannot be seen in
    shapes (default 32). A `shift_factor` of null there means no shift (0.0).
    """
    hf = hf_config or {}
    found: Dict[str, object] = {}
    for side, blocks, extra in (("encoder", "down", 0), ("decoder", "up", 1)):
        if f"{side}.conv_in.weight" not in weights:
            continue
        levels = _levels(weights, rf"{side}\.{blocks}\.(\d+)\.resnets\.(\d+)\.conv1\.weight")
        per_side = {
            "block_out_channels": _channels(levels, side),
            "layers_per_block": _resnets_per_level(levels, side) - extra,
        }
        if side == "encoder":
            per_side["in_channels"] = int(weights["encoder.conv_in.weight"].shape[-1])
            per_side["latent_channels"] = int(weights["encoder.conv_out.weight"].shape[0]) // 2
        else:
            per_side["in_channels"] = int(weights["decoder.conv_out.weight"].shape[0])
            per_side["latent_channels"] = int(weights["decoder.conv_in.weight"].shape[-1])
        for k, v in per_side.items():
            if found.setdefault(k, v) != v:
                raise WeightMappingError(f"VAE encoder and decoder disagree on {k}: {found[k]} vs {v}")
    if "decoder.conv_in.weight" not in weights:
        raise WeightMappingError("cannot infer the VAE configuration: no decoder weights after mapping")

    for key in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels"):
        if hf.get(key) is not None:
            want = tuple(hf[key]) if isinstance(hf[key], list) else hf[key]
            if want != found[key]:
                raise WeightMappingError(
                    f"vae config.json says {key}={hf[key]} but the weights have {found[key]}"
                )
    if hf.get("mid_block_add_attention") is False or hf.get("use_quant_conv") or hf.get("use_post_quant_conv"):
        raise WeightMappingError(
            "this VAE config (no mid-block attention or quant_conv layers) is not the SD3 VAE"
        )
    default = VAEConfig()
    shift = hf["shift_factor"] if "shift_factor" in hf else default.shift_factor
    config = VAEConfig(
        **found,  # type: ignore[arg-type]
        norm_num_groups=int(hf.get("norm_num_groups") or default.norm_num_groups),
        norm_eps=default.norm_eps,
        scaling_factor=float(hf.get("scaling_factor") or default.scaling_factor),
        shift_factor=float(shift or 0.0),
    )
    bad = [c for c in config.block_out_channels if c % config.norm_num_groups]
    if bad:
        raise WeightMappingError(
            f"VAE channels {bad} are not divisible by {config.norm_num_groups} GroupNorm groups; "
            "pass the VAE's config.json (norm_num_groups) as hf_config"
        )
    return config


def has_encoder(weights: Mapping[str, mx.array]) -> bool:
    """Whether mapped weights carry the encoder (official files do; some users strip it)."""
    return any(k.startswith("encoder.") for k in weights)


def load_vae(
    tensors: Mapping[str, mx.array],
    layout: NetworkLayout,
    files: Sequence[str] = (),
    dtype: Optional[mx.Dtype] = None,
    hf_config: Optional[dict] = None,
    config: Optional[VAEConfig] = None,
) -> VAE:
    """Map `tensors` through `layout`, infer the config (unless given), build and load.

    The encoder is built only when the checkpoint has it (decoder-only files load too).
    """
    weights = apply_rules(
        tensors, layout.rules, layout=layout.name, files=files, prefix=layout.prefix,
        ignore=layout.ignore,
    )  # fmt: skip
    if config is None:
        config = infer_config(weights, hf_config)
    model = VAE(config, with_encoder=has_encoder(weights))
    return load_into(model, weights, layout=layout.name, files=files, dtype=dtype)


__all__ = [
    "DIFFUSERS", "STABILITY", "STABILITY_STANDALONE", "MLX", "infer_config", "has_encoder",
    "load_vae",
]  # fmt: skip
