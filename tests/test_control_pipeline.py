"""Final-latent parity of ControlNet generation and inpainting against diffusers'
StableDiffusion3ControlNetPipeline, StableDiffusion3InpaintPipeline and
StableDiffusion3ControlNetInpaintingPipeline, on a tiny random model with the same injected
noise. The references sample the VAE posterior; they are given its mean, as we use.

Stability's SD3.5 Large ControlNets run with Stability's residual rule (also the last block)
and its canny encoding (127.5·a + 0.5); the reference for that is the diffusers pipeline with a
hook adding the last block's residual and the control image handed over already encoded so."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from control_assets import stability_state
from reference import randomize, rel_err, save_state_dict, to_numpy
from test_pipeline import H, W, final_latents, noise_pair  # the same 64x96 run as the plain pipeline's
from tiny_model import CONTEXT_DIM, TinySpec, make_tiny_model

from sd35_mlx.control.settings import ControlNetSettings
from sd35_mlx.pipeline import SD35Pipeline
from sd35_mlx.settings import GenerationSettings

PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "blurry"
TOL = 1e-4
DEPTH = 4  # transformer blocks; ControlNets of 2 blocks: interval 2 as SD3.5 Large's 38 / 19


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_control")
    ref = make_tiny_model(root, TinySpec(num_layers=DEPTH, dual_attention_layers=()))
    return root, ref


@pytest.fixture(scope="module")
def ours(tiny):
    return SD35Pipeline.from_pretrained(tiny[0], dtype=mx.float32)


def _controlnet(joint: bool, seed: int, extra: int = 0):
    from diffusers import SD3ControlNetModel

    common = dict(patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                  pooled_projection_dim=40, out_channels=16)  # fmt: skip
    if joint:  # InstantX / Alimama style (force_zeros_for_pooled_projection defaults to True)
        net = SD3ControlNetModel(sample_size=32, joint_attention_dim=CONTEXT_DIM, caption_projection_dim=32,
                                 pos_embed_max_size=16, extra_conditioning_channels=extra, **common)  # fmt: skip
    else:  # Stability SD3.5 Large style, as diffusers' conversion script builds it
        net = SD3ControlNetModel(joint_attention_dim=None, caption_projection_dim=40, pos_embed_max_size=None,
                                 pos_embed_type=None, use_pos_embed=False, force_zeros_for_pooled_projection=False,
                                 **common)  # fmt: skip
    return randomize(net, seed=seed, gain=0.5).eval()


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    nets = {"joint_a": _controlnet(True, 11), "joint_b": _controlnet(True, 12), "image": _controlnet(False, 13),
            "inpaint": _controlnet(True, 14, extra=1)}  # fmt: skip
    paths = {}
    for name, net in nets.items():
        net.save_pretrained(root / name)
        paths[name] = str(root / name)
    # the image-only one also as Stability's single file (canny), keys as SAI ships them
    sai = stability_state(nets["image"].state_dict(), depth=2, control_type=1)  # canny
    paths["stability_canny"] = str(save_state_dict(sai, root / "sd3.5_tiny_controlnet_canny.safetensors"))
    return nets, paths


def _image(path: Path, seed: int, gray=False) -> str:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    arr = np.stack([(x * 3 + seed) % 256, (y * 5) % 256, (x * y) % 256], -1).astype(np.int32)
    arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def _mask(path: Path) -> str:
    m = np.zeros((H, W), np.uint8)
    m[16:48, 24:72] = 255
    m[10:14, 5:9] = 128  # grey: binarized at 0.5 (128/255 ≥ 0.5 → repaint), by both
    Image.fromarray(m).save(path)
    return str(path)


def check(ours_latents, ref_latents):
    err = rel_err(to_numpy(ours_latents), to_numpy(ref_latents).transpose(0, 2, 3, 1))
    print(f"parity max|Δ|/max|ref| = {err:.2e}")
    assert err <= TOL, f"max|Δ|/max|ref| = {err:.2e} > {TOL}"
    return err


@pytest.fixture
def posterior_mean(monkeypatch):
    from diffusers.models.autoencoders import vae as vae_module

    monkeypatch.setattr(vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _reference_controlnet_pipeline(ref, nets):
    from diffusers import SD3MultiControlNetModel, StableDiffusion3ControlNetPipeline

    net = nets[0] if len(nets) == 1 else SD3MultiControlNetModel(nets)
    return StableDiffusion3ControlNetPipeline(**ref.components, controlnet=net)


def _settings(**kw):
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, steps=3, cfg=4.0, sampler="euler",
                t5_length=77)  # fmt: skip
    return GenerationSettings(**{**base, **kw})


def test_one_joint_controlnet_with_cfg(tiny, ours, controlnets, tmp_path, posterior_mean):
    _, ref = tiny
    nets, paths = controlnets
    img = _image(tmp_path / "c.png", 1)
    noise, noise_t = noise_pair(3)
    pipe = _reference_controlnet_pipeline(ref, [nets["joint_a"]])
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=3,
                        guidance_scale=4.0, max_sequence_length=77, control_image=Image.open(img),
                        controlnet_conditioning_scale=0.5, latents=noise_t, output_type="latent").images  # fmt: skip
    s = _settings(controlnets=(ControlNetSettings(paths["joint_a"], image=img, scale=0.5),))
    got = final_latents(ours, s, noise)
    check(got, expected)
    plain = final_latents(ours, _settings(), noise)
    assert rel_err(got, plain) > 1e-3  # the ControlNet really acted


def test_two_controlnets_scales_and_windows(tiny, ours, controlnets, tmp_path, posterior_mean):
    _, ref = tiny
    nets, paths = controlnets
    a, b = _image(tmp_path / "a.png", 2), _image(tmp_path / "b.png", 3)
    noise, noise_t = noise_pair(5)
    pipe = _reference_controlnet_pipeline(ref, [nets["joint_a"], nets["joint_b"]])
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=4,
                        guidance_scale=4.0, max_sequence_length=77, control_image=[Image.open(a), Image.open(b)],
                        controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.25],
                        control_guidance_end=[0.5, 1.0], latents=noise_t, output_type="latent").images  # fmt: skip
    # 4 steps: the first net acts in steps 0-1, the second in steps 1-3
    s = _settings(steps=4, controlnets=(
        ControlNetSettings(paths["joint_a"], image=a, scale=1.0, start=0.0, end=0.5),
        ControlNetSettings(paths["joint_b"], image=b, scale=0.5, start=0.25, end=1.0)))  # fmt: skip
    check(final_latents(ours, s, noise), expected)


def test_image_only_controlnet_with_the_diffusers_rule(tiny, ours, controlnets, tmp_path, posterior_mean):
    """Stability's architecture in diffusers' layout, run with diffusers' rule: equal to diffusers."""
    _, ref = tiny
    nets, paths = controlnets
    img = _image(tmp_path / "d.png", 4)
    noise, noise_t = noise_pair(7)
    pipe = _reference_controlnet_pipeline(ref, [nets["image"]])
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=3,
                        guidance_scale=4.0, max_sequence_length=77, control_image=Image.open(img),
                        controlnet_conditioning_scale=1.0, latents=noise_t, output_type="latent").images  # fmt: skip
    s = _settings(controlnets=(ControlNetSettings(paths["image"], image=img, residual_rule="diffusers",
                                                  control_type="depth"),))  # fmt: skip
    check(final_latents(ours, s, noise), expected)


