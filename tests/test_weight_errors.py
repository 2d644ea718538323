"""Broken or mismatched weight files give errors that name the file, the key(s) and the layout.

Generic checks of `read_header`, `load_tensors`, `apply_rules` and `check_against_model`
(through `load_network`), with tiny CLIP files as the vehicle.
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reference import save_state_dict
from test_clip import hf_state_dict, make_reference

from sd35_mlx.config import CLIPConfig
from sd35_mlx.errors import WeightFileError, WeightMappingError
from sd35_mlx.models.clip import CLIPTextEncoder
from sd35_mlx.weights.mapping import apply_rules, check_against_model, load_network
from sd35_mlx.weights.safetensors_file import load_tensors, read_header
from sd35_mlx.weights.tables import clip as tables

HF = {"hidden_act": "gelu"}  # toy width 128: name the activation


@pytest.fixture(scope="module")
def state() -> dict:
    return hf_state_dict(make_reference("gelu", True, seed=11))


def _write(tmp_path: Path, state: dict, name: str = "clip_g.safetensors") -> Path:
    return save_state_dict(state, tmp_path / name)


def _load(path: Path, layout=tables.STABILITY, **kw):
    return tables.load_clip(load_tensors(path), layout, files=[str(path)], hf_config=HF, **kw)


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


# ---- file level: read_header / load_tensors ----
def test_truncated_file_names_file_and_cut_tensors(tmp_path, state):
    path = _write(tmp_path, state)
    infos, _ = read_header(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    data_left = len(data) - 1000 - 8 - _header_length(path)
    header = json.loads(data[8 : 8 + _header_length(path)])
    cut = {k for k, e in header.items() if k != "__metadata__" and e["data_offsets"][1] > data_left}
    assert cut  # the test really cut into a tensor
    for reader in (read_header, load_tensors):
        with pytest.raises(WeightFileError) as e:
            reader(path)
        msg = str(e.value)
        assert str(path) in msg and "truncated" in msg
        assert any(f"'{k}'" in msg for k in cut)


def test_file_shorter_than_its_header_length(tmp_path, state):
    path = _write(tmp_path, state)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightFileError, match=f"{path}.*(truncated|corrupt)"):
        read_header(path)


def test_corrupt_header(tmp_path, state):
    path = _write(tmp_path, state)
    data = bytearray(path.read_bytes())
    n = _header_length(path)
    data[8 : 8 + n] = b"\xff" * n  # not JSON, same length
    path.write_bytes(bytes(data))
    for reader in (read_header, load_tensors):
        with pytest.raises(WeightFileError, match="corrupt") as e:
            reader(path)
        assert str(path) in str(e.value)


def test_header_entry_without_offsets(tmp_path, state):
    path = _write(tmp_path, state)
    data = path.read_bytes()
    n = _header_length(path)
    header = json.loads(data[8 : 8 + n])
    key = "text_projection.weight"
    del header[key]["data_offsets"]
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) < n
    raw = raw.ljust(n)  # padded with spaces, as the format allows
    path.write_bytes(data[:8] + raw + data[8 + n :])
    with pytest.raises(WeightFileError, match="corrupt header entry") as e:
        read_header(path)
    assert str(path) in str(e.value) and key in str(e.value)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "sd3_medium.ckpt"])
def test_pickle_checkpoints_are_refused(tmp_path, state, name):
    path = tmp_path / name
    torch.save({"state_dict": {"text_projection.weight": state["text_projection.weight"]}}, path)
    for reader in (read_header, load_tensors):
        with pytest.raises(WeightFileError, match="pickle") as e:
            reader(path)
        assert str(path) in str(e.value) and "safetensors" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(WeightFileError, match="no such weight file"):
        load_tensors(tmp_path / "clip_l.safetensors")


# ---- mapping level: apply_rules / check_against_model through load_network ----
def _assert_names(err: pytest.ExceptionInfo, path: Path, layout, *keys: str) -> None:
    msg = str(err.value)
    assert str(path) in msg, msg
    assert f"layout assumed: {layout.name}" in msg, msg
    for k in keys:
        assert k in msg, (k, msg)


def test_missing_parameter(tmp_path, state):
    key = "text_model.encoder.layers.1.layer_norm2.bias"
    path = _write(tmp_path, {k: v for k, v in state.items() if k != key})
    with pytest.raises(WeightMappingError, match="missing keys") as e:
        _load(path)
    _assert_names(e, path, tables.STABILITY, "layers.1.norm2.bias")


def test_missing_part_of_a_fused_tensor(tmp_path, state):
    key = "text_model.encoder.layers.0.self_attn.k_proj.weight"
    path = _write(tmp_path, {k: v for k, v in state.items() if k != key})
    with pytest.raises(WeightMappingError, match="incomplete") as e:
        _load(path)
    _assert_names(e, path, tables.STABILITY, key, "layers.0.attn.qkv.weight")


def test_unexpected_source_key(tmp_path, state):
    key = "text_model.encoder.layers.0.self_attn.rotary_emb.weight"
    path = _write(tmp_path, {**state, key: torch.zeros(4)})
    with pytest.raises(WeightMappingError, match="unexpected keys") as e:
        _load(path)
    _assert_names(e, path, tables.STABILITY, key)


def test_unexpected_parameter_for_the_given_config(tmp_path, state):
    path = _write(tmp_path, state)
    # apply_rules on its own: a clean mapping, then a config with one layer fewer than the file
    mapped = apply_rules(
        load_tensors(path), tables.RULES, layout=tables.STABILITY.name, files=[str(path)]
    )
    fewer_layers = replace(tables.infer_config(mapped, HF), num_layers=2)
    with pytest.raises(WeightMappingError, match="unexpected keys") as e:
        _load(path, config=fewer_layers)
    _assert_names(e, path, tables.STABILITY, "layers.2.mlp.fc1.weight")


def test_wrong_shape(tmp_path, state):
    key = "text_model.encoder.layers.2.mlp.fc1.weight"
    path = _write(tmp_path, {**state, key: torch.zeros(300, 128)})  # layer 0 says 256
    with pytest.raises(WeightMappingError, match="wrong shapes") as e:
        _load(path)
    _assert_names(e, path, tables.STABILITY, "layers.2.mlp.fc1.weight", "(300, 128)", "(256, 128)")


def test_check_against_model_directly(state):
    model = CLIPTextEncoder(
        CLIPConfig(hidden_size=128, num_layers=1, num_heads=2, intermediate_size=256)
    )
    with pytest.raises(WeightMappingError) as e:
        weights = {"final_norm.weight": model.final_norm.weight, "bogus": model.final_norm.bias}
        check_against_model(model, weights, layout="my layout", files=["x.safetensors"])
    msg = str(e.value)
    assert "x.safetensors" in msg and "my layout" in msg and "bogus" in msg
    assert "missing keys: final_norm.bias" in msg


def test_wrong_layout_for_an_all_in_one_file(tmp_path, state):
    """A single file read as if it were a bare SAI encoder file: every key is foreign."""
    prefixed = {f"text_encoders.clip_g.transformer.{k}": v for k, v in state.items()}
    path = _write(tmp_path, prefixed, "sd3_medium_incl_clips.safetensors")
    with pytest.raises(WeightMappingError, match="unexpected keys") as e:
        _load(path)
    _assert_names(
        e,
        path,
        tables.STABILITY,
        "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight",
    )
    # and the matching layout loads it
    model = load_network(
        load_tensors(path), tables.single_file("clip_g"), CLIPTextEncoder,
        lambda w: tables.infer_config(w, HF), files=[str(path)],
    )  # fmt: skip
    assert model.config.projection_dim == 128
