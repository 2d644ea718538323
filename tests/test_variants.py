"""Variant presets, detection from configs, and image-size validation."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace

import pytest
from diffusers import SD3Transformer2DModel

from sd35_mlx.config import (
    SD3_MEDIUM_MMDIT,
    SD35_LARGE_MMDIT,
    SD35_MEDIUM_MMDIT,
    MMDiTConfig,
)
from sd35_mlx.errors import InputError
from sd35_mlx.sampling import SAMPLERS, SkipLayerGuidance, uses_cfg
from sd35_mlx.variants import (
    SD3_MEDIUM,
    SD35_LARGE,
    SD35_LARGE_TURBO,
    SD35_MEDIUM,
    VARIANTS,
    detect_variant,
    get_variant,
    size_range,
    validate_size,
)

# The official transformer/config.json files (as published in the official repos), as diffusers reads them.
OFFICIAL_TRANSFORMER_CONFIGS = {
    "sd3-medium": {"num_layers": 24, "num_attention_heads": 24, "pos_embed_max_size": 192, "qk_norm": None},
    "sd3.5-medium": {
        "num_layers": 24,
        "num_attention_heads": 24,
        "pos_embed_max_size": 384,
        "qk_norm": "rms_norm",
        "dual_attention_layers": list(range(13)),
    },
    "sd3.5-large": {"num_layers": 38, "num_attention_heads": 38, "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
}


def config_from_diffusers(name: str) -> MMDiTConfig:
    """Our config from an official transformer config.json, diffusers' own defaults filling the rest."""
    # Read the defaults from the signature: from_config(...) would allocate billions of parameters.
    params = inspect.signature(SD3Transformer2DModel.__init__).parameters
    cfg = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    cfg.update(OFFICIAL_TRANSFORMER_CONFIGS[name])
    return MMDiTConfig(
        depth=cfg["num_layers"],
        hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
        num_heads=cfg["num_attention_heads"],
        patch_size=cfg["patch_size"],
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        context_dim=cfg["joint_attention_dim"],
        pooled_dim=cfg["pooled_projection_dim"],
        pos_embed_max_size=cfg["pos_embed_max_size"],
        qk_norm=cfg["qk_norm"] is not None,
        dual_attention_layers=tuple(cfg["dual_attention_layers"] or ()),
    )


@pytest.mark.parametrize(
    "config, hint, expected",
    [
        (SD3_MEDIUM_MMDIT, None, "sd3-medium"),
        (SD35_MEDIUM_MMDIT, None, "sd3.5-medium"),
        (SD35_LARGE_MMDIT, None, "sd3.5-large"),
        (SD35_LARGE_MMDIT, "stabilityai/stable-diffusion-3.5-large", "sd3.5-large"),
        (SD35_LARGE_MMDIT, "stabilityai/stable-diffusion-3.5-large-turbo", "sd3.5-large-turbo"),
        (SD35_LARGE_MMDIT, "/models/SD3.5_Large_TURBO.safetensors", "sd3.5-large-turbo"),
        (SD35_LARGE_MMDIT, "tensorart/stable-diffusion-3.5-large-TurboX", "sd3.5-large-turbox"),
        # Medium's "turbo" is TensorArt's Medium Turbo, never SAI's Large Turbo
        (SD35_MEDIUM_MMDIT, "tensorart/stable-diffusion-3.5-medium-turbo", "sd3.5-medium-turbo"),
        (SD35_MEDIUM_MMDIT, "sd3.5-medium-turbo-4step", "sd3.5-medium-turbo-4step"),  # --variant
    ],
)
def test_detect_variant(config, hint, expected):
    assert detect_variant(config, hint).name == expected


@pytest.mark.parametrize("name", list(OFFICIAL_TRANSFORMER_CONFIGS))
def test_detect_from_official_config_json(name):
    config = config_from_diffusers(name)
    assert config == VARIANTS[name].config  # our presets are the official configs
    assert detect_variant(config) is VARIANTS[name]


def test_detect_keeps_the_checkpoint_config():
    # A fine-tune that differs in a field detection ignores keeps its own config.
    tweaked = replace(SD35_LARGE_MMDIT, pooled_dim=1024)
    variant = detect_variant(tweaked)
    assert variant.name == "sd3.5-large" and variant.config == tweaked


@pytest.mark.parametrize(
    "config",
    [
        MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=16, qk_norm=True),
        replace(SD35_MEDIUM_MMDIT, depth=12, dual_attention_layers=tuple(range(6))),
        replace(SD3_MEDIUM_MMDIT, qk_norm=True),  # neither SD3 Medium nor SD3.5 Medium
    ],
)
def test_unknown_config_gets_generic_variant(config):
    variant = detect_variant(config, "whatever-turbo")
    assert variant.name == "custom" and variant.config == config and variant.repo_id is None
    assert variant.steps >= 1 and variant.sampler in SAMPLERS and variant.shift == 3.0
    assert variant.default_slg is None


