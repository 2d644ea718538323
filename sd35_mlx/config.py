"""Configurations of the networks, as plain dataclasses.

Values are the official ones (see docs/architecture.md); `from_dict`/`to_dict` let a
converted model folder carry them in its config.json.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Tuple, Type, TypeVar

T = TypeVar("T")


# A config read from a file builds a network before any tensor is checked: bound what it may
# ask for (a depth of 10⁹ would build 10⁹ Python blocks) far above every published network.
MAX_LAYERS = 1024
MAX_WIDTH = 2**20


def _checked(cls_name: str, name: str, annotation: str, value: Any) -> Any:
    """`value` as the field's declared type, else ValueError naming the field."""
    where = f"{cls_name}.{name}"
    optional = annotation.startswith("Optional[")
    if value is None and optional:
        return None
    base = annotation[len("Optional["):-1] if optional else annotation
    if base == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false (got {value!r:.60})")
    elif base == "int":
        high = MAX_LAYERS if "layers" in name or name == "depth" else MAX_WIDTH
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise ValueError(f"{where} must be a whole number between 0 and {high} (got {value!r:.60})")
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number (got {value!r:.60})")
        value = float(value)
    elif base == "str":
        if not isinstance(value, str):
            raise ValueError(f"{where} must be text (got {value!r:.60})")
    elif base.startswith("Tuple[int"):
        if not isinstance(value, (list, tuple)) or len(value) > MAX_LAYERS:
            raise ValueError(f"{where} must be a list of whole numbers (got {value!r:.60})")
        value = tuple(_checked(cls_name, name, "int", v) for v in value)
    return value


class _Serializable:
    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: Type[T], values: dict) -> T:
        """From a dict such as config.json holds; wrong types, unknown fields or absurd sizes
        raise ValueError naming the field."""
        if not isinstance(values, dict):
            raise ValueError(f"a {cls.__name__} must be a JSON object (got {type(values).__name__})")
        declared = {f.name: str(f.type) for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(values) - set(declared)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(map(str, unknown))}")
        kwargs = {k: _checked(cls.__name__, k, declared[k], v) for k, v in values.items()}
        return cls(**kwargs)


@dataclass(frozen=True)
class CLIPConfig(_Serializable):
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (CLIP-L) or "gelu" (CLIP-G)
    vocab_size: int = 49408
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    projection_dim: Optional[int] = None  # None: no text_projection
    eos_token_id: int = 49407


CLIP_L = CLIPConfig(projection_dim=768)
CLIP_G = CLIPConfig(
    hidden_size=1280,
    num_layers=32,
    num_heads=20,
    intermediate_size=5120,
    activation="gelu",
    projection_dim=1280,
)


@dataclass(frozen=True)
class T5Config(_Serializable):
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    vocab_size: int = 32128
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6


T5_XXL = T5Config()


@dataclass(frozen=True)
class MMDiTConfig(_Serializable):
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 24
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    context_dim: int = 4096
    pooled_dim: int = 2048
    pos_embed_max_size: int = 192
    qk_norm: bool = False
    dual_attention_layers: Tuple[int, ...] = ()
    mlp_ratio: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


SD3_MEDIUM_MMDIT = MMDiTConfig(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=192)
SD35_MEDIUM_MMDIT = MMDiTConfig(
    depth=24,
    hidden_size=1536,
    num_heads=24,
    pos_embed_max_size=384,
    qk_norm=True,
    dual_attention_layers=tuple(range(13)),
)
SD35_LARGE_MMDIT = MMDiTConfig(
    depth=38, hidden_size=2432, num_heads=38, pos_embed_max_size=192, qk_norm=True
)


@dataclass(frozen=True)
class VAEConfig(_Serializable):
    in_channels: int = 3
    latent_channels: int = 16
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609


SD3_VAE = VAEConfig()


@dataclass(frozen=True)
class ControlNetConfig(_Serializable):
    """An SD3 / SD3.5 ControlNet (docs/control.md).

    context_dim None: image-only blocks that continue the transformer's own embedded latents
    (Stability's SD3.5 Large ControlNets). Otherwise joint blocks that see the prompt and embed
    the latents with their own patch embedder and position table (diffusers' SD3ControlNetModel,
    InstantX / Alimama).
    """

    depth: int = 19
    hidden_size: int = 2432
    num_heads: int = 38
    patch_size: int = 2
    in_channels: int = 16
    control_channels: int = 16  # 17 for the inpainting ControlNet (latents + mask)
    pooled_dim: int = 2048
    context_dim: Optional[int] = None
    pos_embed_max_size: Optional[int] = None  # own position table (joint ControlNets only)
    qk_norm: bool = False
    dual_attention_layers: Tuple[int, ...] = ()
    mlp_ratio: int = 4

    @property
    def joint(self) -> bool:
        return self.context_dim is not None


SD35_LARGE_CONTROLNET = ControlNetConfig()
