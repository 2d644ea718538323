"""LoRAs from the command line and in image metadata: --lora PATH[:SCALE] (repeatable),
--lora-strict, metadata records (name, sha256, scale) that --from-image reapplies; the distilled
presets a LoRA switches to; bad --lora values refused before any model loads."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from lora_files import PEFT, dotted_key, linear_stems, random_lora, save
from PIL import Image
from tiny_model import TinySpec, make_tiny_model

import sd35_mlx.pipeline as pipeline_module
from sd35_mlx.adapters.spec import parse_lora_arg
from sd35_mlx.errors import InputError
from sd35_mlx.generate import main
from sd35_mlx.images import read_metadata
from sd35_mlx.variants import SD35_LARGE, SD35_MEDIUM, lora_preset

COMMON = ["--prompt", "a red fox", "-W", "32", "-H", "32", "--steps", "1", "--cfg", "3", "--seed", "5",
          "--t5-length", "77", "--dtype", "float32", "--memory-budget", "off"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_lora_cli")
    pipe = make_tiny_model(root, TinySpec(seed=2))
    state = pipe.transformer.state_dict()
    loras = []
    for seed in (1, 2):
        tensors, _ = random_lora(state, linear_stems(state), dotted_key("transformer."), suffixes=PEFT,
                                 with_alpha=False, seed=seed)  # fmt: skip
        loras.append(save(tensors, root / "loras" / f"style{seed}.safetensors"))
    return root, loras


def pixels(path):
    return np.asarray(Image.open(path))


def test_lora_flags_metadata_and_from_image(tiny, tmp_path, capsys):
    root, (a, b) = tiny
    plain = tmp_path / "plain.png"
    assert main(["--model", str(root), *COMMON, "-o", str(plain)]) == 0
    out = tmp_path / "lora.png"
    assert main(["--model", str(root), *COMMON, "--lora", f"{a}:0.8", "--lora", str(b), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LoRA style1: diffusers/PEFT format, scale 0.8, on transformer" in printed
    records = read_metadata(out)["loras"]
    assert [(r["name"], r["scale"], r["source"]) for r in records] == [("style1", 0.8, str(a)), ("style2", 1.0, str(b))]
    assert all(len(r["sha256"]) == 64 for r in records)
    assert not np.array_equal(pixels(out), pixels(plain))
    again = tmp_path / "again.png"
    assert main(["--from-image", str(out), "--dtype", "float32", "--memory-budget", "off", "-o", str(again)]) == 0
    assert "LoRA style2" in capsys.readouterr().out
    assert np.array_equal(pixels(out), pixels(again))  # the same LoRAs, reapplied from the metadata


def test_lora_strict_off_applies_the_rest(tiny, tmp_path, capsys, caplog):
    from safetensors.torch import load_file, save_file

    root, (a, _) = tiny
    tensors = load_file(str(a))
    stem = "transformer.transformer_blocks.9.attn.to_q"  # the tiny model has 3 blocks
    tensors[stem + ".lora_A.weight"] = tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].clone()
    tensors[stem + ".lora_B.weight"] = tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].clone()
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, str(odd))
    assert main(["--model", str(root), *COMMON, "--lora", str(odd), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "transformer.transformer_blocks.9.attn.to_q" in err and "--lora-strict off" in err
    with caplog.at_level("WARNING"):
        assert main(["--model", str(root), *COMMON, "--quiet", "--lora", str(odd), "--lora-strict", "off",
                     "-o", str(tmp_path / "y.png")]) == 0  # fmt: skip
    assert f"applied {len(tensors) - 2} of {len(tensors)} keys" in caplog.text


@pytest.mark.parametrize("value, message", [("style.pt", "pickle"), ("style.safetensors:nan", "finite"),
                                            ("style.safetensors:inf", "finite")])  # fmt: skip
def test_bad_lora_values_fail_before_loading(value, message, monkeypatch, capsys):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(pipeline_module.SD35Pipeline, "from_pretrained", no_loading)
    assert main(["--model", "/nonexistent", "--prompt", "x", "--lora", value]) == 2
    assert message in capsys.readouterr().err


def test_lora_argument_forms():
    assert parse_lora_arg("a.safetensors") == parse_lora_arg("a.safetensors:1")
    assert parse_lora_arg("owner/repo:file.safetensors:0.5").source == "owner/repo:file.safetensors"
    assert parse_lora_arg("owner/repo:file.safetensors:0.5").scale == 0.5
    assert parse_lora_arg("owner/repo:file.safetensors").source == "owner/repo:file.safetensors"
    with pytest.raises(InputError):
        parse_lora_arg("")


def test_distilling_loras_are_recognised():
    medium = lora_preset("lora_sd3.5m_turbo_8steps.safetensors", "x/lora_sd3.5m_turbo_8steps.safetensors", "0" * 64, SD35_MEDIUM)
    assert (medium.name, medium.steps, medium.cfg) == ("sd3.5-medium-turbo", 8, 1.5)
    assert lora_preset("lora_sd3.5m_4steps.safetensors", "", "0" * 64, SD35_MEDIUM).steps == 4
    turbox = lora_preset("any.safetensors", "tensorart/stable-diffusion-3.5-large-TurboX:x.safetensors", "0" * 64, SD35_LARGE)
    assert (turbox.name, turbox.steps, turbox.shift) == ("sd3.5-large-turbox", 8, 5.0)
    # a Medium LoRA does not turn Large into anything, and other LoRAs change nothing
    assert lora_preset("lora_sd3.5m_turbo_8steps.safetensors", "", "0" * 64, SD35_LARGE) is None
    assert lora_preset("style.safetensors", "style.safetensors", "0" * 64, SD35_MEDIUM) is None


def test_a_distilling_lora_switches_the_defaults_and_says_so(tiny, tmp_path, monkeypatch, capsys):
    root, (a, _) = tiny
    fast = lambda base: replace(base, name="tiny-turbo", steps=1, cfg=1.0, shift=5.0, description="a tiny turbo")  # noqa: E731
    monkeypatch.setattr(pipeline_module, "lora_preset",
                        lambda name, source, sha, base: fast(base) if name == a.name else None)  # fmt: skip
    pipe = pipeline_module.SD35Pipeline.from_pretrained(root, dtype=mx.float32)
    before = pipe.variant
    pipe.load_lora(a)
    assert pipe.variant.name == "tiny-turbo" and pipe.loras[0].preset == "tiny-turbo"
    s = pipe.settings_with_defaults(pipeline_module.GenerationSettings(prompt="x"))
    assert (s.steps, s.cfg, s.shift) == (1, 1.0, 5.0)
    pipe.unload_lora()
    assert pipe.variant is before
    argv = ["--model", str(root), "--prompt", "x", "-W", "32", "-H", "32", "--dtype", "float32",
            "--memory-budget", "off", "--quiet", "--lora", str(a), "-o", str(tmp_path / "t.png")]  # fmt: skip
    assert main(argv) == 0
    assert "makes this a tiny turbo: defaults now 1 steps, cfg 1, shift 5" in capsys.readouterr().out
    assert read_metadata(tmp_path / "t.png")["steps"] == 1


def latents_of(pipe, seed=4):
    from sd35_mlx.pipeline import initial_noise
    from sd35_mlx.settings import GenerationSettings

    s = GenerationSettings(prompt="a red fox", height=32, width=32, steps=2, cfg=3.0, t5_length=77)
    last = None
    for info in pipe.generate_latents(s, noise=initial_noise(seed, 4, 4)):
        last = info
    return np.array(last.latents)


def test_convert_fuses_loras_into_the_16bit_weights(tiny, tmp_path, capsys):
    from sd35_mlx.convert import convert
    from sd35_mlx.convert import main as convert_main
    from sd35_mlx.weights.converted import read_converted_config

    root, (a, b) = tiny
    out = convert(root, tmp_path / "fused", dtype="float32", quantize="none", loras=[f"{a}:0.8", str(b)], quiet=True)
    runtime = pipeline_module.SD35Pipeline.from_pretrained(root, dtype=mx.float32)
    runtime.load_lora(a, scale=0.8)
    runtime.load_lora(b)
    fused = pipeline_module.SD35Pipeline.from_pretrained(out, dtype=mx.float32)
    want = latents_of(runtime)
    assert np.abs(latents_of(fused) - want).max() / np.abs(want).max() <= 1e-4
    recorded = read_converted_config(out)["source"]["fused_loras"]
    assert [(r["name"], r["scale"]) for r in recorded] == [("style1", 0.8), ("style2", 1.0)]
    # --lora needs --fuse-lora; a converted (quantized) folder cannot take one
    assert convert_main(["--hf-path", str(root), "--mlx-path", str(tmp_path / "x"), "--lora", str(a)]) == 2
    assert "--lora and --fuse-lora go together" in capsys.readouterr().err
    with pytest.raises(InputError, match="needs the 16-bit source model"):
        convert(out, tmp_path / "again", loras=[str(a)], quiet=True)
