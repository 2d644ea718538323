"""MMDiT parity against diffusers' SD3Transformer2DModel, both weight layouts, config inference,
and full-size parameter counts (shapes only; full-size models are never evaluated)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from diffusers.models.embeddings import get_timestep_embedding
from mlx.utils import tree_flatten
from reference import nchw_to_nhwc, nhwc_to_nchw, randomize, rel_err, save_state_dict

from sd35_mlx.config import SD3_MEDIUM_MMDIT, SD35_LARGE_MMDIT, SD35_MEDIUM_MMDIT, MMDiTConfig
from sd35_mlx.errors import InputError, WeightMappingError
from sd35_mlx.models.mmdit import MMDiT, timestep_embedding
from sd35_mlx.weights.mapping import apply_rules, check_against_model
from sd35_mlx.weights.safetensors_file import load_tensors
from sd35_mlx.weights.tables.mmdit import DIFFUSERS, STABILITY, infer_config, load_mmdit

FP32_BOUND = 1e-4
BF16_BOUND = 2e-2  # bf16 weights and activations vs the fp32 reference, 3 blocks (measured ~7.5e-3)

# Tiny configurations (head size 64 as in every released model, so heads = hidden // 64).
TINY = dict(hidden_size=128, num_heads=2, context_dim=32, pooled_dim=24)
MMDITX = MMDiTConfig(
    depth=3, pos_embed_max_size=16, qk_norm=True, dual_attention_layers=(0, 1), **TINY
)
SD3_STYLE = MMDiTConfig(depth=3, pos_embed_max_size=16, qk_norm=False, **TINY)
CROP = MMDiTConfig(depth=2, pos_embed_max_size=15, qk_norm=True, dual_attention_layers=(0,), **TINY)


def diffusers_kwargs(cfg: MMDiTConfig) -> dict:
    return dict(
        sample_size=2 * cfg.pos_embed_max_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.pooled_dim,
        out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=tuple(cfg.dual_attention_layers),
        qk_norm="rms_norm" if cfg.qk_norm else None,
    )


def reference_model(cfg: MMDiTConfig, seed: int = 1) -> SD3Transformer2DModel:
    return randomize(SD3Transformer2DModel(**diffusers_kwargs(cfg)).eval(), seed)


def to_mx(state: Dict[str, torch.Tensor]) -> Dict[str, mx.array]:
    return {k: mx.array(v.detach().float().numpy()) for k, v in state.items()}


def make_inputs(
    cfg: MMDiTConfig, batch: int, height: int, width: int, tokens: int = 7, seed: int = 0
):
    """NCHW latents, context, pooled and distinct float timesteps σ·1000 per batch entry."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, height, width, generator=g)
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    timestep = torch.tensor([999.0, 137.5, 8.929][:batch])
    return latents, context, pooled, timestep


@torch.no_grad()
def run_reference(ref, inputs, skip_layers=None) -> np.ndarray:
    latents, context, pooled, timestep = inputs
    return ref(latents, context, pooled, timestep, skip_layers=skip_layers).sample.numpy()


def run_ours(model: MMDiT, inputs, skip_layers=()) -> np.ndarray:
    latents, context, pooled, timestep = inputs
    out = model(
        nchw_to_nhwc(latents), mx.array(timestep.numpy()), mx.array(context.numpy()),
        mx.array(pooled.numpy()), skip_layers=skip_layers,
    )  # fmt: skip
    return nhwc_to_nchw(out)


# ---- fp32 / bf16 parity ----
@pytest.mark.parametrize(
    "cfg, batch, height, width",
    [
        (MMDITX, 2, 16, 16),  # qk-norm, dual layers 0-1 + plain last layer, 2 timesteps
        (SD3_STYLE, 1, 16, 16),  # SD3 Medium style: no qk-norm, no dual attention
        (CROP, 2, 24, 16),  # non-square 12x8 patch grid, centered crop of a 15x15 table
    ],
    ids=["mmditx-qknorm", "sd3-style", "nonsquare-crop"],
)
def test_fp32_parity(cfg, batch, height, width):
    ref = reference_model(cfg)
    model = load_mmdit(to_mx(ref.state_dict()), DIFFUSERS)
    assert model.config == cfg
    inputs = make_inputs(cfg, batch, height, width)
    expected = run_reference(ref, inputs)
    assert rel_err(run_ours(model, inputs), expected) <= FP32_BOUND
    if batch == 2:  # the two timesteps give different outputs (batch not mixed up)
        assert np.abs(expected[0] - expected[1]).max() > 0.1 * np.abs(expected).max()


