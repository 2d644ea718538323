"""LoRA files: which format, which network, which module — read from the keys (never the file name).

A key is `prefix + stem + suffix`. The prefix names the network and how its modules are named
(lora_controlnet_spec.md §1.3–1.7):

    transformer.transformer_blocks.3.attn.to_q.lora_A.weight       diffusers / PEFT
    lora_unet_joint_blocks_3_x_block_attn_qkv.lora_down.weight      kohya sd-scripts (+ `.alpha`)
    diffusion_model.joint_blocks.3.x_block.attn.qkv.lora_up.weight  ComfyUI / Stability names
    lora_transformer_transformer_blocks_3_attn_to_q.lora_up.weight  OneTrainer (legacy)
    lora_te1_… / text_encoder.… / text_encoders.clip_l.transformer.…  CLIP-L (te2: CLIP-G, te3: T5)

`parse_lora(tensors, metadata)` turns a file into `LoRAModule`s (one factor pair per module as
stored, with its scale alpha/r); `adapters.targets` places them on our modules. LyCORIS types
(LoHa, LoKr), DoRA and full deltas are refused by name; LoRAs for other model families (SDXL,
SD 1.x, FLUX) are named as such.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import mlx.core as mx

from ..components import DIFFUSERS_FOLDERS
from ..errors import InputError


@dataclass(frozen=True)
class Prefix:
    """One key prefix: the network it addresses and how module names follow it."""

    text: str
    component: str  # transformer, clip_l, clip_g, t5
    naming: str  # "diffusers" or "stability" (transformer); "hf" (text encoders)
    flat: bool  # module names with every "." turned into "_" (kohya style)
    family: str  # shown to the user


PREFIXES: Tuple[Prefix, ...] = (
    Prefix("transformer.", "transformer", "diffusers", False, "diffusers/PEFT"),
    Prefix("base_model.model.", "transformer", "diffusers", False, "PEFT"),
    Prefix("lora_transformer_", "transformer", "diffusers", True, "OneTrainer"),
    Prefix("lycoris_", "transformer", "diffusers", True, "SimpleTuner"),
    Prefix("lora_unet_", "transformer", "stability", True, "kohya"),
    Prefix("lora_prior_unet_", "transformer", "stability", True, "kohya"),
    Prefix("model.diffusion_model.", "transformer", "stability", False, "Stability"),
    Prefix("diffusion_model.", "transformer", "stability", False, "ComfyUI"),
    Prefix("text_encoder.", "clip_l", "hf", False, "diffusers/PEFT"),
    Prefix("text_encoder_2.", "clip_g", "hf", False, "diffusers/PEFT"),
    Prefix("text_encoder_3.", "t5", "hf", False, "OneTrainer"),
    Prefix("lora_te_", "clip_l", "hf", True, "kohya"),
    Prefix("lora_te1_", "clip_l", "hf", True, "kohya"),
    Prefix("lora_te2_", "clip_g", "hf", True, "kohya"),
    Prefix("lora_te3_", "t5", "hf", True, "kohya"),
    Prefix("text_encoders.clip_l.transformer.", "clip_l", "hf", False, "ComfyUI"),
    Prefix("text_encoders.clip_g.transformer.", "clip_g", "hf", False, "ComfyUI"),
    Prefix("text_encoders.t5xxl.transformer.", "t5", "hf", False, "ComfyUI"),
    Prefix("", "transformer", "stability", False, "OneTrainer (original names)"),  # bare SAI names
)
_BY_LENGTH = sorted(PREFIXES, key=lambda p: -len(p.text))

# Suffix spellings of one plain LoRA pair (ComfyUI reads all of them, spec §1.5).
ROLE_OF_SUFFIX: Dict[str, str] = {
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_A": "down", ".lora_B": "up",
    ".alpha": "alpha",
}  # fmt: skip

# Adapter kinds this version refuses, by a suffix only they use.
REFUSED_SUFFIXES: Dict[str, str] = {
    **{f".hada_{n}": "LoHa (LyCORIS)" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{n}": "LoKr (LyCORIS)" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    ".dora_scale": "DoRA (LyCORIS/kohya dora_scale)",
    ".lora_magnitude_vector": "DoRA (PEFT lora_magnitude_vector)",
    ".lora_mid.weight": "LoCon with a Tucker core (lora_mid)",
    ".lora_B.bias": "PEFT lora_bias (bias adapters)",
    ".diff": "full weight difference (diff)",
    ".diff_b": "full bias difference (diff_b)",
    ".w_norm": "norm weight difference (w_norm)",
    ".b_norm": "norm bias difference (b_norm)",
    ".a1.weight": "GLoRA", ".a2.weight": "GLoRA", ".b1.weight": "GLoRA", ".b2.weight": "GLoRA",
    ".oft_blocks": "OFT", ".oft_diag": "OFT",
}  # fmt: skip
_SUFFIXES = sorted(list(ROLE_OF_SUFFIX) + list(REFUSED_SUFFIXES), key=len, reverse=True)

# LoRAs for other model families, recognised by their keys or metadata (checked first).
FOREIGN_KEYS: Tuple[Tuple[str, re.Pattern], ...] = tuple(
    (name, re.compile(rx))
    for name, rx in (
        ("SDXL or SD 1.x/2.x (a UNet model)",
         r"(lora_unet_|unet\.|diffusion_model\.)(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]"),
        ("FLUX", r"(lora_unet_|diffusion_model\.|lora_transformer_)(double_blocks|single_blocks|single_transformer_blocks)[._]"),
        ("FLUX", r"transformer\.(single_transformer_blocks|x_embedder\.|time_text_embed\.guidance_embedder)"),
    )
)  # fmt: skip
FOREIGN_METADATA: Tuple[Tuple[str, str], ...] = (  # (substring of a base-model field, family)
    ("sdxl", "SDXL"), ("stable-diffusion-xl", "SDXL"), ("sd_v1", "SD 1.x"), ("sd_v2", "SD 2.x"),
    ("stable-diffusion-v1", "SD 1.x"), ("stable-diffusion-v2", "SD 2.x"), ("flux", "FLUX"),
)  # fmt: skip
_BASE_FIELDS = ("ss_base_model_version", "modelspec.architecture", "ss_network_module")

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key holding the LoraConfig JSON


@dataclass(frozen=True)
class LoRAModule:
    """One module's factor pair as stored: `delta W = scale * up @ down`."""

    key: str  # the key stem as in the file (prefix included), for messages
    prefix: Prefix
    stem: str  # module name after the prefix (flattened for kohya-style prefixes)
    down: mx.array  # (r, in) or a conv (r, C, kh, kw)
    up: mx.array  # (out, r) or (out, r, 1, 1)
    scale: float  # alpha / r (the format's rule)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class ParsedLoRA:
    modules: Tuple[LoRAModule, ...]
    unmatched: Tuple[str, ...]  # keys that are no LoRA pair of a known network
    families: Tuple[str, ...]  # e.g. ("kohya",)
    total_keys: int

    @property
    def components(self) -> Tuple[str, ...]:
        return tuple(sorted({m.prefix.component for m in self.modules}))

    @property
    def format(self) -> str:
        return " + ".join(self.families) or "unknown"


