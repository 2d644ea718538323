"""Whole-pipeline parity with diffusers' StableDiffusion3Pipeline (and its img2img pipeline)
on a tiny random model in the official folder layout, with the same injected noise."""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np
import pytest
import torch

from reference import rel_err, to_numpy
from tiny_model import TinySpec, make_tiny_model

from sd35_mlx.pipeline import SD35Pipeline, initial_noise
from sd35_mlx.settings import GenerationSettings, SkipLayerSettings

H, W = 64, 96
PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd3")
    ref = make_tiny_model(root, TinySpec())
    return root, ref


@pytest.fixture(scope="module")
def ours(tiny):
    root, _ = tiny
    return SD35Pipeline.from_pretrained(root, dtype=mx.float32)


def noise_pair(seed=3):
    noise = initial_noise(seed, H // 8, W // 8)
    return noise, torch.from_numpy(to_numpy(noise).transpose(0, 3, 1, 2).copy())


def final_latents(pipe, settings, noise):
    last = None
    for info in pipe.generate_latents(settings, noise=noise):
        last = info
    return last.latents


def reference_latents(ref, noise_t, **kw):
    with torch.no_grad():
        out = ref(height=H, width=W, latents=noise_t, output_type="latent", **kw)
    return out.images


def check(ours_latents, ref_latents):
    err = rel_err(to_numpy(ours_latents), to_numpy(ref_latents).transpose(0, 2, 3, 1))
    assert err <= TOL, f"max|Δ|/max|ref| = {err:.2e} > {TOL}"


def test_euler_cfg_with_negative_prompt(tiny, ours):
    _, ref = tiny
    noise, noise_t = noise_pair()
    s = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, steps=5, cfg=4.5,
                           sampler="euler", t5_length=100)  # fmt: skip
    ref_lat = reference_latents(ref, noise_t, prompt=PROMPT, negative_prompt=NEGATIVE,
                                num_inference_steps=5, guidance_scale=4.5, max_sequence_length=100)  # fmt: skip
    check(final_latents(ours, s, noise), ref_lat)


def test_empty_negative_prompt_is_encoded(tiny, ours):
    _, ref = tiny
    noise, noise_t = noise_pair(5)
    s = GenerationSettings(prompt=PROMPT, height=H, width=W, steps=3, cfg=7.0, sampler="euler", t5_length=77)
    ref_lat = reference_latents(ref, noise_t, prompt=PROMPT, num_inference_steps=3, guidance_scale=7.0,
                                max_sequence_length=77)  # fmt: skip
    check(final_latents(ours, s, noise), ref_lat)


def test_skip_layer_guidance(tiny, ours):
    _, ref = tiny
    noise, noise_t = noise_pair(7)
    slg = SkipLayerSettings(layers=(1,), scale=2.8, start=0.0, end=0.7)
    s = GenerationSettings(prompt=PROMPT, height=H, width=W, steps=6, cfg=4.0, sampler="euler",
                           t5_length=77, skip_layer_guidance=slg)  # fmt: skip
    ref_lat = reference_latents(ref, noise_t, prompt=PROMPT, num_inference_steps=6, guidance_scale=4.0,
                                max_sequence_length=77, skip_guidance_layers=[1], skip_layer_guidance_scale=2.8,
                                skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.7)  # fmt: skip
    ours_lat = final_latents(ours, s, noise)
    check(ours_lat, ref_lat)
    # and SLG really changed the result
    plain = final_latents(ours, GenerationSettings(**{**s.__dict__, "skip_layer_guidance": None}), noise)
    assert rel_err(ours_lat, plain) > 1e-3


def test_single_pass_when_cfg_at_most_one(tiny, ours):
    _, ref = tiny
    noise, noise_t = noise_pair(11)
    s = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, steps=4, cfg=1.0,
                           sampler="euler", t5_length=77)  # fmt: skip
    ref_lat = reference_latents(ref, noise_t, prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4,
                                guidance_scale=1.0, max_sequence_length=77)  # fmt: skip
    check(final_latents(ours, s, noise), ref_lat)
    # cfg 0 is the same single conditional pass (Turbo), not the unconditional prediction
    s0 = GenerationSettings(**{**s.__dict__, "cfg": 0.0})
    check(final_latents(ours, s0, noise), ref_lat)


