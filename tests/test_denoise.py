"""The fast denoising step equals the plain one: precomputed adaLN table (and freed
weights), cropped position cache, mx.compile, and dequantize-then-matmul for quantized
layers. The reference is the transformer called the plain way (timestep + pooled in,
modulations computed inside) with the guidance arithmetic of sd35_mlx.sampling."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from reference import rel_err

from sd35_mlx import cpu_blas
from sd35_mlx.conditioning import Conditioning
from sd35_mlx.config import MMDiTConfig
from sd35_mlx.denoise import Denoiser
from sd35_mlx.errors import InputError
from sd35_mlx.fast_quantized import (
    DequantizingLinear,
    use_dequantized_matmul,
    use_quantized_matmul,
)
from sd35_mlx.models.mmdit import MMDiT, FreedWeightsError
from sd35_mlx.quantize import make_spec, quantize_network, quantized_paths
from sd35_mlx.sampling import SkipLayerGuidance, cfg_combine, flow_sigmas, make_sampler
from sd35_mlx.settings import SkipLayerSettings

CONFIG = MMDiTConfig(
    depth=4, hidden_size=128, num_heads=2, context_dim=32, pooled_dim=24,
    pos_embed_max_size=12, qk_norm=True, dual_attention_layers=(0, 1),
)  # fmt: skip
STEPS = 6
SLG = dict(layers=(1, 2), scale=2.8, start=0.01, end=0.5)  # active on steps 1 and 2 of 6
# fp32. Bit-identical on the CPU; on CUDA (run with MLX_ENABLE_TF32=0) the batched table's
# matmul tiles differ from per-step ones: 1.8e-6 measured on an H100.
# Bit-identical with MLX's reference CPU BLAS; an optimized BLAS (OpenBLAS on the CPU, cuBLAS)
# may round a batched product (the modulation table: all steps at once) differently from the
# per-step one: measured 2.2e-6 (OpenBLAS, 2 cores) and 1.8e-6 (H100).
EXACT = 1e-6 if mx.default_device().type == mx.cpu and cpu_blas.loaded() is None else 1e-5


def tiny_model(seed: int = 0) -> MMDiT:
    """Every parameter random (norm weights and the position table included)."""
    model = MMDiT(CONFIG)
    mx.random.seed(seed)
    model.update(tree_map(lambda p: 0.3 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    return model


def prompts(batch: int = 1, tokens: int = 9, seed: int = 1):
    k = mx.random.split(mx.random.key(seed), 4)
    pos = Conditioning(mx.random.normal((batch, tokens, 32), key=k[0]), mx.random.normal((batch, 24), key=k[1]))
    neg = Conditioning(mx.random.normal((batch, tokens, 32), key=k[2]), mx.random.normal((batch, 24), key=k[3]))
    return pos, neg


def noise(batch: int = 1, h: int = 12, w: int = 8) -> mx.array:
    return mx.random.normal((batch, h, w, 16), key=mx.random.key(7))


def reference_run(model, latents, pos, neg, sigmas, cfg, slg: Optional[SkipLayerGuidance], sampler="euler"):
    """The plain loop: model(x, t, context, pooled) per branch, guidance, sampler."""
    smp = make_sampler(sampler, sigmas)
    n = len(sigmas) - 1
    x = latents
    for i in range(n):
        sigma = float(sigmas[i])
        if neg is None:
            t = mx.full((x.shape[0],), sigma * 1000.0, dtype=mx.float32)
            v = model(x, t, pos.context, pos.pooled).astype(mx.float32)
        else:
            both = Conditioning.concat([neg, pos])
            t = mx.full((2 * x.shape[0],), sigma * 1000.0, dtype=mx.float32)
            out = model(mx.concatenate([x, x]), t, both.context, both.pooled)
            v_uncond, v_cond = mx.split(out, 2, axis=0)
            v = cfg_combine(v_uncond, v_cond, cfg)
            if slg is not None and slg.active(i, n):
                t1 = mx.full((x.shape[0],), sigma * 1000.0, dtype=mx.float32)
                v_skip = model(x, t1, pos.context, pos.pooled, skip_layers=slg.layers)
                v = slg.apply(v, v_cond, v_skip)
        x = smp.step(i, x, v)
        mx.eval(x)
    return x


def denoiser_run(model, latents, pos, neg, sigmas, cfg, slg: Optional[SkipLayerSettings], sampler="euler", **kw):
    den = Denoiser(model, pos, neg, cfg=cfg, skip_layer_guidance=slg, num_steps=len(sigmas) - 1, sigmas=sigmas, **kw)
    smp = make_sampler(sampler, sigmas)
    x = latents
    for i in range(len(sigmas) - 1):
        x = den.step(x, i, smp)
        mx.eval(x)
    return x


CASES = {
    "cfg": dict(cfg=4.5, slg=False, neg=True),
    "cfg+slg": dict(cfg=4.5, slg=True, neg=True),
    "single": dict(cfg=1.0, slg=False, neg=False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_precomputed_and_freed_equals_plain(case, sampler):
    c = CASES[case]
    pos, neg = prompts(batch=2 if case == "cfg" else 1)
    neg = neg if c["neg"] else None
    sigmas = flow_sigmas(STEPS, 3.0)
    x0 = noise(pos.batch_size)
    ref = reference_run(tiny_model(), x0, pos, neg, sigmas, c["cfg"],
                        SkipLayerGuidance(**SLG) if c["slg"] else None, sampler)  # fmt: skip
    model = tiny_model()
    ours = denoiser_run(model, x0, pos, neg, sigmas, c["cfg"], SkipLayerSettings(**SLG) if c["slg"] else None,
                        sampler, free_adaln=True, free_pos_embed=True, compile=False)  # fmt: skip
    assert model.conditioning_freed and model.pos_embed_freed
    err = rel_err(np.array(ours), np.array(ref))
    assert err <= EXACT, err


def test_slg_steps_use_the_positive_half_of_the_table():
    pos, neg = prompts(batch=2)
    sigmas = flow_sigmas(STEPS, 3.0)
    model = tiny_model()
    den = Denoiser(model, pos, neg, cfg=4.0, skip_layer_guidance=SkipLayerSettings(**SLG),
                   num_steps=STEPS, sigmas=sigmas)  # fmt: skip
    assert [i for i in range(STEPS) if den.slg_active(i)] == list(SkipLayerGuidance(**SLG).active_steps(STEPS))
    t = mx.full((2,), sigmas[2] * 1000.0, dtype=mx.float32)
    plain = model.pack_modulations(model.modulations(model.conditioning(t, pos.pooled)))
    assert den.table.shape == (STEPS, 4, model.num_modulation_chunks, 128)
    err = rel_err(np.array(den.table[2, 2:]), np.array(plain))
    assert err <= EXACT, err


def test_compiled_step_equals_uncompiled():
    pos, neg = prompts()
    sigmas = flow_sigmas(STEPS, 3.0)
    slg = SkipLayerSettings(**SLG)
    x0 = noise()
    plain = denoiser_run(tiny_model(), x0, pos, neg, sigmas, 4.5, slg, compile=False)
    compiled = denoiser_run(tiny_model(), x0, pos, neg, sigmas, 4.5, slg, compile=True)
    err = rel_err(np.array(compiled), np.array(plain))
    assert err <= 1e-5, err


def test_velocity_call_matches_step_and_keeps_the_old_contract():
    pos, neg = prompts()
    sigmas = flow_sigmas(STEPS, 3.0)
    model = tiny_model()
    x = noise()
    # without sigmas: modulations computed per call, as before
    old = Denoiser(model, pos, neg, cfg=4.5, skip_layer_guidance=None, num_steps=STEPS)
    new = Denoiser(model, pos, neg, cfg=4.5, skip_layer_guidance=None, num_steps=STEPS, sigmas=sigmas)
    v_old, v_new = old(x, float(sigmas[0]), 0), new(x, float(sigmas[0]), 0)
    assert v_old.dtype == mx.float32
    err = rel_err(np.array(v_new), np.array(v_old))
    assert err <= EXACT, err
    smp = make_sampler("euler", sigmas)
    stepped = new.step(x, 0, smp)
    err = rel_err(np.array(stepped), np.array(smp.step(0, x, v_new)))
    assert err <= 1e-6, err


def test_freed_adaln_raises_clearly():
    pos, neg = prompts()
    sigmas = flow_sigmas(STEPS, 3.0)
    model = tiny_model()
    n_before = sum(p.size for _, p in tree_flatten(model.parameters()))
    den = Denoiser(model, pos, neg, cfg=4.5, skip_layer_guidance=None, num_steps=STEPS,
                   sigmas=sigmas, free_adaln=True)  # fmt: skip
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not any(part in ("adaLN", "t_embedder", "y_embedder") for k in names for part in k.split("."))
    n_after = sum(p.size for _, p in tree_flatten(model.parameters()))
    assert n_after < 0.8 * n_before
    x = noise()
    t = mx.full((1,), 500.0)
    with pytest.raises(FreedWeightsError, match="freed"):
        model(x, t, pos.context, pos.pooled)
    with pytest.raises(FreedWeightsError):
        model.conditioning(t, pos.pooled)
    with pytest.raises(FreedWeightsError, match="not in the precomputed schedule"):
        den(x, 0.123, 0)  # a sigma the table does not hold
    den(x, float(sigmas[1]), 1)  # the schedule still works
    with pytest.raises(InputError, match="sigmas"):
        Denoiser(tiny_model(), pos, neg, cfg=4.5, skip_layer_guidance=None, num_steps=STEPS, free_adaln=True)


def test_position_cache_equals_crop_and_free_is_safe():
    model = tiny_model()
    full = model.cropped_pos_embed(6, 4)
    cached = model.cache_pos_embed(6, 4)
    assert cached.shape == (1, 24, 128)
    np.testing.assert_array_equal(np.array(cached), np.array(full))
    model.free_pos_embed()
    assert "pos_embed" not in dict(tree_flatten(model.parameters()))
    np.testing.assert_array_equal(np.array(model.cropped_pos_embed(6, 4)), np.array(full))
    with pytest.raises(FreedWeightsError, match=r"\(6, 4\)"):
        model.cropped_pos_embed(4, 4)


@pytest.mark.parametrize("bits, mode, group", [(4, "affine", 64), (8, "affine", 64), (4, "mxfp4", 32)])
def test_dequantize_then_matmul_equals_quantized_matmul(bits, mode, group):
    mx.random.seed(3)
    linear = nn.Linear(128, 192)
    q = nn.QuantizedLinear.from_linear(linear, group, bits, mode=mode)
    fast = DequantizingLinear.from_quantized(q, min_rows=1)
    x = mx.random.normal((2, 50, 128))
    ref = q(x)
    err = rel_err(np.array(fast(x)), np.array(ref))
    assert err <= 1e-5, err
    # below the threshold the quantized kernel itself runs
    fast.min_rows = 1000
    np.testing.assert_array_equal(np.array(fast(x)), np.array(ref))


def test_quantized_transformer_fast_path_equals_slow_path():
    pos, neg = prompts()
    sigmas = flow_sigmas(STEPS, 3.0)
    x0 = noise()
    slg = SkipLayerSettings(**SLG)

    def quantized():
        return quantize_network(tiny_model(), make_spec("transformer", bits=4), "transformer")

    slow_model = quantized()
    slow = denoiser_run(slow_model, x0, pos, neg, sigmas, 4.5, slg, compile=False, dequantize_min_rows=10**9)
    fast_model = quantized()
    fast = denoiser_run(fast_model, x0, pos, neg, sigmas, 4.5, slg, compile=False, dequantize_min_rows=1)
    assert any(isinstance(m, DequantizingLinear) for _, m in fast_model.named_modules())
    err = rel_err(np.array(fast), np.array(slow))
    assert err <= 1e-5, err


@pytest.mark.parametrize("compile", [False, True])
def test_a_quantized_blocks_layers_share_one_dequantization(monkeypatch, compile):
    """dequantize_per_block: every quantized layer of a block takes its weight from one shared
    de-quantization per block (one kernel on CUDA), none de-quantizes on its own, and the
    latents are those of one de-quantization per layer."""
    from sd35_mlx import fast_quantized as fq

    pos, neg = prompts()
    sigmas = flow_sigmas(STEPS, 3.0)
    x0, slg = noise(), SkipLayerSettings(**SLG)

    def quantized():
        return quantize_network(tiny_model(), make_spec("transformer", bits=4), "transformer")

    per_layer = denoiser_run(quantized(), x0, pos, neg, sigmas, 4.5, slg, compile=compile, dequantize_min_rows=1,
                             dequantize_per_block=False)  # fmt: skip
    model = quantized()
    shared, alone = [], []
    real_one = fq.dequantized_weight

    def together(layers):
        shared.append({id(l) for l in layers})
        return [mx.dequantize(l.weight, l.scales, l.biases, l.group_size, l.bits) for l in layers]

    monkeypatch.setattr(fq, "dequantized_weights", together)
    monkeypatch.setattr(fq, "dequantized_weight", lambda layer, dtype=None: alone.append(id(layer)) or real_one(layer, dtype))
    per_block = denoiser_run(model, x0, pos, neg, sigmas, 4.5, slg, compile=compile, dequantize_min_rows=1)
    blocks = [{id(l) for l in fq.quantized_layers(b, skip=("adaLN",))} for b in model.blocks]  # the forward's layers
    assert all(len(b) > 1 for b in blocks)
    assert blocks[0] in shared and all(s in blocks for s in shared)  # one shared set per block, every block
    assert not set(alone) & set().union(*blocks)  # only the adaLN (the modulation table) and the final projection
    assert np.abs(np.array(per_block) - np.array(per_layer)).max() == 0


def test_blocks_dequantize_layer_by_layer_where_a_layer_would_not_dequantize():
    """Below a layer's row threshold it runs the quantized kernel: nothing is shared then."""
    from sd35_mlx import fast_quantized as fq

    model = quantize_network(tiny_model(), make_spec("transformer", bits=4), "transformer")
    use_dequantized_matmul(model, min_rows=100)
    layers = fq.quantized_layers(model.blocks[0])
    with fq.dequantized_together(layers, rows=99):
        assert fq._DENSE.get() == {}
    with fq.dequantized_together(layers, rows=100):
        assert set(fq._DENSE.get()) == {id(l) for l in layers}
    assert fq._DENSE.get() == {}


