"""Layout detection: which files and which layout each network comes from, for every official
layout (docs/loading.md) and their traps, decided from safetensors headers only.

The tiny model built here (also used by test_loading.py and test_hub.py) is written in every
layout from one set of weights. Decoys hold *negated* weights — the `*.fp16*` duplicates,
`vae copy/`, and the Stability files next to the diffusers folders — so a loader that picks
one of them produces different numbers, not just a different file name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import pytest
import torch
from mlx.utils import tree_flatten
from reference import randomize, save_state_dict

from sd35_mlx.errors import SD35Error, WeightFileError
from sd35_mlx.weights import layouts
from sd35_mlx.weights.layouts import resolve_component, resolve_components
from sd35_mlx.weights.mapping import _regex, apply_rules, conv_to_nhwc, concat, identity, squeeze_1x1
from sd35_mlx.weights.safetensors_file import load_tensors
from sd35_mlx.weights.tables import clip, mmdit, t5, vae

CONTEXT_DIM = 32


# ------------------------------------------------------------------ the tiny model, every layout
def reference_modules(seed: int = 0, identity_clip_l_projection: bool = True) -> Dict[str, torch.nn.Module]:
    """Tiny torch reference networks; widths that Stability files (no config.json) can load:
    heads of 64, VAE channels divisible by 32 GroupNorm groups."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_common = dict(vocab_size=1000, max_position_embeddings=77, intermediate_size=96,
                       num_hidden_layers=2, bos_token_id=0, eos_token_id=2)  # legacy eos, as official  # fmt: skip
    modules = dict(
        transformer=SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=64, num_attention_heads=2, joint_attention_dim=CONTEXT_DIM,
            caption_projection_dim=128, pooled_projection_dim=64 + 128, pos_embed_max_size=8,
            qk_norm="rms_norm", dual_attention_layers=(0,)),  # fmt: skip
        vae=AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),  # fmt: skip
        clip_l=CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=64, num_attention_heads=1, hidden_act="quick_gelu", projection_dim=64, **clip_common)),  # fmt: skip
        clip_g=CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=128, num_attention_heads=2, hidden_act="gelu", projection_dim=128, **clip_common)),  # fmt: skip
        t5=T5EncoderModel(T5Config(
            vocab_size=100, d_model=CONTEXT_DIM, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
            feed_forward_proj="gated-gelu")),  # fmt: skip
    )
    for i, m in enumerate(modules.values()):
        randomize(m, seed=seed * 10 + i).eval()
    if identity_clip_l_projection:  # as in the official diffusers text_encoder/
        with torch.no_grad():
            modules["clip_l"].text_projection.weight.copy_(torch.eye(modules["clip_l"].text_projection.weight.shape[0]))
    modules["t5"] = modules["t5"].half()  # the official T5 files are fp16
    return modules


def invert_rules(weights: Dict[str, mx.array], layout) -> Dict[str, mx.array]:
    """Our-named weights -> the layout's source names (for layouts without when/rename rules).

    Checked by mapping the result forward again: it must give back exactly `weights`.
    """
    inverse = {
        identity: lambda w, n: [w],
        concat: lambda w, n: mx.split(w, n, axis=0),
        conv_to_nhwc: lambda w, n: [w.transpose(0, 3, 1, 2)],
        squeeze_1x1: lambda w, n: [w.reshape(*w.shape, 1, 1) if w.ndim == 2 else w],
    }
    out: Dict[str, mx.array] = {}
    for name, value in weights.items():
        for rule in layout.rules:
            m = _regex(rule.target).match(name)
            if m is None:
                continue
            assert rule.when is None and rule.rename is None, "layout not invertible here"
            sources = [layout.prefix + s.format(**m.groupdict()) for s in rule.sources]
            out.update(zip(sources, inverse[rule.transform](value, len(sources)), strict=True))
            break
        else:
            raise AssertionError(f"no rule of {layout.name} makes {name}")
    forward = apply_rules(out, layout.rules, layout=layout.name, prefix=layout.prefix, ignore=layout.ignore)
    assert forward.keys() == weights.keys()
    assert all(mx.array_equal(forward[k], weights[k]).item() for k in weights)
    return out


