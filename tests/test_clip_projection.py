"""CLIP-L's text_projection check (docs/text_encoders_clip.md): SD3 means the pooled CLIP-L vector unprojected.

Diffusers' text_encoder/ stores a projection that should be the identity; we apply it as
stored (as diffusers does) and warn (CLIPProjectionWarning) when it is not the identity.
Tiny CLIPs (width 128) from test_clip; the converter runs on test_layouts' tiny model.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
import torch
from reference import save_state_dict
from safetensors.torch import load_file
from test_clip import BF16_BOUND, EOS, assert_parity, hf_state_dict, make_reference, token_ids
from test_layouts import build_tiny_model

from sd35_mlx.config import CLIPConfig
from sd35_mlx.convert import convert
from sd35_mlx.errors import CLIPProjectionWarning
from sd35_mlx.loading import load_component, load_text_encoders
from sd35_mlx.models.clip import CLIPTextEncoder
from sd35_mlx.weights.tables import clip as tables

TOL = tables.IDENTITY_TOLERANCE  # 2^-7


def write_encoder(folder: Path, ref, dtype: torch.dtype = torch.float32) -> Path:
    """A diffusers component folder: config.json (as the hub has it) + model.safetensors."""
    ref.config.save_pretrained(folder)
    return save_state_dict({k: v.to(dtype) for k, v in hf_state_dict(ref).items()}, folder / "model.safetensors")


def clip_l_reference(projection: torch.Tensor | None, seed: int = 0):
    ref = make_reference("quick_gelu", True, seed=seed)
    if projection is not None:
        with torch.no_grad():
            ref.text_projection.weight.copy_(projection)
    return ref


@contextmanager
def silent():
    """Any CLIPProjectionWarning inside fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CLIPProjectionWarning)
        yield


def near_identity_bf16() -> torch.Tensor:
    w = torch.eye(128)
    w[3, 3] = 1 - 2**-8  # the bf16 neighbour below 1: one rounding step
    w[7, 7] = 1 + 2**-7  # the bf16 neighbour above 1
    return w


# ---- loading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "projection, dtype",
    [
        (torch.eye(128), torch.float16),  # what diffusers stores (exact in every float format)
        (torch.eye(128), torch.bfloat16),
        (near_identity_bf16(), torch.bfloat16),  # within tolerance: ||W - I||_2 = 2^-7
    ],
)
def test_identity_projection_loads_silently(tmp_path, projection, dtype):
    ref = clip_l_reference(projection)
    write_encoder(tmp_path / "text_encoder", ref, dtype)
    with silent():
        model = load_component(tmp_path / "text_encoder", "clip_l")
    assert "text_projection" in model  # kept and applied: the same numbers as diffusers
    assert tables.projection_deviation(model) <= TOL
    assert_parity(model, ref, token_ids(pad=EOS), bound=BF16_BOUND)  # 16-bit weights


def test_just_outside_the_tolerance_warns(tmp_path):
    w = torch.eye(128)
    w[0, 1] = 2**-6  # one off-diagonal entry: moves the pooled vector by up to 2^-6 of its norm
    write_encoder(tmp_path / "text_encoder", clip_l_reference(w))
    with pytest.warns(CLIPProjectionWarning, match="not the identity"):
        model = load_component(tmp_path / "text_encoder", "clip_l")
    assert tables.projection_deviation(model) == pytest.approx(2**-6)


def test_random_projection_warns_and_still_matches_transformers(tmp_path):
    ref = make_reference("quick_gelu", True, seed=1)  # randomize(): a learned-looking projection
    path = write_encoder(tmp_path / "text_encoder", ref)
    with pytest.warns(CLIPProjectionWarning) as record:
        model = load_component(tmp_path / "text_encoder", "clip_l")
    [w] = [w for w in record if issubclass(w.category, CLIPProjectionWarning)]
    message = str(w.message)
    for expected in (str(path), "not the identity", "unprojected pooled CLIP-L vector",
                     "Stability's reference", "applies the projection as stored, as diffusers does"):  # fmt: skip
        assert expected in message, message
    # applied as stored: equal to CLIPTextModelWithProjection's text_embeds (fp32, <= 1e-4)
    assert_parity(model, ref, token_ids(pad=EOS))


