"""The published SD3 / SD3.5 models: architecture, official repo and sampling defaults.

Defaults follow the model cards' diffusers recipes (docs/sampling.md, "Variants"; anchors "SD3.x default
sampling parameters"), with diffusers' Euler sampler and shift 3.0 everywhere. SAI's
reference script uses other defaults (dpmpp_2m, 40–50 steps, shift 1.0 for SD3 Medium);
pass them explicitly to reproduce it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from numbers import Integral

from .config import SD3_MEDIUM_MMDIT, SD35_LARGE_MMDIT, SD35_MEDIUM_MMDIT, MMDiTConfig
from .errors import InputError
from .sampling.guidance import SkipLayerGuidance

VAE_SCALE = 8  # pixels per latent cell
MIN_SIZE = 128  # smallest side for the published models (8×8 patches; they were trained from 256)


@dataclass(frozen=True)
class Variant:
    name: str
    config: MMDiTConfig
    repo_id: str | None
    steps: int  # default number of sampling steps
    cfg: float  # default guidance scale (≤ 1: no negative pass)
    shift: float = 3.0
    sampler: str = "euler"
    slg: SkipLayerGuidance | None = None  # recommended skip-layer guidance, if the model has one
    slg_by_default: bool = False  # whether generation turns `slg` on without being asked
    default_size: int = 1024
    min_size: int = MIN_SIZE  # smallest image side accepted by `validate_size`
    description: str = ""

    @property
    def default_slg(self) -> SkipLayerGuidance | None:
        return self.slg if self.slg_by_default else None


SD3_MEDIUM = Variant(
    name="sd3-medium",
    config=SD3_MEDIUM_MMDIT,
    repo_id="stabilityai/stable-diffusion-3-medium-diffusers",
    steps=28,
    cfg=7.0,
    description="SD3 Medium (2B MMDiT)",
)
# The card recommends skip-layer guidance in prose, but its diffusers recipe (40 steps,
# cfg 4.5) does not enable it and diffusers defaults to none, so it is opt-in here.
SD35_MEDIUM = Variant(
    name="sd3.5-medium",
    config=SD35_MEDIUM_MMDIT,
    repo_id="stabilityai/stable-diffusion-3.5-medium",
    steps=40,
    cfg=4.5,
    slg=SkipLayerGuidance(),  # its defaults are the ones recommended for 3.5 Medium
    description="SD3.5 Medium (2.5B MMDiT-X)",
)
SD35_LARGE = Variant(
    name="sd3.5-large",
    config=SD35_LARGE_MMDIT,
    repo_id="stabilityai/stable-diffusion-3.5-large",
    steps=28,
    cfg=3.5,
    description="SD3.5 Large (8B MMDiT)",
)
SD35_LARGE_TURBO = Variant(
    name="sd3.5-large-turbo",
    config=SD35_LARGE_MMDIT,
    repo_id="stabilityai/stable-diffusion-3.5-large-turbo",
    steps=4,
    cfg=0.0,  # cfg ≤ 1: one conditional pass per step
    description="SD3.5 Large Turbo (8B MMDiT, distilled for 4 steps without CFG)",
)

# Community-distilled variants (lora_controlnet_spec.md §4): TensorArt's model cards. Their
# diffusers folders ship a scheduler config without the recommended shift, so it is set here.
SD35_LARGE_TURBOX = Variant(
    name="sd3.5-large-turbox",
    config=SD35_LARGE_MMDIT,
    repo_id="tensorart/stable-diffusion-3.5-large-TurboX",
    steps=8,
    cfg=1.5,  # the card: 1.0-1.5 ("CFG != 1 will double generation time"); its diffusers Space uses 1.5
    shift=5.0,  # the card: "Most important"
    description="TensorArt SD3.5 Large TurboX (8 steps, shift 5)",
)
# The card's diffusers snippet keeps the base scheduler (shift 3); the MIR database says 5.
SD35_MEDIUM_TURBO = Variant(
    name="sd3.5-medium-turbo",
    config=SD35_MEDIUM_MMDIT,
    repo_id="tensorart/stable-diffusion-3.5-medium-turbo",
    steps=8,
    cfg=1.5,
    description="TensorArt SD3.5 Medium Turbo (8 steps, cfg 1.5)",
)
SD35_MEDIUM_TURBO_4STEP = replace(
    SD35_MEDIUM_TURBO, name="sd3.5-medium-turbo-4step", steps=4,
    description="TensorArt SD3.5 Medium Turbo, 4-step LoRA (4 steps, cfg 1.5)",
)  # fmt: skip

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE, SD35_LARGE_TURBO, SD35_LARGE_TURBOX, SD35_MEDIUM_TURBO,
              SD35_MEDIUM_TURBO_4STEP)
}  # fmt: skip


@dataclass(frozen=True)
class LoRAPreset:
    """A LoRA that turns a base model into a distilled one: loading it switches the defaults."""

    variant: Variant
    base: Variant
    file_names: tuple[str, ...] = ()  # as published (lower case)
    repo_ids: tuple[str, ...] = ()
    sha256: tuple[tuple[str, str], ...] = ()  # (first, last) hex digits as published (MIR database)


LORA_PRESETS = (
    LoRAPreset(SD35_MEDIUM_TURBO, SD35_MEDIUM,
               ("lora_sd3.5m_turbo_8steps.safetensors", "sd3.5m_turbo_8steps.safetensors", "lora-s-8step-final.safetensors"),
               sha256=(("bdcbdfa3", "8b1858"),)),
    LoRAPreset(SD35_MEDIUM_TURBO_4STEP, SD35_MEDIUM, ("lora_sd3.5m_4steps.safetensors", "sd3.5m-4steps.safetensors")),
    LoRAPreset(SD35_LARGE_TURBOX, SD35_LARGE, repo_ids=("tensorart/stable-diffusion-3.5-large-turbox",),
               sha256=(("fae59d1b", "e09548"),)),
)  # fmt: skip


def lora_preset(file_name: str, source: str, sha256: str, base: Variant) -> Variant | None:
    """The distilled variant a LoRA makes of `base`, recognised by its published file name, the
    repo it came from or its checksum; None for any other LoRA (or another base model)."""
    name, src = file_name.lower(), str(source).lower()
    for preset in LORA_PRESETS:
        if _signature(preset.base.config) != _signature(base.config):
            continue
        if (name in preset.file_names or any(src.startswith(r) for r in preset.repo_ids)
                or any(sha256.startswith(a) and sha256.endswith(b) for a, b in preset.sha256)):  # fmt: skip
            return replace(preset.variant, config=base.config)
    return None


def get_variant(name: str) -> Variant:
    """A variant by name; SAI spellings ("sd3.5_large") are accepted too."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in VARIANTS:
        raise InputError(f"unknown model variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[key]


def _signature(c: MMDiTConfig) -> tuple:
    # What tells the published architectures apart; fine-tunes keep all of it.
    return (c.depth, c.hidden_size, c.qk_norm, bool(c.dual_attention_layers), c.pos_embed_max_size)


def _generic(config: MMDiTConfig) -> Variant:
    # Unknown architecture: diffusers' step count, SAI's fallback cfg, the public shift.
    return Variant(
        name="custom",
        config=config,
        repo_id=None,
        steps=28,
        cfg=5.0,
        default_size=min(1024, VAE_SCALE * config.patch_size * config.pos_embed_max_size),
        min_size=VAE_SCALE * config.patch_size,  # no quality floor for unknown (e.g. tiny test) models
        description=f"unrecognised MMDiT (depth {config.depth}, hidden {config.hidden_size})",
    )


def detect_variant(config: MMDiTConfig, hint: str | None = None) -> Variant:
    """The published variant whose architecture `config` is, else a generic one.

    SD3 Medium: depth 24, no qk-norm. SD3.5 Medium: depth 24, dual attention, 384 pos grid.
    SD3.5 Large: depth 38. Turbo (and TensorArt's TurboX / Medium Turbo) have exactly their
    base's architecture, so only `hint` (a variant name, repo id, folder or file name)
    containing "turbo" ("turbox") selects them. The returned variant carries
    `config` itself, so a checkpoint's own (inferred) config is what gets built.
    """
    sig = _signature(config)
    text = str(hint).lower() if hint is not None else ""
    named = VARIANTS.get(text.strip().replace("_", "-"))
    if named is not None and _signature(named.config) == sig:  # --variant: an exact name
        base = named
    elif sig == _signature(SD35_LARGE.config):
        base = SD35_LARGE_TURBOX if "turbox" in text else SD35_LARGE_TURBO if "turbo" in text else SD35_LARGE
    elif sig == _signature(SD35_MEDIUM.config):
        base = SD35_MEDIUM_TURBO if "turbo" in text else SD35_MEDIUM
    elif sig == _signature(SD3_MEDIUM.config):
        base = SD3_MEDIUM
    else:
        return _generic(config)
    return base if base.config == config else replace(base, config=config)


def size_range(config: MMDiTConfig, minimum: int = MIN_SIZE) -> tuple[int, int, int]:
    """(multiple, smallest, largest) allowed image side in pixels for this transformer."""
    multiple = VAE_SCALE * config.patch_size
    largest = multiple * config.pos_embed_max_size  # the positional grid is cropped, never grown
    smallest = max(-(-minimum // multiple) * multiple, multiple)
    return multiple, smallest, largest


def validate_size(
    height: int, width: int, variant_or_config: Variant | MMDiTConfig, minimum: int | None = None
) -> None:
    """Raise InputError unless both sides are multiples of 16 within the model's range.

    The largest side is 16·pos_embed_max_size (3072 px for SD3 Medium / SD3.5 Large,
    6144 px for SD3.5 Medium). The smallest is `minimum`, else the variant's `min_size`
    (128 for the published models, one patch (16) for unrecognised configs); a bare config
    is first matched with `detect_variant`.
    """
    variant = variant_or_config if isinstance(variant_or_config, Variant) else detect_variant(variant_or_config)
    label = "this model" if variant.name == "custom" else variant.name
    multiple, smallest, largest = size_range(variant.config, variant.min_size if minimum is None else minimum)
    for side, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise InputError(f"{side} must be a whole number of pixels (got {value!r})")
        if value % multiple or not smallest <= value <= largest:
            nearest = min(max(round(value / multiple) * multiple, smallest), largest)
            raise InputError(
                f"{side} {value} is not allowed for {label}: use a multiple of {multiple} "
                f"between {smallest} and {largest} pixels (nearest: {nearest})"
            )
