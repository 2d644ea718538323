"""Every bad LoRA input gets an error that says what is wrong: wrong base model (SDXL, FLUX, another
SD3 size), keys that match nothing (listed; strict off warns "applied N of M"), rank mismatch,
refused adapter types, truncated files, pickles, non-finite scales; and LoRAs from a Hub repo."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from hub_server import FakeHub, point_huggingface_hub_at, set_offline
from lora_files import kohya_key, linear_stems, random_lora, save
from test_mmdit import MMDITX, random_sai_state

from sd35_mlx.adapters.apply import prepare
from sd35_mlx.adapters.formats import parse_lora
from sd35_mlx.adapters.source import read_lora, split_repo_file
from sd35_mlx.errors import InputError, SD35Error, WeightFileError
from sd35_mlx.weights.tables.mmdit import STABILITY, load_mmdit

H = MMDITX.hidden_size


@pytest.fixture(scope="module")
def sai():
    return random_sai_state(MMDITX)


@pytest.fixture(scope="module")
def model(sai):
    return load_mmdit({"model.diffusion_model." + k: mx.array(v.numpy()) for k, v in sai.items()}, STABILITY)


def kohya_file(tmp_path: Path, sai, extra=None, stems=None, name="lora.safetensors", metadata=None) -> Path:
    lora, _ = random_lora(sai, stems or linear_stems(sai)[:4], kohya_key("lora_unet_"))
    return save({**lora, **(extra or {})}, tmp_path / name, metadata)


def prepare_file(path: Path, model, **kw):
    return prepare(read_lora(path), {"transformer": model}, **kw)


def pair(stem: str, down_shape, up_shape, prefix="lora_unet_", suffixes=("lora_down.weight", "lora_up.weight")):
    return {f"{prefix}{stem}.{suffixes[0]}": torch.randn(*down_shape), f"{prefix}{stem}.{suffixes[1]}": torch.randn(*up_shape)}


@pytest.mark.parametrize("keys, family", [
    (pair("down_blocks_0_attentions_0_proj_in", (4, 320), (320, 4)), "SDXL or SD 1.x"),
    (pair("input_blocks_4_1_proj_in", (4, 320), (320, 4)), "SDXL or SD 1.x"),
    (pair("double_blocks_0_img_attn_qkv", (4, 3072), (9216, 4)), "FLUX"),
    (pair("single_transformer_blocks.0.attn.to_q", (4, 3072), (3072, 4), "transformer.", ("lora_A.weight", "lora_B.weight")), "FLUX"),
])  # fmt: skip
def test_a_lora_for_another_model_family_is_named(tmp_path, model, keys, family):
    path = save(keys, tmp_path / "other.safetensors")
    with pytest.raises(InputError, match=f"this LoRA is for {family}.*not for SD3 / SD3.5"):
        prepare_file(path, model)


def test_base_model_from_kohya_metadata(tmp_path, sai, model):
    path = kohya_file(tmp_path, sai, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(InputError, match=r"for SDXL \(ss_base_model_version = 'sdxl_base_v1-0'\)"):
        prepare_file(path, model)


def test_a_lora_for_another_sd3_size_says_so(tmp_path, model):
    wide = 2432  # SD3.5 Large's width on this (narrower) model
    path = save(pair("joint_blocks_0_x_block_attn_qkv", (4, wide), (3 * wide, 4)), tmp_path / "large.safetensors")
    with pytest.raises(InputError, match=rf"does not fit blocks.0.x.attn.qkv.*width {wide}; this model has width {H}"):
        prepare_file(path, model)


def test_keys_that_match_nothing_are_listed_or_skipped_with_a_count(tmp_path, sai, model, caplog):
    extra = {**pair("joint_blocks_7_x_block_attn_qkv", (4, H), (3 * H, 4)), "lora_unet_joint_blocks_7_x_block_attn_qkv.alpha": torch.tensor(4.0),
             "something.else": torch.zeros(3)}  # fmt: skip
    path = kohya_file(tmp_path, sai, extra)
    with pytest.raises(InputError) as e:
        prepare_file(path, model)
    message = str(e.value)
    assert "lora_unet_joint_blocks_7_x_block_attn_qkv" in message and "something.else" in message
    assert "4 of its 16 keys match nothing" in message and "block 7 but this model has 3 blocks" in message
    assert "--lora-strict off" in message
    with caplog.at_level(logging.WARNING):
        lora = prepare_file(path, model, strict=False)
    assert "applied 12 of 16 keys" in caplog.text
    assert sum(len(v) for v in lora.placed["transformer"].values()) == 4


def test_attn2_lora_on_a_model_without_dual_attention(tmp_path):
    from test_mmdit import SD3_STYLE

    plain = load_mmdit({"model.diffusion_model." + k: mx.array(v.numpy()) for k, v in random_sai_state(SD3_STYLE).items()}, STABILITY)
    path = save(pair("joint_blocks_0_x_block_attn2_qkv", (4, H), (3 * H, 4)), tmp_path / "m.safetensors")
    with pytest.raises(InputError, match="attn2, the dual attention only SD3.5 Medium"):
        prepare_file(path, plain)


def test_rank_mismatch_and_incomplete_pairs(tmp_path, model):
    path = save(pair("joint_blocks_0_x_block_attn_qkv", (4, H), (3 * H, 8)), tmp_path / "rank.safetensors")
    with pytest.raises(InputError, match="rank mismatch in 'lora_unet_joint_blocks_0_x_block_attn_qkv'.*rank 4.*rank 8"):
        prepare_file(path, model)
    half = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(4, H)}
    with pytest.raises(InputError, match="incomplete.*no up matrix"):
        prepare_file(save(half, tmp_path / "half.safetensors"), model)


@pytest.mark.parametrize("suffix, kind", [(".hada_w1_a", "LoHa"), (".lokr_w1", "LoKr"), (".dora_scale", "DoRA"),
                                          (".lora_magnitude_vector", "DoRA"), (".diff", "full weight difference")])  # fmt: skip
def test_unsupported_adapter_types_are_refused_by_name(tmp_path, sai, model, suffix, kind):
    path = kohya_file(tmp_path, sai, {"lora_unet_joint_blocks_0_x_block_attn_proj" + suffix: torch.randn(4, H)})
    with pytest.raises(InputError, match=f"does not apply: {kind}"):
        prepare_file(path, model)


def test_peft_dora_config_is_refused(tmp_path, model):
    import json

    keys = pair("transformer_blocks.0.attn.to_q", (4, H), (H, 4), "transformer.", ("lora_A.weight", "lora_B.weight"))
    path = save(keys, tmp_path / "dora.safetensors", {"lora_adapter_metadata": json.dumps({"transformer.use_dora": True, "transformer.lora_alpha": 4})})
    with pytest.raises(InputError, match="DoRA"):
        prepare_file(path, model)


def test_non_finite_alpha_and_scales(tmp_path, sai, model):
    stem = "lora_unet_" + linear_stems(sai)[0].replace(".", "_")
    path = kohya_file(tmp_path, sai, {stem + ".alpha": torch.tensor(math.nan)})
    with pytest.raises(InputError, match="alpha.*is nan"):
        prepare_file(path, model)
    good = kohya_file(tmp_path, sai, name="good.safetensors")
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(InputError, match="finite"):
            prepare_file(good, model, scale=bad)
        with pytest.raises(InputError, match="finite"):
            prepare_file(good, model, text_encoder_scale=bad)


def test_truncated_file_and_pickles_are_refused(tmp_path, sai):
    path = kohya_file(tmp_path, sai)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="truncated"):
        read_lora(cut)
    for suffix in (".pt", ".ckpt", ".bin"):
        pickle = tmp_path / f"lora{suffix}"
        torch.save({"x": torch.zeros(1)}, pickle)
        with pytest.raises(WeightFileError, match="refusing to read a pickle"):
            read_lora(pickle)
    with pytest.raises(InputError, match="no such LoRA file"):
        read_lora(tmp_path / "missing.safetensors")


def test_a_full_checkpoint_is_not_a_lora(tmp_path, sai, model):
    path = save({"model.diffusion_model." + k: v for k, v in list(sai.items())[:5]}, tmp_path / "full.safetensors")
    with pytest.raises(InputError, match="none of its 5 keys is a LoRA pair"):
        prepare_file(path, model)


def test_alpha_zero_follows_kohya(tmp_path, sai):
    stem = linear_stems(sai)[0]
    lora, _ = random_lora(sai, [stem], kohya_key("lora_unet_"))
    lora["lora_unet_" + stem.replace(".", "_") + ".alpha"] = torch.tensor(0.0)
    parsed = parse_lora({k: mx.array(v.numpy()) for k, v in lora.items()})
    assert parsed.modules[0].scale == 1.0  # kohya trains alpha 0 as alpha = rank


# ---------------------------------------------------------------- from the Hub
def test_repo_and_repo_file(tmp_path, sai, monkeypatch):
    assert split_repo_file("owner/name:sub/file.safetensors") == ("owner/name", "sub/file.safetensors")
    assert split_repo_file("owner/name") == ("owner/name", None)
    one = kohya_file(tmp_path, sai, name="one.safetensors").read_bytes()
    hub = FakeHub().start()
    try:
        hub.add_repo("someone/style-lora", {"style.safetensors": one, "README.md": b"a LoRA\n"})
        hub.add_repo("someone/two-loras", {"a.safetensors": one, "b.safetensors": one, "c.bin": b"x"})
        hub.add_repo("someone/gated-lora", {"g.safetensors": one}, gated=True)
        point_huggingface_hub_at(monkeypatch, hub.url, tmp_path / "hf_home")
        got = read_lora("someone/style-lora")
        assert got.path.name == "style.safetensors" and got.path.read_bytes() == one
        fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path}
        assert fetched == {"style.safetensors"}  # only the LoRA file, not the rest of the repo
        assert read_lora("someone/two-loras:b.safetensors").path.name == "b.safetensors"
        with pytest.raises(SD35Error, match=r"several .safetensors files \(a.safetensors, b.safetensors\); name the LoRA file as someone/two-loras:<file>"):
            read_lora("someone/two-loras")
        with pytest.raises(WeightFileError, match="pickle"):
            read_lora("someone/two-loras:c.bin")
        with pytest.raises(SD35Error, match="gated model"):
            read_lora("someone/gated-lora")
        set_offline(monkeypatch, True)
        assert read_lora("someone/style-lora").sha256 == got.sha256  # from the cache
        with pytest.raises(SD35Error, match="not in the Hugging Face cache"):
            read_lora("someone/never-fetched")
    finally:
        hub.stop()
