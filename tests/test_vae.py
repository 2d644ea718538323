"""The 16-channel VAE against diffusers' AutoencoderKL, in every weight layout.

Reference: diffusers `AutoencoderKL` at a tiny config that keeps every structural feature of
SD3's (4 levels, two channel changes -> conv shortcuts, 2 resnets per level, mid attention,
16 latent channels, no quant convs), all parameters randomized. The Stability layout is
checked through diffusers' own `convert_ldm_vae_checkpoint`.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from reference import nchw_to_nhwc, randomize, rel_err, save_state_dict

from sd35_mlx.config import SD3_VAE, VAEConfig
from sd35_mlx.errors import SD35Error, WeightMappingError
from sd35_mlx.models.vae import VAE, count_parameters
from sd35_mlx.weights.mapping import apply_rules, check_against_model
from sd35_mlx.weights.safetensors_file import load_tensors
from sd35_mlx.weights.tables.vae import (
    DIFFUSERS, MLX, STABILITY, infer_config, load_vae,
)  # fmt: skip

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

FP32_BOUND = 1e-4
# bf16 weights and activations (GroupNorm statistics and softmax in fp32) against the fp32
# reference; measured ~1e-2 on this config.
BF16_BOUND = 4e-2


def diffusers_config(channels=(16, 32, 64, 64), groups=8) -> dict:
    n = len(channels)
    return dict(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
        block_out_channels=list(channels), norm_num_groups=groups,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
        scaling_factor=1.5305, shift_factor=0.0609,
    )  # fmt: skip


OFFICIAL = dict(diffusers_config((128, 256, 512, 512), 32), sample_size=1024, force_upcast=True)

# non-square, batch 2
IMAGE_SHAPE = (2, 3, 48, 80)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    ref = randomize(AutoencoderKL(**diffusers_config()).eval(), seed=1)
    images = torch.rand(IMAGE_SHAPE) * 2 - 1
    with torch.no_grad():
        post = ref.encode(images).latent_dist
        decoded = ref.decode(post.mean).sample
    return ref, images, post, decoded


def _mx_state(state) -> dict:
    return {k: mx.array(v.float().numpy()) for k, v in state.items()}


def _check_parity(vae: VAE, images, post, decoded, bound: float, encode: bool = True) -> None:
    out = vae.decode(nchw_to_nhwc(post.mean))
    assert rel_err(out, decoded.permute(0, 2, 3, 1)) <= bound
    if encode:
        mean, logvar = vae.encode(nchw_to_nhwc(images))
        assert rel_err(mean, post.mean.permute(0, 2, 3, 1)) <= bound
        assert rel_err(logvar, post.logvar.permute(0, 2, 3, 1)) <= bound


def test_diffusers_folder_fp32(tiny, tmp_path):
    ref, images, post, decoded = tiny
    ref.save_pretrained(tmp_path / "vae")  # config.json + diffusion_pytorch_model.safetensors
    hf_config = json.loads((tmp_path / "vae" / "config.json").read_text())
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    vae = load_vae(load_tensors(path), DIFFUSERS, files=(str(path),), hf_config=hf_config)
    assert vae.config.block_out_channels == (16, 32, 64, 64)
    assert vae.config.norm_num_groups == 8 and vae.has_encoder
    _check_parity(vae, images, post, decoded, FP32_BOUND)


def test_bf16_weights(tiny, tmp_path):
    ref, images, post, decoded = tiny
    path = save_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()},
                           tmp_path / "vae_bf16.safetensors")  # fmt: skip
    vae = load_vae(load_tensors(path), DIFFUSERS, hf_config=diffusers_config())
    assert vae.dtype == mx.bfloat16
    out = vae.decode(nchw_to_nhwc(post.mean))
    assert out.dtype == mx.bfloat16
    err = rel_err(out, decoded.permute(0, 2, 3, 1))
    mean, logvar = vae.encode(nchw_to_nhwc(images))
    err_mean = rel_err(mean, post.mean.permute(0, 2, 3, 1))
    err_logvar = rel_err(logvar, post.logvar.permute(0, 2, 3, 1))
    assert max(err, err_mean, err_logvar) <= BF16_BOUND, (err, err_mean, err_logvar)
    assert err > FP32_BOUND  # it really ran in bf16


# ---- Stability single file ----
def sai_shapes(cfg: dict) -> dict:
    """Names and shapes of Stability's VAE (`sd3_impls.py` naming), from the config."""
    ch, lat, nr = cfg["block_out_channels"], cfg["latent_channels"], cfg["layers_per_block"]
    n, c_in = len(ch), cfg["in_channels"]
    shapes: dict = {}

    def conv(name, cout, cin, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(side, c):
        resnet(f"{side}.mid.block_1", c, c), resnet(f"{side}.mid.block_2", c, c)
        norm(f"{side}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{side}.mid.attn_1.{p}", c, c, 1)

    conv("encoder.conv_in", ch[0], c_in)
    for i in range(n):
        for j in range(nr):
            resnet(f"encoder.down.{i}.block.{j}", ch[i - 1] if (j == 0 and i > 0) else ch[i], ch[i])
        if i < n - 1:
            conv(f"encoder.down.{i}.downsample.conv", ch[i], ch[i])
    mid("encoder", ch[-1]), norm("encoder.norm_out", ch[-1])
    conv("encoder.conv_out", 2 * lat, ch[-1])
    conv("decoder.conv_in", ch[-1], lat)
    mid("decoder", ch[-1])
    for i in range(n):
        for j in range(nr + 1):
            resnet(f"decoder.up.{i}.block.{j}", ch[min(i + 1, n - 1)] if j == 0 else ch[i], ch[i])
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", ch[i], ch[i])
    norm("decoder.norm_out", ch[0]), conv("decoder.conv_out", c_in, ch[0])
    return shapes


def sai_state(cfg: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sai_shapes(cfg).items():
        r = torch.randn(shape, generator=g)
        if len(shape) == 1:
            out[name] = 1 + 0.2 * r if name.endswith("weight") and "norm" in name else 0.1 * r
        else:
            out[name] = r / math.sqrt(math.prod(shape[1:]))
    return out


@pytest.fixture(scope="module")
def stability_file(tmp_path_factory):
    cfg = diffusers_config()
    sai = {f"first_stage_model.{k}": v for k, v in sai_state(cfg, seed=3).items()}
    # another network's keys share the file
    sai["model.diffusion_model.x_embedder.proj.weight"] = torch.randn(32, 16, 2, 2)
    sai["model.diffusion_model.pos_embed"] = torch.randn(1, 16, 32)
    path = save_state_dict(sai, tmp_path_factory.mktemp("sai") / "sd3.5_tiny.safetensors")

    ref = AutoencoderKL(**cfg).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(sai, cfg), strict=True)  # the oracle
    images = torch.rand(IMAGE_SHAPE) * 2 - 1
    with torch.no_grad():
        post = ref.encode(images).latent_dist
        decoded = ref.decode(post.mean).sample
    return path, sai, (images, post, decoded)


def test_stability_single_file(stability_file):
    path, _, (images, post, decoded) = stability_file
    vae = load_vae(load_tensors(path), STABILITY, files=(str(path),),
                   hf_config={"norm_num_groups": 8})  # fmt: skip
    assert vae.config.block_out_channels == (16, 32, 64, 64)
    _check_parity(vae, images, post, decoded, FP32_BOUND)


def test_decoder_only_checkpoint(stability_file):
    path, _, (images, post, decoded) = stability_file
    tensors = {k: v for k, v in load_tensors(path).items()
               if not k.startswith("first_stage_model.encoder.")}  # fmt: skip
    vae = load_vae(tensors, STABILITY, hf_config={"norm_num_groups": 8})
    assert not vae.has_encoder
    _check_parity(vae, images, post, decoded, FP32_BOUND, encode=False)
    with pytest.raises(SD35Error, match="no encoder"):
        vae.encode(nchw_to_nhwc(images))


def test_drop_encoder(tiny):
    ref, images, post, decoded = tiny
    vae = load_vae(_mx_state(ref.state_dict()), DIFFUSERS, hf_config=diffusers_config())
    n_full = count_parameters(vae)
    vae.drop_encoder()
    assert not vae.has_encoder and count_parameters(vae) < n_full
    _check_parity(vae, images, post, decoded, FP32_BOUND, encode=False)


def test_unknown_key_is_reported(stability_file):
    path, _, _ = stability_file
    tensors = dict(load_tensors(path))
    tensors["first_stage_model.decoder.up.0.extra.weight"] = mx.zeros((3,))
    with pytest.raises(WeightMappingError, match=r"first_stage_model\.decoder\.up\.0\.extra"):
        load_vae(tensors, STABILITY, hf_config={"norm_num_groups": 8})


def test_converted_layout_roundtrip(tiny):
    ref, images, post, decoded = tiny
    vae = load_vae(_mx_state(ref.state_dict()), DIFFUSERS, hf_config=diffusers_config())
    again = load_vae(dict(tree_flatten(vae.parameters())), MLX, config=vae.config)
    _check_parity(again, images, post, decoded, FP32_BOUND)


def test_three_levels_reverse_up_blocks():
    """The diffusers up_blocks index reversal is not hard-wired to four levels."""
    cfg = diffusers_config(channels=(16, 32, 32), groups=8)
    ref = randomize(AutoencoderKL(**cfg).eval(), seed=5)
    z = torch.randn(1, 16, 6, 10)
    with torch.no_grad():
        want = ref.decode(z).sample
    vae = load_vae(_mx_state(ref.state_dict()), DIFFUSERS, hf_config=cfg)
    assert vae.downscale == 4
    assert rel_err(vae.decode(nchw_to_nhwc(z)), want.permute(0, 2, 3, 1)) <= FP32_BOUND


# ---- full size: shapes only, nothing evaluated ----
def _lazy(shapes: dict) -> dict:
    return {k: mx.zeros(tuple(s)) for k, s in shapes.items()}  # never evaluated


def test_full_size_parameter_counts():
    with torch.device("meta"):
        ref = AutoencoderKL(**OFFICIAL)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(ref.encoder), count(ref.decoder)) == (34_274_208, 49_545_475)
    assert count(ref) == 83_819_683

    ours = VAE(SD3_VAE)
    assert count_parameters(ours.encoder) == count(ref.encoder)
    assert count_parameters(ours.decoder) == count(ref.decoder)
    assert count_parameters(ours) == 83_819_683

    # both official layouts map onto the full-size module tree with the right shapes
    df = apply_rules(_lazy({k: v.shape for k, v in ref.state_dict().items()}), DIFFUSERS.rules,
                     layout=DIFFUSERS.name)  # fmt: skip
    assert len(df) == 244 and infer_config(df, OFFICIAL) == SD3_VAE
    check_against_model(ours, df, layout=DIFFUSERS.name)
    sai = _lazy({f"first_stage_model.{k}": s for k, s in sai_shapes(OFFICIAL).items()})
    mapped = apply_rules(sai, STABILITY.rules, layout=STABILITY.name, prefix=STABILITY.prefix)
    assert infer_config(mapped) == SD3_VAE
    check_against_model(ours, mapped, layout=STABILITY.name)


