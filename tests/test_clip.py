"""CLIP text encoders vs transformers: parity, every weight layout, full-size parameter counts.

Tiny models (width 128, 2 heads of 64, 3 layers) with the real vocabulary so the real
special ids appear: BOS 49406, EOS 49407; CLIP-L pads with EOS, CLIP-G pads with 0 (docs/text.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from mlx.utils import tree_flatten
from reference import randomize, rel_err, save_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd35_mlx.config import CLIP_G, CLIP_L, CLIPConfig
from sd35_mlx.errors import InputError, WeightMappingError
from sd35_mlx.models.clip import CLIPTextEncoder
from sd35_mlx.weights.safetensors_file import load_tensors
from sd35_mlx.weights.tables import clip as tables

BOS, EOS = 49406, 49407
FP32_BOUND = 1e-4
BF16_BOUND = 2e-2  # bf16 weights and activations (8-bit mantissa) vs fp32; measured ~0.9%
LENGTHS = (5, 30, 77)  # tokens incl. BOS/EOS; 77 = no padding at all


def hf_config(act: str, projection: bool, eos_token_id: int = 2) -> CLIPTextConfig:
    # eos_token_id 2 is what the official SD3 config.json files carry (legacy: argmax pooling)
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
        projection_dim=128 if projection else 512, eos_token_id=eos_token_id,
    )  # fmt: skip


def make_reference(act: str, projection: bool, seed: int = 0, eos_token_id: int = 2):
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return randomize(cls(hf_config(act, projection, eos_token_id)), seed=seed).eval()


def hf_state_dict(ref) -> dict:
    """Names as in the official files: transformers 5 stores a bare CLIPTextModel without
    the `text_model.` prefix that every SD3 checkpoint uses, so add it back."""
    sd = ref.state_dict()
    if isinstance(ref, CLIPTextModel):
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return sd


def token_ids(pad: int, eos: int = EOS, seed: int = 0) -> torch.Tensor:
    """One row per length in LENGTHS: BOS, random words, EOS, then `pad`."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in LENGTHS:
        words = torch.randint(1, 49405, (n - 2,), generator=g)
        words[words == eos] = eos + 1  # only the final EOS may be an EOS
        rows.append(torch.cat([torch.tensor([BOS]), words, torch.tensor([eos]),
                               torch.full((77 - n,), pad)]))  # fmt: skip
    return torch.stack(rows)


@torch.no_grad()
def reference_outputs(ref, ids: torch.Tensor):
    out = ref(ids, output_hidden_states=True)
    pooled = out.text_embeds if isinstance(ref, CLIPTextModelWithProjection) else out.pooler_output
    return out.hidden_states[-2], pooled


def our_outputs(model: CLIPTextEncoder, ids: torch.Tensor):
    out = model(mx.array(ids.numpy()))
    return out.hidden, out.pooled


def assert_parity(model, ref, ids, bound=FP32_BOUND):
    hidden, pooled = our_outputs(model, ids)
    ref_hidden, ref_pooled = reference_outputs(ref, ids)
    assert rel_err(hidden, ref_hidden) <= bound
    assert rel_err(pooled, ref_pooled) <= bound


# ---- parity ----
# Pooled position in transformers: legacy eos_token_id == 2 -> argmax(ids) (EOS 49407 is the
# largest id; torch returns the first maximum, so with EOS padding the first EOS); any other
# eos_token_id -> first position of that id. We always search the first EOS explicitly.
@pytest.mark.parametrize(
    "act, projection, pad, hf_eos, eos",
    [
        ("quick_gelu", True, EOS, 2, EOS),  # CLIP-L as in diffusers text_encoder/: pad with EOS
        ("gelu", True, 0, 2, EOS),  # CLIP-G: pad with 0 ("!")
        ("quick_gelu", False, EOS, EOS, EOS),  # non-legacy config: HF takes the first EOS
        ("gelu", False, 0, EOS, EOS),
        ("gelu", True, 0, 500, 500),  # EOS not the largest id: argmax would pick wrong
    ],
)
def test_fp32_parity(act, projection, pad, hf_eos, eos):
    ref = make_reference(act, projection, seed=1, eos_token_id=hf_eos)
    model = tables.load_clip(
        {k: mx.array(v.numpy()) for k, v in hf_state_dict(ref).items()},
        tables.DIFFUSERS, hf_config=ref.config.to_dict(),
    )  # fmt: skip
    assert model.config.activation == act
    assert model.config.eos_token_id == eos
    assert ("text_projection" in model) == projection
    ids = token_ids(pad, eos)
    assert_parity(model, ref, ids)


def test_bf16_within_bound():
    ref = make_reference("gelu", True, seed=2)
    tensors = {k: mx.array(v.numpy()) for k, v in hf_state_dict(ref).items()}
    model = tables.load_clip(
        tensors, tables.DIFFUSERS, dtype=mx.bfloat16, hf_config=ref.config.to_dict()
    )
    ids = token_ids(pad=0)
    hidden, pooled = our_outputs(model, ids)
    assert hidden.dtype == mx.bfloat16 and pooled.dtype == mx.bfloat16
    ref_hidden, ref_pooled = reference_outputs(ref, ids)
    assert rel_err(hidden, ref_hidden) <= BF16_BOUND
    assert rel_err(pooled, ref_pooled) <= BF16_BOUND


