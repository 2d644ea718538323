"""Conditioning assembly equals diffusers' StableDiffusion3Pipeline.encode_prompt on the same encoder outputs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from assets import tokenizer_root  # noqa: F401  (session fixture)
from reference import randomize, to_numpy
from sd35_mlx.conditioning import Conditioning, assemble
from sd35_mlx.errors import InputError
from sd35_mlx.tokenizers import CLIPTokenizer, T5Tokenizer

JOINT = 32  # plays the role of 4096: T5 width = joint_attention_dim
L_DIM, G_DIM = 8, 12  # play the roles of 768 and 1280

PROMPTS = ["a photo of a cat!!", "A LONG prompt " * 30]
NEGATIVES = ["", "blurry, low quality"]


@pytest.fixture(scope="module")
def pipe(tokenizer_root):
    """diffusers' SD3 pipeline with tiny random text encoders and the test tokenizer folders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer as HFCLIP
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tok3 = T5TokenizerFast.from_pretrained(tokenizer_root / "tokenizer_3")
    common = dict(vocab_size=49408, max_position_embeddings=77, num_attention_heads=2, num_hidden_layers=3,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=1)  # fmt: skip
    clip_l = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=L_DIM, intermediate_size=16, projection_dim=L_DIM, **common)
    )
    clip_g = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=G_DIM, intermediate_size=24, projection_dim=G_DIM, **common)
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=JOINT, d_kv=8, d_ff=48, num_layers=2, num_heads=4))
    transformer = SD3Transformer2DModel(  # only its config (joint_attention_dim) is read by encode_prompt
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=JOINT, caption_projection_dim=16,
        pooled_projection_dim=L_DIM + G_DIM, pos_embed_max_size=8)  # fmt: skip
    for i, m in enumerate((clip_l, clip_g, t5)):
        randomize(m, seed=i).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=clip_l, tokenizer=HFCLIP.from_pretrained(tokenizer_root / "tokenizer"),
        text_encoder_2=clip_g, tokenizer_2=HFCLIP.from_pretrained(tokenizer_root / "tokenizer_2"),
        text_encoder_3=t5, tokenizer_3=tok3,
    )  # fmt: skip


@pytest.fixture(scope="module")
def toks(tokenizer_root):
    return (
        CLIPTokenizer.from_folder(tokenizer_root / "tokenizer"),
        CLIPTokenizer.from_folder(tokenizer_root / "tokenizer_2"),
        T5Tokenizer.from_folder(tokenizer_root / "tokenizer_3"),
    )