def params(model) -> Dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def to_mx(state: Dict[str, torch.Tensor]) -> Dict[str, mx.array]:
    return {k: mx.array(v.detach().numpy()) for k, v in state.items()}


def negated(tensors: Dict[str, mx.array]) -> Dict[str, mx.array]:
    return {k: -v if mx.issubdtype(v.dtype, mx.floating) else v for k, v in tensors.items()}


def write_negated_copy(src: Path, dst: Path) -> None:
    """`dst` = `src` with every tensor negated (same names, shapes, dtypes): a decoy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst), negated(load_tensors(src)))


MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    "image_encoder": [None, None], "feature_extractor": [None, None],
}  # fmt: skip


@dataclass
class TinyModel:
    diffusers: Path  # official diffusers folder, with its traps (fp16 duplicates, vae copy/)
    stability: Path  # Stability folder: sd3.5_tiny.safetensors + text_encoders/
    all_in_one: Path  # one Stability file with text_encoders.* inside
    both: Path  # repo snapshot: diffusers folders + (negated) Stability files
    expected: Dict[str, Dict[str, mx.array]]  # our-named weights of each network
    hf_configs: Dict[str, dict]  # each diffusers component's config.json

    def sai_file(self) -> Path:
        return self.stability / "sd3.5_tiny.safetensors"


def _diffusers_folder(root: Path, modules) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(root / "scheduler")
    modules["transformer"].save_pretrained(root / "transformer", max_shard_size="1MB")  # sharded, as Large
    modules["vae"].save_pretrained(root / "vae")
    modules["clip_l"].save_pretrained(root / "text_encoder")
    modules["clip_g"].save_pretrained(root / "text_encoder_2")
    modules["t5"].save_pretrained(root / "text_encoder_3", max_shard_size="40KB")
    # The traps of the official repos (docs/loading.md).
    for sub in ("text_encoder", "text_encoder_2"):
        write_negated_copy(root / sub / "model.safetensors", root / sub / "model.fp16.safetensors")
    te3 = root / "text_encoder_3"
    index = json.loads((te3 / "model.safetensors.index.json").read_text())
    renamed = {}
    for shard in sorted(set(index["weight_map"].values())):
        fp16_name = shard.replace("model-", "model.fp16-")
        write_negated_copy(te3 / shard, te3 / fp16_name)
        renamed[shard] = fp16_name
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (te3 / "model.safetensors.index.fp16.json").write_text(json.dumps(index))
    shutil.copytree(root / "vae", root / "vae copy")
    write_negated_copy(root / "vae" / "diffusion_pytorch_model.safetensors",
                       root / "vae copy" / "diffusion_pytorch_model.safetensors")  # fmt: skip
    (root / "README.md").write_text("tiny test model\n")


def _merged(folder: Path, stem: str) -> Dict[str, mx.array]:
    """Read a component folder the way the official layout is documented (index, else one file)."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.exists():
        out: Dict[str, mx.array] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_tensors(folder / shard))
        return out
    return load_tensors(folder / f"{stem}.safetensors")


def _stability_tensors(expected, modules) -> Dict[str, Dict[str, mx.array]]:
    """Stability-named tensors: the MMDiT and VAE through the inverted tables, encoders as HF names."""
    clip_l = to_mx(modules["clip_l"].state_dict())
    del clip_l["text_projection.weight"]  # SAI clip_l.safetensors has no projection (docs/loading.md)
    t5_sd = to_mx(modules["t5"].state_dict())
    t5_sd["encoder.embed_tokens.weight"] = t5_sd["shared.weight"]  # SAI t5xxl_fp16 has both
    return dict(
        transformer=invert_rules(expected["transformer"], mmdit.STABILITY),
        vae=invert_rules(expected["vae"], vae.STABILITY),
        clip_l=clip_l,
        clip_g=to_mx(modules["clip_g"].state_dict()),
        t5=t5_sd,
    )