def test_crop_offset_matters():
    """A corner crop instead of the centered one is detectably wrong for this grid."""
    ref = reference_model(CROP)
    model = load_mmdit(to_mx(ref.state_dict()), DIFFUSERS)
    inputs = make_inputs(CROP, 1, 24, 16)
    expected = run_reference(ref, inputs)
    table = model.pos_embed.reshape(15, 15, -1)
    shifted = mx.concatenate([table[1:], table[:1]], axis=0)  # moves the crop down one row
    model.pos_embed = shifted.reshape(1, 15 * 15, -1)
    assert rel_err(run_ours(model, inputs), expected) > 100 * FP32_BOUND


def test_skip_layers_match_diffusers():
    ref = reference_model(MMDITX)
    model = load_mmdit(to_mx(ref.state_dict()), DIFFUSERS)
    inputs = make_inputs(MMDITX, 2, 16, 16)
    for skip in ([1], [0, 2]):
        expected = run_reference(ref, inputs, skip_layers=skip)
        assert rel_err(run_ours(model, inputs, skip_layers=skip), expected) <= FP32_BOUND
    assert rel_err(run_reference(ref, inputs, skip_layers=[1]), run_reference(ref, inputs)) > 1e-2


def test_bf16_within_bound():
    ref = reference_model(MMDITX)
    model = load_mmdit(to_mx(ref.state_dict()), DIFFUSERS, dtype=mx.bfloat16)
    assert model.dtype == mx.bfloat16
    inputs = make_inputs(MMDITX, 2, 16, 16)
    assert rel_err(run_ours(model, inputs), run_reference(ref, inputs)) <= BF16_BOUND


def test_timestep_sinusoid_is_fp32():
    t = torch.tensor([0.0, 1.5, 8.929, 602.151, 999.3, 1000.0])
    expected = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert np.abs(np.array(timestep_embedding(mx.array(t.numpy()))) - expected.numpy()).max() < 1e-4
    # In a bf16 model, timesteps 1000 and 1001 must still give different conditioning
    # (a bf16 sinusoid would round both to 1000).
    ref = reference_model(SD3_STYLE)
    model = load_mmdit(to_mx(ref.state_dict()), DIFFUSERS, dtype=mx.bfloat16)
    pooled = mx.zeros((2, SD3_STYLE.pooled_dim))
    c = model.conditioning(mx.array([1000.0, 1001.0]), pooled).astype(mx.float32)
    assert mx.abs(c[0] - c[1]).max().item() > 0


def test_input_errors():
    model = MMDiT(MMDITX)  # 16x16 table, patch 2: largest latent side 32
    ctx, pooled, t = mx.zeros((1, 3, 32)), mx.zeros((1, 24)), mx.array([500.0])
    with pytest.raises(InputError, match="largest latent side is 32"):
        model(mx.zeros((1, 34, 16, 16)), t, ctx, pooled)
    with pytest.raises(InputError, match="multiples of 2"):
        model(mx.zeros((1, 15, 16, 16)), t, ctx, pooled)
    with pytest.raises(InputError, match="NHWC"):
        model(mx.zeros((1, 16, 32, 32)), t, ctx, pooled)  # NCHW by mistake
    with pytest.raises(InputError, match="skip_layers"):
        model(mx.zeros((1, 16, 16, 16)), t, ctx, pooled, skip_layers=[3])