def test_infer_config_overrides_and_mismatch(stability_file):
    _, sai, _ = stability_file
    weights = apply_rules(_mx_state(sai), STABILITY.rules, layout="t", prefix=STABILITY.prefix)
    cfg = infer_config(weights, {"norm_num_groups": 8, "scaling_factor": 0.3611, "shift_factor": None})
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.latent_channels) == (0.3611, 0.0, 16)
    assert cfg.layers_per_block == 2 and cfg.in_channels == 3
    assert infer_config(weights, {"norm_num_groups": 8}).shift_factor == 0.0609
    with pytest.raises(WeightMappingError, match="divisible"):
        infer_config(weights)  # 16 channels cannot make 32 groups
    with pytest.raises(WeightMappingError, match="latent_channels"):
        infer_config(weights, {"norm_num_groups": 8, "latent_channels": 4})


def test_latent_scaling_matches_sd3_convention():
    vae = VAE(VAEConfig(block_out_channels=(8, 8), norm_num_groups=4), with_encoder=False)
    z = mx.random.normal((1, 4, 6, 16))
    # SAI SD3LatentFormat / diffusers SD3 pipeline: (z - shift) * scale, and back
    want = (np.array(z) - SD3_VAE.shift_factor) * SD3_VAE.scaling_factor
    assert np.allclose(np.array(vae.to_latents(z)), want, atol=1e-6)
    assert np.allclose(np.array(vae.from_latents(vae.to_latents(z))), np.array(z), atol=1e-5)


