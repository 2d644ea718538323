"""Layer streaming of T5: identical results to the loaded encoder, and a much lower peak.

The reference for every comparison is our own `T5Encoder` loaded whole from the same file
(its parity with transformers is tested in test_t5.py): streaming must not change a single
bit. Files are written by transformers' own model (official HF names) with random weights.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel

from reference import randomize, save_state_dict
from sd35_mlx.errors import WeightMappingError
from sd35_mlx.quantize import QuantSpec, make_spec, quantize_network, quantized_paths
from sd35_mlx.streaming import StreamedT5, streamed_t5, t5_weights_provider
from sd35_mlx.weights.safetensors_file import load_tensors
from sd35_mlx.weights.tables.t5 import DIFFUSERS, SINGLE_FILE, load_t5

from test_t5 import VOCAB, hf_config as t5_test_config  # noqa: E402
SAI_PREFIX = "text_encoders.t5xxl.transformer."


def hf_config(**overrides) -> HFT5Config:
    # test_t5's tiny config with every width a multiple of 64, so that every layer can be
    # quantized with group size 64 (inner 128 != d_model 64 != d_ff 192 still).
    return t5_test_config(**{"d_kv": 32, "d_ff": 192, **overrides})


def hf_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> dict:
    model = randomize(T5EncoderModel(hf_config(**overrides)).eval(), seed=seed)
    sd = {k: v.detach().clone().to(dtype) for k, v in model.state_dict().items()}
    sd.pop("encoder.embed_tokens.weight")  # as diffusers stores it (tied duplicate dropped)
    return sd


def deep_state_dict(num_layers: int, seed: int = 0, **overrides) -> dict:
    """Like `hf_state_dict` for many blocks, fast: transformers' model is built with one block
    (names and shapes), then blocks 1.. get their own random tensors under the same names."""
    sd = hf_state_dict(seed=seed, num_layers=1, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    for key in [k for k in sd if ".block.0." in k and "relative_attention_bias" not in k]:
        shape = sd[key].shape
        for i in range(1, num_layers):
            r = torch.randn(shape, generator=g)
            sd[key.replace(".block.0.", f".block.{i}.")] = 1 + 0.2 * r if len(shape) == 1 else r / shape[1] ** 0.5
    return sd


def ids(length: int = 12, batch: int = 2, seed: int = 0) -> mx.array:
    return mx.array(np.random.RandomState(seed).randint(0, VOCAB, (batch, length)))


def loaded(path: Path, layout=DIFFUSERS, dtype=None, spec=None):
    model = load_t5(load_tensors(path), layout, dtype=dtype)
    return quantize_network(model, spec, "t5")


def run(model, input_ids: mx.array) -> mx.array:
    out = model(input_ids)
    mx.eval(out)
    return out


def assert_identical(a: mx.array, b: mx.array) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert mx.array_equal(a, b).item(), f"max |Δ| = {mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()}"


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory) -> Path:
    return save_state_dict(hf_state_dict(), tmp_path_factory.mktemp("t5") / "model.safetensors")


@pytest.fixture(scope="module")
def bf16_file(tmp_path_factory) -> Path:
    sd = hf_state_dict(dtype=torch.bfloat16)
    return save_state_dict(sd, tmp_path_factory.mktemp("t5bf16") / "model.safetensors")


# ---- same numbers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "file_fixture, dtype",
    [("fp32_file", None), ("bf16_file", None), ("fp32_file", mx.bfloat16), ("fp32_file", mx.float16)],
    ids=["fp32", "bf16-file", "fp32-file-as-bf16", "fp32-file-as-fp16-storage"],
)
def test_streamed_is_identical_to_loaded(request, file_fixture, dtype):
    path = request.getfixturevalue(file_fixture)
    streamed = StreamedT5(None, t5_weights_provider([path], DIFFUSERS), dtype=dtype)
    assert streamed.config == loaded(path).config
    x = ids()
    out = run(streamed, x)
    assert_identical(out, run(loaded(path, dtype=dtype), x))
    assert_identical(run(streamed, x), out)  # a second call reads fresh weights, same result


def test_single_file_layout_with_other_networks_in_the_file(tmp_path):
    """Stability all-in-one file: only the T5 prefix is read; the transformer is ignored."""
    sd = {SAI_PREFIX + k: v for k, v in hf_state_dict(seed=3).items()}
    sd["model.diffusion_model.x_embedder.proj.weight"] = torch.randn(8, 16, 2, 2)
    path = save_state_dict(sd, tmp_path / "sd3.5_all_in_one.safetensors")
    streamed = StreamedT5(None, t5_weights_provider([path], SINGLE_FILE))
    x = ids(seed=1)
    assert_identical(run(streamed, x), run(loaded(path, SINGLE_FILE), x))


def test_diffusers_folder_by_path(tmp_path):
    """`streamed_t5(path)` finds text_encoder_3/ and its config.json (eps comes from there)."""
    model = randomize(T5EncoderModel(hf_config(layer_norm_epsilon=1e-3)).eval(), seed=4)
    folder = tmp_path / "text_encoder_3"
    model.save_pretrained(folder, safe_serialization=True)
    streamed = streamed_t5(folder)
    assert streamed.config.layer_norm_eps == 1e-3
    from sd35_mlx.loading import load_component

    x = ids(seed=2)
    assert_identical(run(streamed, x), run(load_component(folder, "t5"), x))


# ---- quantization -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [make_spec("t5", 4), make_spec("t5", 8, 32), make_spec("t5", mode="mxfp4"),
     make_spec("t5", 4, keep=[r"blocks\.1\.ff\.wo", r"blocks\.0\.attn\..*"])],
    ids=["4bit", "8bit-g32", "mxfp4", "4bit-keep-full-paths"],
)  # fmt: skip
def test_quantized_on_the_fly_is_identical_to_quantize_network(fp32_file, spec):
    """A 16-bit file streamed with a spec == the loaded encoder through quantize_network."""
    x = ids()
    reference = loaded(fp32_file, dtype=mx.bfloat16, spec=spec)
    streamed = StreamedT5(None, t5_weights_provider([fp32_file], DIFFUSERS), quantize=spec, dtype=mx.bfloat16)
    assert_identical(run(streamed, x), run(reference, x))
    if spec.keep:  # the keep patterns (full paths) really selected layers
        assert "blocks.1.ff.wo" not in quantized_paths(reference)
        assert "blocks.1.ff.wi_0" in quantized_paths(reference)


@pytest.mark.parametrize(
    "spec", [make_spec("t5", 4), make_spec("t5", 8, 32), make_spec("t5", mode="mxfp4"),
             make_spec("t5", 4, keep=[r"blocks\.2\..*"])],
    ids=["4bit", "8bit-g32", "mxfp4", "4bit-last-block-kept"],
)  # fmt: skip
def test_prequantized_converted_file(tmp_path, fp32_file, spec):
    """Tensors saved already quantized, in our names (a converted folder): config and
    quantization are read from the shapes; the result equals the quantized loaded encoder."""
    reference = loaded(fp32_file, dtype=mx.bfloat16, spec=spec)
    path = tmp_path / "t5.safetensors"
    mx.save_safetensors(str(path), {"t5." + k: v for k, v in tree_flatten(reference.parameters())})
    streamed = StreamedT5(None, t5_weights_provider([path], None, prefix="t5."))
    assert streamed.config == reference.config
    assert (streamed.quantize.bits, streamed.quantize.group_size, streamed.quantize.mode) == (
        spec.bits, spec.group_size, spec.mode)  # fmt: skip
    x = ids(seed=5)
    assert_identical(run(streamed, x), run(reference, x))


@pytest.mark.parametrize("spec", [None, make_spec("t5", 4)], ids=["16-bit", "4bit"])
def test_converted_folder_by_path(tmp_path, fp32_file, spec):
    """`streamed_t5(folder)` on a folder written by `save_converted` (config.json + t5.safetensors)
    equals the converted loader's T5."""
    from sd35_mlx.weights.converted import load_converted_component, save_converted

    folder = save_converted(tmp_path / "converted", {"t5": loaded(fp32_file, dtype=mx.bfloat16)},
                            quantization={"t5": spec}, dtype="bfloat16")  # fmt: skip
    streamed = streamed_t5(folder)
    assert streamed.prequantized == (spec is not None)
    x = ids(seed=6)
    assert_identical(run(streamed, x), run(load_converted_component(folder, "t5"), x))