def _split(key: str) -> Tuple[Optional[Prefix], str, str]:
    """(prefix, stem, suffix) of a key; suffix "" when it has none we know."""
    for prefix in _BY_LENGTH:
        if not key.startswith(prefix.text):
            continue
        rest = key[len(prefix.text):]
        if prefix.flat:
            stem, dot, tail = rest.partition(".")
            if dot and ("." + tail in ROLE_OF_SUFFIX or "." + tail in REFUSED_SUFFIXES):
                return prefix, stem, "." + tail
            continue
        for suffix in _SUFFIXES:
            if rest.endswith(suffix) and len(rest) > len(suffix):
                return prefix, rest[: -len(suffix)], suffix
    return None, key, ""


def _sample(keys: Sequence[str], limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" … ({len(keys)} in all)" if len(keys) > limit else "")


def check_base(keys: Sequence[str], metadata: Mapping[str, str], where: str) -> None:
    """Raise InputError when the keys or metadata say the LoRA is for another model family."""
    for field in _BASE_FIELDS:
        value = str(metadata.get(field, "")).lower()
        for needle, family in FOREIGN_METADATA:
            if needle in value:
                raise InputError(
                    f"{where}: this LoRA is for {family} ({field} = {metadata[field]!r}), not for SD3 / "
                    "SD3.5; it cannot be applied to this model. Use a LoRA trained for SD3 or SD3.5."
                )
    for family, rx in FOREIGN_KEYS:
        hits = [k for k in keys if rx.match(k)]
        if hits:
            raise InputError(
                f"{where}: this LoRA is for {family}, not for SD3 / SD3.5 (keys such as {_sample(hits, 3)}); "
                "it cannot be applied to this model. Use a LoRA trained for SD3 or SD3.5."
            )


def _scalar(value: mx.array, key: str, where: str) -> float:
    if value.size != 1:
        raise InputError(f"{where}: '{key}' should be one number (the LoRA alpha) but has shape {tuple(value.shape)}")
    alpha = float(value.astype(mx.float32).reshape(()).item())
    if not math.isfinite(alpha):
        raise InputError(f"{where}: '{key}' is {alpha}; the file is damaged (alpha must be a finite number)")
    return alpha


def peft_configs(metadata: Mapping[str, str], where: str) -> Dict[str, dict]:
    """The LoraConfig per diffusers component ("transformer", "text_encoder", …; "" when unprefixed)."""
    text = metadata.get(PEFT_METADATA_KEY)
    if not text:
        return {}
    try:
        flat = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: its {PEFT_METADATA_KEY} header is not valid JSON ({e})") from None
    out: Dict[str, dict] = {}
    for key, value in flat.items():
        head, dot, tail = key.partition(".")
        if dot and head in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
            out.setdefault(head, {})[tail] = value
        else:
            out.setdefault("", {})[key] = value
    return out