@torch.no_grad()
def _our_encoder_outputs(pipe, toks, prompts, t5_length):
    """Our tokenizers' ids through the reference encoders: (hidden[-2], projected pooled) and T5 last."""
    outs = []
    for tokenizer, encoder in zip(toks[:2], (pipe.text_encoder, pipe.text_encoder_2)):
        ids = tokenizer.tokenize(prompts).ids
        out = encoder(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        outs.append((mx.array(to_numpy(out.hidden_states[-2])), mx.array(to_numpy(out[0]))))
    ids = toks[2].tokenize(prompts, max_length=t5_length).ids
    t5 = mx.array(to_numpy(pipe.text_encoder_3(torch.from_numpy(ids.astype(np.int64)))[0]))
    return outs[0], outs[1], t5


def _encode_reference(pipe, t5_length, num_images_per_prompt=1):
    with torch.no_grad():
        return pipe.encode_prompt(
            PROMPTS, None, None, device=torch.device("cpu"), num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=True, negative_prompt=NEGATIVES, max_sequence_length=t5_length,
        )  # fmt: skip


def _assert_same(ours: Conditioning, context: torch.Tensor, pooled: torch.Tensor) -> None:
    # assembly is pure copying and zero padding: exact equality
    np.testing.assert_array_equal(np.array(ours.context), to_numpy(context))
    np.testing.assert_array_equal(np.array(ours.pooled), to_numpy(pooled))


@pytest.mark.parametrize("t5_length", [77, 128])
def test_assembly_matches_diffusers_encode_prompt(pipe, toks, t5_length):
    pos_ctx, neg_ctx, pos_pool, neg_pool = _encode_reference(pipe, t5_length)
    l, g, t5 = _our_encoder_outputs(pipe, toks, PROMPTS, t5_length)
    positive = assemble(l, g, t5, t5_length)
    assert positive.context.shape == (2, 77 + t5_length, JOINT) and positive.pooled.shape == (2, L_DIM + G_DIM)
    _assert_same(positive, pos_ctx, pos_pool)
    nl, ng, nt5 = _our_encoder_outputs(pipe, toks, NEGATIVES, t5_length)
    negative = assemble(nl, ng, nt5, t5_length)
    _assert_same(negative, neg_ctx, neg_pool)
    # CFG batch as diffusers' __call__ builds it: torch.cat([negative, positive])
    _assert_same(
        Conditioning.concat([negative, positive]), torch.cat([neg_ctx, pos_ctx]), torch.cat([neg_pool, pos_pool])
    )


@pytest.mark.parametrize("t5_length", [77, 256])
def test_drop_t5_matches_diffusers(pipe, toks, t5_length):
    pipe.text_encoder_3, pipe.tokenizer_3, saved = None, None, (pipe.text_encoder_3, pipe.tokenizer_3)
    try:
        pos_ctx, _, pos_pool, _ = _encode_reference(pipe, t5_length)
    finally:
        pipe.text_encoder_3, pipe.tokenizer_3 = saved
    l, g, _ = _our_encoder_outputs(pipe, toks, PROMPTS, 77)
    ours = assemble(l, g, None, t5_length, joint_dim=JOINT)
    _assert_same(ours, pos_ctx, pos_pool)
    # zeros after the 77 CLIP tokens; CLIP features in the first L+G columns, zero padding after
    ctx = np.array(ours.context)
    assert ctx.shape == (2, 77 + t5_length, JOINT)
    assert not ctx[:, 77:].any() and not ctx[:, :77, L_DIM + G_DIM :].any()
    np.testing.assert_array_equal(ctx[:, :77, :L_DIM], np.array(l[0]))
    np.testing.assert_array_equal(ctx[:, :77, L_DIM : L_DIM + G_DIM], np.array(g[0]))


def test_full_size_shapes_and_default_drop_length():
    b = 2
    l = (mx.random.normal((b, 77, 768)), mx.random.normal((b, 768)))
    g = (mx.random.normal((b, 77, 1280)).astype(mx.bfloat16), mx.random.normal((b, 1280)))
    cond = assemble(l, g, None)  # diffusers' default: 256 zero tokens of width 4096
    assert cond.context.shape == (b, 333, 4096) and cond.pooled.shape == (b, 2048)
    assert cond.context.dtype == mx.float32
    t5 = mx.random.normal((b, 77, 4096)).astype(mx.bfloat16)
    bf = assemble((l[0].astype(mx.bfloat16), l[1]), g, t5, 77)
    assert bf.context.shape == (b, 154, 4096) and bf.context.dtype == mx.bfloat16


def test_num_images_per_prompt_matches_diffusers_repeat(pipe, toks):
    pos_ctx, _, pos_pool, _ = _encode_reference(pipe, 77, num_images_per_prompt=2)
    l, g, t5 = _our_encoder_outputs(pipe, toks, PROMPTS, 77)
    _assert_same(assemble(l, g, t5, 77).repeat(2), pos_ctx, pos_pool)


def test_save_load_roundtrip(tmp_path):
    for dtype in (mx.float32, mx.bfloat16):
        cond = Conditioning(mx.random.normal((2, 154, 64)).astype(dtype), mx.random.normal((2, 40)).astype(dtype))
        path = cond.save(tmp_path / f"prompt_{dtype}", metadata={"prompt": "a cat", "t5_length": "77"})
        assert path.suffix == ".safetensors"
        back = Conditioning.load(path)
        assert back.context.dtype == dtype and back.metadata == {"prompt": "a cat", "t5_length": "77"}
        assert mx.array_equal(back.context, cond.context).item() and mx.array_equal(back.pooled, cond.pooled).item()
    mx.save_safetensors(str(tmp_path / "other.safetensors"), {"x": mx.zeros((1,))})
    with pytest.raises(InputError, match="not a saved Conditioning"):
        Conditioning.load(tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="not found"):
        Conditioning.load(tmp_path / "missing.safetensors")


def test_concat_slice_and_errors():
    a = Conditioning(mx.zeros((1, 154, 32)), mx.zeros((1, 20)))
    b = Conditioning(mx.ones((2, 154, 32)), mx.ones((2, 20)))
    ab = Conditioning.concat([a, b])
    assert ab.batch_size == 3 and ab[0].context.sum().item() == 0 and ab[1:].context.min().item() == 1
    with pytest.raises(InputError, match="different shapes"):
        Conditioning.concat([a, Conditioning(mx.zeros((1, 333, 32)), mx.zeros((1, 20)))])
    with pytest.raises(InputError):
        Conditioning(mx.zeros((2, 154, 32)), mx.zeros((1, 20)))
    l, g = (mx.zeros((1, 77, 8)), mx.zeros((1, 8))), (mx.zeros((1, 77, 12)), mx.zeros((1, 12)))
    with pytest.raises(InputError, match="t5_length"):
        assemble(l, g, mx.zeros((1, 77, 32)), 256)
    with pytest.raises(InputError, match="exceeds"):
        assemble(l, g, None, 77, joint_dim=16)