# ---- weight layouts ----
def read_transformer_folder(folder: Path) -> Dict[str, mx.array]:
    """A diffusers model folder: the shards the index names, else the single file."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        assert len(shards) > 1
        tensors: Dict[str, mx.array] = {}
        for shard in shards:
            tensors.update(load_tensors(folder / shard))
        return tensors
    return load_tensors(folder / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_diffusers_folder(tmp_path, sharded):
    ref = reference_model(MMDITX)
    folder = tmp_path / "transformer"
    ref.save_pretrained(
        folder, safe_serialization=True, max_shard_size="400KB" if sharded else "10GB"
    )
    assert (
        json.loads((folder / "config.json").read_text())["_class_name"] == "SD3Transformer2DModel"
    )
    tensors = read_transformer_folder(folder)
    model = load_mmdit(tensors, DIFFUSERS, files=[str(folder)])
    assert model.config == MMDITX
    inputs = make_inputs(MMDITX, 2, 16, 16)
    assert rel_err(run_ours(model, inputs), run_reference(ref, inputs)) <= FP32_BOUND


def sai_shapes(cfg: MMDiTConfig) -> Dict[str, tuple]:
    """SAI MMDiTX tensor names and shapes (Stability's mmditx.py), without the file prefix."""
    h, p, n = cfg.hidden_size, cfg.patch_size, cfg.depth
    wb = lambda name, out, inp: {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}  # noqa: E731
    s = {"pos_embed": (1, cfg.pos_embed_max_size**2, h)}
    s.update({"x_embedder.proj.weight": (h, cfg.in_channels, p, p), "x_embedder.proj.bias": (h,)})
    s.update(wb("t_embedder.mlp.0", h, 256) | wb("t_embedder.mlp.2", h, h))
    s.update(wb("y_embedder.mlp.0", h, cfg.pooled_dim) | wb("y_embedder.mlp.2", h, h))
    s.update(wb("context_embedder", h, cfg.context_dim))
    for i in range(n):
        last, dual = i == n - 1, i in cfg.dual_attention_layers
        for stream in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{stream}."
            chunks = (9 if dual else 6) if stream == "x_block" else (2 if last else 6)
            s.update(wb(b + "adaLN_modulation.1", chunks * h, h) | wb(b + "attn.qkv", 3 * h, h))
            attns = ["attn", "attn2"] if stream == "x_block" and dual else ["attn"]
            if cfg.qk_norm:
                s.update({f"{b}{a}.ln_{q}.weight": (cfg.head_dim,) for a in attns for q in "qk"})
            if dual and stream == "x_block":
                s.update(wb(b + "attn2.qkv", 3 * h, h) | wb(b + "attn2.proj", h, h))
            if stream == "x_block" or not last:
                s.update(wb(b + "attn.proj", h, h))
                s.update(wb(b + "mlp.fc1", 4 * h, h) | wb(b + "mlp.fc2", h, 4 * h))
    s.update(wb("final_layer.adaLN_modulation.1", 2 * h, h))
    s.update(wb("final_layer.linear", p * p * cfg.out_channels, h))
    return s


def random_sai_state(cfg: MMDiTConfig, seed: int = 3) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sai_shapes(cfg).items():
        r = torch.randn(shape, generator=g)
        if name == "pos_embed":
            out[name] = r
        elif len(shape) == 1:
            out[name] = (1.0 + 0.2 * r) if ".ln_" in name else 0.1 * r
        else:
            out[name] = r / math.sqrt(math.prod(shape[1:]))
    return out


@pytest.mark.parametrize("cfg", [MMDITX, SD3_STYLE], ids=["mmditx-qknorm", "sd3-style"])
def test_stability_single_file(tmp_path, cfg):
    """Our direct load of a SAI file equals diffusers' own conversion of the same tensors."""
    sai = random_sai_state(cfg)
    ref = SD3Transformer2DModel(**diffusers_kwargs(cfg)).eval()
    ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(sai)), strict=True)

    g = torch.Generator().manual_seed(9)
    others = {  # other networks' keys in the same file must be left alone
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 16, 3, 3, generator=g),
        "first_stage_model.encoder.conv_out.bias": torch.randn(32, generator=g),
        "loss.logvar": torch.randn(4, generator=g),
    }
    file = save_state_dict(
        {"model.diffusion_model." + k: v for k, v in sai.items()} | others,
        tmp_path / "sd3.safetensors",
    )
    tensors = load_tensors(file)
    model = load_mmdit(tensors, STABILITY, files=[str(file)])
    assert model.config == cfg
    inputs = make_inputs(cfg, 2, 16, 16)
    assert rel_err(run_ours(model, inputs), run_reference(ref, inputs)) <= FP32_BOUND


