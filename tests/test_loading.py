"""The public loaders load the same networks from every layout.

"Expected" weights come from the diffusers files mapped by the tables directly (no layout
detection involved); every loader result must equal them exactly — parameters and outputs.
Decoys in the tiny model hold negated weights, so picking a wrong file cannot pass.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from assets import make_tokenizer_folders
from mlx.utils import tree_flatten
from test_layouts import TinyModel, build_tiny_model, params

from sd35_mlx import loading
from sd35_mlx.components import component_dtype
from sd35_mlx.convert import convert
from sd35_mlx.errors import SD35Error, WeightFileError
from sd35_mlx.loading import load_text_encoders, load_tokenizers, load_transformer, load_vae
from sd35_mlx.weights.layouts import resolve_components
from sd35_mlx.weights.tables import clip, mmdit, t5, vae


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_loading"))


def assert_same_params(model, expected, skip=()):
    got = params(model)
    want = {k: v for k, v in expected.items() if k not in skip}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert mx.array_equal(got[k], v).item(), f"{k} differs: a wrong file or layout was loaded"


def reference_network(component: str, tiny: TinyModel):
    """The network built from the expected weights by the tables alone."""
    build = {"transformer": lambda w: mmdit.MMDiT(mmdit.infer_config(w)),
             "vae": lambda w: vae.VAE(vae.infer_config(w, tiny.hf_configs["vae"])),
             "clip_l": lambda w: clip.CLIPTextEncoder(clip.infer_config(w, tiny.hf_configs["clip_l"])),
             "clip_g": lambda w: clip.CLIPTextEncoder(clip.infer_config(w, tiny.hf_configs["clip_g"])),
             "t5": lambda w: t5.T5Encoder(t5.infer_config(w, tiny.hf_configs["t5"]))}  # fmt: skip
    weights = tiny.expected[component]
    model = build[component](weights)
    model.load_weights(list(weights.items()), strict=True)
    return model


def transformer_out(model) -> np.ndarray:
    k = mx.random.split(mx.random.key(1), 3)
    latents = mx.random.normal((1, 8, 8, 16), key=k[0])
    context = mx.random.normal((1, 5, 32), key=k[1])
    pooled = mx.random.normal((1, 192), key=k[2])
    return np.array(model(latents, mx.array([500.0]), context, pooled))


def vae_out(model) -> np.ndarray:
    z = mx.random.normal((1, 2, 2, 16), key=mx.random.key(2))
    return np.array(model.decode(z))


IDS = mx.array([[0, 5, 17, 300, 999, 2, 2, 2]])


# ------------------------------------------------------------------ transformer
LAYOUT_PATHS = {
    "diffusers-root": lambda t: t.diffusers,
    "component-folder": lambda t: t.diffusers / "transformer",
    "shard-file": lambda t: sorted((t.diffusers / "transformer").glob("*-00001-of-*.safetensors"))[0],
    "stability-file": lambda t: t.sai_file(),
    "stability-folder": lambda t: t.stability,
    "all-in-one-file": lambda t: t.all_in_one,
    "snapshot-with-both": lambda t: t.both,
}


@pytest.mark.parametrize("where", list(LAYOUT_PATHS))
def test_load_transformer(tiny, where):
    model = load_transformer(LAYOUT_PATHS[where](tiny))
    assert_same_params(model, tiny.expected["transformer"])
    assert model.config == reference_network("transformer", tiny).config


def test_transformer_outputs_match_across_layouts(tiny):
    reference = transformer_out(reference_network("transformer", tiny))
    for path in (tiny.diffusers, tiny.sai_file(), tiny.both):
        np.testing.assert_array_equal(transformer_out(load_transformer(path)), reference)


def test_dtype_is_applied(tiny):
    model = load_transformer(tiny.sai_file(), dtype=mx.bfloat16)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}


# ------------------------------------------------------------------ VAE
@pytest.mark.parametrize(
    "where", [w for w in LAYOUT_PATHS if w not in ("shard-file", "component-folder")] + ["vae-folder", "bare-sai-vae"]
)
def test_load_vae(tiny, where, tmp_path):
    if where == "vae-folder":
        path = tiny.diffusers / "vae"
    elif where == "bare-sai-vae":  # a VAE-only Stability file (no first_stage_model. prefix)
        tensors = mx.load(str(tiny.sai_file()))
        path = tmp_path / "sd3_vae.safetensors"
        prefix = "first_stage_model."
        mx.save_safetensors(str(path), {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    else:
        path = LAYOUT_PATHS[where](tiny)
    model = load_vae(path)
    assert_same_params(model, tiny.expected["vae"])
    reference = reference_network("vae", tiny)
    assert model.config == reference.config
    np.testing.assert_array_equal(vae_out(model), vae_out(reference))


def test_the_wrong_component_folder_says_what_it_holds(tiny):
    with pytest.raises(WeightFileError, match=r"transformer: no VAE there \(it holds the MMDiT transformer\)"):
        load_vae(tiny.diffusers / "transformer")


def test_load_vae_reads_no_other_network(tiny, monkeypatch):
    opened = []
    real = loading.load_tensors
    monkeypatch.setattr(loading, "load_tensors", lambda p: opened.append(Path(p)) or real(p))
    for name in ("load_mmdit",):
        monkeypatch.setattr(mmdit, name, lambda *a, **k: pytest.fail("the transformer was built"))
    for name in ("load_clip",):
        monkeypatch.setattr(clip, name, lambda *a, **k: pytest.fail("a text encoder was built"))
    monkeypatch.setattr(t5, "load_t5", lambda *a, **k: pytest.fail("T5 was built"))
    load_vae(tiny.both)
    assert opened == [tiny.both / "vae" / "diffusion_pytorch_model.safetensors"]


# ------------------------------------------------------------------ text encoders
TEXT_PATHS = {
    "diffusers-root": lambda t: t.diffusers,
    "snapshot-with-both": lambda t: t.both,
    "stability-folder": lambda t: t.stability,
    "text_encoders-folder": lambda t: t.stability / "text_encoders",
    "all-in-one-file": lambda t: t.all_in_one,
}
STABILITY_PATHS = {"stability-folder", "text_encoders-folder", "all-in-one-file"}


@pytest.mark.parametrize("where", list(TEXT_PATHS))
def test_load_text_encoders(tiny, where):
    enc = load_text_encoders(TEXT_PATHS[where](tiny))
    # Stability's clip_l file has no text_projection (docs/loading.md); everything else is identical.
    skip_l = ("text_projection.weight",) if where in STABILITY_PATHS else ()
    assert_same_params(enc.clip_l, tiny.expected["clip_l"], skip=skip_l)
    assert_same_params(enc.clip_g, tiny.expected["clip_g"])
    assert_same_params(enc.t5, tiny.expected["t5"])  # fp16 files stay fp16 (T5 computes in fp32)
    for name in ("clip_l", "clip_g"):
        ref = reference_network(name, tiny)
        got, want = getattr(enc, name)(IDS), ref(IDS)
        np.testing.assert_array_equal(np.array(got.hidden), np.array(want.hidden))
        if name == "clip_g" or not skip_l:
            np.testing.assert_array_equal(np.array(got.pooled), np.array(want.pooled))
    np.testing.assert_array_equal(np.array(enc.t5(IDS % 100)), np.array(reference_network("t5", tiny)(IDS % 100)))


def test_without_t5_nothing_of_t5_is_loaded(tiny, monkeypatch):
    monkeypatch.setattr(t5, "load_t5", lambda *a, **k: pytest.fail("T5 was loaded"))
    enc = load_text_encoders(tiny.diffusers, t5=False)
    assert enc.t5 is None and enc.clip_l is not None and enc.clip_g is not None


def test_model_without_t5_gives_none(tiny, tmp_path, caplog):
    folder = tmp_path / "no_t5"
    shutil.copytree(tiny.diffusers, folder, ignore=shutil.ignore_patterns("text_encoder_3"))
    with caplog.at_level(logging.WARNING, logger="sd35_mlx"):
        enc = load_text_encoders(folder)
    assert enc.t5 is None
    assert "no T5-XXL text encoder found" in caplog.text


def test_t5_never_runs_in_float16(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="sd35_mlx"):
        enc = load_text_encoders(tiny.diffusers, dtype=mx.float16)
    assert {v.dtype for _, v in tree_flatten(enc.t5.parameters())} == {mx.bfloat16}
    assert {v.dtype for _, v in tree_flatten(enc.clip_l.parameters())} == {mx.float16}
    assert "T5-XXL overflows in float16" in caplog.text and "bfloat16 instead" in caplog.text
    out = enc.t5(IDS % 100)
    assert bool(mx.all(mx.isfinite(out)).item())


def test_missing_clip_says_what_is_there(tiny):
    with pytest.raises(WeightFileError, match=r"no CLIP-L text encoder there \(it holds the MMDiT transformer, the VAE\)"):
        load_text_encoders(tiny.sai_file())


# ------------------------------------------------------------------ tokenizers
@pytest.fixture(scope="module")
def tokenizer_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokenizers")
    make_tokenizer_folders(root)
    return root


def test_load_tokenizers(tokenizer_root, tiny, tmp_path):
    toks = load_tokenizers(tokenizer_root)
    assert toks.clip_l.pad_id == 49407 and toks.clip_g.pad_id == 0  # docs/text.md
    assert toks.t5 is not None
    # a Stability file kept next to the tokenizer folders finds them
    shutil.copytree(tokenizer_root, tmp_path / "model")
    shutil.copy(tiny.sai_file(), tmp_path / "model")
    assert load_tokenizers(tmp_path / "model" / "sd3.5_tiny.safetensors").t5 is not None
    shutil.rmtree(tmp_path / "model" / "tokenizer_3")
    assert load_tokenizers(tmp_path / "model").t5 is None


def test_stability_files_carry_no_tokenizers(tiny):
    with pytest.raises(WeightFileError, match="no tokenizer/ and tokenizer_2/ folders.*load_tokenizers"):
        load_tokenizers(tiny.stability)


# ------------------------------------------------------------------ plumbing
def test_converted_folders_go_to_the_converted_loader(tmp_path, monkeypatch):
    calls = []

    def fake_load(folder, component, dtype=None):
        calls.append((component, component_dtype(component, dtype, warn=False)))
        return component

    monkeypatch.setattr(loading, "load_converted_component", fake_load)
    (tmp_path / "config.json").write_text('{"format": "sd35_mlx", "format_version": 1, "components": {}}')
    assert load_transformer(tmp_path, dtype=mx.bfloat16) == "transformer"
    enc = load_text_encoders(tmp_path, dtype=mx.float16)
    assert (enc.clip_l, enc.clip_g, enc.t5) == ("clip_l", "clip_g", "t5")
    assert calls == [("transformer", mx.bfloat16), ("clip_l", mx.float16), ("clip_g", mx.float16), ("t5", mx.bfloat16)]
    with pytest.raises(SD35Error, match="converted sd35_mlx folder"):
        resolve_components(tmp_path)


def test_a_real_converted_folder(tiny, tmp_path):
    out = convert(tiny.both, tmp_path / "converted", dtype="float32", quantize="none", quiet=True)
    assert_same_params(load_transformer(out), tiny.expected["transformer"])
    assert_same_params(load_vae(out), tiny.expected["vae"])
    enc = load_text_encoders(out, t5=False)
    assert enc.t5 is None
    assert_same_params(enc.clip_g, tiny.expected["clip_g"])


def test_a_tensor_in_two_files_is_an_error(tiny, tmp_path):
    a = tiny.diffusers / "text_encoder" / "model.safetensors"
    b = shutil.copy(a, tmp_path / "copy.safetensors")
    with pytest.raises(WeightFileError, match="duplicate each other"):
        loading._tensors([a, Path(b)])


def test_missing_local_path(tmp_path):
    with pytest.raises(SD35Error, match="no such file or folder"):
        load_vae(tmp_path / "nothing-here")
