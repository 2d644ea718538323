"""T5-XXL encoder: parity with transformers' T5EncoderModel, precision, and weight layouts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel

from reference import randomize, rel_err, save_state_dict
from sd35_mlx.config import T5_XXL
from sd35_mlx.errors import WeightMappingError
from sd35_mlx.models.t5 import T5Encoder, relative_position_buckets
from sd35_mlx.weights.safetensors_file import load_tensors
from sd35_mlx.weights.tables import t5 as t5_table
from sd35_mlx.weights.tables.t5 import DIFFUSERS, SINGLE_FILE, STABILITY, infer_config, load_t5

FP32_BOUND = 1e-4
# bf16 weights + bf16 matmuls (fp32 residual stream and norms). Measured ~5e-3 (HF's own bf16
# run of the same model: ~1.1e-2). With a residual stream beyond the fp16 range: ~1.7e-2.
BF16_BOUND = 1.5e-2
BF16_OVERFLOW_BOUND = 3e-2
FP16_WEIGHTS_BOUND = 1e-2  # fp16 storage, fp32 compute: only weight rounding (measured ~4e-3)
VOCAB = 300
FP16_MAX = float(torch.finfo(torch.float16).max)


def hf_config(**overrides) -> HFT5Config:
    # Tiny but with the REAL bucket settings; inner (heads*d_kv=96) != d_model != d_ff so a
    # mix-up of these dims cannot pass.
    values = dict(
        vocab_size=VOCAB, d_model=64, d_kv=24, d_ff=80, num_layers=3, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
        dropout_rate=0.0, layer_norm_epsilon=1e-6,
    )  # fmt: skip
    values.update(overrides)
    return HFT5Config(**values)


def reference(seed: int = 0, gain: float = 1.0, **overrides) -> T5EncoderModel:
    model = T5EncoderModel(hf_config(**overrides)).eval()
    return randomize(model, seed=seed, gain=gain)


def hf_weights(model: T5EncoderModel, both_embeddings: bool = False) -> dict:
    """The state dict as files store it: diffusers drops the tied `encoder.embed_tokens`."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if both_embeddings:
        assert torch.equal(sd["shared.weight"], sd["encoder.embed_tokens.weight"])
    else:
        sd.pop("encoder.embed_tokens.weight", None)
    return sd


def to_mx(sd: dict) -> dict:
    return {k: mx.array(v.float().numpy()) for k, v in sd.items()}


