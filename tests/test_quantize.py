"""Quantization policy: spec parsing and its errors, the layer predicate, error bounds.

The error bounds are those of benchmarks/results/quantization_error.md (section 1, tiny
networks, default policy) with a margin; the networks, weights, inputs and error measure
are the benchmark's own functions, so the test checks exactly what the table reports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from sd35_mlx.config import MMDiTConfig, VAEConfig
from sd35_mlx.errors import InputError
from sd35_mlx.models.mmdit import MMDiT
from sd35_mlx.models.vae import VAE
from sd35_mlx.quantize import (
    DEFAULT_KEEP, QuantSpec, default_quantization, dequantize_network, make_spec, parse_quantize,
    parse_value, quantizable_layers, quantize_network, quantized_paths, spec_of,
)  # fmt: skip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quantization_error as bench  # noqa: E402

# rms error bounds (‖Δ‖/‖ref‖) vs the unquantized network, per spec; the benchmark's tiny
# networks measure 8-bit ≤ 0.015, 4-bit ≤ 0.19, mxfp4 ≤ 0.24 (see the table). Margin ~1.5x.
RMS_BOUNDS = {"8-bit": 0.03, "4-bit": 0.3, "mxfp4": 0.36}
SPECS = {"8-bit": (8, 64, "affine"), "4-bit": (4, 64, "affine"), "mxfp4": (4, 32, "mxfp4")}


# ---- parsing ---------------------------------------------------------------------------------
def test_defaults_quantize_only_t5_at_4_bit():
    specs = default_quantization()
    assert specs["t5"] == QuantSpec(4, 64, "affine", ())
    assert all(specs[c] is None for c in ("transformer", "vae", "clip_l", "clip_g"))
    assert parse_quantize("") == specs


def test_parse_per_component_values():
    s = parse_quantize("t5=8, clip_g=4:32 ,transformer=mxfp4,clip_l=nvfp4")
    assert s["t5"] == QuantSpec(8, 64, "affine", DEFAULT_KEEP["t5"])
    assert s["clip_g"] == QuantSpec(4, 32, "affine", DEFAULT_KEEP["clip_g"])
    assert s["transformer"] == QuantSpec(4, 32, "mxfp4", DEFAULT_KEEP["transformer"])
    assert s["clip_l"] == QuantSpec(4, 16, "nvfp4", DEFAULT_KEEP["clip_l"])
    assert s["vae"] is None
    assert parse_value("t5", "affine:6:128") == QuantSpec(6, 128, "affine", ())
    assert parse_value("t5", "mxfp8") == QuantSpec(8, 32, "mxfp8", ())


def test_parse_none_and_16_and_defaults_off():
    assert all(v is None for v in parse_quantize("none").values())
    s = parse_quantize("t5=16,vae=none")
    assert s["t5"] is None and s["vae"] is None
    assert parse_quantize("transformer=4", defaults=False)["t5"] is None
    base = {"clip_g": QuantSpec(8)}
    assert parse_quantize("t5=4", base=base)["clip_g"] == QuantSpec(8)


@pytest.mark.parametrize(
    "text, message",
    [
        ("vae=4", "VAE is never quantized"),
        ("t5=7", "bits in [2, 3, 4, 5, 6, 8]"),
        ("t5=1", "bits in"),
        ("t5=4:16", "group sizes [32, 64, 128]"),
        ("t5=mxfp4:64", "mxfp4 quantization takes group sizes [32]"),
        ("t5=nvfp4:32", "nvfp4 quantization takes group sizes [16]"),
        ("unet=4", "unknown component 'unet'"),
        ("t5", "expected component=value"),
        ("t5=4,t5=8", "names t5 twice"),
        ("t5=four", "cannot read quantization t5='four'"),
        ("t5=4:64:2", "cannot read"),
        ("t5=fp4", "cannot read"),
    ],
)
def test_parse_errors_say_what_is_wrong(text, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_quantize(text)


def test_spec_validation_and_round_trip():
    with pytest.raises(InputError, match="unknown quantization mode"):
        QuantSpec(4, 64, "int4")
    with pytest.raises(InputError, match="mxfp8 is always 8-bit"):
        QuantSpec(4, 32, "mxfp8")
    with pytest.raises(InputError, match="invalid keep pattern"):
        QuantSpec(4, 64, "affine", ("(",))
    spec = make_spec("transformer", 3, 128)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.label == "3-bit g128" and make_spec("t5").label == "4-bit"


def test_the_vae_is_refused():
    with pytest.raises(InputError, match="VAE is never quantized"):
        make_spec("vae", 8)
    vae = VAE(VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32))
    with pytest.raises(InputError, match="VAE is never quantized"):
        quantize_network(vae, QuantSpec(8), "vae")
    assert not quantized_paths(vae)


# ---- the predicate ---------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.conv = nn.Conv2d(64, 64, 3)
        self.a = nn.Linear(64, 96)  # in 64: quantizable at g32/g64, not g128
        self.b = nn.Linear(96, 64)  # in 96: only g32
        self.keep_me = nn.Linear(64, 64)
        self.blocks = [nn.Linear(128, 128), nn.Linear(128, 128)]


def test_predicate_linear_only_divisible_input_and_keep():
    toy = Toy()
    for group, expected in ((32, ["a", "b", "blocks.0", "blocks.1"]), (64, ["a", "blocks.0", "blocks.1"]),
                            (128, ["blocks.0", "blocks.1"])):  # fmt: skip
        assert quantizable_layers(toy, QuantSpec(4, group, "affine", ("keep_me",))) == expected
    quantize_network(toy, QuantSpec(4, 64, "affine", (r"blocks\.1",)), "t5")
    assert quantized_paths(toy) == ["a", "blocks.0", "keep_me"]
    assert isinstance(toy.embed, nn.Embedding) and isinstance(toy.conv, nn.Conv2d)
    assert spec_of(toy) == (4, 64, "affine")
    # quantizing again leaves quantized layers alone
    quantize_network(toy, QuantSpec(8, 64, "affine"), "t5")
    assert {type(m).__name__ for p, m in toy.named_modules() if p in ("a", "blocks.1")} == {"QuantizedLinear"}


def test_mmdit_default_policy_keeps_embedders_and_final_projection():
    cfg = MMDiTConfig(depth=2, hidden_size=128, num_heads=2, context_dim=256, pooled_dim=128,
                      pos_embed_max_size=8, qk_norm=True, dual_attention_layers=(0,))  # fmt: skip
    model = quantize_network(MMDiT(cfg), make_spec("transformer", 4), "transformer")
    paths = quantized_paths(model)
    kept = [p for p, m in model.named_modules() if type(m) is nn.Linear]
    assert sorted(kept) == ["context_embedder", "final_layer.adaLN", "final_layer.linear", "t_embedder.fc1",
                            "t_embedder.fc2", "y_embedder.fc1", "y_embedder.fc2"]  # fmt: skip
    assert "blocks.0.x.attn2.qkv" in paths and "blocks.1.context.adaLN" in paths and "blocks.1.x.mlp.fc2" in paths
    assert isinstance(model.x_embedder, nn.Conv2d) and model.pos_embed.dtype == mx.float32


def test_dequantize_gives_linear_layers_with_the_dequantized_weights():
    toy = Toy()
    quantize_network(toy, QuantSpec(4, 32, "affine"), "t5")
    q = toy.a
    expected = mx.dequantize(q.weight, q.scales, q.biases, 32, 4)
    assert dequantize_network(toy) == 5  # a, b, keep_me, blocks.0, blocks.1
    assert not quantized_paths(toy)
    assert type(toy.a) is nn.Linear and mx.array_equal(toy.a.weight, expected).item()
    mx.eval(toy.parameters())


def test_mx_modes_dequantize_too():
    toy = Toy()
    toy.set_dtype(mx.bfloat16)
    x = mx.random.normal((3, 128)).astype(mx.bfloat16)
    quantize_network(toy, QuantSpec(4, 32, "mxfp4"), "t5")
    y = toy.blocks[0](x)
    dequantize_network(toy)
    assert toy.blocks[0].weight.dtype == mx.bfloat16
    assert mx.allclose(toy.blocks[0](x), y, atol=2e-2, rtol=2e-2).item()


# ---- error bounds (the benchmark's networks and measure) ---------------------------------------
@pytest.fixture(scope="module")
def tiny_networks():
    out = {}
    for label, cfg in bench.tiny_configs().items():
        weights = dict(tree_flatten(bench.randomize(bench.build(cfg), seed=0).parameters()))
        ref_model = bench.reference(cfg, weights)
        inputs = bench.make_inputs(ref_model, 0)
        out[label] = (cfg, weights, inputs, bench.outputs(ref_model, inputs))
    return out


@pytest.mark.parametrize("component", ["transformer", "clip_l", "clip_g", "t5"])
def test_quantized_output_within_the_tables_bounds(tiny_networks, component):
    cfg, weights, inputs, ref = tiny_networks[component]
    errs = {}
    for name, (bits, group, mode) in SPECS.items():
        spec = QuantSpec(bits, group, mode, DEFAULT_KEEP[component])
        q = bench.quantized_copy(cfg, weights, spec, component)
        assert quantized_paths(q), "nothing was quantized"
        errs[name] = bench.errors(ref, bench.outputs(q, inputs))[1]
        assert errs[name] <= RMS_BOUNDS[name], f"{component} {name}: rms error {errs[name]:.3g}"
    assert 0 < errs["8-bit"] < errs["4-bit"], errs  # the bound is not vacuous: 4-bit is worse


def test_keeping_the_sensitive_layers_pays_off(tiny_networks):
    """The default keep list at least halves the transformer's 4-bit error for <5% of weights."""
    cfg, weights, inputs, ref = tiny_networks["transformer"]
    default = bench.quantized_copy(cfg, weights, QuantSpec(4, 64, "affine", DEFAULT_KEEP["transformer"]), "transformer")
    everything = bench.quantized_copy(cfg, weights, QuantSpec(4, 64, "affine", ()), "transformer")
    e_default = bench.errors(ref, bench.outputs(default, inputs))[1]
    e_all = bench.errors(ref, bench.outputs(everything, inputs))[1]
    assert e_default < 0.7 * e_all, (e_default, e_all)


@pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="the dequantize kernel is CUDA-only")
@pytest.mark.parametrize("bits, group_size, dtype", [(4, 64, mx.bfloat16), (8, 64, mx.bfloat16), (4, 32, mx.float16),
                                                     (8, 128, mx.float32)])  # fmt: skip
def test_dequantize_kernel_equals_mx_dequantize_on_cuda(bits, group_size, dtype):
    from sd35_mlx import fast_quantized as fq

    layer = nn.QuantizedLinear(512, 96, bias=True, group_size=group_size, bits=bits)
    layer.set_dtype(dtype)
    assert fq._use_dequantize_kernel(layer, dtype)
    ours = fq.dequantized_weight(layer, dtype)
    want = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size, bits)
    assert ours.dtype == want.dtype and ours.shape == want.shape == (96, 512)
    assert mx.array_equal(ours, want).item()