def test_block_dense_bytes_is_what_one_block_holds_dequantized():
    """What the kept-loaded memory limit adds for a quantized transformer: the largest block's
    shared 16-bit weights (0 for a 16-bit transformer)."""
    from sd35_mlx import fast_quantized as fq

    model = quantize_network(tiny_model(), make_spec("transformer", bits=4), "transformer")
    as_loaded = model.block_dense_bytes()  # plain nn.QuantizedLinear layers, as the pipeline loads them
    use_dequantized_matmul(model, min_rows=1)  # as the Denoiser runs them
    want = max(sum(w.nbytes for w in fq.dequantized_weights(fq.quantized_layers(b, skip=("adaLN",))))
               for b in model.blocks)  # fmt: skip
    assert as_loaded == model.block_dense_bytes() == want > 0
    assert tiny_model().block_dense_bytes() == 0


@pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="the shared dequantize kernel is CUDA-only")
@pytest.mark.parametrize("bits, dtype", [(4, mx.bfloat16), (8, mx.float16)])
def test_one_launch_dequantizes_every_layer_as_mx_dequantize_on_cuda(bits, dtype):
    from sd35_mlx import fast_quantized as fq

    layers = [nn.QuantizedLinear(i, o, group_size=64, bits=bits) for i, o in ((128, 384), (256, 64), (64, 192))]
    for layer in layers:
        layer.set_dtype(dtype)
    got = fq.dequantized_weights(layers)
    for layer, w in zip(layers, got):
        want = mx.dequantize(layer.weight, layer.scales, layer.biases, 64, bits)
        assert w.dtype == want.dtype and w.shape == want.shape
        assert mx.array_equal(w, want).item()


