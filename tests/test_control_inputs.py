"""Bad control / inpainting input, each refused (or handled as documented) before models load;
metadata and --from-image with control images and masks; the CLI end to end."""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from reference import randomize
from tiny_model import CONTEXT_DIM, TinySpec, make_tiny_model

from sd35_mlx.config import SD35_LARGE_MMDIT, ControlNetConfig
from sd35_mlx.control.inpaint import read_mask
from sd35_mlx.control.settings import ControlNetSettings
from sd35_mlx.control.spec import ControlNetSpec, open_controlnet
from sd35_mlx.control.residuals import STABILITY
from sd35_mlx.errors import InputError
from sd35_mlx.generate import main
from sd35_mlx.images import read_metadata
from sd35_mlx.settings import GenerationSettings

H, W = 48, 64


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_control_inputs")
    make_tiny_model(root, TinySpec(seed=2))
    return root


def _controlnet_folder(root: Path, hidden_heads: int = 4, seed: int = 21) -> str:
    from diffusers import SD3ControlNetModel

    net = SD3ControlNetModel(sample_size=32, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                             num_attention_heads=hidden_heads, joint_attention_dim=CONTEXT_DIM,
                             caption_projection_dim=8 * hidden_heads, pooled_projection_dim=40, out_channels=16,
                             pos_embed_max_size=16)  # fmt: skip
    randomize(net, seed=seed, gain=0.5).save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    return _controlnet_folder(tmp_path_factory.mktemp("cn") / "canny-cn")


def _png(path: Path, w=W, h=H, seed=0, mode="RGB") -> str:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(rng.integers(0, 255, shape).astype(np.uint8), mode).save(path)
    return str(path)


def _mask(path: Path, w=W, h=H, value=255) -> str:
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = value
    Image.fromarray(m).save(path)
    return str(path)


# ---- settings: refused before any model loads ----
def test_control_image_missing_or_unreadable(tmp_path, controlnet):
    with pytest.raises(InputError, match="control image not found"):
        ControlNetSettings(controlnet, image=str(tmp_path / "nope.png")).validate()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot read control image"):
        ControlNetSettings(controlnet, image=str(bad)).validate()
    with pytest.raises(InputError, match="needs a control image"):
        ControlNetSettings(controlnet).validate()


@pytest.mark.parametrize("start,end", [(0.5, 0.5), (0.8, 0.2), (-0.1, 1.0), (0.0, 1.5)])
def test_control_window_must_be_ordered(tmp_path, controlnet, start, end):
    with pytest.raises(InputError, match="start < end"):
        ControlNetSettings(controlnet, image=_png(tmp_path / "c.png"), start=start, end=end).validate()


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_control_scale_must_be_finite(tmp_path, controlnet, scale):
    with pytest.raises(InputError, match="finite"):
        ControlNetSettings(controlnet, image=_png(tmp_path / "c.png"), scale=scale).validate()


def test_mask_needs_an_init_image(tmp_path):
    with pytest.raises(InputError, match="needs the image"):
        GenerationSettings(mask=_mask(tmp_path / "m.png")).validate()