def test_stability_file_with_its_rule_and_canny_encoding(tiny, ours, controlnets, tmp_path, posterior_mean):
    _, ref = tiny
    nets, paths = controlnets
    img = _image(tmp_path / "e.png", 5)
    noise, noise_t = noise_pair(9)
    pipe = _reference_controlnet_pipeline(ref, [nets["image"]])
    captured = {}
    original = pipe.controlnet.forward

    def capture(*args, **kwargs):
        out = original(*args, **kwargs)
        captured["samples"] = out[0]
        return out

    pipe.controlnet.forward = capture
    last = pipe.transformer.transformer_blocks[-1]
    k = (DEPTH - 1) // (DEPTH // 2)
    handle = last.register_forward_hook(lambda m, a, out: (out[0], out[1] + captured["samples"][k]))
    a = np.asarray(Image.open(img).convert("RGB"), dtype=np.float32) / 255.0
    control = torch.from_numpy((a * 127.5 + 0.5).transpose(2, 0, 1)[None].copy())  # Stability's canny input
    try:
        with torch.no_grad():
            expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=3,
                            guidance_scale=4.0, max_sequence_length=77, control_image=control,
                            latents=noise_t, output_type="latent").images  # fmt: skip
    finally:
        handle.remove()
    s = _settings(controlnets=(ControlNetSettings(paths["stability_canny"], image=img),))
    got = final_latents(ours, s, noise)
    check(got, expected)
    # the rule matters: with diffusers' rule the result differs
    s_d = _settings(controlnets=(ControlNetSettings(paths["stability_canny"], image=img, residual_rule="diffusers"),))
    assert rel_err(final_latents(ours, s_d, noise), got) > 1e-4


