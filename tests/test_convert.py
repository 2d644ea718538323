"""The converter and the converted format, on the tiny model in every official layout.

- 16-bit conversions equal the unconverted load exactly (parameters, dtypes and outputs),
  from the diffusers folder and from Stability single file + separate text encoders;
- quantized conversions stay within the quantization table's bounds;
- requantizing a converted folder: 16 -> q equals direct conversion exactly; 8 -> 4 is
  within a stated bound of direct 4-bit (see `test_requantize_8_to_4`);
- config.json rebuilds the same networks; newer format versions are refused clearly;
- --drop-t5, --force, failures mid-write, pickles, disk space, bad arguments, upload.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from assets import make_tokenizer_folders
from mlx.utils import tree_flatten
from test_layouts import build_tiny_model

import sd35_mlx.convert as convert_module
from sd35_mlx import loading
from sd35_mlx.convert import convert, default_output_name, main
from sd35_mlx.errors import InputError, SD35Error, WeightFileError
from sd35_mlx.loading import load_component, load_text_encoders, load_transformer
from sd35_mlx.quantize import QuantSpec, parse_quantize, quantizable_layers, quantized_paths
from sd35_mlx.weights import converted
from sd35_mlx.weights.converted import (
    build_network, is_converted, load_converted_component, read_converted_config, save_converted,
)  # fmt: skip

NETWORKS = ("transformer", "vae", "clip_l", "clip_g", "t5")
LICENSE_CARD = (
    "---\nlicense: other\nlicense_name: stabilityai-ai-community\nlicense_link: LICENSE.md\n"
    "tags:\n- text-to-image\n---\n# Tiny SD3.5\n"
)
# rms error of the tiny model's outputs, 4-bit g32 vs 16-bit. Measured: transformer 0.019,
# clip_l 0.075, clip_g 0.126, t5 0.249 (widths of 32–128 and, for T5, random unscaled
# attention make these larger than at real sizes; see benchmarks/results). Bound = ~1.6–2x.
Q4_RMS_BOUND = {"transformer": 0.04, "clip_l": 0.12, "clip_g": 0.2, "t5": 0.4}


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_convert"))


@pytest.fixture(scope="module")
def source(tiny, tmp_path_factory) -> Path:
    """The diffusers folder with tokenizers, a license and a model card, like the official repos."""
    root = tmp_path_factory.mktemp("src") / "stable-diffusion-3.5-tiny"
    shutil.copytree(tiny.diffusers, root)
    make_tokenizer_folders(root)
    (root / "LICENSE.md").write_text("STABILITY AI COMMUNITY LICENSE AGREEMENT (test copy)\n")
    (root / "README.md").write_text(LICENSE_CARD)
    return root


@pytest.fixture(scope="module")
def sai_files(tiny):
    te = tiny.stability / "text_encoders"
    return [str(tiny.sai_file()), str(te / "clip_l.safetensors"), str(te / "clip_g.safetensors"),
            str(te / "t5xxl_fp16.safetensors")]  # fmt: skip


@pytest.fixture(scope="module")
def out16(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c") / "tiny-16"
    convert(str(source), str(out), quantize="none", quiet=True)
    return out


@pytest.fixture(scope="module")
def out4(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c") / "tiny-4"
    convert(str(source), str(out), quantize="transformer=4:32,clip_l=4:32,clip_g=4:32,t5=4:32", quiet=True)
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any network is loaded (errors must come first)."""
    monkeypatch.setattr(loading, "_load_source", lambda *a, **k: pytest.fail("a network was loaded"))
    monkeypatch.setattr(converted, "load_converted_component", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(convert_module, "load_converted_component", lambda *a, **k: pytest.fail("loaded"))


# ---- helpers ---------------------------------------------------------------------------------------
def params(model):
    return dict(tree_flatten(model.parameters()))


def assert_identical(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        assert mx.array_equal(pa[k], pb[k]).item(), k


def run(component: str, model) -> list:
    """Fixed inputs through a network; a list of float32 numpy outputs."""
    k = mx.random.split(mx.random.key(1), 3)
    if component == "transformer":
        out = [model(mx.random.normal((1, 8, 8, 16), key=k[0]), mx.array([500.0]),
                     mx.random.normal((1, 5, 32), key=k[1]), mx.random.normal((1, 192), key=k[2]))]  # fmt: skip
    elif component == "vae":
        out = [model.decode(mx.random.normal((1, 2, 2, 16), key=k[0]))]
    elif component == "t5":
        out = [model(mx.array([[5, 17, 30, 99, 1, 0, 0]]))]
    else:
        out = list(model(mx.array([[0, 5, 17, 300, 999, 2, 2, 2]])))
    return [np.array(o.astype(mx.float32)) for o in out]


def rms_err(a: list, b: list) -> float:
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(a, b))


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---- round trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("component", NETWORKS)
def test_diffusers_16bit_equals_the_unconverted_load(source, out16, component):
    original = load_component(source, component, dtype=mx.bfloat16)
    ours = load_component(out16, component)  # public loader -> converted folder
    assert_identical(ours, original)
    for x, y in zip(run(component, ours), run(component, original)):
        np.testing.assert_array_equal(x, y)


def test_stability_files_16bit_equal_the_unconverted_load(sai_files, tmp_path):
    out = tmp_path / "from-sai"
    convert(sai_files, str(out), quantize="none", dtype="float32", quiet=True)
    config = read_converted_config(out)
    assert config["source"]["layouts"]["transformer"].startswith("Stability")
    for component, file in zip(NETWORKS, sai_files[:1] * 2 + sai_files[1:]):
        original = load_component(file, component, dtype=mx.float32)
        ours = load_converted_component(out, component)
        assert_identical(ours, original)
        for x, y in zip(run(component, ours), run(component, original)):
            np.testing.assert_array_equal(x, y)


def test_the_converted_folder(out16, source):
    names = sorted(p.name for p in out16.iterdir())
    assert names == sorted(["config.json", "README.md", "LICENSE.md", "scheduler", "tokenizer", "tokenizer_2",
                            "tokenizer_3"] + [f"{c}.safetensors" for c in NETWORKS])  # fmt: skip
    config = read_converted_config(out16)
    assert (config["format"], config["format_version"], config["t5"]) == ("sd35_mlx", 1, "present")
    assert config["source"]["path"] == str(source)
    assert config["components"]["t5"]["quantization"] is None
    for c in NETWORKS:  # tensors named exactly tree_flatten(model.parameters()), with metadata
        tensors, meta = mx.load(str(out16 / f"{c}.safetensors"), return_metadata=True)
        assert set(tensors) == set(params(load_converted_component(out16, c)))
        assert (meta["component"], meta["sd35_mlx_format_version"], meta["quantization"]) == (c, "1", "null")
    card = (out16 / "README.md").read_text()
    assert "Stability AI Community License" in card and "license_name: stabilityai-ai-community" in card
    assert "`LICENSE.md`" in card and "license_link: LICENSE.md" in card


def test_config_json_rebuilds_the_same_networks(source, out4):
    config = read_converted_config(out4)
    for c in NETWORKS:
        entry = config["components"][c]
        original = load_component(source, c)
        rebuilt = build_network(c, entry["config"], entry["options"])
        assert rebuilt.config == original.config
        spec = QuantSpec.from_dict(entry["quantization"]) if entry["quantization"] else None
        loaded = load_converted_component(out4, c)
        assert quantized_paths(loaded) == (quantizable_layers(rebuilt, spec) if spec else [])
        shapes = {k: v.shape for k, v in params(loaded).items()}
        assert shapes == {k: v.shape for k, v in mx.load(str(out4 / f"{c}.safetensors")).items()}


def test_quantized_outputs_within_bounds(out16, out4):
    config = read_converted_config(out4)
    assert config["components"]["vae"]["quantization"] is None
    for c in ("transformer", "clip_l", "clip_g", "t5"):
        q = load_converted_component(out4, c)
        assert quantized_paths(q), f"{c}: nothing quantized"
        assert config["components"][c]["quantization"]["bits"] == 4
        err = rms_err(run(c, q), run(c, load_converted_component(out16, c)))
        assert 0 < err <= Q4_RMS_BOUND[c], f"{c}: rms error {err:.3g}"
    sizes = {f.name: f.stat().st_size for f in (*out4.glob("*.safetensors"), *out16.glob("*.safetensors"))}
    assert sum(sizes.values()) > 0
    assert (out4 / "transformer.safetensors").stat().st_size < 0.5 * (out16 / "transformer.safetensors").stat().st_size


def test_sharded_networks_load_the_same(out16, source, tmp_path):
    out = tmp_path / "sharded"
    convert(str(source), str(out), quantize="none", max_shard_bytes=300_000, quiet=True)
    index = json.loads((out / "transformer.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"transformer-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == read_converted_config(out)["components"]["transformer"]["bytes"]
    assert_identical(load_converted_component(out, "transformer"), load_converted_component(out16, "transformer"))


# ---- requantizing ------------------------------------------------------------------------------------
def test_requantize_from_16bit_equals_direct_conversion(out16, out4, tmp_path):
    out = tmp_path / "re"
    convert(str(out16), str(out), quantize="transformer=4:32,clip_l=4:32,clip_g=4:32,t5=4:32", quiet=True)
    for c in NETWORKS:
        assert_identical(load_converted_component(out, c), load_converted_component(out4, c))
    config = read_converted_config(out)
    assert config["source"]["requantized_from"] == str(out16)
    assert (out / "tokenizer_3" / "spiece.model").is_file() and (out / "LICENSE.md").is_file()


def test_dequantize_restores_the_dequantized_weights(out4, tmp_path):
    out = tmp_path / "deq"
    assert main(["--hf-path", str(out4), "--mlx-path", str(out), "-d", "--quiet"]) == 0
    q = load_converted_component(out4, "t5")
    d = load_converted_component(out, "t5")
    assert not quantized_paths(d)
    layer = q.blocks[0].attn.qkv
    expected = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    assert mx.array_equal(d.blocks[0].attn.qkv.weight, expected).item()
    assert read_converted_config(out)["components"]["t5"]["quantization"] is None


def test_requantize_8_to_4(source, out16, out4, tmp_path):
    """8 -> 4 is not bit-identical to 16 -> 4: the 8-bit weights sit up to half an 8-bit step
    (1/510 of a group's range) from the originals, so the 4-bit group min/max move a little
    and values that close to a 4-bit rounding edge land one level over. Measured on this
    model: 1.1–1.7% of the codes move by one level (checked < 5%, never more than one level),
    and the requantized network's error vs 16-bit is within 0.96–1.10x of direct 4-bit's
    (checked ≤ 1.3x). Requantizing from a 16-bit folder is exact (test above)."""
    out8 = tmp_path / "q8"
    convert(str(source), str(out8), quantize="transformer=8:32,clip_l=8:32,clip_g=8:32,t5=8:32", quiet=True)
    out84 = tmp_path / "q84"
    convert(str(out8), str(out84), quantize="transformer=4:32,clip_l=4:32,clip_g=4:32,t5=4:32", quiet=True)
    for c in ("transformer", "clip_l", "clip_g", "t5"):
        direct, requant = load_converted_component(out4, c), load_converted_component(out84, c)
        assert quantized_paths(direct) == quantized_paths(requant)
        codes_differ = []
        for path in quantized_paths(direct):
            a = dict(direct.named_modules())[path]
            b = dict(requant.named_modules())[path]
            wa = mx.dequantize(a.weight, a.scales, a.biases, 32, 4)
            wb = mx.dequantize(b.weight, b.scales, b.biases, 32, 4)
            step = mx.repeat(a.scales, 32, axis=1).astype(mx.float32)
            diff = mx.abs(wa.astype(mx.float32) - wb.astype(mx.float32)) / step
            assert mx.max(diff).item() <= 1.25, f"{c}.{path}: a weight moved more than one 4-bit level"
            codes_differ.append(mx.mean(diff > 0.5).item())
        assert max(codes_differ) < 0.05, codes_differ
        ref = run(c, load_converted_component(out16, c))
        e_direct, e_requant = rms_err(run(c, direct), ref), rms_err(run(c, requant), ref)
        assert e_requant <= 1.3 * e_direct, (c, e_direct, e_requant)


def test_requantize_in_place_with_force(out4, tmp_path):
    folder = tmp_path / "inplace"
    shutil.copytree(out4, folder)
    convert(str(folder), str(folder), quantize="t5=8:32", force=True, quiet=True)
    assert read_converted_config(folder)["components"]["t5"]["quantization"]["bits"] == 8
    assert run("t5", load_converted_component(folder, "t5"))[0].shape == (1, 7, 32)
    assert leftovers(tmp_path) == []


# ---- options -------------------------------------------------------------------------------------------
def test_drop_t5(source, tmp_path):
    out = tmp_path / "no-t5"
    convert(str(source), str(out), drop_t5=True, quiet=True)
    config = read_converted_config(out)
    assert config["t5"] == "dropped" and "t5" not in config["components"]
    assert not (out / "t5.safetensors").exists() and not (out / "tokenizer_3").exists()
    assert load_text_encoders(out).t5 is None
    with pytest.raises(WeightFileError, match="--drop-t5"):
        load_converted_component(out, "t5")


def test_float16_keeps_t5_in_bfloat16(source, tmp_path, capsys):
    out = tmp_path / "fp16"
    convert(str(source), str(out), dtype="float16", quantize="none")
    assert "T5-XXL overflows in float16" in capsys.readouterr().out
    config = read_converted_config(out)
    assert config["components"]["t5"]["dtype"] == "bfloat16"
    assert config["components"]["transformer"]["dtype"] == "float16"


def test_default_output_name(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    convert(str(source), quiet=True)
    assert (tmp_path / "stable-diffusion-3.5-tiny-mlx-t5-4bit").is_dir()
    q4 = {c: QuantSpec(4) for c in ("transformer", "clip_l", "clip_g", "t5")}
    assert default_output_name(["org/sd3.5-large"], q4, False) == "sd3.5-large-mlx-4bit"
    assert default_output_name(["x/sd3.5_medium.safetensors"], {}, True) == "sd3.5_medium-mlx-no-t5"
    assert default_output_name(["y-mlx-t5-4bit"], parse_quantize("transformer=8"), False) == \
        "y-mlx-transformer-8bit-t5-4bit"


def test_cli_summary(source, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--hf-path", str(source), "--mlx-path", str(out), "-q", "--q-group-size", "32"]) == 0
    text = capsys.readouterr().out
    for c in NETWORKS:
        assert f"  {c}" in text
    assert "4-bit g32" in text and "total" in text and "M params" in text
    # the tiny T5's feed-forward output layer has input width 48: not a multiple of 32
    assert "of the t5's weights stay 16-bit: their input widths are not multiples of group size 32" in text
    assert all(s["quantization"] for c, s in read_converted_config(out)["components"].items() if c != "vae")


# ---- safety ----------------------------------------------------------------------------------------------
def test_existing_output_is_not_touched_without_force(source, tmp_path, no_loading):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="already exists; it was not touched"):
        convert(str(source), str(out), quiet=True)
    assert main(["--hf-path", str(source), "--mlx-path", str(out)]) == 2
    assert sorted(os.listdir(out)) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


def test_force_replaces_a_converted_folder_only_when_complete(source, out4, tmp_path):
    out = tmp_path / "forced"
    shutil.copytree(out4, out)
    (out / "old-marker.txt").write_text("old")
    convert(str(source), str(out), quantize="none", force=True, quiet=True)
    assert not (out / "old-marker.txt").exists() and is_converted(out)
    assert read_converted_config(out)["components"]["t5"]["quantization"] is None
    assert leftovers(tmp_path) == []


def test_force_never_replaces_other_folders(source, tmp_path, monkeypatch, no_loading):
    mine = tmp_path / "my-documents"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    with pytest.raises(InputError, match="not a converted sd35_mlx folder; --force only replaces"):
        convert(str(source), str(mine), force=True, quiet=True)
    monkeypatch.chdir(mine)
    with pytest.raises(InputError, match="refusing to replace"):
        convert(str(source), ".", force=True, quiet=True)
    assert (mine / "thesis.txt").read_text() == "precious"


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_mid_write_leaves_nothing(source, out4, tmp_path, monkeypatch, exc, existing):
    out = tmp_path / "fails"
    if existing:
        shutil.copytree(out4, out)
        (out / "mine.txt").write_text("old")
        before = sorted(os.listdir(out))
    calls = []
    real = mx.save_safetensors

    def save_then_fail(path, arrays, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # transformer and vae written, then clip_l fails
            raise exc
        real(path, arrays, metadata=metadata)

    monkeypatch.setattr(converted.mx, "save_safetensors", save_then_fail)
    with pytest.raises(type(exc)):
        convert(str(source), str(out), force=existing, quiet=True)
    assert len(calls) == 3
    assert leftovers(tmp_path) == []
    if existing:
        assert sorted(os.listdir(out)) == before and (out / "mine.txt").read_text() == "old"
        assert read_converted_config(out)["components"]["t5"]["quantization"]["bits"] == 4
    else:
        assert not out.exists()


def test_a_killed_conversions_temp_folder_is_cleaned_up(source, tmp_path):
    stale = tmp_path / ".killed.tmp-999999999"  # no such process
    stale.mkdir()
    (stale / "transformer.safetensors").write_bytes(b"half")
    convert(str(source), str(tmp_path / "killed"), quiet=True)
    assert not stale.exists() and is_converted(tmp_path / "killed")


@pytest.mark.parametrize("name", ["sd3.5_large.ckpt", "model.bin", "weights.pt"])
def test_pickle_inputs_are_refused(tmp_path, name, no_loading):
    f = tmp_path / name
    f.write_bytes(b"\x80\x02}q\x00.")  # a pickle
    with pytest.raises(WeightFileError, match="refusing to read a pickle"):
        convert(str(f), str(tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists()


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "sd3.5_large.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(WeightFileError, match="pickle"):
        convert(str(tmp_path / "m"), str(tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists()


def test_not_enough_disk_space(source, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    monkeypatch.setattr(convert_module, "save_converted", lambda *a, **k: pytest.fail("writing started"))
    with pytest.raises(SD35Error, match=r"not enough free disk space .* needs about 0\.\d+ GB, .* has 0\.00 GB free"):
        convert(str(source), str(tmp_path / "full"), quiet=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--quantize", "vae=4"], "VAE is never quantized"),
        (["--quantize", "t5=7"], "bits in"),
        (["--q-bits", "8"], "only apply with -q"),
        (["-q", "--q-mode", "mxfp4", "--q-group-size", "64"], "group sizes \\[32\\]"),
        (["-d", "-q"], "cannot be combined"),
        (["--upload-repo", "not a repo"], "must look like 'user/name'"),
    ],
)
def test_bad_arguments_fail_before_loading(source, tmp_path, argv, message, no_loading, capsys):
    try:
        code = main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "o"), *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_missing_input(tmp_path, no_loading):
    with pytest.raises(InputError, match="no such file or folder"):
        convert(str(tmp_path / "nope"), str(tmp_path / "o"), quiet=True)


def test_a_single_file_without_text_encoders_says_what_to_pass(tiny, tmp_path):
    with pytest.raises(WeightFileError, match="pass the text encoder files too"):
        convert(str(tiny.sai_file()), str(tmp_path / "o"), quiet=True)
    assert not (tmp_path / "o").exists()


def test_newer_format_version_is_refused_clearly(out16, tmp_path):
    folder = tmp_path / "future"
    shutil.copytree(out16, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(format_version=2, sd35_mlx_version="9.0")
    (folder / "config.json").write_text(json.dumps(config))
    assert is_converted(folder)
    with pytest.raises(WeightFileError, match=r"sd35_mlx 9\.0 in converted-format version 2; .* reads up to version 1"):
        load_transformer(folder)
    with pytest.raises(WeightFileError, match="reads up to version 1"):
        convert(str(folder), str(tmp_path / "o"), quiet=True)


def test_save_converted_directly_and_its_checks(source, tmp_path):
    clip = load_component(source, "clip_l")
    out = save_converted(tmp_path / "direct", {"clip_l": clip}, quantization={"clip_l": QuantSpec(8, 32)})
    assert quantized_paths(load_converted_component(out, "clip_l"))
    q = load_component(source, "clip_g")
    from sd35_mlx.quantize import quantize_network

    quantize_network(q, QuantSpec(4, 32), "clip_g")
    with pytest.raises(SD35Error, match="no quantization spec was given"):
        save_converted(tmp_path / "bad", {"clip_g": q})
    with pytest.raises(SD35Error, match="not as the spec says"):
        save_converted(tmp_path / "bad", {"clip_g": q}, quantization={"clip_g": QuantSpec(8, 32)})
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []


def test_upload(source, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, repo_type, exist_ok):
            calls.append(("create", repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            calls.append(("upload", sorted(os.listdir(folder_path)), repo_id))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "up"
    convert(str(source), str(out), upload_repo="me/tiny-mlx", token="t0k", quiet=True)
    assert calls[0] == ("token", "t0k") and calls[1] == ("create", "me/tiny-mlx", True)
    assert calls[2][0] == "upload" and "config.json" in calls[2][1] and calls[2][2] == "me/tiny-mlx"
    assert 'from_pretrained("me/tiny-mlx")' in (out / "README.md").read_text()


# ---- from the Hub (a local stand-in server) ---------------------------------------------------------------
def test_from_a_repo_id_and_requantize_a_converted_repo(source, out16, tmp_path, monkeypatch):
    from hub_server import FakeHub, point_huggingface_hub_at

    files = lambda folder: {p.relative_to(folder).as_posix(): p.read_bytes()  # noqa: E731
                            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip
    hub = FakeHub().start()
    try:
        hub.add_repo("tiny-org/sd35-tiny", files(source))
        hub.add_repo("me/sd35-tiny-mlx", files(out16))
        point_huggingface_hub_at(monkeypatch, hub.url, tmp_path / "hf_home")
        out = tmp_path / "from-hub"
        convert("tiny-org/sd35-tiny", str(out), quantize="none", quiet=True)
        config = read_converted_config(out)
        assert config["source"] == {**config["source"], "repo_id": "tiny-org/sd35-tiny", "revision": None}
        card = (out / "README.md").read_text()
        assert "base_model: tiny-org/sd35-tiny" in card and "Stability AI Community License" in card
        assert (out / "LICENSE.md").is_file() and (out / "tokenizer_2" / "vocab.json").is_file()
        downloaded = set(hub.downloads("tiny-org/sd35-tiny"))
        assert not any(".fp16" in f or f.startswith("vae copy/") for f in downloaded)
        for c in NETWORKS:
            assert_identical(load_converted_component(out, c), load_converted_component(out16, c))
        # a converted repo is requantized
        out2 = tmp_path / "from-converted-hub"
        convert("me/sd35-tiny-mlx", str(out2), quantize="t5=8:32", quiet=True)
        assert read_converted_config(out2)["components"]["t5"]["quantization"]["bits"] == 8
    finally:
        hub.stop()