def test_t5_dropped(tiny):
    from diffusers import StableDiffusion3Pipeline

    root, ref = tiny
    ref_no_t5 = StableDiffusion3Pipeline(**{**ref.components, "text_encoder_3": None, "tokenizer_3": None})
    pipe = SD35Pipeline.from_pretrained(root, dtype=mx.float32, t5=False)
    assert pipe._encoders is None or pipe._encoders.t5 is None
    noise, noise_t = noise_pair(13)
    s = GenerationSettings(prompt=PROMPT, height=H, width=W, steps=4, cfg=5.0, sampler="euler", t5_length=120)
    ref_lat = reference_latents(ref_no_t5, noise_t, prompt=PROMPT, num_inference_steps=4, guidance_scale=5.0,
                                max_sequence_length=120)  # fmt: skip
    check(final_latents(pipe, s, noise), ref_lat)


def test_img2img(tiny, ours, tmp_path, monkeypatch):
    from diffusers import StableDiffusion3Img2ImgPipeline
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img as img2img_mod
    from PIL import Image

    _, ref = tiny
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    arr = np.stack([(x * 2) % 256, (y * 3) % 256, (x + y) % 256], -1).astype(np.uint8)
    arr = np.clip(arr.astype(int) + rng.integers(-10, 10, arr.shape), 0, 255).astype(np.uint8)
    init = tmp_path / "init.png"
    Image.fromarray(arr).save(init)

    noise, noise_t = noise_pair(17)
    # The reference samples the VAE posterior; we use its mean (deterministic): make it use the mean too,
    # and give it our noise.
    orig = img2img_mod.retrieve_latents
    monkeypatch.setattr(img2img_mod, "retrieve_latents", lambda out, generator=None, sample_mode="sample": orig(out, sample_mode="argmax"))
    monkeypatch.setattr(img2img_mod, "randn_tensor", lambda shape, **kw: noise_t.clone())
    ref_i2i = StableDiffusion3Img2ImgPipeline(**ref.components)
    with torch.no_grad():
        ref_lat = ref_i2i(prompt=PROMPT, image=Image.open(init), strength=0.7, num_inference_steps=6,
                          guidance_scale=4.0, max_sequence_length=77, output_type="latent", height=H, width=W).images  # fmt: skip
    s = GenerationSettings(prompt=PROMPT, height=H, width=W, steps=6, cfg=4.0, sampler="euler", t5_length=77,
                           init_image=str(init), strength=0.7)  # fmt: skip
    check(final_latents(ours, s, noise), ref_lat)


def test_generate_returns_image_and_metadata(ours):
    out = ours.generate(PROMPT, height=H, width=W, steps=2, cfg=3.0, seed=42, t5_length=77)
    assert out.image.size == (W, H)
    assert out.seed == 42 and out.metadata["seed"] == 42 and out.metadata["prompt"] == PROMPT
    again = ours.generate(PROMPT, height=H, width=W, steps=2, cfg=3.0, seed=42, t5_length=77)
    assert np.array_equal(np.asarray(out.image), np.asarray(again.image))


def test_callback_can_stop(ours):
    from sd35_mlx.callbacks import GenerationInterrupted

    seen = []

    def stop_after_two(info):
        seen.append(info.step)
        return info.step < 2

    with pytest.raises(GenerationInterrupted):
        ours.generate(PROMPT, height=H, width=W, steps=5, cfg=3.0, seed=1, t5_length=77, callback=stop_after_two)
    assert seen == [1, 2]


def test_reusable_prompt_embeddings(ours):
    emb = ours.encode_prompt(PROMPT, NEGATIVE, t5_length=77)
    noise, _ = noise_pair(2)
    s = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, steps=2, cfg=3.0, t5_length=77)
    a = final_latents(ours, s, noise)
    b = None
    for info in ours.generate_latents(s, embeddings=emb, noise=noise):
        b = info.latents
    assert np.array_equal(to_numpy(a), to_numpy(b))


def _latents_with(root, noise, **pipe_kwargs):
    pipe = SD35Pipeline.from_pretrained(root, dtype=mx.float32, **pipe_kwargs)
    s = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, steps=3, cfg=4.0, t5_length=77)
    return to_numpy(final_latents(pipe, s, noise)), pipe


def test_staged_unstaged_and_streamed_t5_give_identical_latents(tiny, ours):
    root, _ = tiny
    noise, _ = noise_pair(19)
    staged, _ = _latents_with(root, noise, low_memory=True)
    unstaged, pipe = _latents_with(root, noise, low_memory=False)
    assert pipe._transformer is not None and pipe._encoders is not None  # really kept
    streamed, _ = _latents_with(root, noise, stream_t5=True)
    assert np.array_equal(staged, unstaged)
    assert np.array_equal(staged, streamed)


