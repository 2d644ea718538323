"""kohya and ComfyUI LoRAs (which diffusers cannot read for SD3) against an independent reference:
the LoRA merged in torch into Stability-layout tensors (`W + w·alpha/r·up@down`), loaded through
diffusers' single-file converter (transformer) or transformers (text encoders). Ours applies the
same LoRA at runtime on the unmerged network. Every module kind is targeted: both streams' qkv
(fused, Stability layout), proj, MLP, adaLN (incl. the last block's 2-chunk one), MMDiT-X attn2,
the embedders (the patch embedder as a conv LoRA), the final layer; ranks 4 and 16, alpha ≠ rank."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from lora_files import dotted_key, kohya_key, linear_stems, random_lora
from reference import rel_err
from test_clip import make_reference as clip_reference
from test_clip import our_outputs as clip_outputs
from test_clip import reference_outputs as clip_reference_outputs
from test_clip import token_ids as clip_ids
from test_mmdit import MMDITX, diffusers_kwargs, make_inputs, random_sai_state, run_ours, run_reference
from test_t5 import reference as t5_reference
from test_t5 import run_ours as t5_ours
from test_t5 import run_reference as t5_run_reference
from test_t5 import token_ids as t5_ids

from sd35_mlx.adapters.formats import parse_lora
from sd35_mlx.adapters.lora import attach
from sd35_mlx.adapters.targets import place
from sd35_mlx.weights.tables import clip as clip_tables
from sd35_mlx.weights.tables import t5 as t5_tables
from sd35_mlx.weights.tables.mmdit import STABILITY, load_mmdit

TOL = 1e-4
WEIGHT = 0.7  # the user's LoRA weight


def to_mx(state):
    return {k: mx.array(v.detach().float().numpy()) for k, v in state.items()}


def apply(model, lora, component, weight=WEIGHT):
    parsed = parse_lora(to_mx(lora), {}, "test LoRA")
    placed, unmatched, _ = place(parsed, component, model, "test LoRA")
    assert unmatched == []
    attach(model, placed, "test", weight)
    return parsed, placed


TRANSFORMER_FORMATS = {
    "kohya": kohya_key("lora_unet_"),
    "comfyui": dotted_key("diffusion_model."),
}


@pytest.mark.parametrize("fmt", list(TRANSFORMER_FORMATS))
def test_transformer_lora_matches_the_merged_single_file(fmt):
    sai = random_sai_state(MMDITX)
    stems = linear_stems(sai)
    assert {"x_embedder.proj", "joint_blocks.0.x_block.attn2.qkv", "joint_blocks.2.context_block.adaLN_modulation.1",
            "final_layer.adaLN_modulation.1", "t_embedder.mlp.0", "context_embedder"} <= set(stems)
    lora, merged = random_lora(sai, stems, TRANSFORMER_FORMATS[fmt], weight=WEIGHT, seed=1)
    ref = SD3Transformer2DModel(**diffusers_kwargs(MMDITX)).eval()
    ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(merged)), strict=True)
    plain = SD3Transformer2DModel(**diffusers_kwargs(MMDITX)).eval()
    plain.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(sai)), strict=True)

    ours = load_mmdit(to_mx({"model.diffusion_model." + k: v for k, v in sai.items()}), STABILITY)
    parsed, placed = apply(ours, lora, "transformer")
    assert len(parsed.modules) == len(stems) and len(placed) == len(stems)
    inputs = make_inputs(MMDITX, 2, 16, 16)
    expected = run_reference(ref, inputs)
    assert rel_err(run_ours(ours, inputs), expected) <= TOL
    assert rel_err(run_reference(plain, inputs), expected) > 1e-2  # the LoRA really changes the output


CLIP_FORMATS = {
    "kohya-l": ("lora_te1_", False, "quick_gelu"),
    "kohya-g": ("lora_te2_", True, "gelu"),
    "comfyui-l": ("text_encoders.clip_l.transformer.", False, "quick_gelu"),
    "comfyui-g": ("text_encoders.clip_g.transformer.", True, "gelu"),
}


@pytest.mark.parametrize("fmt", list(CLIP_FORMATS))
def test_clip_lora_matches_transformers_with_merged_weights(fmt):
    prefix, with_projection_lora, act = CLIP_FORMATS[fmt]
    ref = clip_reference(act, projection=True, seed=2)
    state = ref.state_dict()
    stems = linear_stems(state, skip=() if with_projection_lora else ("text_projection",))
    key = kohya_key(prefix) if prefix.startswith("lora_") else dotted_key(prefix)
    lora, merged = random_lora(state, stems, key, weight=WEIGHT, seed=3)
    ours = clip_tables.load_clip(to_mx(state), clip_tables.DIFFUSERS, hf_config=ref.config.to_dict())
    apply(ours, lora, "clip_g" if "g" in fmt[-1] else "clip_l")
    ref.load_state_dict(merged)
    ids = clip_ids(pad=49407)
    hidden, pooled = clip_outputs(ours, ids)
    ref_hidden, ref_pooled = clip_reference_outputs(ref, ids)
    assert rel_err(hidden, ref_hidden) <= TOL and rel_err(pooled, ref_pooled) <= TOL


@pytest.mark.parametrize("prefix", ["lora_te3_", "text_encoders.t5xxl.transformer."])
def test_t5_lora_matches_transformers_with_merged_weights(prefix):
    ref = t5_reference(seed=4)
    state = ref.state_dict()
    stems = linear_stems(state, skip=("relative_attention_bias",))
    assert any("DenseReluDense.wi_0" in s for s in stems) and any("SelfAttention.q" in s for s in stems)
    key = kohya_key(prefix) if prefix.startswith("lora_") else dotted_key(prefix)
    lora, merged = random_lora(state, stems, key, weight=WEIGHT, seed=5)
    ours = t5_tables.load_t5(to_mx(state), t5_tables.DIFFUSERS)
    apply(ours, lora, "t5")
    ref.load_state_dict(merged)
    ids = t5_ids(12)
    assert rel_err(t5_ours(ours, ids), t5_run_reference(ref, ids)) <= TOL


def test_format_is_detected_from_keys():
    sai = random_sai_state(MMDITX)
    stems = linear_stems(sai)[:3]
    for key_of, family in ((kohya_key("lora_unet_"), "kohya"), (dotted_key("diffusion_model."), "ComfyUI"),
                           (dotted_key(""), "OneTrainer (original names)")):  # fmt: skip
        lora, _ = random_lora(sai, stems, key_of)
        assert parse_lora(to_mx(lora), {}, "x").families == (family,)
