"""Repo id -> local snapshot: only the needed files, the cache, offline use, actionable errors.

No network: `hub_server.FakeHub` plays the Hub on 127.0.0.1 and huggingface_hub is pointed
at it (and at a fresh cache per test). The repos it serves hold the tiny model of
test_layouts.py in the official layout, with every trap of the official repos.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Dict, Set

import mlx.core as mx
import pytest
from assets import make_tokenizer_folders
from hub_server import FakeHub, point_huggingface_hub_at, set_offline
from test_layouts import TinyModel, build_tiny_model, params

from sd35_mlx.errors import SD35Error
from sd35_mlx.hub import files_to_download, resolve_model_path
from sd35_mlx.loading import load_text_encoders, load_tokenizers, load_transformer, load_vae

REPO = "tiny-org/sd35-tiny"
GATED = "tiny-org/sd35-gated"
SAI_ONLY = "tiny-org/sd35-single-file"
CONVERTED = "tiny-org/sd35-tiny-mlx"
GOOD_TOKEN = "hf_accepted_licence"


def repo_files(folder: Path) -> Dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModel:
    model = build_tiny_model(tmp_path_factory.mktemp("tiny_hub"))
    make_tokenizer_folders(model.both)
    extras = {".gitattributes": "*.safetensors filter=lfs\n", "LICENSE.md": "licence\n",
              "SD3.5M_example_workflow.json": "{}", "text_encoders/README.md": "encoders\n"}  # fmt: skip
    for name, text in extras.items():
        (model.both / name).write_text(text)
    return model


@pytest.fixture(scope="module")
def converted_folder(tiny, tmp_path_factory) -> Path:
    convert = pytest.importorskip("sd35_mlx.convert").convert
    out = tmp_path_factory.mktemp("converted") / "sd35-tiny-mlx"
    return convert(tiny.both, out, dtype="float32", quantize="none", quiet=True)


@pytest.fixture(scope="module")
def server(tiny, converted_folder):
    hub = FakeHub().start()
    hub.add_repo(REPO, repo_files(tiny.both))
    hub.add_repo(GATED, repo_files(tiny.both), gated=True, accepted_tokens=(GOOD_TOKEN,))
    hub.add_repo(SAI_ONLY, {**repo_files(tiny.stability), "README.md": b"single file\n"})
    hub.add_repo(CONVERTED, repo_files(converted_folder))
    yield hub
    hub.stop()


@pytest.fixture
def hub(server, tmp_path, monkeypatch) -> FakeHub:
    point_huggingface_hub_at(monkeypatch, server.url, tmp_path / "hf_home")
    server.clear()
    return server


def needed_by_diffusers_loading(files) -> Set[str]:
    """What a full diffusers load needs, written independently of sd35_mlx.hub's rules."""
    def unneeded(f: str) -> bool:
        return (".fp16" in f or f.startswith(("vae copy/", "text_encoders/"))
                or ("/" not in f and f != "model_index.json"))  # fmt: skip

    return {f for f in files if not unneeded(f)}


def snapshot_files(folder: Path) -> Set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def resolve_requests(hub: FakeHub):
    return [r for r in hub.requests if "/resolve/" in r.path]


# ------------------------------------------------------------------ what is downloaded
def test_only_the_needed_files_are_downloaded(hub, tiny):
    folder = resolve_model_path(REPO)
    expected = needed_by_diffusers_loading(hub.repos[REPO].files)
    assert any(f.startswith("tokenizer_3/") for f in expected) and "transformer/config.json" in expected
    assert snapshot_files(folder) == expected
    requested, downloaded = set(hub.requested(REPO)), hub.downloads(REPO)
    assert requested == expected
    assert not any(".fp16" in f or "vae copy" in f or f.startswith("text_encoders/") for f in requested)
    assert "sd3.5_tiny.safetensors" not in requested
    # every weight file came once; identical files (tokenizer_2 = tokenizer vocab) only once at all
    assert set(downloaded) <= expected and len(downloaded) == len(set(downloaded))
    assert {f for f in expected if f.endswith(".safetensors")} <= set(downloaded)


def test_the_second_resolve_hits_the_cache(hub):
    first = resolve_model_path(REPO)
    hub.clear()
    assert resolve_model_path(REPO) == first
    assert resolve_requests(hub) == []  # no file request at all, not even a HEAD


def test_loaders_download_per_component(hub, tiny):
    vae = load_vae(REPO)
    assert set(hub.requested()) == {"model_index.json", "scheduler/scheduler_config.json",
                                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}  # fmt: skip
    assert all(mx.array_equal(params(vae)[k], v).item() for k, v in tiny.expected["vae"].items())
    hub.clear()
    transformer = load_transformer(REPO)
    assert {f.split("/")[0] for f in hub.requested()} == {"transformer"}
    assert all(mx.array_equal(params(transformer)[k], v).item() for k, v in tiny.expected["transformer"].items())
    hub.clear()
    enc = load_text_encoders(REPO, t5=False)
    assert {f.split("/")[0] for f in hub.requested()} == {"text_encoder", "text_encoder_2"}
    assert enc.t5 is None
    hub.clear()
    toks = load_tokenizers(REPO)
    assert {f.split("/")[0] for f in hub.requested()} == {"tokenizer", "tokenizer_2", "tokenizer_3"}
    assert toks.t5 is not None