def test_module_swap_keeps_parameters_and_round_trips():
    model = quantize_network(tiny_model(), make_spec("transformer", bits=8), "transformer")
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    paths = quantized_paths(model)
    assert use_dequantized_matmul(model, min_rows=16) == len(paths) > 0
    assert quantized_paths(model) == paths
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    assert all(np.array_equal(np.array(after[k]), before[k]) for k in before)
    assert use_quantized_matmul(model) == len(paths)
    assert all(type(m) is nn.QuantizedLinear for p, m in model.named_modules() if p in paths)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("compile", [False, True])
def test_split_cfg_equals_the_batch_of_two(sampler, compile):
    """Negative and positive passes run separately (half the activations) give the same latents,
    with skip-layer guidance on some steps."""
    pos, neg = prompts()
    sigmas = flow_sigmas(STEPS, 3.0)
    slg = SkipLayerSettings(**SLG)
    x0 = noise()
    batched = denoiser_run(tiny_model(), x0, pos, neg, sigmas, 4.5, slg, sampler, compile=compile)
    split = denoiser_run(tiny_model(), x0, pos, neg, sigmas, 4.5, slg, sampler, compile=compile, split_cfg=True)
    ref = reference_run(tiny_model(), x0, pos, neg, sigmas, 4.5, SkipLayerGuidance(**SLG), sampler)
    assert rel_err(np.array(split), np.array(batched)) <= 1e-5
    assert rel_err(np.array(split), np.array(ref)) <= 1e-5
