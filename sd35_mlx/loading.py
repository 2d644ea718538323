"""The public component loaders: a path or a Hugging Face repo id in, MLX networks out.

Each loader loads only its own network(s): `load_vae(path)` reads no transformer tensor
(tensors are lazy; only the VAE's are ever read). `path` is any of:
- a Hugging Face repo id ("stabilityai/stable-diffusion-3.5-medium"): only the files the
  loader needs are downloaded (see `sd35_mlx.hub`);
- a local diffusers folder, one of its component folders, a Stability single file, a
  folder with Stability files (`text_encoders/…` included), a separate encoder file;
- a converted sd35_mlx folder;
- a `ModelSources` (`sd35_mlx.weights.sources`): a model resolved once, as the pipeline does.
See `sd35_mlx.weights.layouts` for how files and layouts are found.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import mlx.core as mx

from .components import TOKENIZER_FOLDERS, check_component, component_dtype
from .errors import WeightFileError
from .weights.converted import load_converted_component
from .weights.layouts import ComponentSource
from .weights.safetensors_file import load_tensors
from .weights.sources import ModelSources, resolve_sources

log = logging.getLogger(__name__)


@dataclass
class TextEncoders:
    clip_l: object  # CLIPTextEncoder
    clip_g: object  # CLIPTextEncoder
    t5: Optional[object] = None  # T5Encoder; None when not asked for or not there


@dataclass
class Tokenizers:
    clip_l: object  # CLIPTokenizer
    clip_g: object  # CLIPTokenizer
    t5: Optional[object] = None  # T5Tokenizer; None when the model has no tokenizer_3/


# ---- paths ------------------------------------------------------------------------------------
ModelPath = Union[str, os.PathLike, ModelSources]


def _local_path(path: str | os.PathLike, components: Sequence[str]) -> Path:
    """`path` itself when it exists locally, else the Hub snapshot holding `components`."""
    local = Path(os.fspath(path)).expanduser()
    if local.exists():
        return local
    from .hub import resolve_model_path

    return resolve_model_path(os.fspath(path), components=components)


def model_sources(path: ModelPath, components: Sequence[str]) -> ModelSources:
    """`path` resolved (downloading `components` when it is a repo id); sources pass through."""
    if isinstance(path, ModelSources):
        return path
    return resolve_sources(_local_path(path, components), components)


def _tensors(files: Sequence[Path], cache: Optional[Dict[Path, dict]] = None) -> Dict[str, mx.array]:
    """Lazy tensors of several files (shards) merged; a key in two files is an error."""
    merged: Dict[str, mx.array] = {}
    owner: Dict[str, Path] = {}
    for f in files:
        if cache is not None and f in cache:
            tensors = cache[f]
        else:
            tensors = load_tensors(f)
            if cache is not None:
                cache[f] = tensors
        for key, value in tensors.items():
            if key in merged:
                raise WeightFileError(
                    f"tensor '{key}' is in both {owner[key]} and {f}: these files duplicate each "
                    "other (e.g. a model.fp16 copy next to model.safetensors); keep one set."
                )
            merged[key] = value
            owner[key] = f
    return merged


def _names(source: ComponentSource) -> List[str]:
    return [str(f) for f in source.files]


# ---- networks -----------------------------------------------------------------------------------
def _load_source(component: str, source: ComponentSource, dtype: Optional[mx.Dtype],
                 cache: Optional[Dict[Path, dict]] = None):  # fmt: skip
    from .weights.tables import clip, mmdit, t5, vae

    check_component(component)

    tensors = _tensors(source.files, cache)
    files = _names(source)
    log.info("loading the %s from %s (%s)", component, ", ".join(files), source.layout.name)
    if component == "transformer":
        return mmdit.load_mmdit(tensors, source.layout, files=files, dtype=dtype)
    if component == "vae":
        return vae.load_vae(tensors, source.layout, files=files, dtype=dtype, hf_config=source.hf_config)
    if component in ("clip_l", "clip_g"):
        model = clip.load_clip(tensors, source.layout, files=files, dtype=dtype, hf_config=source.hf_config)
        if component == "clip_l":  # SD3 means CLIP-L's projection to be the identity (docs/text_encoders_clip.md)
            clip.warn_if_clip_l_projected(model, ", ".join(files))
        return model
    return t5.load_t5(tensors, source.layout, files=files, dtype=component_dtype("t5", dtype), hf_config=source.hf_config)


def _load_converted(folder: Path, component: str, dtype: Optional[mx.Dtype]):
    model = load_converted_component(folder, component, dtype=dtype)  # (T5: never float16)
    if component == "clip_l":  # as in _load_source
        from .weights.tables.clip import warn_if_clip_l_projected

        warn_if_clip_l_projected(model, f"converted folder {folder}")
    return model


def _load(sources: ModelSources, component: str, dtype: Optional[mx.Dtype], cache: Optional[Dict[Path, dict]] = None):
    if sources.converted is not None:
        return _load_converted(sources.path, component, dtype)
    return _load_source(component, sources.source(component), dtype, cache)


def load_component(path: ModelPath, component: str, dtype: Optional[mx.Dtype] = None):
    """One network ("transformer", "vae", "clip_l", "clip_g" or "t5") from any supported path."""
    check_component(component)
    return _load(model_sources(path, (component,)), component, dtype)


def load_transformer(path: ModelPath, dtype: Optional[mx.Dtype] = None):
    """The MMDiT (`sd35_mlx.models.mmdit.MMDiT`); `dtype` None keeps the file's dtype."""
    return load_component(path, "transformer", dtype)