# ---- errors -------------------------------------------------------------------------------------------
def test_incomplete_file_fails_before_anything_runs(tmp_path):
    sd = hf_state_dict()
    sd.pop("encoder.block.2.layer.1.DenseReluDense.wo.weight")
    path = save_state_dict(sd, tmp_path / "model.safetensors")
    with pytest.raises(WeightMappingError, match=r"blocks\.2\.ff\.wo\.weight.*"):
        StreamedT5(None, t5_weights_provider([path], DIFFUSERS))


def test_wrong_spec_for_prequantized_tensors(tmp_path, fp32_file):
    reference = loaded(fp32_file, spec=make_spec("t5", 4))
    path = tmp_path / "t5.safetensors"
    mx.save_safetensors(str(path), dict(tree_flatten(reference.parameters())))
    with pytest.raises(WeightMappingError, match="wrong shapes"):
        StreamedT5(None, t5_weights_provider([path]), quantize=QuantSpec(8, 64))


# ---- memory -----------------------------------------------------------------------------------------
def _peak_of(fn):
    """Peak active memory of fn() above what was active before, and what stays after."""
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    result = fn()
    mx.eval(result)
    return mx.get_peak_memory() - before, mx.get_active_memory() - before, result


def test_streamed_peak_is_a_fraction_of_the_loaded_peak(tmp_path):
    """d_model 512, 8 blocks: ~10.5 MB of fp32 weights per block, 84 MB in all, activations
    (1 x 16 tokens) negligible. Loaded holds every block; streamed one at a time."""
    sd = deep_state_dict(8, d_model=512, d_kv=64, num_heads=8, d_ff=1024)
    path = save_state_dict(sd, tmp_path / "model.safetensors")
    weight_bytes = sum(v.numel() * 4 for v in sd.values())
    x = ids(length=16, batch=1)

    loaded_peak, _, reference = _peak_of(lambda: run(loaded(path), x))
    streamed = StreamedT5(None, t5_weights_provider([path], DIFFUSERS))
    streamed_peak, left, out = _peak_of(lambda: streamed(x))
    assert_identical(out, reference)
    assert loaded_peak >= weight_bytes  # the measurement sees the weights
    assert streamed_peak < 0.4 * loaded_peak, (streamed_peak, loaded_peak)
    # nothing of the weights outlives the call: only the output (and reference) remain
    assert left <= out.nbytes + 1024, left
    # a second call does not accumulate either
    again_peak, left_again, _ = _peak_of(lambda: streamed(x))
    assert again_peak < 0.4 * loaded_peak and left_again <= out.nbytes + 1024


def test_streamed_quantized_peak(tmp_path):
    """On-the-fly 4-bit from an fp32 file with many small blocks: one fp32 block is read,
    quantized, run and dropped, so the peak is a fraction of even the whole 4-bit encoder
    (5/32 of the fp32 one: fp32 scales and biases). fp32 because MLX's CPU quantized matmul
    is slow in bf16; with bf16 weights (T5-XXL) the ratio is the same."""
    sd = deep_state_dict(48, d_model=256, d_kv=64, num_heads=4, d_ff=512)
    path = save_state_dict(sd, tmp_path / "model.safetensors")
    x = ids(length=16, batch=1)
    spec = make_spec("t5", 4)
    reference_model = loaded(path, spec=spec)
    quantized_bytes = sum(v.nbytes for _, v in tree_flatten(reference_model.parameters()))
    reference = run(reference_model, x)
    del reference_model
    streamed = StreamedT5(None, t5_weights_provider([path], DIFFUSERS), quantize=spec)
    streamed_peak, _, out = _peak_of(lambda: streamed(x))
    assert_identical(out, reference)
    assert streamed_peak < 0.4 * quantized_bytes, (streamed_peak, quantized_bytes)