def test_a_folder_without_t5_weights_runs_in_t5_drop_mode(tiny, tmp_path):
    """The loader says it continues without T5; the pipeline then really does (T5-drop),
    giving the latents of t5=False and saying so in the metadata."""
    import shutil

    root, _ = tiny
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(root, no_t5, ignore=shutil.ignore_patterns("text_encoder_3"))
    noise, _ = noise_pair(29)
    s = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, steps=2, cfg=4.0, t5_length=77)
    pipe = SD35Pipeline.from_pretrained(no_t5, dtype=mx.float32)
    got = to_numpy(final_latents(pipe, s, noise))
    assert not pipe.use_t5 and pipe.metadata(s)["t5"].startswith("dropped")
    dropped = SD35Pipeline.from_pretrained(root, dtype=mx.float32, t5=False)
    assert np.array_equal(got, to_numpy(final_latents(dropped, s, noise)))


def test_memory_budget_plans_and_refuses(tiny, caplog):
    from sd35_mlx.errors import InputError

    root, _ = tiny
    with caplog.at_level(logging.INFO, logger="sd35_mlx"):  # a library logs; the CLI prints it
        pipe = SD35Pipeline.from_pretrained(root, dtype=mx.float32, memory_budget=100.0)
    assert pipe.plan is not None and pipe.plan.t5 == "loaded" and pipe.plan.transformer_bits is None
    assert "memory plan" in caplog.text
    with pytest.raises(InputError, match="nothing fits"):
        SD35Pipeline.from_pretrained(root, dtype=mx.float32, memory_budget=1e-6)


def test_memory_budget_holds_mlx_below_the_budget_in_every_stage(tiny, monkeypatch):
    """Encode, every denoising step and the decode run under MLX's memory limit
    throttle_bytes(budget); the caller's limit is back after each (and between steps)."""
    from sd35_mlx import memory
    from sd35_mlx.denoise import Denoiser
    from sd35_mlx.models import vae as vae_module

    root, _ = tiny
    real_set = mx.set_memory_limit
    current = {"limit": real_set(10**12)}
    real_set(current["limit"])
    original = current["limit"]

    def recording_set(limit):
        current["limit"] = limit
        return real_set(limit)

    monkeypatch.setattr(memory.mx, "set_memory_limit", recording_set)
    seen = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.setdefault(name, []).append(current["limit"])
            return fn(*args, **kwargs)

        return wrapped

    pipe = SD35Pipeline.from_pretrained(root, dtype=mx.float32, memory_budget=50.0)
    monkeypatch.setattr(vae_module.VAE, "decode", spy("decode", vae_module.VAE.decode))
    monkeypatch.setattr(Denoiser, "step", spy("step", Denoiser.step))
    enc = pipe._load_encoders()
    enc.clip_g = spy("encode", enc.clip_g)
    s = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, steps=3, cfg=4.0, t5_length=77)
    between = []
    for info in pipe.generate_latents(s, noise=noise_pair(3)[0]):
        between.append(current["limit"])
    pipe.decode(info.latents)
    limit = memory.throttle_bytes(int(50.0 * 1e9), pipe.plan.headroom)
    assert pipe.plan.headroom > 0
    assert seen["encode"] == [limit] and seen["decode"] == [limit] and seen["step"] == [limit] * 3
    assert between == [original] * 3 and current["limit"] == original
    assert pipe.plan is not None and pipe.plan.peak <= limit


def test_preview_is_a_cheap_rgb_image_of_the_latents(ours):
    """The preview map is measured from the VAE: decoding a constant latent equals the map."""
    from sd35_mlx.preview import calibrate

    noise, _ = noise_pair(23)
    img = ours.preview(noise)
    assert img.size == (W, H) and img.mode == "RGB"
    vae = ours._load_vae()
    proj = calibrate(vae)
    z = mx.full((1, 4, 4, 16), 0.5)
    decoded = vae.decode(vae.from_latents(z)).astype(mx.float32).mean(axis=(1, 2))[0]
    approx = 0.5 * proj[:-1].sum(axis=0) + proj[-1]
    assert float(mx.abs(decoded - approx).max()) < 0.5 * float(mx.abs(decoded).max()) + 0.1
