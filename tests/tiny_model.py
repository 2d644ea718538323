"""A tiny, random SD3-style model saved in the official diffusers folder layout.

Built from the reference classes (diffusers / transformers) and written with their own
`save_pretrained`, so the files are laid out exactly as the official repos are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from assets import make_tokenizer_folders
from reference import randomize

CONTEXT_DIM = 64  # plays the role of 4096 (= T5 width = joint_attention_dim)


@dataclass(frozen=True)
class TinySpec:
    num_layers: int = 3
    dual_attention_layers: tuple = (0,)
    qk_norm: str | None = "rms_norm"
    pos_embed_max_size: int = 16
    seed: int = 0


def build_components(spec: TinySpec, t5_vocab_size: int):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_common = dict(vocab_size=49408, max_position_embeddings=77, num_attention_heads=2,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=1)  # fmt: skip
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, hidden_act="quick_gelu",
        projection_dim=16, **clip_common))  # fmt: skip
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, hidden_act="gelu",
        projection_dim=24, **clip_common))  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab_size, d_model=CONTEXT_DIM, d_kv=8, d_ff=96, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True))  # fmt: skip
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16,
        num_layers=spec.num_layers, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=CONTEXT_DIM, caption_projection_dim=32, pooled_projection_dim=16 + 24,
        pos_embed_max_size=spec.pos_embed_max_size, qk_norm=spec.qk_norm,
        dual_attention_layers=tuple(spec.dual_attention_layers))  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
    for i, m in enumerate((clip_l, clip_g, t5, transformer, vae)):
        randomize(m, seed=spec.seed * 10 + i)
        m.eval()
    with torch.no_grad():  # as in the official diffusers text_encoder/ (tests/test_clip_projection.py: other values)
        clip_l.text_projection.weight.copy_(torch.eye(clip_l.text_projection.weight.shape[0]))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return dict(transformer=transformer, vae=vae, text_encoder=clip_l, text_encoder_2=clip_g,
                text_encoder_3=t5, scheduler=scheduler)  # fmt: skip


def make_tiny_model(root: Path, spec: TinySpec = TinySpec()):
    """Write a complete tiny model folder at `root`; returns the diffusers pipeline (fp32)."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    root = Path(root)
    make_tokenizer_folders(root)
    tok3 = T5TokenizerFast.from_pretrained(root / "tokenizer_3")
    comps = build_components(spec, t5_vocab_size=len(tok3))
    pipe = StableDiffusion3Pipeline(
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        tokenizer_3=tok3,
        **comps,
    )
    pipe.save_pretrained(root)
    return pipe