def test_stability_only_repo(hub, tiny):
    folder = resolve_model_path(SAI_ONLY)
    assert snapshot_files(folder) == {"sd3.5_tiny.safetensors", "text_encoders/clip_l.safetensors",
                                      "text_encoders/clip_g.safetensors", "text_encoders/t5xxl_fp16.safetensors"}  # fmt: skip
    model = load_transformer(SAI_ONLY)
    assert all(mx.array_equal(params(model)[k], v).item() for k, v in tiny.expected["transformer"].items())


def test_converted_repo_downloads_per_network(hub, tiny, converted_folder):
    vae = load_vae(CONVERTED)
    assert set(hub.requested()) == {"config.json", "scheduler/scheduler_config.json", "vae.safetensors"}
    assert all(mx.array_equal(params(vae)[k], v).item() for k, v in tiny.expected["vae"].items())
    hub.clear()
    enc = load_text_encoders(CONVERTED)
    assert set(hub.requested()) == {"clip_l.safetensors", "clip_g.safetensors", "t5.safetensors"}
    assert all(mx.array_equal(params(enc.t5)[k], v).item() for k, v in tiny.expected["t5"].items())


def test_converted_listing_without_its_config():
    files = ["config.json", "README.md", "transformer-00001-of-00002.safetensors",
             "transformer-00002-of-00002.safetensors", "transformer.safetensors.index.json",
             "vae.safetensors", "t5.safetensors", "tokenizer/vocab.json"]  # fmt: skip
    assert files_to_download(files, ["transformer"]) == [
        "config.json", "transformer-00001-of-00002.safetensors", "transformer-00002-of-00002.safetensors",
        "transformer.safetensors.index.json",
    ]
    config = {"components": {"vae": {"files": ["vae.safetensors"]}}, "tokenizers": {"clip_l": "tokenizer"}}
    assert files_to_download(files, ["vae", "t5", "tokenizers"], config) == [
        "config.json", "tokenizer/vocab.json", "vae.safetensors"]  # t5 not in its config: nothing


# ------------------------------------------------------------------ offline
def test_offline_works_from_the_cache(hub, monkeypatch, tiny):
    online = resolve_model_path(REPO)
    hub.clear()
    set_offline(monkeypatch, True)
    assert resolve_model_path(REPO) == online
    assert resolve_model_path(REPO, components=("vae",)) == online
    vae = load_vae(REPO)
    assert all(mx.array_equal(params(vae)[k], v).item() for k, v in tiny.expected["vae"].items())
    assert hub.requests == []


def test_offline_without_the_tree_listing_cache(hub, monkeypatch):
    """Older huggingface_hub keeps no listing: the snapshot folder itself is the list."""
    online = resolve_model_path(REPO, components=("vae",))
    for trees in Path(online).parents[1].glob("trees"):
        shutil.rmtree(trees)
    set_offline(monkeypatch, True)
    assert resolve_model_path(REPO, components=("vae",)) == online


def test_offline_with_nothing_cached(hub, monkeypatch):
    set_offline(monkeypatch, True)
    with pytest.raises(SD35Error) as e:
        resolve_model_path(REPO)
    message = str(e.value)
    assert "HF_HUB_OFFLINE=1 is set" in message and "not in the Hugging Face cache" in message
    assert "unset HF_HUB_OFFLINE" in message and "local copy" in message
    assert hub.requests == []


def test_offline_with_another_component_cached(hub, monkeypatch):
    resolve_model_path(REPO, components=("vae",))
    set_offline(monkeypatch, True)
    with pytest.raises(SD35Error, match=r"HF_HUB_OFFLINE=1 is set and tiny-org/sd35-tiny \(transformer\) is not in"):
        resolve_model_path(REPO, components=("transformer",))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def test_no_network(hub, monkeypatch, tmp_path):
    online = resolve_model_path(REPO, components=("vae",))
    point_huggingface_hub_at(monkeypatch, closed_port_url(), tmp_path / "hf_home")  # same cache
    assert resolve_model_path(REPO, components=("vae",)) == online
    with pytest.raises(SD35Error, match=r"could not be reached .*ConnectError.* is not in the Hugging Face cache"):
        resolve_model_path("tiny-org/never-downloaded")


# ------------------------------------------------------------------ errors
def test_gated_repo_without_token(hub):
    with pytest.raises(SD35Error) as e:
        resolve_model_path(GATED, components=("vae",))
    message = str(e.value)
    assert f"{hub.url}/{GATED}" in message and "accept the licence" in message
    assert "No Hugging Face token was found" in message and "hf auth login" in message
    assert "Traceback" not in message and e.value.__cause__ is None