def test_warned_once_per_file_and_never_for_clip_g(tmp_path):
    write_encoder(tmp_path / "text_encoder", make_reference("quick_gelu", True, seed=2))
    write_encoder(tmp_path / "text_encoder_2", make_reference("gelu", True, seed=3))  # random, learned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own default: once per text and call site
        first = load_text_encoders(tmp_path, t5=False)
        load_text_encoders(tmp_path, t5=False)
    ours = [str(w.message) for w in caught if issubclass(w.category, CLIPProjectionWarning)]
    assert len(ours) == 1
    assert "text_encoder/model.safetensors" in ours[0] and "text_encoder_2" not in ours[0]
    assert tables.projection_deviation(first.clip_g) > 1  # CLIP-G's is far from I: not checked


def test_stability_clip_l_without_projection_is_silent(tmp_path):
    ref = make_reference("quick_gelu", False, seed=4)
    path = save_state_dict(hf_state_dict(ref), tmp_path / "text_encoders" / "clip_l.safetensors")
    with silent():
        model = load_component(path, "clip_l")
    assert "text_projection" not in model and tables.projection_deviation(model) is None
    assert_parity(model, ref, token_ids(pad=EOS))


def test_quantized_and_non_square_projections():
    config = CLIPConfig(hidden_size=64, num_layers=1, num_heads=1, intermediate_size=64,
                        vocab_size=10, max_positions=4, projection_dim=64)  # fmt: skip
    model = CLIPTextEncoder(config)
    model.text_projection.weight = mx.eye(64, dtype=mx.bfloat16)
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: p == "text_projection")
    assert isinstance(model.text_projection, nn.QuantizedLinear)
    assert tables.projection_deviation(model) <= TOL  # 4-bit identity: 15 * bf16(1/15) ~ 1
    assert tables.clip_l_projection_note(model, "x") is None

    model = CLIPTextEncoder(config)  # random init
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: p == "text_projection")
    assert "not the identity" in tables.clip_l_projection_note(model, "x")

    wide = CLIPTextEncoder(CLIPConfig(**{**config.to_dict(), "projection_dim": 32}))
    assert "maps 64 -> 32 features" in tables.clip_l_projection_note(wide, "x")


# ---- converter -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_projection"), identity_clip_l_projection=False)


@pytest.fixture(scope="module")
def identity_source(tiny, tmp_path_factory) -> Path:
    """The same model with CLIP-L's projection set to the identity, as diffusers stores it."""
    root = tmp_path_factory.mktemp("identity") / "model"
    shutil.copytree(tiny.diffusers, root)
    path = root / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    state["text_projection.weight"] = torch.eye(state["text_projection.weight"].shape[0])
    save_state_dict(state, path)
    return root


def notes(text: str) -> list:
    return [line for line in text.splitlines() if "Note: CLIP-L text encoder" in line]


def test_converter_reports_it_once_without_failing(tiny, tmp_path, capsys):
    with silent():  # the converter reports it itself: no warning escapes (it would fail here)
        out = convert(str(tiny.diffusers), str(tmp_path / "out"), quantize="none")
    [note] = notes(capsys.readouterr().out)
    assert "text_encoder/model.safetensors" in note and "not the identity" in note
    assert "clip_l" in json.loads((out / "config.json").read_text())["components"]  # converted as stored

    # loading the converted folder warns (the projection is kept as stored) ...
    with pytest.warns(CLIPProjectionWarning, match="converted folder"):
        load_component(out, "clip_l")
    # ... and requantizing it reports it again
    capsys.readouterr()
    convert(str(out), str(tmp_path / "re"))
    [note] = notes(capsys.readouterr().out)
    assert f"converted folder {out}" in note


def test_quiet_converter_logs_it(tiny, tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="sd35_mlx.convert"):
        convert(str(tiny.diffusers), str(tmp_path / "out"), quantize="none", quiet=True)
    assert capsys.readouterr().out == ""
    assert sum("text_projection is not the identity" in r.getMessage() for r in caplog.records) == 1


def test_converter_and_loading_are_silent_for_an_identity(identity_source, tmp_path, capsys):
    with silent():
        out = convert(str(identity_source), str(tmp_path / "out"), quantize="none")
        clip_l = load_component(out, "clip_l")
    assert notes(capsys.readouterr().out) == []
    assert tables.projection_deviation(clip_l) == 0.0