def test_unexpected_keys_are_refused():
    sai = {
        "model.diffusion_model." + k: mx.array(v.numpy())
        for k, v in random_sai_state(SD3_STYLE).items()
    }
    sai["model.diffusion_model.joint_blocks.0.x_block.attn.extra.weight"] = mx.zeros((2,))
    with pytest.raises(WeightMappingError, match="attn.extra.weight"):
        load_mmdit(sai, STABILITY, files=["sd3.safetensors"])
    state = to_mx(reference_model(SD3_STYLE).state_dict())
    del state["transformer_blocks.1.attn.to_k.weight"]
    with pytest.raises(WeightMappingError, match="to_k.weight"):
        load_mmdit(state, DIFFUSERS)


# ---- full-size configurations: key tables, config inference, parameter counts ----
OFFICIAL = [
    # config, diffusers keys, SAI keys, params incl. pos_embed (docs/transformer.md)
    (SD3_MEDIUM_MMDIT, 683, 491, 2_084_951_104),
    (SD35_MEDIUM_MMDIT, 909, 665, 2_469_663_936),
    (SD35_LARGE_MMDIT, 1227, 923, 8_146_280_768),
]


def lazy_zeros(shapes: Dict[str, tuple]) -> Dict[str, mx.array]:
    return {k: mx.zeros(tuple(s), dtype=mx.bfloat16) for k, s in shapes.items()}  # never evaluated


@pytest.mark.parametrize(
    "cfg, n_diffusers, n_sai, n_params", OFFICIAL, ids=["sd3-m", "sd35-m", "sd35-l"]
)
def test_full_size_tables_and_counts(cfg, n_diffusers, n_sai, n_params):
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**diffusers_kwargs(cfg))
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}  # incl. pos_embed
        sai_meta = {k: torch.empty(s) for k, s in sai_shapes(cfg).items()}
        converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai_meta))
    assert len(ref_shapes) == n_diffusers and len(sai_meta) == n_sai
    assert sum(math.prod(s) for s in ref_shapes.values()) == n_params
    assert {k: tuple(v.shape) for k, v in converted.items()} == ref_shapes  # our SAI table shapes

    model = MMDiT(cfg)  # built lazily; never evaluated
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == n_params
    for layout, shapes in ((DIFFUSERS, ref_shapes), (STABILITY, sai_shapes(cfg))):
        tensors = {layout.prefix + k: v for k, v in lazy_zeros(shapes).items()}
        weights = apply_rules(tensors, layout.rules, layout=layout.name, prefix=layout.prefix)
        assert infer_config(weights) == cfg
        check_against_model(model, weights, layout=layout.name)


def _joint_attention_modules(dtype, qk_norm: bool, hidden: int = 256, heads: int = 4):
    from sd35_mlx.models.mmdit_blocks import Attention

    ctx_attn, x_attn = (Attention(hidden, heads, qk_norm) for _ in range(2))
    for a in (ctx_attn, x_attn):
        if qk_norm:
            a.q_norm.weight, a.k_norm.weight = mx.random.normal((64,)), mx.random.normal((64,))
        a.set_dtype(dtype)
    return ctx_attn, x_attn


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_alternating_token_layout_splits_back_into_each_streams_rows(batch):
    """The CUDA layout puts odd batch rows' image tokens first; the split returns every stream's
    rows in order (checked on any backend: the split is plain MLX)."""
    from sd35_mlx.models.joint_heads import _split_alternating

    nc, nx, h = 3, 5, 4
    ctx = mx.random.normal((batch, nc, h))
    img = mx.random.normal((batch, nx, h))
    rows = [mx.concatenate([img[b], ctx[b]]) if b % 2 else mx.concatenate([ctx[b], img[b]]) for b in range(batch)]
    got_ctx, got_img = _split_alternating(mx.stack(rows), nc)
    assert got_ctx.shape == ctx.shape and got_img.shape == img.shape
    assert mx.array_equal(got_ctx, ctx).item() and mx.array_equal(got_img, img).item()


@pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="the fused layout kernel is CUDA-only")
@pytest.mark.parametrize("dtype, qk_norm", [(mx.bfloat16, True), (mx.float32, True), (mx.bfloat16, False)])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_fused_joint_attention_matches_the_plain_path_on_cuda(dtype, qk_norm, batch):
    """The CUDA kernel's q, k, v (one pass, alternating (B, N, heads, d) layout) give the same
    attention rows per stream as split + norm + concat; the image-only heads the same q, k, v."""
    from sd35_mlx.backend import KERNELS
    from sd35_mlx.models import joint_heads as jh

    ctx_attn, x_attn = _joint_attention_modules(dtype, qk_norm)
    qkv_c = mx.random.normal((batch, 7, 3 * 256)).astype(dtype)
    qkv_x = (3 * mx.random.normal((batch, 37, 3 * 256))).astype(dtype)
    with KERNELS.overridden(joint_heads=False):
        plain = jh.joint_attention(ctx_attn, qkv_c, x_attn, qkv_x) + jh.heads(x_attn, qkv_x)
    assert jh._use_kernel(x_attn, qkv_c, qkv_x)
    fused = jh.joint_attention(ctx_attn, qkv_c, x_attn, qkv_x) + jh.heads(x_attn, qkv_x)
    bound = 1e-5 if dtype == mx.float32 else 2e-2  # bf16: one rounding step apart at most, before attention
    for p, f in zip(plain, fused):
        assert p.shape == f.shape
        assert rel_err(np.array(f.astype(mx.float32)), np.array(p.astype(mx.float32))) < bound


@pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="the block kernels are CUDA-only")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("hidden", [1536, 2432])
def test_block_kernels_match_the_plain_path_on_cuda(dtype, hidden):
    """LayerNorm + modulate (alone, after the gated residual, one stream or two) and the tanh
    GELU (one array or two) of models/block_kernels.py equal MLX's ops."""
    from sd35_mlx.backend import KERNELS
    from sd35_mlx.models import block_kernels as bk

    def stream(tokens, residual):
        x = (4 * mx.random.normal((2, tokens, hidden)) + 3).astype(dtype)  # a large mean: the centred variance matters
        y = mx.random.normal((2, tokens, hidden)).astype(dtype)
        vectors = [mx.random.normal((2, 1, hidden)).astype(dtype) for _ in range(3 if residual else 2)]
        return (x, y, *vectors) if residual else (x, *vectors)

    xs, cs = stream(37, False), stream(11, False)
    xr, cr = stream(37, True), stream(11, True)
    h, h2 = ((3 * mx.random.normal((2, n, 4 * hidden))).astype(dtype) for n in (37, 11))

    def run():
        outs = [bk.norm_modulate(*xs), *bk.norm_modulate_pair(xs, cs), *bk.residual_norm_modulate(*xr)]
        outs += [a for pair in bk.residual_norm_modulate_pair(xr, cr) for a in pair]
        return outs + [bk.gelu_tanh(h), *bk.gelu_tanh_pair(h, h2)]

    with KERNELS.overridden(block_elementwise=False):
        plain = run()
    fused = run()
    # bf16: the plain path rounds after every op; a residual rounded one step apart moves the
    # normalised output by up to ~3 steps at its largest value (1.2e-2 measured on an H200)
    bound = 1e-5 if dtype == mx.float32 else 2e-2
    assert len(plain) == len(fused) == 11
    for p, f in zip(plain, fused):
        assert p.shape == f.shape and p.dtype == f.dtype
        assert rel_err(np.array(f.astype(mx.float32)), np.array(p.astype(mx.float32))) < bound