def load_vae(path: ModelPath, dtype: Optional[mx.Dtype] = None):
    """The VAE (`sd35_mlx.models.vae.VAE`; decoder-only files give a VAE without encoder)."""
    return load_component(path, "vae", dtype)


def load_text_encoders(path: ModelPath, dtype: Optional[mx.Dtype] = None, t5: bool = True) -> TextEncoders:
    """CLIP-L, CLIP-G and (when `t5` and present) T5-XXL, loaded one after the other.

    T5 runs in bf16 or fp32: dtype=float16 loads it in bfloat16 (logged). A model without
    T5 gives `t5=None` (SD3 then runs with zeros in place of T5's tokens).
    """
    wanted = ("clip_l", "clip_g") + (("t5",) if t5 else ())
    sources = model_sources(path, wanted)
    if sources.converted is not None:
        return _converted_text_encoders(sources.path, dtype, t5)
    cache: Dict[Path, dict] = {}  # an all-in-one file is opened once
    encoders = TextEncoders(
        clip_l=_load(sources, "clip_l", dtype, cache),
        clip_g=_load(sources, "clip_g", dtype, cache),
    )
    if t5:
        if sources.has("t5"):
            encoders.t5 = _load(sources, "t5", dtype, cache)
        else:
            log.warning("%s: no T5-XXL text encoder found; continuing without T5", sources.path)
    return encoders


def _converted_text_encoders(folder: Path, dtype: Optional[mx.Dtype], t5: bool) -> TextEncoders:
    encoders = TextEncoders(_load_converted(folder, "clip_l", dtype), _load_converted(folder, "clip_g", dtype))
    if t5:
        try:
            encoders.t5 = _load_converted(folder, "t5", dtype)
        except WeightFileError as e:
            log.warning("%s: no T5 in this converted folder (%s); continuing without T5", folder, e)
    return encoders


# ---- tokenizers ---------------------------------------------------------------------------------
def _tokenizer_root(local: Path) -> Optional[Path]:
    """The folder holding tokenizer/ and tokenizer_2/: the path, or the folder around it."""
    for candidate in (local, local.parent) if local.is_dir() else (local.parent, local.parent.parent):
        if all((candidate / TOKENIZER_FOLDERS[c]).is_dir() for c in ("clip_l", "clip_g")):
            return candidate
    return None


def load_tokenizers(path: str | os.PathLike) -> Tokenizers:
    """The CLIP-L, CLIP-G and T5 tokenizers from diffusers `tokenizer*/` folders.

    Stability single files carry no tokenizers: keep them in a folder next to
    `tokenizer/`, `tokenizer_2/`, `tokenizer_3/`, or load the tokenizers from a diffusers
    repo (`load_tokenizers("stabilityai/stable-diffusion-3.5-medium")` downloads only them).
    """
    from .tokenizers import CLIPTokenizer, T5Tokenizer

    local = _local_path(path, ("tokenizers",))
    root = _tokenizer_root(local)
    if root is None:
        raise WeightFileError(
            f"{local}: no tokenizer/ and tokenizer_2/ folders there (Stability single files carry "
            "no tokenizers). Put the diffusers tokenizer/, tokenizer_2/ and tokenizer_3/ folders "
            "next to the checkpoint, or load them from a diffusers repo, e.g. "
            "sd35_mlx.load_tokenizers('stabilityai/stable-diffusion-3.5-medium'), which downloads "
            "only the tokenizer files."
        )
    t5_folder = root / TOKENIZER_FOLDERS["t5"]
    return Tokenizers(
        clip_l=CLIPTokenizer.from_folder(root / TOKENIZER_FOLDERS["clip_l"]),
        clip_g=CLIPTokenizer.from_folder(root / TOKENIZER_FOLDERS["clip_g"]),
        t5=T5Tokenizer.from_folder(t5_folder) if t5_folder.is_dir() else None,
    )