def test_mask_of_another_size(tmp_path, caplog):
    init = _png(tmp_path / "i.png")
    half = _mask(tmp_path / "half.png", w=W // 2, h=H // 2)  # same aspect: resized, with a warning
    with caplog.at_level(logging.WARNING):
        GenerationSettings(init_image=init, mask=half).validate()
    assert "resized" in caplog.text
    m = read_mask(half, W, H)
    assert m.shape == (H, W) and m[H // 2, W // 2] == 1 and m[0, 0] == 0
    other = _mask(tmp_path / "other.png", w=W, h=W)  # another aspect ratio: refused
    with pytest.raises(InputError, match="aspect"):
        GenerationSettings(init_image=init, mask=other).validate()


def test_non_binary_mask_is_binarized_at_half(tmp_path):
    m = np.zeros((H, W), np.uint8)
    m[:, : W // 4] = 127  # < 0.5: kept
    m[:, W // 4 : W // 2] = 128  # ≥ 0.5: repainted
    m[:, W // 2 :] = 255
    Image.fromarray(m).save(tmp_path / "grey.png")
    got = read_mask(str(tmp_path / "grey.png"), W, H)
    assert set(np.unique(got)) == {0.0, 1.0}
    assert got[:, : W // 4].max() == 0 and got[:, W // 4 :].min() == 1


def test_all_black_mask_is_refused(tmp_path):
    with pytest.raises(InputError, match="all black"):
        read_mask(_mask(tmp_path / "black.png", value=0), W, H)


def test_controlnet_for_another_base_is_named():
    sd3_medium_cn = ControlNetSpec(source="InstantX/SD3-Controlnet-Canny", files=(), layout="x",
                                   config=ControlNetConfig(depth=6, hidden_size=1536, num_heads=24, context_dim=4096,
                                                           pos_embed_max_size=192),
                                   rule=STABILITY, zero_pooled=True, latent_shift=False, control_type="canny")  # fmt: skip
    with pytest.raises(InputError, match=r"made for SD3 Medium / SD3\.5 Medium, not for sd3\.5-large"):
        sd3_medium_cn.check_base(SD35_LARGE_MMDIT, "sd3.5-large")


def test_wrong_base_is_refused_before_the_transformer_loads(tiny_root, tmp_path, monkeypatch):
    from sd35_mlx.pipeline import SD35Pipeline

    other = _controlnet_folder(tmp_path / "wide", hidden_heads=6)  # width 48, the tiny transformer's is 32
    pipe = SD35Pipeline.from_pretrained(tiny_root, dtype=mx.float32)
    evaluated = []
    monkeypatch.setattr(pipe, "_load_transformer", lambda: evaluated.append(1))
    s = GenerationSettings(prompt="x", width=W, height=H, steps=1, t5_length=77,
                           controlnets=(ControlNetSettings(other, image=_png(tmp_path / "c.png")),))  # fmt: skip
    with pytest.raises(InputError, match="made for a model of width 48"):
        next(pipe.generate_latents(s, embeddings=pipe.encode_prompt("x", t5_length=77)))
    assert not evaluated


def test_checkpoint_type_and_overrides(controlnet, tmp_path):
    spec = open_controlnet(controlnet)
    assert spec.control_type == "canny"  # from the name: a diffusers folder has no type tag
    assert spec.zero_pooled and not spec.latent_shift and spec.rule.name == "diffusers"
    assert open_controlnet(controlnet, residual_rule="stability", control_type="depth").rule.name == "stability"
    with pytest.raises(InputError, match="unknown control type"):
        open_controlnet(controlnet, control_type="scribble")
    with pytest.raises(InputError, match="not found"):
        open_controlnet(str(tmp_path / "missing"))


# ---- the CLI ----
def _cli(tiny_root, out, *extra):
    return main(["--model", str(tiny_root), "-p", "a fox", "-W", str(W), "-H", str(H), "--steps", "2", "--cfg", "3",
                 "--seed", "5", "--t5-length", "77", "--dtype", "float32", "--memory-budget", "off", "--quiet",
                 "-o", str(out), *extra])  # fmt: skip


def test_cli_controlnet_metadata_and_from_image(tiny_root, controlnet, tmp_path, capsys):
    photo = _png(tmp_path / "photo.png", seed=3)
    out = tmp_path / "out.png"
    rc = _cli(tiny_root, out, "--controlnet", controlnet, "--control-image", photo, "--control-preprocess", "canny",
              "--control-scale", "0.7", "--control-start", "0.1", "--control-end", "0.9",
              "--save-control", str(tmp_path / "seen"))  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    meta = read_metadata(out)
    (entry,) = meta["control"]
    assert entry["scale"] == 0.7 and entry["start"] == 0.1 and entry["end"] == 0.9 and entry["preprocess"] == "canny"
    assert len(entry["image_sha256"]) == 64
    seen = np.asarray(Image.open(tmp_path / "seen" / "out-control-0.png"))
    assert set(np.unique(seen)) <= {0, 255}  # the canny map the ControlNet saw
    # --from-image reproduces it with the same control image
    from_image = ["--from-image", str(out), "--dtype", "float32", "--memory-budget", "off", "--quiet", "-o", str(out)]
    assert main(from_image) == 2  # metadata is untrusted: the files it names are read only on request
    assert "--trust-metadata-model" in capsys.readouterr().err
    assert main([*from_image, "--trust-metadata-model"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "out-1.png")))
    # …and refuses when the control image changed
    _png(tmp_path / "photo.png", seed=4)
    assert main(["--from-image", str(out), "--memory-budget", "off", "--quiet", "--trust-metadata-model", "-o", str(out)]) == 2
    assert "sha256 differs" in capsys.readouterr().err


def test_cli_inpainting_records_the_mask(tiny_root, tmp_path, capsys):
    init, mask = _png(tmp_path / "i.png", seed=6), _mask(tmp_path / "m.png")
    out = tmp_path / "inpaint.png"
    assert _cli(tiny_root, out, "--init-image", init, "--mask", mask, "--strength", "0.9") == 0, capsys.readouterr().err
    meta = read_metadata(out)
    assert meta["mask"] == mask and len(meta["mask_sha256"]) == 64


@pytest.mark.parametrize("extra, message", [
    (["--control-scale", "0.5"], "need a --controlnet"),
    (["--controlnet", "x", "--controlnet", "y", "--control-scale", "1", "2", "--control-image", "a"], "unrecognized"),
    (["--controlnet", "x", "--control-image", "missing.png"], "control image not found"),
    (["--controlnet", "x", "--control-image", "{img}", "--control-scale", "nan"], "finite"),
    (["--controlnet", "x", "--control-image", "{img}", "--control-start", "0.6", "--control-end", "0.4"], "start < end"),
])  # fmt: skip
def test_cli_bad_control_input(tiny_root, tmp_path, capsys, extra, message):
    img = _png(tmp_path / "c.png")
    extra = [e.replace("{img}", img) for e in extra]
    try:
        rc = _cli(tiny_root, tmp_path / "o.png", *extra)
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


# ---- conversion and quantization ----
def test_convert_controlnet_round_trip_and_quantized(tiny_root, controlnet, tmp_path, capsys):
    """The converted folder keeps the weights and the conventions; 4-bit runs and is recorded."""
    from sd35_mlx.control.spec import open_controlnet
    from sd35_mlx.convert import main as convert_main
    from sd35_mlx.quantize import is_quantized
    from sd35_mlx.weights.converted import read_converted_config

    out16, out4 = tmp_path / "cn16", tmp_path / "cn4"
    assert convert_main(["--controlnet", controlnet, "--mlx-path", str(out16), "--dtype", "float32", "--quiet"]) == 0
    assert convert_main(["--controlnet", controlnet, "--mlx-path", str(out4), "--quantize", "controlnet=4",
                         "--quiet"]) == 0, capsys.readouterr().err  # fmt: skip
    entry = read_converted_config(out4)["components"]["controlnet"]
    assert entry["quantization"]["bits"] == 4 and entry["control"]["rule"] == "diffusers"
    original, converted = open_controlnet(controlnet), open_controlnet(str(out16))
    assert converted.converted and converted.config == original.config and converted.rule == original.rule
    assert (converted.zero_pooled, converted.latent_shift, converted.control_type) == (
        original.zero_pooled, original.latent_shift, original.control_type)  # fmt: skip
    a, b = original.load(dtype=mx.float32), converted.load(dtype=mx.float32)
    from mlx.utils import tree_flatten

    for (ka, va), (kb, vb) in zip(sorted(tree_flatten(a.parameters())), sorted(tree_flatten(b.parameters()))):
        assert ka == kb and mx.array_equal(va, vb), ka
    assert is_quantized(open_controlnet(str(out4)).load())
    assert convert_main(["--controlnet", controlnet, "--mlx-path", str(out4), "--quantize", "t5=4", "--quiet"]) == 2
    # a quantized ControlNet at load time, recorded in the metadata
    photo = _png(tmp_path / "p.png")
    png = tmp_path / "q.png"
    assert _cli(tiny_root, png, "--controlnet", str(out16), "--control-image", photo, "--controlnet-quantize", "8") == 0
    assert read_metadata(png)["controlnet_quantization"] == "8"


def test_memory_planner_counts_controlnets():
    """A full-size SD3.5 Large ControlNet (2.15 B parameters) adds its weights (4.31 GB at
    16-bit, about a quarter at 4-bit), the residuals a step holds and the matmuls' copy of
    one block's weights to the denoise stage (shapes only, nothing runs)."""
    from sd35_mlx.config import SD35_LARGE_CONTROLNET
    from sd35_mlx.memory import MemoryEstimator
    from sd35_mlx.quantize import make_spec

    plain = MemoryEstimator(SD35_LARGE_MMDIT, trimmed_transformer=True)
    with16 = MemoryEstimator(SD35_LARGE_MMDIT, trimmed_transformer=True, controlnets=[(SD35_LARGE_CONTROLNET, None)])
    spec4 = make_spec("controlnet", 4)
    with4 = MemoryEstimator(SD35_LARGE_MMDIT, trimmed_transformer=True, controlnets=[(SD35_LARGE_CONTROLNET, spec4)])
    base = plain.denoise(None, 1024, 1024, 256)
    extra16 = with16.denoise(None, 1024, 1024, 256) - base
    extra4 = with4.denoise(None, 1024, 1024, 256) - base
    residuals = 20 * 2 * (64 * 64) * 2432 * 2  # 19 outputs + the control tokens, CFG batch, 16-bit
    weights16 = 2_153_518_976 * 2
    block = 2432 * (6 + 3 + 1 + 4 + 4) * 2432 + (6 + 3 + 1 + 4) * 2432 + 2432  # one block's parameters
    copy = block * (4 if plain.on_cpu else 0)  # the matmuls' float32 copy of one block on the CPU
    assert weights16 + residuals + copy <= extra16 < weights16 + residuals + copy + 0.01e9
    copy4 = block * (4 if plain.on_cpu else 2)  # de-quantized on a GPU
    assert residuals + copy4 + 0.25 * weights16 < extra4 < residuals + copy4 + 0.35 * weights16
    assert plain.plan(None, None, "loaded", False, 1024, 1024, 256).stages["encode"] == \
        with16.plan(None, None, "loaded", False, 1024, 1024, 256).stages["encode"]  # only the denoise stage


def test_pipeline_plan_includes_planned_controlnets(tiny_root, controlnet):
    from sd35_mlx.pipeline import SD35Pipeline

    a = SD35Pipeline.from_pretrained(tiny_root, dtype=mx.float32, memory_budget=50.0)
    b = SD35Pipeline.from_pretrained(tiny_root, dtype=mx.float32, memory_budget=50.0, controlnets=[controlnet])
    assert b.plan.stages["denoise"] > a.plan.stages["denoise"]


def test_mask_crop_padding_must_be_a_whole_number(tmp_path):
    init, mask = _png(tmp_path / "i.png"), _mask(tmp_path / "m.png")
    for bad in (-1, 2.5):
        with pytest.raises(InputError, match="crop padding"):
            GenerationSettings(init_image=init, mask=mask, mask_crop_padding=bad).validate()
    GenerationSettings(init_image=init, mask=mask, mask_crop_padding=0).validate()


@pytest.mark.parametrize("value, message", [
    ([{"image": "x.png"}], "needs at least a path"),
    ([{"path": "x", "colour": "red"}], "unknown ControlNet setting"),
    ("not a list", "must be a list"),
    ([{"path": "x", "image": "{img}", "scale": "strong"}], "finite number"),
    ([{"path": "x", "image": "{img}", "start": None}], "finite number"),
])  # fmt: skip
def test_metadata_with_bad_control_entries_is_refused(tmp_path, value, message):
    """--from-image reads settings from a PNG anyone could have edited: bad entries are InputErrors."""
    img = _png(tmp_path / "c.png")
    if isinstance(value, list):
        value = [{k: (v.replace("{img}", img) if isinstance(v, str) else v) for k, v in e.items()} for e in value]
    with pytest.raises(InputError, match=message):
        GenerationSettings.from_dict({"prompt": "x", "controlnets": value}).validate()
