"""Malformed model files give one clear error naming the file and the field (issue 9, part 2).

Configs with wrong types, absurd sizes or NaN (diffusers config.json and our converted
config.json), damaged tokenizer files: each an `SD35Error` subclass, never a TypeError,
JSONDecodeError or a library's bare Exception, and never an attempt to build what they ask.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from assets import make_tokenizer_folders

from sd35_mlx.errors import InputError, SD35Error, WeightFileError
from sd35_mlx.loading import load_tokenizers, load_vae
from sd35_mlx.weights.converted import FORMAT, load_converted_component, read_converted_config

TRANSFORMER = {"depth": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 2, "in_channels": 16,
               "out_channels": 16, "context_dim": 64, "pooled_dim": 40, "pos_embed_max_size": 16,
               "qk_norm": True, "dual_attention_layers": [], "mlp_ratio": 4}  # fmt: skip


def converted_folder(tmp_path: Path, mutate) -> Path:
    folder = tmp_path / "conv"
    folder.mkdir(exist_ok=True)
    entry = {"class": "MMDiT", "config": dict(TRANSFORMER), "options": {}, "dtype": "bfloat16",
             "quantization": None, "files": ["transformer.safetensors"], "parameters": 1, "bytes": 1}  # fmt: skip
    config = {"format": FORMAT, "format_version": 1, "sd35_mlx_version": "0.1.0", "variant": None,
              "components": {"transformer": entry}, "tokenizers": {}, "source": {}, "t5": "present"}  # fmt: skip
    mutate(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def entry(**changes):
    return lambda c: c["components"]["transformer"].update(changes)


def model_config(**changes):
    return lambda c: c["components"]["transformer"]["config"].update(changes)


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda c: c["components"].update(transformer=[1]), "components.transformer must be an object"),
        (lambda c: c["components"].update(unet={}), "components.unet: unknown component"),
        (entry(files="transformer.safetensors"), "files must be a list of file names"),
        (entry(files=[1]), "files must be a list of file names"),
        (entry(files=["../../etc/passwd"]), "files must be a list of file names inside the folder"),
        (entry(files=["/etc/passwd"]), "inside the folder"),
        (entry(quantization=[4]), "quantization: a quantization entry must be an object"),
        (entry(quantization={"bits": "four", "group_size": 64}), "bits must be a whole number"),
        (entry(quantization={"bits": 4}), "lacks group_size"),
        (entry(quantization={"bits": 4, "group_size": 64, "keep": "all"}), "keep a list of names"),
        (entry(config=[1]), "config must be an object"),
        (entry(options=[1]), "options must be an object"),
        (entry(dtype="float8"), "dtype must be bfloat16"),
        (entry(parameters="many"), "parameters must be a whole number"),
        (lambda c: c.update(variant=5), "'variant' must be a str"),
        (lambda c: c.update(t5=["x"]), "'t5' must be a str"),
    ],
)
def test_converted_config_entries(mutate, expect, tmp_path):
    folder = converted_folder(tmp_path, mutate)
    with pytest.raises(WeightFileError, match=expect.replace("(", r"\(")) as e:
        read_converted_config(folder)
    assert str(folder / "config.json") in str(e.value)


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (model_config(depth=10**9), "MMDiTConfig.depth must be a whole number between 0 and 1024"),  # ran out of memory
        (model_config(depth="2"), "MMDiTConfig.depth must be a whole number"),
        (model_config(hidden_size=-5), "MMDiTConfig.hidden_size must be a whole number"),
        (model_config(hidden_size=2**40), "MMDiTConfig.hidden_size must be a whole number"),
        (model_config(qk_norm="yes"), "MMDiTConfig.qk_norm must be true or false"),
        (model_config(dual_attention_layers=5), "must be a list of whole numbers"),
        (model_config(dual_attention_layers=["a"]), "must be a whole number"),
        (model_config(colour="red"), "unknown MMDiTConfig fields"),
    ],
)
def test_converted_network_configs_are_checked_before_building(mutate, expect, tmp_path):
    folder = converted_folder(tmp_path, mutate)
    with pytest.raises(WeightFileError, match=expect) as e:
        load_converted_component(folder, "transformer")
    assert str(folder / "config.json") in str(e.value)


@pytest.fixture(scope="module")
def tokenizer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    make_tokenizer_folders(root)
    return root


@pytest.mark.parametrize(
    "file, content, expect",
    [
        ("tokenizer/vocab.json", b"{garbage", "Cannot read the tokenizer in"),
        ("tokenizer/vocab.json", b"[1, 2]", "Cannot read the tokenizer in"),
        ("tokenizer/merges.txt", b"\xff\xfe\x00\x01 garbage", "Cannot read the tokenizer in"),
        ("tokenizer_2/tokenizer_config.json", b"[1]", "expected a JSON object, found a list"),
        ("tokenizer_2/special_tokens_map.json", b"\xff\xfe", "Cannot read tokenizer file"),
        ("tokenizer_3/spiece.model", b"not a sentencepiece model", "Cannot read the tokenizer in"),
        ("tokenizer_3/tokenizer_config.json", b'{"added_tokens_decoder": [1]}', "Cannot read the tokenizer in"),
    ],
)
def test_damaged_tokenizer_files(file, content, expect, tokenizer_root, tmp_path):
    root = tmp_path / "model"
    shutil.copytree(tokenizer_root, root)
    (root / file).write_bytes(content)
    with pytest.raises(InputError, match=expect) as e:
        load_tokenizers(root)
    assert str(root / Path(file).parent) in str(e.value)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """Only a tiny diffusers VAE folder (the whole tiny model takes far longer to write)."""
    from diffusers import AutoencoderKL
    from reference import randomize

    root = tmp_path_factory.mktemp("tiny_files")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
    randomize(vae, seed=3)
    vae.save_pretrained(root / "vae")
    return root


@pytest.mark.parametrize(
    "key, value, expect",
    [
        ("scaling_factor", "big", "scaling_factor must be a number"),
        ("scaling_factor", float("nan"), "scaling_factor must be a finite number"),
        ("shift_factor", float("inf"), "shift_factor must be a finite number"),
        ("norm_num_groups", "four", "norm_num_groups must be a whole number"),
    ],
)
def test_diffusers_vae_config_fields(key, value, expect, tiny_vae, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(tiny_vae / "vae", root / "vae")
    cfg = root / "vae" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), key: value}))
    with pytest.raises(SD35Error, match=expect) as e:
        load_vae(root / "vae")
    assert "vae config.json" in str(e.value) and str(root / "vae") in str(e.value)