_PEFT_COMPONENT = DIFFUSERS_FOLDERS  # PEFT prefixes are the diffusers folder names


def _peft_scale(config: Mapping, module: str, rank: int) -> Optional[float]:
    """PEFT's scaling for `module`: lora_alpha / r (alpha_pattern matched by suffix, rsLoRA: / √r)."""
    if not config:
        return None
    if config.get("use_dora"):
        raise InputError("DoRA (PEFT use_dora) LoRAs are not supported; use a plain LoRA")
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            alpha = value
            break
    if alpha is None:
        return None
    alpha = float(alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def parse_lora(tensors: Mapping[str, mx.array], metadata: Optional[Mapping[str, str]] = None,
               where: str = "LoRA") -> ParsedLoRA:  # fmt: skip
    """Group a LoRA file's tensors into factor pairs with their scales; see the module docstring.

    Raises InputError for another model family, refused adapter kinds, a pair missing a half,
    mismatched ranks and non-finite numbers. Keys of no known shape are returned as `unmatched`.
    """
    metadata = dict(metadata or {})
    keys = list(tensors)
    if not keys:
        raise InputError(f"{where}: the file holds no tensors; it is not a LoRA")
    check_base(keys, metadata, where)
    groups: Dict[Tuple[str, str], Dict[str, str]] = {}
    prefixes: Dict[str, Prefix] = {}
    unmatched: List[str] = []
    refused: Dict[str, List[str]] = {}
    for key in keys:
        prefix, stem, suffix = _split(key)
        if prefix is None:
            unmatched.append(key)
        elif suffix in REFUSED_SUFFIXES:
            refused.setdefault(REFUSED_SUFFIXES[suffix], []).append(key)
        else:
            groups.setdefault((prefix.text, stem), {})[ROLE_OF_SUFFIX[suffix]] = key
            prefixes[prefix.text] = prefix
    if refused:
        kinds = "; ".join(f"{kind} ({_sample(ks, 2)})" for kind, ks in refused.items())
        raise InputError(
            f"{where}: this file holds adapter types sd35_mlx does not apply: {kinds}. Only plain LoRA "
            "(down/up or A/B pairs, with optional alpha) is supported; use a plain-LoRA export of it."
        )
    configs = peft_configs(metadata, where)
    modules: List[LoRAModule] = []
    for (ptext, stem), roles in groups.items():
        prefix = prefixes[ptext]
        if set(roles) == {"alpha"}:
            unmatched.append(roles["alpha"])
            continue
        missing = [r for r in ("down", "up") if r not in roles]
        if missing:
            raise InputError(
                f"{where}: the LoRA pair for '{ptext}{stem}' is incomplete: it has "
                f"{', '.join(roles[r] for r in roles)} but no {' or '.join(missing)} matrix. The file is damaged."
            )
        down, up = tensors[roles["down"]], tensors[roles["up"]]
        conv = down.ndim == 4
        if down.ndim not in (2, 4) or up.ndim != down.ndim or (conv and tuple(up.shape[2:]) != (1, 1)):
            raise InputError(
                f"{where}: '{ptext}{stem}' has down {tuple(down.shape)} and up {tuple(up.shape)}; expected "
                "(rank, in) and (out, rank) matrices (or a conv down and a 1x1 conv up)"
            )
        if down.shape[0] != up.shape[1]:
            raise InputError(
                f"{where}: rank mismatch in '{ptext}{stem}': down {roles['down']} {tuple(down.shape)} has rank "
                f"{down.shape[0]} but up {roles['up']} {tuple(up.shape)} has rank {up.shape[1]}. The file is damaged."
            )
        rank = int(down.shape[0])
        if "alpha" in roles:
            alpha = _scalar(tensors[roles["alpha"]], roles["alpha"], where)
            # kohya: a missing or zero alpha means alpha = rank (scale 1); ComfyUI would use 0 (spec §1.1)
            scale = alpha / rank if alpha != 0 else 1.0
        else:
            config = configs.get(_PEFT_COMPONENT[prefix.component]) or configs.get("") or {}
            scale = _peft_scale(config, stem, rank)
            scale = 1.0 if scale is None else scale  # PEFT without metadata / alpha folded in: alpha = rank
        if not math.isfinite(scale):
            raise InputError(f"{where}: '{ptext}{stem}' has a non-finite scale ({scale})")
        modules.append(LoRAModule(ptext + stem, prefix, stem, down, up, scale))
    families = tuple(dict.fromkeys(m.prefix.family for m in modules))
    return ParsedLoRA(tuple(modules), tuple(sorted(unmatched)), families, len(keys))


__all__ = ["PREFIXES", "LoRAModule", "ParsedLoRA", "Prefix", "check_base", "parse_lora", "peft_configs"]