def token_ids(length: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run_reference(model: T5EncoderModel, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).last_hidden_state


def run_ours(model: T5Encoder, ids: torch.Tensor) -> mx.array:
    out = model(mx.array(ids.numpy()))
    mx.eval(out)
    return out


# ---------------------------------------------------------------- parity


def test_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 300  # beyond max_distance both ways: every bucket, edges at powers of two
    pos = torch.arange(length)
    rel = pos[None, :] - pos[:, None]
    ref = T5Attention._relative_position_bucket(rel, True, 32, 128).numpy()
    ours = relative_position_buckets(length, 32, 128)
    np.testing.assert_array_equal(ours, ref)
    # every bucket is exercised except 16 (= "key after query" at distance 0, impossible)
    assert set(np.unique(ours).tolist()) == set(range(32)) - {16}


@pytest.mark.parametrize("length", [160, 77])
def test_fp32_parity(length):
    ref_model = reference()
    ours = load_t5(to_mx(hf_weights(ref_model)), DIFFUSERS)
    assert ours.config.relative_attention_num_buckets == 32 and ours.config.d_kv == 24
    ids = token_ids(length)
    out = run_ours(ours, ids)
    assert out.dtype == mx.float32
    assert rel_err(out, run_reference(ref_model, ids)) <= FP32_BOUND


def test_bf16_within_bound():
    ref_model = reference(gain=0.5)  # T5-like attention sharpness (no 1/sqrt(d) scaling)
    ids = token_ids(160)
    ours = load_t5(to_mx(hf_weights(ref_model)), DIFFUSERS, dtype=mx.bfloat16)
    out = run_ours(ours, ids)
    assert out.dtype == mx.bfloat16
    assert rel_err(out, run_reference(ref_model, ids)) <= BF16_BOUND


def test_fp16_overflow_trap():
    """Residual stream beyond 65504: torch fp16 overflows; our bf16 / fp16-weight runs don't."""
    ref_model = reference(gain=0.5)
    with torch.no_grad():  # FF gain ~20*20*500; every weight stays well inside the fp16 range
        for block in ref_model.encoder.block:
            ff = block.layer[1].DenseReluDense
            ff.wi_0.weight.mul_(20.0)
            ff.wi_1.weight.mul_(20.0)
            ff.wo.weight.mul_(500.0)
        assert max(float(p.abs().max()) for p in ref_model.parameters()) < FP16_MAX / 10
    ids = token_ids(77)
    with torch.no_grad():
        ref_out = ref_model(ids, output_hidden_states=True)
    ref = ref_out.last_hidden_state
    assert max(float(h.abs().max()) for h in ref_out.hidden_states) > 2 * FP16_MAX
    assert torch.isfinite(ref).all()

    # Naive fp16 (the whole torch model in half): the FF outputs overflow to inf. (HF then
    # clamps the stream to finite values, so its output is finite but wrong.)
    half = copy.deepcopy(ref_model).half()
    overflowed = []
    hooks = [
        b.layer[1].DenseReluDense.register_forward_hook(
            lambda _m, _i, out: overflowed.append(bool((~torch.isfinite(out)).any()))
        )
        for b in half.encoder.block
    ]
    half_out = run_reference(half, ids)
    for h in hooks:
        h.remove()
    assert any(overflowed)
    assert not torch.isfinite(half_out).all() or rel_err(half_out, ref) > 0.1

    weights = to_mx(hf_weights(ref_model))
    for dtype, bound in ((mx.bfloat16, BF16_OVERFLOW_BOUND), (mx.float16, FP16_WEIGHTS_BOUND)):
        out = run_ours(load_t5(weights, DIFFUSERS, dtype=dtype), ids)
        assert np.isfinite(np.array(out.astype(mx.float32))).all(), dtype
        assert rel_err(out, ref) <= bound, dtype


def test_hf_config_sets_what_shapes_cannot_show():
    ref_model = reference(seed=3, relative_attention_max_distance=64, layer_norm_epsilon=1e-3)
    cfg = json.loads(ref_model.config.to_json_string())
    ours = load_t5(to_mx(hf_weights(ref_model)), DIFFUSERS, hf_config=cfg)
    assert ours.config.relative_attention_max_distance == 64
    assert ours.config.layer_norm_eps == 1e-3
    ids = token_ids(160)
    assert rel_err(run_ours(ours, ids), run_reference(ref_model, ids)) <= FP32_BOUND
    with pytest.raises(WeightMappingError, match="gated-gelu"):
        infer_config({}, hf_config={"feed_forward_proj": "relu"})


# ---------------------------------------------------------------- layouts


def load_indexed_shards(folder: Path, index_name: str) -> tuple:
    """Load exactly the shards an index names (the lead's folder resolver will replace this)."""
    weight_map = json.loads((folder / index_name).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    tensors: dict = {}
    for name in files:
        part = load_tensors(folder / name)
        assert all(weight_map[k] == name for k in part), f"{name}: keys its index does not name"
        tensors.update(part)
    assert set(tensors) == set(weight_map)
    return tensors, [str(folder / f) for f in files]


def write_sharded(folder: Path, sd: dict, stem: str, index_name: str) -> None:
    keys = list(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for n, part in enumerate(halves, start=1):
        name = f"{stem}-{n:05d}-of-00002.safetensors"
        save_state_dict({k: sd[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (folder / index_name).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


@pytest.fixture(scope="module")
def layout_reference():
    model = reference(seed=7)
    ids = token_ids(160, seed=1)
    return model, ids, run_reference(model, ids)


def test_diffusers_sharded_folder(tmp_path, layout_reference):
    model, ids, ref = layout_reference
    folder = tmp_path / "text_encoder_3"
    sd = hf_weights(model)  # only shared.weight, like the official shards
    write_sharded(folder, sd, "model", "model.safetensors.index.json")
    write_sharded(folder, {k: v.half() for k, v in sd.items()}, "model.fp16",
                  "model.safetensors.index.fp16.json")  # fmt: skip
    model.config.to_json_file(str(folder / "config.json"))
    assert len(list(folder.glob("*.safetensors"))) == 4  # a glob would load everything twice

    hf_cfg = json.loads((folder / "config.json").read_text())
    tensors, files = load_indexed_shards(folder, "model.safetensors.index.json")
    assert all(".fp16" not in f for f in files)
    ours = load_t5(tensors, DIFFUSERS, files=files, hf_config=hf_cfg)
    assert rel_err(run_ours(ours, ids), ref) <= FP32_BOUND

    tensors16, files16 = load_indexed_shards(folder, "model.safetensors.index.fp16.json")
    assert tensors16["shared.weight"].dtype == mx.float16
    ours16 = load_t5(tensors16, DIFFUSERS, files=files16, hf_config=hf_cfg)
    assert rel_err(run_ours(ours16, ids), ref) <= FP16_WEIGHTS_BOUND


def test_sai_file_with_both_embedding_names(tmp_path, layout_reference):
    model, ids, ref = layout_reference
    sd = hf_weights(model, both_embeddings=True)
    path = save_state_dict(sd, tmp_path / "t5xxl_fp16.safetensors")
    tensors = load_tensors(path)
    assert {"shared.weight", "encoder.embed_tokens.weight"} <= set(tensors)
    ours = load_t5(tensors, STABILITY, files=[str(path)])
    assert rel_err(run_ours(ours, ids), ref) <= FP32_BOUND


def test_single_file_prefix(tmp_path, layout_reference):
    model, ids, ref = layout_reference
    sd = hf_weights(model, both_embeddings=True)
    sd.pop("shared.weight")  # the alias alone must do
    prefix = "text_encoders.t5xxl.transformer."
    state = {prefix + k: v for k, v in sd.items()}
    state["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    state["model.diffusion_model.x_embedder.proj.bias"] = torch.zeros(8)  # other networks
    path = save_state_dict(state, tmp_path / "sd3_medium_incl_clips_t5.safetensors")
    tensors = load_tensors(path)
    assert SINGLE_FILE.owns(tensors) and not DIFFUSERS.owns(tensors)
    ours = load_t5(tensors, SINGLE_FILE, files=[str(path)])
    assert rel_err(run_ours(ours, ids), ref) <= FP32_BOUND


def test_incomplete_or_foreign_checkpoint_is_refused(layout_reference):
    model, _, _ = layout_reference
    sd = to_mx(hf_weights(model))
    broken = dict(sd)
    del broken["encoder.block.1.layer.0.SelfAttention.k.weight"]
    with pytest.raises(WeightMappingError, match="SelfAttention.k.weight"):
        load_t5(broken, DIFFUSERS, files=["x.safetensors"])
    bias_key = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    extra = dict(sd, **{bias_key.format(1): sd[bias_key.format(0)]})  # only block 0 has one
    with pytest.raises(WeightMappingError, match="unexpected"):
        load_t5(extra, DIFFUSERS)


# ---------------------------------------------------------------- full size


def test_full_size_parameter_count():
    official = dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
    )  # fmt: skip
    with torch.device("meta"):
        hf = T5EncoderModel(HFT5Config(**official))
    hf_count = sum(p.numel() for p in hf.parameters())  # the tied embedding counted once
    ours = T5Encoder(T5_XXL)  # lazy: nothing is allocated
    our_params = dict(tree_flatten(ours.parameters()))
    assert sum(v.size for v in our_params.values()) == hf_count == 4_762_310_656
    assert ours.block_count == 24
    # Every table target exists in the model (names kept in sync).
    targets = {r.target.replace("{i}", "0") for r in t5_table.RULES}
    assert targets <= set(our_params)