def test_gated_repo_with_a_token_not_granted(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(SD35Error, match=rf"gated model.*{hub.url}/{GATED} .*not been granted access"):
        resolve_model_path(GATED, components=("vae",))


def test_gated_repo_with_access(hub):
    folder = resolve_model_path(GATED, components=("vae",), token=GOOD_TOKEN)
    assert "vae/diffusion_pytorch_model.safetensors" in snapshot_files(folder)


def test_repo_not_found(hub):
    with pytest.raises(SD35Error) as e:
        resolve_model_path("stabilityai/stable-diffusion-3.5-medum")
    message = str(e.value)
    assert "'stabilityai/stable-diffusion-3.5-medum' was not found" in message
    assert "Check the spelling" in message and "stabilityai/stable-diffusion-3.5-medium" in message
    assert "hf auth login" in message


def test_revision_not_found(hub):
    with pytest.raises(SD35Error, match="has no revision 'v2'"):
        resolve_model_path(REPO, revision="v2")


def test_local_paths_are_returned_as_they_are(hub, tiny, tmp_path):
    assert resolve_model_path(tiny.diffusers) == tiny.diffusers
    assert resolve_model_path(str(tiny.sai_file())) == tiny.sai_file()
    assert hub.requests == []
    with pytest.raises(SD35Error, match="no such file or folder"):
        resolve_model_path(tmp_path / "missing" / "model")
    with pytest.raises(SD35Error, match="not a Hugging Face repo id"):
        resolve_model_path("not a repo")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(SD35Error, match="refusing to read a pickle"):
        resolve_model_path(pickle)


# ------------------------------------------------------------------ the official file lists
SD35_LARGE_FILES = """.gitattributes LICENSE.md README.md SD3.5L_example_workflow.json mmdit.png sd3.5_large.safetensors
model_index.json scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.fp16.safetensors text_encoder/model.safetensors
text_encoder_2/config.json text_encoder_2/model.fp16.safetensors text_encoder_2/model.safetensors
text_encoder_3/config.json text_encoder_3/model-00001-of-00002.safetensors text_encoder_3/model-00002-of-00002.safetensors
text_encoder_3/model.fp16-00001-of-00002.safetensors text_encoder_3/model.fp16-00002-of-00002.safetensors
text_encoder_3/model.safetensors.index.fp16.json text_encoder_3/model.safetensors.index.json
text_encoders/README.md text_encoders/clip_g.safetensors text_encoders/clip_l.safetensors
text_encoders/t5xxl_fp16.safetensors text_encoders/t5xxl_fp8_e4m3fn.safetensors
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json tokenizer_2/tokenizer_config.json tokenizer_2/vocab.json
tokenizer_3/special_tokens_map.json tokenizer_3/spiece.model tokenizer_3/tokenizer.json tokenizer_3/tokenizer_config.json
transformer/config.json transformer/diffusion_pytorch_model-00001-of-00002.safetensors
transformer/diffusion_pytorch_model-00002-of-00002.safetensors transformer/diffusion_pytorch_model.safetensors.index.json
vae/config.json vae/diffusion_pytorch_model.safetensors""".split()  # the official repo's listing

SD35_MEDIUM_EXTRA = ["vae copy/config.json", "vae copy/diffusion_pytorch_model.safetensors"]


def test_official_large_listing():
    wanted = files_to_download(SD35_LARGE_FILES)
    assert set(wanted) == needed_by_diffusers_loading(SD35_LARGE_FILES)
    assert files_to_download(SD35_LARGE_FILES, ["t5"]) == [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder_3/config.json",
        "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors",
        "text_encoder_3/model.safetensors.index.json",
    ]  # fmt: skip


def test_official_medium_listing():
    files = [f for f in SD35_LARGE_FILES if not f.startswith("transformer/diffusion_pytorch_model")]
    files = [f.replace("large", "medium") for f in files] + SD35_MEDIUM_EXTRA
    files.append("transformer/diffusion_pytorch_model.safetensors")
    wanted = files_to_download(files, ["transformer", "vae"])
    assert wanted == ["model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                      "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                      "vae/diffusion_pytorch_model.safetensors"]  # fmt: skip


def test_stability_repo_listing():
    files = ["README.md", "sd3_medium.safetensors", "sd3_medium_incl_clips.safetensors",
             "sd3_medium_incl_clips_t5xxlfp8.safetensors", "text_encoders/clip_g.safetensors",
             "text_encoders/clip_l.safetensors", "text_encoders/t5xxl_fp16.safetensors",
             "text_encoders/t5xxl_fp8_e4m3fn.safetensors"]  # fmt: skip
    assert files_to_download(files) == [
        "sd3_medium.safetensors", "text_encoders/clip_g.safetensors", "text_encoders/clip_l.safetensors",
        "text_encoders/t5xxl_fp16.safetensors",
    ]
    with pytest.raises(SD35Error, match="several single-file checkpoints"):
        files_to_download(["a.safetensors", "b.safetensors"], ["transformer"])
