"""The runtime LoRA on quantized networks, and fusing into 16-bit weights.

- 4-/8-bit: a LoRA beside the quantized weights gives what the same LoRA gives on the
  de-quantized weights (≤ 1e-4), through both quantized forwards (quantized_matmul and
  dequantize-then-matmul); baking it into 4-bit (dequantize, add, re-quantize) would lose most
  of it, which is why it is never done.
- 16-bit: fuse equals the runtime path; unfuse restores every weight bit for bit.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from lora_files import kohya_key, linear_stems, random_lora
from mlx.utils import tree_flatten
from reference import rel_err
from test_mmdit import MMDITX, make_inputs, random_sai_state, run_ours

from sd35_mlx.adapters import lora as runtime
from sd35_mlx.adapters.formats import parse_lora
from sd35_mlx.adapters.targets import place
from sd35_mlx.errors import InputError
from sd35_mlx.fast_quantized import DequantizingLinear, use_dequantized_matmul, use_quantized_matmul
from sd35_mlx.quantize import dequantize_network, make_spec, quantize_network
from sd35_mlx.weights.tables.mmdit import STABILITY, load_mmdit

TOL = 1e-4


def to_mx(state):
    return {k: mx.array(v.detach().float().numpy()) for k, v in state.items()}


@pytest.fixture(scope="module")
def sai():
    return random_sai_state(MMDITX)


def network(sai, dtype=mx.float32, bits=None):
    model = load_mmdit(to_mx({"model.diffusion_model." + k: v for k, v in sai.items()}), STABILITY, dtype=dtype)
    if bits:
        quantize_network(model, make_spec("transformer", bits), "transformer")
    mx.eval(model.parameters())
    return model


def lora_on(model, sai, gain, seed=11, name="style", weight=1.0):
    lora, _ = random_lora(sai, linear_stems(sai), kohya_key("lora_unet_"), gain=gain, seed=seed)
    parsed = parse_lora(to_mx(lora), {}, "test")
    placed, unmatched, _ = place(parsed, "transformer", model, "test")
    assert not unmatched
    runtime.attach(model, placed, name, weight)
    return placed


def bits(v: mx.array) -> np.ndarray:
    """The stored bits (bit-for-bit comparisons, bf16 included)."""
    return np.array(v.view({2: mx.uint16, 4: mx.uint32}[v.itemsize]))


def out(model, inputs):
    return run_ours(model, inputs).astype(np.float64)


def baked_into_quantized(model) -> None:
    """The naive way: de-quantize, add the LoRA, re-quantize, drop the adapter."""
    for path, layer in runtime.lora_layers(model).items():
        base = layer.base
        if isinstance(base, nn.QuantizedLinear):
            w = mx.dequantize(base.weight, base.scales, base.biases, base.group_size, base.bits)
            merged = nn.Linear(w.shape[1], w.shape[0], bias="bias" in base)
            merged.weight = (w + layer.delta_weight()).astype(w.dtype)
            if "bias" in base:
                merged.bias = base.bias
            base = nn.QuantizedLinear.from_linear(merged, base.group_size, base.bits)
        else:
            base.weight = base.weight + layer.delta_weight()
        runtime._set_layer(model, path, base)


@pytest.mark.parametrize("bits", [4, 8])
def test_runtime_lora_on_quantized_weights_equals_lora_on_dequantized(sai, bits):
    inputs = make_inputs(MMDITX, 2, 16, 16)
    # a realistically small LoRA: its delta is well below one 4-bit rounding step
    gain = 0.02
    quantized = network(sai, bits=bits)
    plain_q = out(quantized, inputs)
    reference = network(sai, bits=bits)
    dequantize_network(reference)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in reference.named_modules())
    plain_ref = out(reference, inputs)
    lora_on(reference, sai, gain)
    want = out(reference, inputs) - plain_ref  # what the LoRA contributes on the de-quantized weights

    lora_on(quantized, sai, gain)
    use_quantized_matmul(quantized)  # mx.quantized_matmul
    assert rel_err(out(quantized, inputs) - plain_q, want) <= TOL
    use_dequantized_matmul(quantized, min_rows=1)  # de-quantize before the matmul (the fast path)
    assert isinstance(quantized.blocks[0].x.attn.qkv.base, DequantizingLinear)
    assert rel_err(out(quantized, inputs) - plain_q, want) <= TOL

    if bits == 4:
        baked = network(sai, bits=bits)
        lora_on(baked, sai, gain)
        baked_into_quantized(baked)
        lost = rel_err(out(baked, inputs) - plain_q, want)
        assert lost > 0.5, f"baking into 4-bit kept the LoRA (error {lost:.2f}): the check is not sensitive"


def test_fusing_into_quantized_weights_is_refused(sai):
    model = network(sai, bits=4)
    lora_on(model, sai, 0.5)
    with pytest.raises(InputError, match="cannot be fused into quantized weights"):
        runtime.fuse(model)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_fuse_equals_runtime_and_unfuse_restores_bit_for_bit(sai, dtype):
    model = network(sai, dtype=dtype)
    before = {k: bits(v) for k, v in tree_flatten(model.parameters())}
    inputs = make_inputs(MMDITX, 2, 16, 16)
    lora_on(model, sai, 0.5, weight=0.8)
    at_runtime = out(model, inputs)
    assert runtime.fuse(model) == len(linear_stems(sai))
    fused = out(model, inputs)
    assert rel_err(fused, at_runtime) <= (TOL if dtype == mx.float32 else 3e-2)
    with pytest.raises(InputError, match="unfuse"):
        runtime.set_scale(model, "style", 0.3)
    runtime.unfuse(model)
    after = {k.replace(".base.", "."): bits(v) for k, v in tree_flatten(model.parameters())}
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert rel_err(out(model, inputs), at_runtime) <= TOL  # the runtime LoRA is back


def test_scales_and_several_loras(sai):
    inputs = make_inputs(MMDITX, 1, 16, 16)
    model = network(sai)
    plain = out(model, inputs)
    lora_on(model, sai, 0.5, seed=1, name="a", weight=1.0)
    only_a = out(model, inputs)
    lora_on(model, sai, 0.5, seed=2, name="b", weight=0.5)
    both = out(model, inputs)
    runtime.set_scale(model, "a", 0.0)
    only_b_half = out(model, inputs)
    runtime.set_scale(model, "b", 1.0)
    only_b = out(model, inputs)
    # the transformer is not linear in the LoRAs, but a zero weight must really remove one
    runtime.detach(model, "a")
    assert np.allclose(out(model, inputs), only_b, rtol=0, atol=1e-6)
    assert rel_err(only_a, plain) > 1e-2 and rel_err(both, only_a) > 1e-3 and rel_err(only_b, only_b_half) > 1e-3
    assert runtime.names_on(model) == ["b"]
    runtime.detach(model)
    assert runtime.lora_layers(model) == {} and np.allclose(out(model, inputs), plain, rtol=0, atol=1e-6)
    for bad in (math.nan, math.inf, "strong"):
        with pytest.raises(InputError, match="must be a"):
            runtime.check_scale(bad)


def test_bake_for_the_converter_leaves_plain_16bit_layers(sai):
    model = network(sai)
    inputs = make_inputs(MMDITX, 1, 16, 16)
    lora_on(model, sai, 0.5)
    at_runtime = out(model, inputs)
    runtime.bake(model)
    assert runtime.lora_layers(model) == {}
    assert type(model.blocks[0].x.attn.qkv) is nn.Linear and model.dtype == mx.float32
    assert rel_err(out(model, inputs), at_runtime) <= TOL