def test_inpainting_matches_diffusers(tiny, ours, tmp_path, monkeypatch):
    from diffusers import StableDiffusion3InpaintPipeline
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_inpaint as mod

    _, ref = tiny
    init, mask = _image(tmp_path / "i.png", 6), _mask(tmp_path / "m.png")
    noise, noise_t = noise_pair(11)
    orig = mod.retrieve_latents
    monkeypatch.setattr(mod, "retrieve_latents", lambda out, generator=None, sample_mode="sample": orig(out, sample_mode="argmax"))
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: noise_t.clone())
    pipe = StableDiffusion3InpaintPipeline(**ref.components)
    for strength in (0.7, 1.0):
        with torch.no_grad():
            expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.open(init),
                            mask_image=Image.open(mask), height=H, width=W, strength=strength,
                            num_inference_steps=4, guidance_scale=4.0, max_sequence_length=77,
                            output_type="latent").images  # fmt: skip
        s = _settings(steps=4, init_image=init, mask=mask, strength=strength)
        got = final_latents(ours, s, noise)
        check(got, expected)
    # outside the mask the result is the init image's latents
    m = np.asarray(Image.open(mask)) >= 128
    keep = ~m[::8, ::8]
    z0 = ours.encode_image(__import__("sd35_mlx.images", fromlist=["load_image"]).load_image(init, W, H))
    assert np.allclose(to_numpy(got)[0][keep], to_numpy(z0)[0][keep], atol=1e-5)


def test_controlnet_inpainting_matches_diffusers(tiny, ours, controlnets, tmp_path, posterior_mean):
    from diffusers import StableDiffusion3ControlNetInpaintingPipeline

    _, ref = tiny
    nets, paths = controlnets
    init, mask = _image(tmp_path / "j.png", 7), _mask(tmp_path / "n.png")
    noise, noise_t = noise_pair(13)
    pipe = StableDiffusion3ControlNetInpaintingPipeline(**ref.components, controlnet=nets["inpaint"])
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, control_image=Image.open(init),
                        control_mask=Image.open(mask), height=H, width=W, num_inference_steps=3,
                        guidance_scale=4.0, max_sequence_length=77, controlnet_conditioning_scale=0.95,
                        latents=noise_t, output_type="latent").images  # fmt: skip
    s = _settings(init_image=init, mask=mask, controlnets=(ControlNetSettings(paths["inpaint"], scale=0.95),))
    check(final_latents(ours, s, noise), expected)


