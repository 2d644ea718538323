"""The diffusers / transformers networks of the baselines, at our configs, random init, bf16.

Built directly on the device in bf16 (`torch.device(...)` + default dtype: no slow fp32 CPU
init, no copy). Used by bench_speed.py (timed next to ours) and bench_first_image.py (saved as
an official diffusers folder). Needs torch, diffusers and transformers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict

import torch

from sd35_mlx.config import CLIP_G, CLIP_L, SD3_VAE, T5_XXL, CLIPConfig, MMDiTConfig, T5Config, VAEConfig


@contextlib.contextmanager
def torch_build(device: str):
    """Build modules directly on `device` in bf16."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def transformer(cfg: MMDiTConfig, device: str, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    with torch_build(device):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(
            sample_size=128, patch_size=cfg.patch_size, in_channels=cfg.in_channels, num_layers=cfg.depth,
            attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim,
            caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.pooled_dim,
            out_channels=cfg.out_channels, pos_embed_max_size=cfg.pos_embed_max_size,
            dual_attention_layers=tuple(cfg.dual_attention_layers), qk_norm="rms_norm" if cfg.qk_norm else None,
        ).eval()  # fmt: skip


def t5(c: T5Config, device: str, seed: int = 0):
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    with torch_build(device):
        torch.manual_seed(seed)
        return T5EncoderModel(HFT5Config(
            vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
            num_heads=c.num_heads, relative_attention_num_buckets=c.relative_attention_num_buckets,
            relative_attention_max_distance=c.relative_attention_max_distance, feed_forward_proj="gated-gelu",
            layer_norm_epsilon=c.layer_norm_eps, is_encoder_decoder=False, use_cache=False,
        )).eval()  # fmt: skip


def clip(c: CLIPConfig, device: str, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch_build(device):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            max_position_embeddings=c.max_positions, hidden_act=c.activation,
            projection_dim=c.projection_dim, layer_norm_eps=c.layer_norm_eps,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        )).eval()  # fmt: skip


def vae(c: VAEConfig, device: str, seed: int = 0):
    from diffusers import AutoencoderKL

    with torch_build(device):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=c.in_channels, out_channels=c.in_channels, latent_channels=c.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
            norm_num_groups=c.norm_num_groups, sample_size=1024, scaling_factor=c.scaling_factor,
            shift_factor=c.shift_factor, use_quant_conv=False, use_post_quant_conv=False,
        ).eval()  # fmt: skip


def pipeline_components(mmdit: MMDiTConfig, device: str) -> Dict[str, Any]:
    """Every network of an SD3.5 pipeline at the official configs (random weights, bf16)."""
    return dict(
        transformer=transformer(mmdit, device, seed=0), vae=vae(SD3_VAE, device, seed=1),
        text_encoder=clip(CLIP_L, device, seed=2), text_encoder_2=clip(CLIP_G, device, seed=3),
        text_encoder_3=t5(T5_XXL, device, seed=4),
    )  # fmt: skip


def sync(device: str):
    def wait(_result):
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return wait


def cfg_euler(x, v, sigmas, i: int, scale: float):
    """StableDiffusion3Pipeline's step after the transformer: CFG over the batch-2 velocity `v`,
    then the Euler update of `x` from sigmas[i] to sigmas[i + 1], in float32."""
    v_uncond, v_cond = v.chunk(2)
    v = v_uncond + scale * (v_cond - v_uncond)
    return (x.float() + float(sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)