# ---- layouts ----
def test_diffusers_folder(tmp_path: Path):
    ref = make_reference("quick_gelu", True, seed=3)
    folder = tmp_path / "text_encoder"
    ref.config.save_pretrained(folder)  # writes config.json as the hub folders have it
    sd = hf_state_dict(ref)
    save_state_dict(sd, folder / "model.safetensors")
    save_state_dict({k: v.half() for k, v in sd.items()}, folder / "model.fp16.safetensors")

    hf = json.loads((folder / "config.json").read_text())
    assert hf["eos_token_id"] == 2 and hf["hidden_act"] == "quick_gelu"
    # docs/loading.md: the folder holds the same tensors twice; the full-precision file is the one to load
    path = folder / "model.safetensors"
    model = tables.load_clip(load_tensors(path), tables.DIFFUSERS, files=[str(path)], hf_config=hf)
    assert model.config.eos_token_id == EOS
    assert model.token_embedding.weight.dtype == mx.float32
    assert_parity(model, ref, token_ids(pad=EOS))

    # the fp16 duplicate maps through the same layout (when asked for on purpose)
    path16 = folder / "model.fp16.safetensors"
    model16 = tables.load_clip(
        load_tensors(path16), tables.DIFFUSERS, files=[str(path16)], hf_config=hf
    )
    assert model16.token_embedding.weight.dtype == mx.float16
    assert_parity(model16, ref, token_ids(pad=EOS), bound=1e-2)


def test_stability_clip_l_without_projection(tmp_path: Path):
    ref = make_reference("quick_gelu", False, seed=4)
    path = save_state_dict(hf_state_dict(ref), tmp_path / "text_encoders" / "clip_l.safetensors")
    # no config.json beside SAI files; a width-128 toy needs its activation named
    model = tables.load_clip(
        load_tensors(path),
        tables.STABILITY,
        files=[str(path)],
        hf_config={"hidden_act": "quick_gelu"},
    )
    assert "text_projection" not in model and model.config.projection_dim is None
    assert model.config.num_heads == 2  # hidden // 64
    assert_parity(model, ref, token_ids(pad=EOS))


def test_single_file_with_both_clips_and_other_networks(tmp_path: Path):
    ref_l = make_reference("quick_gelu", False, seed=5)
    ref_g = make_reference("gelu", True, seed=6)
    state = {}
    for which, ref in (("clip_l", ref_l), ("clip_g", ref_g)):
        prefix = f"text_encoders.{which}.transformer."
        state.update({prefix + k: v for k, v in hf_state_dict(ref).items()})
        # older exports carry the position_ids buffer: known, ignored
        state[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["model.diffusion_model.x_embedder.proj.weight"] = torch.randn(8, 16, 2, 2)
    state["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"] = torch.randn(24, 8)
    path = save_state_dict(state, tmp_path / "sd3_medium_incl_clips.safetensors")
    tensors = load_tensors(path)

    # width 128 is neither official width, so the toy files need their activation named
    model_l = tables.load_clip(tensors, tables.single_file("clip_l"), files=[str(path)],
                               hf_config={"hidden_act": "quick_gelu"})  # fmt: skip
    model_g = tables.load_clip(tensors, tables.single_file("clip_g"), files=[str(path)],
                               hf_config={"hidden_act": "gelu"})  # fmt: skip
    assert model_l.config.projection_dim is None
    assert model_g.config.projection_dim == 128
    assert_parity(model_l, ref_l, token_ids(pad=EOS))
    assert_parity(model_g, ref_g, token_ids(pad=0))


def test_unknown_width_needs_activation(tmp_path: Path):
    ref = make_reference("gelu", True, seed=7)
    tensors = {k: mx.array(v.numpy()) for k, v in hf_state_dict(ref).items()}
    with pytest.raises(WeightMappingError, match="width 128.*hf_config"):
        tables.load_clip(tensors, tables.STABILITY)


def test_single_file_rejects_unknown_encoder():
    with pytest.raises(InputError, match="clip_l"):
        tables.single_file("t5xxl")


# ---- configs and sizes (lazy: the full-size networks are built, never evaluated) ----
def _lazy_params(config: CLIPConfig) -> dict:
    return dict(tree_flatten(CLIPTextEncoder(config).parameters()))


@pytest.mark.parametrize("official", [CLIP_L, CLIP_G])
def test_infer_config_from_full_size_shapes(official: CLIPConfig):
    weights = _lazy_params(official)
    assert tables.infer_config(weights) == official  # SAI files: shapes and width only
    legacy = {
        "hidden_act": official.activation,
        "eos_token_id": 2,
        "num_attention_heads": official.num_heads,
    }
    assert tables.infer_config(weights, legacy) == official  # diffusers config.json values
    weights.pop("text_projection.weight")
    assert tables.infer_config(weights).projection_dim is None


def _meta_count(cls, **kw) -> int:
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**kw))
    return sum(p.numel() for p in model.parameters())


def test_full_size_parameter_counts():
    l_kw = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
    g_kw = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                intermediate_size=5120, hidden_act="gelu", projection_dim=1280)  # fmt: skip

    def ours(config):
        return sum(v.size for v in _lazy_params(config).values())

    assert ours(CLIP_L) == _meta_count(CLIPTextModelWithProjection, **l_kw) == 123_650_304
    assert ours(CLIP_G) == _meta_count(CLIPTextModelWithProjection, **g_kw) == 694_659_840
    no_proj = CLIPConfig(**{**CLIP_L.to_dict(), "projection_dim": None})
    assert ours(no_proj) == _meta_count(CLIPTextModel, **l_kw) == 123_060_480  # SAI clip_l