def test_single_pass_when_cfg_at_most_one(tiny, ours, controlnets, tmp_path, posterior_mean):
    _, ref = tiny
    nets, paths = controlnets
    img = _image(tmp_path / "s.png", 8)
    noise, noise_t = noise_pair(15)
    pipe = _reference_controlnet_pipeline(ref, [nets["joint_a"]])
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=2, guidance_scale=1.0,
                        max_sequence_length=77, control_image=Image.open(img), controlnet_conditioning_scale=0.7,
                        latents=noise_t, output_type="latent").images  # fmt: skip
    s = _settings(steps=2, cfg=1.0, controlnets=(ControlNetSettings(paths["joint_a"], image=img, scale=0.7),))
    check(final_latents(ours, s, noise), expected)


def test_split_cfg_and_skip_layer_guidance_agree_with_the_batched_step(ours, controlnets, tmp_path):
    """CFG as two passes (the memory plan's split) runs each ControlNet per half and gives the
    batched result; with skip-layer guidance too (its conditional pass gets the residuals by
    the rule: Stability's adds nothing to a skipped block)."""
    from types import SimpleNamespace

    from sd35_mlx.settings import SkipLayerGuidance

    _, paths = controlnets
    img = _image(tmp_path / "t.png", 9)
    noise, _ = noise_pair(17)
    slg = SkipLayerGuidance(layers=(1,), scale=2.0, start=0.0, end=1.0)
    for net in ("joint_a", "stability_canny"):
        s = _settings(steps=2, skip_layer_guidance=slg, controlnets=(ControlNetSettings(paths[net], image=img),))
        batched = final_latents(ours, s, noise)
        ours.plan = SimpleNamespace(split_cfg=True, encode_tile=None)
        try:
            split = final_latents(ours, s, noise)
        finally:
            ours.plan = None
        assert rel_err(split, batched) <= 1e-5, net
        plain = final_latents(ours, _settings(steps=2, skip_layer_guidance=slg), noise)
        assert rel_err(batched, plain) > 1e-3


def test_inpainting_a_crop_around_the_mask_matches_diffusers(tiny, ours, tmp_path, monkeypatch):
    """diffusers' padding_mask_crop: the crop's final latents, and the pasted-back image keeps the
    original outside the mask (our VAE decode adds the shift diffusers' inpaint decode omits, so
    images are compared only where the original shows through)."""
    from diffusers import StableDiffusion3InpaintPipeline
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_inpaint as mod

    from sd35_mlx.control.inpaint_crop import crop_region

    _, ref = tiny
    big_w, big_h = 160, 128
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (big_h, big_w, 3)).astype(np.uint8)).save(tmp_path / "big.png")
    m = np.zeros((big_h, big_w), np.uint8)
    m[40:70, 60:90] = 255
    Image.fromarray(m).save(tmp_path / "bigmask.png")
    init, mask = str(tmp_path / "big.png"), str(tmp_path / "bigmask.png")
    noise, noise_t = noise_pair(19)
    orig = mod.retrieve_latents
    monkeypatch.setattr(mod, "retrieve_latents", lambda out, generator=None, sample_mode="sample": orig(out, sample_mode="argmax"))
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: noise_t.clone())
    pipe = StableDiffusion3InpaintPipeline(**ref.components)
    box = pipe.mask_processor.get_crop_region(Image.open(mask), W, H, pad=8)
    assert crop_region(Image.open(mask), W, H, 8) == box
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.open(init), mask_image=Image.open(mask), height=H,
              width=W, strength=0.8, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=77,
              padding_mask_crop=8)  # fmt: skip
    captured = {}

    def last_latents(pipeline, i, t, tensors):  # after the step and the blend
        captured["latents"] = tensors["latents"]
        return tensors

    with torch.no_grad():  # (output_type="latent" fails in diffusers with padding_mask_crop: it overlays latents)
        pipe(callback_on_step_end=last_latents, **kw)
    expected = captured["latents"]
    s = _settings(init_image=init, mask=mask, strength=0.8, mask_crop_padding=8)
    check(final_latents(ours, s, noise), expected)
    out = ours.generate(settings=s, noise=noise).image
    assert out.size == (big_w, big_h)
    original = np.asarray(Image.open(init))
    assert np.array_equal(np.asarray(out)[m == 0], original[m == 0])