def _write_stability(folder: Path, sai: Dict[str, Dict[str, mx.array]], negate: bool = False) -> None:
    sign = negated if negate else (lambda x: x)
    (folder / "text_encoders").mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "sd3.5_tiny.safetensors"), sign({**sai["transformer"], **sai["vae"]}))
    mx.save_safetensors(str(folder / "text_encoders" / "clip_l.safetensors"), sign(sai["clip_l"]))
    mx.save_safetensors(str(folder / "text_encoders" / "clip_g.safetensors"), sign(sai["clip_g"]))
    mx.save_safetensors(str(folder / "text_encoders" / "t5xxl_fp16.safetensors"), sign(sai["t5"]))
    # the fp8 T5 of the official repos: never chosen (fp8 is not supported)
    fp8 = {k: torch.from_numpy(v.astype(mx.float32).__array__()).to(torch.float8_e4m3fn) for k, v in sai["t5"].items()}
    save_state_dict(fp8, folder / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors")


def build_tiny_model(base: Path, seed: int = 0, identity_clip_l_projection: bool = True) -> TinyModel:
    base = Path(base)
    modules = reference_modules(seed, identity_clip_l_projection)
    dif = base / "diffusers"
    _diffusers_folder(dif, modules)
    hf = {c: json.loads((dif / sub / "config.json").read_text()) for c, sub in layouts.DIFFUSERS_FOLDERS.items()}
    expected = {
        "transformer": params(mmdit.load_mmdit(_merged(dif / "transformer", "diffusion_pytorch_model"), mmdit.DIFFUSERS)),
        "vae": params(vae.load_vae(_merged(dif / "vae", "diffusion_pytorch_model"), vae.DIFFUSERS, hf_config=hf["vae"])),
        "clip_l": params(clip.load_clip(_merged(dif / "text_encoder", "model"), clip.DIFFUSERS, hf_config=hf["clip_l"])),
        "clip_g": params(clip.load_clip(_merged(dif / "text_encoder_2", "model"), clip.DIFFUSERS, hf_config=hf["clip_g"])),
        "t5": params(t5.load_t5(_merged(dif / "text_encoder_3", "model"), t5.DIFFUSERS, hf_config=hf["t5"])),
    }  # fmt: skip
    sai = _stability_tensors(expected, modules)
    _write_stability(base / "stability", sai)

    all_in_one = base / "sd3_tiny_incl_clips.safetensors"
    packed = {**sai["transformer"], **sai["vae"], "loss.dummy": mx.zeros((1,))}
    for name, which in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5", "t5xxl")):
        packed.update({f"text_encoders.{which}.transformer.{k}": v for k, v in sai[name].items()})
    mx.save_safetensors(str(all_in_one), packed)

    both = base / "both"
    shutil.copytree(dif, both)
    _write_stability(both, sai, negate=True)  # decoys: the diffusers folders must win
    return TinyModel(dif, base / "stability", all_in_one, both, expected, hf)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


# ------------------------------------------------------------------ tests
def files_of(sources) -> Dict[str, List[str]]:
    return {c: [f.name for f in s.files] for c, s in sources.items()}


def rel(paths: List[Path], root: Path) -> List[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_the_tiny_model_has_the_official_traps(tiny):
    te3 = sorted(p.name for p in (tiny.diffusers / "text_encoder_3").iterdir())
    assert "model.safetensors.index.json" in te3 and "model.safetensors.index.fp16.json" in te3
    assert sum(n.startswith("model.fp16-") for n in te3) == sum(n.startswith("model-") for n in te3) >= 2
    assert len(list((tiny.diffusers / "transformer").glob("diffusion_pytorch_model-*-of-*.safetensors"))) >= 2
    assert (tiny.diffusers / "vae copy" / "diffusion_pytorch_model.safetensors").is_file()


def test_diffusers_folder(tiny):
    sources = resolve_components(tiny.diffusers)
    assert set(sources) == set(layouts.COMPONENTS)
    root = tiny.diffusers
    index = json.loads((root / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
    assert rel(sources["transformer"].files, root) == sorted(f"transformer/{s}" for s in set(index["weight_map"].values()))
    assert rel(sources["vae"].files, root) == ["vae/diffusion_pytorch_model.safetensors"]
    assert rel(sources["clip_l"].files, root) == ["text_encoder/model.safetensors"]
    assert rel(sources["clip_g"].files, root) == ["text_encoder_2/model.safetensors"]
    t5_files = rel(sources["t5"].files, root)
    assert len(t5_files) >= 2 and all(f.startswith("text_encoder_3/model-") for f in t5_files)
    assert {c: s.layout for c, s in sources.items()} == {
        "transformer": mmdit.DIFFUSERS, "vae": vae.DIFFUSERS, "clip_l": clip.DIFFUSERS,
        "clip_g": clip.DIFFUSERS, "t5": t5.DIFFUSERS,
    }  # fmt: skip
    for c, s in sources.items():
        assert s.hf_config == tiny.hf_configs[c]


def test_only_the_requested_components_are_opened(tiny, monkeypatch):
    opened = []
    real = layouts.read_header
    monkeypatch.setattr(layouts, "read_header", lambda p: opened.append(Path(p)) or real(p))
    sources = resolve_components(tiny.diffusers, ["vae"])
    assert list(sources) == ["vae"]
    assert {p.parent.name for p in opened} == {"vae"}


def test_no_tensor_data_is_read(tiny, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("layout detection must read headers only")

    monkeypatch.setattr(mx, "load", refuse)
    for path in (tiny.diffusers, tiny.stability, tiny.all_in_one, tiny.both):
        assert resolve_components(path)


@pytest.mark.parametrize(
    "sub, component",
    [("transformer", "transformer"), ("vae", "vae"), ("text_encoder", "clip_l"),
     ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5"), ("vae copy", "vae")],
)  # fmt: skip
def test_one_component_folder(tiny, sub, component):
    sources = resolve_components(tiny.diffusers / sub)
    assert list(sources) == [component]
    assert all(f.parent.name == sub and ".fp16" not in f.name for f in sources[component].files)


def test_component_folder_with_an_unusual_name_uses_its_config(tiny, tmp_path):
    """No name hint: a CLIP's config.json (hidden_act) says whether it is L or G."""
    for sub, component in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        folder = tmp_path / f"my_{component[-1]}_encoder"
        shutil.copytree(tiny.diffusers / sub, folder)
        assert list(resolve_components(folder)) == [component]


def test_a_shard_path_gives_the_whole_component(tiny):
    shard = sorted((tiny.diffusers / "text_encoder_3").glob("model-*.safetensors"))[-1]
    sources = resolve_components(shard)
    assert list(sources) == ["t5"]
    assert sources["t5"].files == resolve_components(tiny.diffusers, ["t5"])["t5"].files


def test_a_component_weight_file_path(tiny):
    path = tiny.diffusers / "text_encoder_2" / "model.safetensors"
    sources = resolve_components(path)
    assert list(sources) == ["clip_g"] and sources["clip_g"].files == [path]
    assert sources["clip_g"].layout == clip.DIFFUSERS
    assert sources["clip_g"].hf_config == tiny.hf_configs["clip_g"]
    fp16 = tiny.diffusers / "text_encoder" / "model.fp16.safetensors"  # asked for by name: used
    assert resolve_components(fp16)["clip_l"].files == [fp16]


def test_stability_single_file(tiny):
    sources = resolve_components(tiny.sai_file())
    assert set(sources) == {"transformer", "vae"}
    assert sources["transformer"].layout == mmdit.STABILITY and sources["vae"].layout == vae.STABILITY
    assert all(s.files == [tiny.sai_file()] for s in sources.values())


def test_stability_file_with_text_encoders_inside(tiny):
    sources = resolve_components(tiny.all_in_one)
    assert set(sources) == set(layouts.COMPONENTS)
    assert all(s.files == [tiny.all_in_one] for s in sources.values())
    assert sources["clip_l"].layout == clip.single_file("clip_l")
    assert sources["clip_g"].layout == clip.single_file("clip_g")
    assert sources["t5"].layout == t5.SINGLE_FILE
    assert sources["clip_l"].hf_config == {"hidden_act": "quick_gelu"}  # Stability files: no config.json


def test_stability_folder(tiny):
    sources = resolve_components(tiny.stability)
    assert files_of(sources) == {
        "transformer": ["sd3.5_tiny.safetensors"], "vae": ["sd3.5_tiny.safetensors"],
        "clip_l": ["clip_l.safetensors"], "clip_g": ["clip_g.safetensors"],
        "t5": ["t5xxl_fp16.safetensors"],  # never the fp8 one
    }  # fmt: skip
    assert sources["clip_l"].layout == clip.STABILITY and sources["t5"].layout == t5.STABILITY
    assert sources["clip_g"].hf_config == {"hidden_act": "gelu"}


def test_the_text_encoders_folder_and_files(tiny):
    te = tiny.stability / "text_encoders"
    assert files_of(resolve_components(te)) == {
        "clip_l": ["clip_l.safetensors"], "clip_g": ["clip_g.safetensors"], "t5": ["t5xxl_fp16.safetensors"]
    }
    assert files_of(resolve_components(te / "clip_l.safetensors")) == {"clip_l": ["clip_l.safetensors"]}
    assert files_of(resolve_components(te / "t5xxl_fp16.safetensors")) == {"t5": ["t5xxl_fp16.safetensors"]}
    with pytest.raises(WeightFileError, match="fp8"):
        resolve_components(te / "t5xxl_fp8_e4m3fn.safetensors")


def test_repo_snapshot_with_both_layouts_prefers_diffusers(tiny):
    sources = resolve_components(tiny.both)
    for component, source in sources.items():
        assert all(tiny.both / layouts.DIFFUSERS_FOLDERS[component] == f.parent for f in source.files), component
    assert resolve_components(tiny.diffusers).keys() == sources.keys()


def test_diffusers_folder_missing_a_component_uses_the_stability_file(tiny, tmp_path):
    folder = tmp_path / "snapshot"
    shutil.copytree(tiny.both, folder)
    shutil.rmtree(folder / "text_encoder_3")
    sources = resolve_components(folder)
    assert sources["t5"].files == [folder / "text_encoders" / "t5xxl_fp16.safetensors"]
    assert sources["clip_l"].files == [folder / "text_encoder" / "model.safetensors"]


def test_model_index_without_t5(tiny, tmp_path):
    folder = tmp_path / "no_t5"
    shutil.copytree(tiny.both, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert "t5" not in resolve_components(folder)  # not even from text_encoders/


def test_partial_download_lists_what_is_there(tiny, tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(tiny.diffusers / "model_index.json", folder)
    shutil.copytree(tiny.diffusers / "vae", folder / "vae")
    (folder / "transformer").mkdir()
    shutil.copy(tiny.diffusers / "transformer" / "config.json", folder / "transformer")  # config only
    assert list(resolve_components(folder)) == ["vae"]
    with pytest.raises(WeightFileError, match=r"no MMDiT transformer there \(it holds the VAE\)"):
        resolve_component(folder, "transformer")


def test_only_fp16_variant_is_used_when_alone(tiny, tmp_path):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    shutil.copy(tiny.diffusers / "text_encoder" / "config.json", folder)
    shutil.copy(tiny.diffusers / "text_encoder" / "model.fp16.safetensors", folder)
    assert files_of(resolve_components(folder)) == {"clip_l": ["model.fp16.safetensors"]}


def test_index_naming_a_missing_shard(tiny, tmp_path):
    folder = tmp_path / "text_encoder_3"
    shutil.copytree(tiny.diffusers / "text_encoder_3", folder)
    missing = sorted(folder.glob("model-*.safetensors"))[0]
    missing.unlink()
    with pytest.raises(WeightFileError, match=f"names the shard {missing.name}, which is missing"):
        resolve_components(folder)


def test_shard_and_index_that_disagree(tiny, tmp_path):
    folder = tmp_path / "text_encoder_3"
    shutil.copytree(tiny.diffusers / "text_encoder_3", folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    shutil.copy(shards[0], shards[1])
    with pytest.raises(WeightFileError, match="do not belong together"):
        resolve_components(folder)


def test_several_checkpoints_in_one_folder_is_ambiguous(tiny, tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(tiny.stability, folder)
    shutil.copy(tiny.sai_file(), folder / "sd3.5_tiny_turbo.safetensors")
    with pytest.raises(WeightFileError, match="several files hold the MMDiT transformer.*sd3.5_tiny.safetensors.*turbo"):
        resolve_components(folder)
    # the encoders are still unambiguous
    assert files_of(resolve_components(folder, ["clip_l", "t5"])) == {
        "clip_l": ["clip_l.safetensors"], "t5": ["t5xxl_fp16.safetensors"]
    }


def test_dedicated_files_win_over_an_all_in_one_file(tiny, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny.stability, folder)
    shutil.copy(tiny.all_in_one, folder)
    shutil.copy(tiny.sai_file(), folder / "other.safetensors")
    (folder / "sd3.5_tiny.safetensors").unlink()
    (folder / "other.safetensors").rename(folder / "sd3.5_tiny.safetensors")
    sources = resolve_components(folder, ["clip_l", "clip_g", "t5"])
    assert files_of(sources) == {
        "clip_l": ["clip_l.safetensors"], "clip_g": ["clip_g.safetensors"], "t5": ["t5xxl_fp16.safetensors"]
    }


def test_pickle_only_folders_are_refused(tmp_path):
    (tmp_path / "sd3.5_medium.ckpt").write_bytes(b"\x80\x04not really")
    with pytest.raises(WeightFileError, match="pickle"):
        resolve_components(tmp_path)
    with pytest.raises(WeightFileError, match="pickle"):
        resolve_components(tmp_path / "sd3.5_medium.ckpt")
    sub = tmp_path / "vae"
    sub.mkdir()
    (sub / "config.json").write_text("{}")
    (sub / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightFileError, match=r"only pickle weights \(diffusion_pytorch_model.bin\)"):
        resolve_components(sub)


def test_unknown_things_say_what_was_found_and_what_is_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightFileError, match=r"holds notes.txt.*Expected one of: a diffusers"):
        resolve_components(tmp_path)
    other = save_state_dict({"lm_head.weight": torch.zeros(2, 2)}, tmp_path / "gpt.safetensors")
    with pytest.raises(WeightFileError, match=r"not an SD3 checkpoint I know \(tensors: lm_head.weight"):
        resolve_components(other)
    with pytest.raises(WeightFileError, match="no such file or folder"):
        resolve_components(tmp_path / "absent")
    with pytest.raises(SD35Error, match="unknown component"):
        resolve_components(tmp_path, ["unet"])


def test_a_clip_of_unknown_kind_asks_for_a_name(tiny, tmp_path):
    path = shutil.copy(tiny.stability / "text_encoders" / "clip_g.safetensors", tmp_path / "encoder.safetensors")
    with pytest.raises(WeightFileError, match="CLIP-L or CLIP-G.*clip_l.safetensors"):
        resolve_components(path)
