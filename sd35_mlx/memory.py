"""How much memory a generation needs, and a planner that makes it fit a budget.

Estimates come from the networks themselves (built lazily: MLX allocates nothing until
used), so they are exact for weights and hold for fine-tunes with other shapes. With
staged execution the peak is the largest stage, not the sum:

    encode  = CLIP-L + CLIP-G + T5 (whole, or one block at a time when streamed)
    denoise = transformer without its adaLN weights (precomputed) + cropped position
              table + activations
    decode  = VAE decoder + decode activations (tiled: one tile's worth)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import CLIP_G, CLIP_L, T5_XXL, MMDiTConfig, SD3_VAE, T5Config, VAEConfig
from .errors import InputError

GB = 1e9
BYTES_16 = 2


def default_budget_bytes() -> int:
    """What this machine can give: Metal's recommended working set, else 85% of RAM."""
    import mlx.core as mx

    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    try:
        return int(0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 10**9


def network_bytes(model: nn.Module, bits: Optional[int] = None, group_size: int = 64, component: str = "") -> int:
    """Bytes of a network's weights at 16-bit, or with its Linear layers at `bits`."""
    total = sum(p.size * BYTES_16 for _, p in tree_flatten(model.parameters()))
    if not bits:
        return total
    from .quantize import make_spec, quantizable_layers

    spec = make_spec(component, bits=bits, group_size=group_size) if component else None
    modules = dict(model.named_modules())
    paths = quantizable_layers(model, spec) if spec is not None else [
        p for p, m in modules.items() if isinstance(m, nn.Linear) and m.weight.shape[1] % group_size == 0
    ]
    for path in paths:
        w = modules[path].weight
        n = w.size
        # weights at `bits`, plus a 16-bit scale and bias per group
        total += int(n * bits / 8 + (n // group_size) * 2 * BYTES_16) - n * BYTES_16
    return total


def _adaln_bytes(model: nn.Module, quantized_ratio: float) -> int:
    n = sum(p.size for k, p in tree_flatten(model.parameters()) if "adaLN" in k)
    return int(n * BYTES_16 * quantized_ratio)


@dataclass(frozen=True)
class Plan:
    """What was chosen and the estimated peak of each stage (bytes)."""

    transformer_bits: Optional[int]
    t5_bits: Optional[int]
    t5: str  # "loaded", "streamed" or "dropped"
    tile_vae: bool
    stages: Dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    def quantize_spec(self) -> str:
        parts = []
        if self.transformer_bits:
            parts.append(f"transformer={self.transformer_bits}")
        if self.t5 != "dropped":
            parts.append(f"t5={self.t5_bits or 16}")
        return ",".join(parts)

    def describe(self) -> str:
        tr = f"{self.transformer_bits}-bit" if self.transformer_bits else "16-bit"
        t5 = "dropped" if self.t5 == "dropped" else f"{self.t5_bits or 16}-bit, {self.t5}"
        stages = ", ".join(f"{k} {v / GB:.2f} GB" for k, v in self.stages.items())
        return f"transformer {tr}; T5 {t5}; VAE {'tiled' if self.tile_vae else 'untiled'} (estimated peak: {stages})"


class MemoryEstimator:
    """Per-stage memory of one model family at a given image size."""

    def __init__(self, mmdit: MMDiTConfig, t5: T5Config = T5_XXL, vae: VAEConfig = SD3_VAE,
                 clip_l=CLIP_L, clip_g=CLIP_G):  # fmt: skip
        from .models.clip import CLIPTextEncoder
        from .models.mmdit import MMDiT
        from .models.t5 import T5Encoder
        from .models.vae import VAE

        self.mmdit_config, self.vae_config = mmdit, vae
        self.transformer = MMDiT(mmdit)  # lazy: nothing is allocated
        self.t5 = T5Encoder(t5)
        self.clips = [CLIPTextEncoder(clip_l), CLIPTextEncoder(clip_g)]
        self.vae = VAE(vae)
        self._cache: Dict[Tuple, int] = {}

    def _bytes(self, name: str, model: nn.Module, bits: Optional[int]) -> int:
        key = (name, bits)
        if key not in self._cache:
            self._cache[key] = network_bytes(model, bits, component=name)
        return self._cache[key]

    def encode(self, t5_bits: Optional[int], t5_mode: str) -> int:
        """Encoders run one after another and each is released after use: the largest counts."""
        sizes = [self._bytes(n, m, None) for n, m in zip(("clip_l", "clip_g"), self.clips)]
        if t5_mode != "dropped":
            t5 = self._bytes("t5", self.t5, t5_bits)
            if t5_mode == "streamed":
                blocks = len(self.t5.blocks)
                embed = sum(p.size * BYTES_16 for k, p in tree_flatten(self.t5.parameters()) if "block" not in k)
                t5 = embed + (t5 - embed) // blocks
            sizes.append(t5)
        return max(sizes) + int(0.1 * GB)

    def denoise(self, bits: Optional[int], height: int, width: int, t5_tokens: int, batch: int = 2) -> int:
        c = self.mmdit_config
        full = self._bytes("transformer", self.transformer, bits)
        ratio = full / self._bytes("transformer", self.transformer, None)
        weights = full - _adaln_bytes(self.transformer, ratio)  # precomputed, then freed
        table = c.pos_embed_max_size**2 * c.hidden_size * BYTES_16
        grid = (height // 16) * (width // 16)
        cropped = grid * c.hidden_size * BYTES_16
        tokens = grid + 77 + t5_tokens
        # residual streams, qkv, attention output and the 4x MLP intermediate of one block
        activations = batch * tokens * c.hidden_size * BYTES_16 * 16
        return weights - table + cropped + activations

    def decode(self, height: int, width: int, tiled: bool) -> int:
        from .models.vae_tiling import decode_activation_bytes

        decoder = sum(p.size * BYTES_16 for k, p in tree_flatten(self.vae.parameters()) if not k.startswith("encoder"))
        h, w = (min(height, 512), min(width, 512)) if tiled else (height, width)
        return decoder + decode_activation_bytes(h, w, self.vae_config)

    def plan(self, transformer_bits, t5_bits, t5_mode, tile, height, width, t5_tokens) -> Plan:
        stages = {
            "encode": self.encode(t5_bits, t5_mode),
            "denoise": self.denoise(transformer_bits, height, width, t5_tokens),  # T5-drop zeros are tokens too
            "decode": self.decode(height, width, tile),
        }
        return Plan(transformer_bits, t5_bits if t5_mode != "dropped" else None, t5_mode, tile, stages)


def candidates(allow_drop_t5: bool = True, fixed: Optional[Dict[str, Optional[int]]] = None):
    """Settings from best quality to smallest memory."""
    fixed = fixed or {}
    order = [
        (None, None, "loaded"), (None, 8, "loaded"), (None, 4, "loaded"), (None, 4, "streamed"),
        (8, 4, "streamed"), (4, 4, "streamed"),
    ]  # fmt: skip
    if allow_drop_t5:
        order.append((4, None, "dropped"))
    for tr, t5, mode in order:
        if "transformer" in fixed and tr != fixed["transformer"]:
            continue
        if "t5" in fixed and mode != "dropped" and t5 != fixed["t5"]:
            continue
        yield tr, t5, mode


def plan_memory(
    estimator: MemoryEstimator,
    budget_bytes: int,
    height: int,
    width: int,
    *,
    t5_tokens: int = 256,
    allow_drop_t5: bool = True,
    fixed: Optional[Dict[str, Optional[int]]] = None,
) -> Plan:
    """The best-quality settings whose estimated peak fits `budget_bytes`, else InputError."""
    tried: List[Plan] = []
    for tr, t5, mode in candidates(allow_drop_t5, fixed):
        for tile in (False, True):
            p = estimator.plan(tr, t5, mode, tile, height, width, t5_tokens)
            tried.append(p)
            if p.peak <= budget_bytes:
                return p
    smallest = min(tried, key=lambda p: p.peak)
    raise InputError(
        f"nothing fits a {budget_bytes / GB:.2f} GB budget at {width}x{height}: the smallest plan "
        f"({smallest.describe()}) needs about {smallest.peak / GB:.2f} GB. Use a smaller image, "
        "allow T5-drop, or raise --memory-budget."
    )