def test_defaults():
    expected = {
        "sd3-medium": ("stabilityai/stable-diffusion-3-medium-diffusers", 28, 7.0),
        "sd3.5-medium": ("stabilityai/stable-diffusion-3.5-medium", 40, 4.5),
        "sd3.5-large": ("stabilityai/stable-diffusion-3.5-large", 28, 3.5),
        "sd3.5-large-turbo": ("stabilityai/stable-diffusion-3.5-large-turbo", 4, 0.0),
        "sd3.5-large-turbox": ("tensorart/stable-diffusion-3.5-large-TurboX", 8, 1.5),
        "sd3.5-medium-turbo": ("tensorart/stable-diffusion-3.5-medium-turbo", 8, 1.5),
        "sd3.5-medium-turbo-4step": ("tensorart/stable-diffusion-3.5-medium-turbo", 4, 1.5),
    }
    assert set(VARIANTS) == set(expected)
    for name, (repo, steps, cfg) in expected.items():
        v = VARIANTS[name]
        assert (v.repo_id, v.steps, v.cfg) == (repo, steps, cfg)
        assert v.shift == (5.0 if name == "sd3.5-large-turbox" else 3.0) and v.sampler == "euler"
        assert v.default_size == 1024
        validate_size(v.default_size, v.default_size, v)
    assert not uses_cfg(SD35_LARGE_TURBO.cfg)  # Turbo: one conditional pass per step
    assert SD35_LARGE_TURBO.config == SD35_LARGE.config


def test_slg_available_on_medium_only_and_off_by_default():
    assert SD35_MEDIUM.slg == SkipLayerGuidance(layers=(7, 8, 9), scale=2.8, start=0.01, end=0.2)
    assert SD35_MEDIUM.default_slg is None
    SD35_MEDIUM.slg.check_depth(SD35_MEDIUM.config.depth)
    for v in (SD3_MEDIUM, SD35_LARGE, SD35_LARGE_TURBO):
        assert v.slg is None and v.default_slg is None
    assert replace(SD35_MEDIUM, slg_by_default=True).default_slg is SD35_MEDIUM.slg


def test_get_variant():
    assert get_variant("sd3.5-large") is SD35_LARGE
    assert get_variant("SD3.5_Large_Turbo") is SD35_LARGE_TURBO  # SAI spelling
    with pytest.raises(InputError, match="sd3-medium, sd3.5-medium, sd3.5-large, sd3.5-large-turbo"):
        get_variant("sdxl")


def test_size_range_follows_pos_embed_grid():
    assert size_range(SD35_LARGE_MMDIT) == (16, 128, 3072)
    assert size_range(SD3_MEDIUM_MMDIT) == (16, 128, 3072)
    assert size_range(SD35_MEDIUM_MMDIT) == (16, 128, 6144)


@pytest.mark.parametrize("h, w", [(1024, 1024), (768, 1344), (128, 3072), (1216, 832)])
def test_valid_sizes(h, w):
    validate_size(h, w, SD35_LARGE)
    validate_size(h, w, SD35_LARGE_MMDIT)


@pytest.mark.parametrize(
    "h, w, match",
    [
        (1020, 1024, r"height 1020 .* multiple of 16 between 128 and 3072 .*nearest: 1024"),
        (1024, 1032, r"width 1032"),
        (112, 1024, r"between 128 and 3072"),
        (1024, 3088, r"width 3088 .*nearest: 3072"),
        (0, 1024, r"height 0"),
        (-16, 1024, r"height -16"),
        (1024.0, 1024, r"whole number"),
        ("1024", 1024, r"whole number"),
    ],
)
def test_invalid_sizes(h, w, match):
    with pytest.raises(InputError, match=match):
        validate_size(h, w, SD35_LARGE)


def test_medium_allows_its_larger_grid():
    validate_size(4096, 6144, SD35_MEDIUM)
    with pytest.raises(InputError, match="sd3.5-large"):
        validate_size(4096, 1024, SD35_LARGE)


def test_minimum_size_per_variant():
    # A bare official config gets its variant's floor (128); an unknown (tiny) one only one patch.
    with pytest.raises(InputError, match="between 128 and 3072"):
        validate_size(112, 1024, SD35_LARGE_MMDIT)
    tiny = MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=8)
    assert detect_variant(tiny).min_size == 16 and detect_variant(tiny).default_size == 128
    validate_size(32, 64, tiny)
    with pytest.raises(InputError, match="multiple of 16 between 16 and 128"):
        validate_size(8, 16, tiny)
    with pytest.raises(InputError, match="between 128 and 128"):
        validate_size(64, 64, tiny, minimum=128)
    validate_size(64, 64, SD35_LARGE, minimum=64)


def test_variant_json_roundtrip_of_config():
    # Variants carry ordinary configs: a converted folder's config.json restores them.
    for v in VARIANTS.values():
        assert MMDiTConfig.from_dict(json.loads(json.dumps(v.config.to_dict()))) == v.config