@pytest.mark.parametrize("dtype, bound", [(mx.float32, 1e-6), (mx.bfloat16, 1e-2)])
@pytest.mark.parametrize("hw", [(12, 10), (32, 16)])  # one reduction; two stages (16 partial means)
def test_fused_group_norm_matches_torch(dtype, bound, hw):
    """The compiled GroupNorm + SiLU the GPUs run (tested here on the CPU) and the plain one
    both equal torch's GroupNorm followed by SiLU, with the statistics reduced in one stage or,
    for small images, two."""
    from sd35_mlx.models.vae import GroupNorm

    norm = GroupNorm(8, 64, 1e-6)
    norm.weight = mx.random.normal((64,)) + 1
    norm.bias = mx.random.normal((64,))
    x = (3 * mx.random.normal((2, *hw, 64)) + 1.5).astype(dtype)
    ref = torch.nn.GroupNorm(8, 64, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(norm.weight)))
        ref.bias.copy_(torch.from_numpy(np.array(norm.bias)))
        want = torch.nn.functional.silu(ref(torch.from_numpy(np.array(x.astype(mx.float32))).permute(0, 3, 1, 2)))
    want = want.permute(0, 2, 3, 1).numpy()
    for fused in (False, True):
        got = norm(x, silu=True, fused=fused)
        assert got.dtype == dtype
        assert rel_err(np.array(got.astype(mx.float32)), want) < bound, fused
    plain, fused = (np.array(norm(x, fused=f).astype(mx.float32)) for f in (False, True))
    assert rel_err(fused, plain) < bound / 10  # without SiLU as well
