"""The networks an SD3 / SD3.5 model is made of, and the facts every layer needs about them.

One table: names, the diffusers folders and tokenizer folders they live in, what they are
called in messages, their classes, and the dtype rule (T5-XXL never runs in float16).
Everything else (the layouts, the Hub file picker, the converter, the loaders, the
quantization policy, the memory planner) reads these instead of keeping its own list.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Dict, Optional, Tuple

import mlx.core as mx

from .errors import InputError

log = logging.getLogger(__name__)

# In the order they are listed, converted and written.
COMPONENTS: Tuple[str, ...] = ("transformer", "vae", "clip_l", "clip_g", "t5")
TEXT_ENCODERS: Tuple[str, ...] = ("clip_l", "clip_g", "t5")
QUANTIZABLE: Tuple[str, ...] = ("transformer", "clip_l", "clip_g", "t5")  # everything but the VAE
REQUIRED: Tuple[str, ...] = ("transformer", "vae", "clip_l", "clip_g")  # T5 is optional (T5-drop mode)
# Side networks: not part of a model, converted and quantized on their own (docs/control.md).
SIDE_NETWORKS: Tuple[str, ...] = ("controlnet",)

DIFFUSERS_FOLDERS: Dict[str, str] = {
    "transformer": "transformer", "vae": "vae", "clip_l": "text_encoder",
    "clip_g": "text_encoder_2", "t5": "text_encoder_3",
}  # fmt: skip
TOKENIZER_FOLDERS: Dict[str, str] = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}
DESCRIPTIONS: Dict[str, str] = {
    "transformer": "MMDiT transformer", "vae": "VAE", "clip_l": "CLIP-L text encoder",
    "clip_g": "CLIP-G text encoder", "t5": "T5-XXL text encoder", "controlnet": "ControlNet",
}  # fmt: skip


def check_component(name: str) -> None:
    """Raise InputError unless `name` is one of COMPONENTS (or a side network)."""
    if name not in COMPONENTS + SIDE_NETWORKS:
        raise InputError(f"unknown component {name!r}; components are {', '.join(COMPONENTS)}")


def network_classes(component: str):
    """(network class, config class) of a component; imported late (models import heavy deps)."""
    check_component(component)
    from .config import CLIPConfig, ControlNetConfig, MMDiTConfig, T5Config, VAEConfig

    if component == "transformer":
        from .models.mmdit import MMDiT

        return MMDiT, MMDiTConfig
    if component == "vae":
        from .models.vae import VAE

        return VAE, VAEConfig
    if component == "t5":
        from .models.t5 import T5Encoder

        return T5Encoder, T5Config
    if component == "controlnet":
        from .models.controlnet import ControlNet

        return ControlNet, ControlNetConfig
    from .models.clip import CLIPTextEncoder

    return CLIPTextEncoder, CLIPConfig


# T5 tokens per prompt: diffusers' max_sequence_length default, and the range that makes sense
# (below 77 T5 would see less than CLIP; 512 is what T5-XXL was trained with).
T5_DEFAULT_LENGTH = 256
T5_LENGTH_RANGE = (77, 512)


class T5Mode(str, Enum):
    """How T5-XXL runs: loaded whole, streamed one block at a time from disk, or dropped
    (zeros stand in for its tokens). A `str` enum: it compares equal to its value."""

    LOADED = "loaded"
    STREAMED = "streamed"
    DROPPED = "dropped"

    def __str__(self) -> str:
        return self.value


# ---- dtypes -----------------------------------------------------------------------------------
DTYPES: Dict[str, mx.Dtype] = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
T5_FLOAT16_NOTE = (
    "T5-XXL overflows in float16 (its activations exceed the fp16 range and turn into inf/NaN); "
    "loading T5 in bfloat16 instead."
)  # docs/text_encoder_t5.md, "Precision"


def parse_dtype(name: Optional[str]) -> Optional[mx.Dtype]:
    """'bfloat16' / 'float16' / 'float32' -> the MLX dtype (None stays None)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: Optional[mx.Dtype]) -> Optional[str]:
    """mx.bfloat16 -> 'bfloat16' (None stays None)."""
    return None if dtype is None else str(dtype).replace("mlx.core.", "")


def component_dtype(component: str, dtype: Optional[mx.Dtype], *, warn: bool = True) -> Optional[mx.Dtype]:
    """The dtype `component` is loaded in when `dtype` is asked for: T5-XXL never in float16
    (bfloat16 instead, logged when `warn`); every other network as asked."""
    if component == "t5" and dtype is not None and dtype == mx.float16:
        if warn:
            log.warning("%s", T5_FLOAT16_NOTE)
        return mx.bfloat16
    return dtype


__all__ = [
    "COMPONENTS", "TEXT_ENCODERS", "QUANTIZABLE", "REQUIRED", "SIDE_NETWORKS", "DIFFUSERS_FOLDERS", "TOKENIZER_FOLDERS",
    "DESCRIPTIONS", "T5_DEFAULT_LENGTH", "T5_LENGTH_RANGE", "check_component", "network_classes", "T5Mode", "DTYPES", "parse_dtype", "dtype_name",
    "component_dtype",
]  # fmt: skip
