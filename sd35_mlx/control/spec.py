"""A ControlNet on disk: which file, which layout, and the conventions it was trained with.

    cn = open_controlnet("sd3.5_large_controlnet_canny.safetensors")   # reads headers only
    cn.check_base(transformer.config, "SD3.5 Large")                  # before any weight is read
    net = cn.load(dtype=mx.bfloat16)

What the tensors cannot say comes from the checkpoint's family (docs/control.md):

| family (recognised by)                 | residual rule | ControlNet pooled | control latent shift |
|----------------------------------------|---------------|-------------------|----------------------|
| image-only blocks (Stability SD3.5     | stability     | the prompt's      | (z − 0.0609)·1.5305  |
|  Large, either layout)                 |               |                   |                      |
| joint blocks (InstantX, Alimama)       | diffusers     | zeros if its      | z·1.5305 if          |
|                                        |               |  config.json has  |  force_zeros…        |
|                                        |               |  force_zeros_for_pooled_projection (the default) |  (as diffusers)  |
| joint, 17 input channels (Alimama      | diffusers     | zeros             | (z − 0.0609)·1.5305  |
|  inpainting)                           |               |                   |                      |

The residual rule can be overridden (`residual_rule=`), the control type too.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from ..config import ControlNetConfig, MMDiTConfig
from ..errors import InputError
from ..quantize import QuantSpec
from .residuals import DIFFUSERS, STABILITY, ResidualRule, rule_named

log = logging.getLogger(__name__)

CONTROL_TYPES = ("blur", "canny", "depth", "pose", "tile", "inpaint", "other")
STABILITY_TYPE_IDS = {0: "blur", 1: "canny", 2: "depth"}  # the files' `control_type` tensor
COMPONENT = "controlnet"  # its name in converted folders and quantization specs
_BASES = {1536: "SD3 Medium / SD3.5 Medium", 2432: "SD3.5 Large"}  # hidden size -> base family


@dataclass(frozen=True)
class ControlNetSpec:
    """A ControlNet's source and conventions; `load()` builds the network."""

    source: str
    files: Tuple[Path, ...]
    layout: str
    config: ControlNetConfig
    rule: ResidualRule
    zero_pooled: bool
    latent_shift: bool
    control_type: Optional[str]
    converted: bool = False  # a folder written by `python -m sd35_mlx.convert --controlnet`
    stored_quantization: Optional[QuantSpec] = None  # how a converted folder stores it

    def quantization(self, at_load: Optional[QuantSpec]) -> Optional[QuantSpec]:
        """What runs: a converted folder as stored, anything else at `at_load` (--controlnet-quantize)."""
        return self.stored_quantization if self.converted else at_load

    @property
    def base(self) -> str:
        return _BASES.get(self.config.hidden_size, f"a model of width {self.config.hidden_size}")

    @property
    def inpainting(self) -> bool:
        return self.config.control_channels == self.config.in_channels + 1

    def with_overrides(self, rule: Optional[str] = None, control_type: Optional[str] = None) -> "ControlNetSpec":
        s = self
        if rule is not None:
            s = replace(s, rule=rule_named(rule))
        if control_type is not None:
            s = replace(s, control_type=check_control_type(control_type))
        return s

    def check_base(self, transformer: MMDiTConfig, model_name: str) -> None:
        """Refuse a ControlNet made for another base model (before anything heavy loads)."""
        cfg = self.config
        problems = []
        if cfg.hidden_size != transformer.hidden_size:
            problems.append(f"width {cfg.hidden_size} vs the transformer's {transformer.hidden_size}")
        if cfg.pooled_dim != transformer.pooled_dim:
            problems.append(f"pooled width {cfg.pooled_dim} vs {transformer.pooled_dim}")
        if cfg.joint and cfg.context_dim != transformer.context_dim:
            problems.append(f"prompt width {cfg.context_dim} vs {transformer.context_dim}")
        if cfg.depth > transformer.depth:
            problems.append(f"{cfg.depth} blocks for a transformer of {transformer.depth}")
        if problems:
            raise InputError(
                f"ControlNet {self.source} was made for {self.base}, not for {model_name} "
                f"({'; '.join(problems)}). Use a ControlNet trained for {model_name}: "
                "SD3.5 Large takes stabilityai/stable-diffusion-3.5-controlnets, SD3 Medium the "
                "InstantX / Alimama SD3 ControlNets."
            )

    def load(self, dtype: Optional[mx.Dtype] = None):
        """Build and load the network (tensors are lazy: read when first used)."""
        if self.converted:
            from ..weights.converted import load_converted_component

            return load_converted_component(self.files[0].parent, COMPONENT, dtype=dtype)
        from ..weights.tables.controlnet import LAYOUTS, load_controlnet

        layout = next(l for l in LAYOUTS if l.name == self.layout)
        return load_controlnet(
            _tensors(self.files), layout, files=[str(f) for f in self.files], dtype=dtype, config=self.config
        )


def check_control_type(name: str) -> str:
    if name not in CONTROL_TYPES:
        raise InputError(f"unknown control type {name!r}; choose one of: {', '.join(CONTROL_TYPES)}")
    return name


def _tensors(files: Tuple[Path, ...]) -> Dict[str, mx.array]:
    from ..weights.safetensors_file import load_tensors

    out: Dict[str, mx.array] = {}
    for f in files:
        out.update(load_tensors(f))
    return out


def _weight_files(folder: Path) -> List[Path]:
    from ..weights.layouts import component_weight_files

    return list(component_weight_files(folder))


def _find_files(path: Path) -> Tuple[List[Path], dict]:
    """(weight files, diffusers config.json or {}) of a file or a folder."""
    if path.is_file():
        return [path], {}
    files = _weight_files(path)
    if not files:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if len(found) > 1:
            raise InputError(
                f"{path} holds several ControlNets ({', '.join(found)}); pass the one you want, "
                f"e.g. {path / found[0]}"
            )
        if not found:
            raise InputError(f"{path}: no ControlNet weights (*.safetensors) found")
        files = [path / found[0]]
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return files, config


def resolve_controlnet_path(source: str) -> Path:
    """A local file/folder, or a Hugging Face repo id (`owner/name`, or `owner/name/file.safetensors`
    for repos holding several files) downloaded into the standard cache."""
    local = Path(os.path.expanduser(source))
    if local.exists():
        return local
    parts = source.split("/")
    if len(parts) < 2 or any(not p for p in parts):
        raise InputError(f"ControlNet {source!r} not found: not a local file or folder, nor a repo id")
    try:
        import huggingface_hub as hf

        if len(parts) > 2:
            return Path(hf.hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        return Path(hf.snapshot_download(source, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]))
    except Exception as e:  # network, gated repo, typo: say which and what to do
        raise InputError(
            f"ControlNet {source!r} is neither a local path nor downloadable ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Check the name, log in with `hf auth login` "
            "for gated repos, or pass a downloaded file."
        ) from e


def open_controlnet(
    source: str | os.PathLike,
    *,
    num_heads: Optional[int] = None,
    residual_rule: Optional[str] = None,
    control_type: Optional[str] = None,
) -> ControlNetSpec:
    """Recognise a ControlNet from its headers (no tensor data is read).

    num_heads: the transformer's heads, used where the files cannot say (Stability files)."""
    from ..weights.mapping import apply_rules
    from ..weights.tables.controlnet import (
        CONTROL_TYPE_KEY, STABILITY as STABILITY_LAYOUT, infer_config, layout_of, read_control_type,
    )  # fmt: skip

    from ..weights.converted import is_converted

    path = resolve_controlnet_path(os.fspath(source))
    if is_converted(path):
        return _converted_spec(path, os.fspath(source)).with_overrides(residual_rule, control_type)
    files, hf_config = _find_files(path)
    tensors = _tensors(tuple(files))  # lazy: the rules below only look at shapes
    layout = layout_of(list(tensors))
    mapped = apply_rules(tensors, layout.rules, layout=layout.name, files=[str(f) for f in files],
                         ignore=layout.ignore)  # fmt: skip
    if hf_config.get("num_attention_heads"):
        num_heads = int(hf_config["num_attention_heads"])
    config = infer_config(mapped, num_heads=num_heads)
    type_name = None
    if layout is STABILITY_LAYOUT and CONTROL_TYPE_KEY in tensors:
        type_name = STABILITY_TYPE_IDS.get(read_control_type(tensors))
    if config.joint:
        zero_pooled = bool(hf_config.get("force_zeros_for_pooled_projection", True))
        rule, shift = DIFFUSERS, not zero_pooled
        if config.control_channels == config.in_channels + 1:
            # StableDiffusion3ControlNetInpaintingPipeline: pooled zeros, shifted latents, always
            type_name, zero_pooled, shift = "inpaint", True, True
    else:
        # diffusers shifts the control latents exactly when it does not zero the pooled input
        zero_pooled, rule = bool(hf_config.get("force_zeros_for_pooled_projection", False)), STABILITY
        shift = not zero_pooled
    type_name = type_name or _type_from_name(str(path))
    spec = ControlNetSpec(
        source=os.fspath(source), files=tuple(files), layout=layout.name, config=config, rule=rule,
        zero_pooled=zero_pooled, latent_shift=shift, control_type=type_name,
    )  # fmt: skip
    return spec.with_overrides(residual_rule, control_type)


def _type_from_name(name: str) -> Optional[str]:
    low = name.lower()
    for t in ("canny", "depth", "blur", "pose", "tile", "inpaint"):
        if t in low:
            return t
    return None


def spec_options(spec: ControlNetSpec) -> dict:
    """The conventions a converted folder stores beside the weights."""
    return {"rule": spec.rule.name, "zero_pooled": spec.zero_pooled, "latent_shift": spec.latent_shift,
            "control_type": spec.control_type}  # fmt: skip


def _converted_spec(path: Path, source: str) -> ControlNetSpec:
    from ..weights.converted import read_converted_config

    entry = read_converted_config(path)["components"].get(COMPONENT)
    if entry is None:
        raise InputError(f"{path} is a converted sd35_mlx folder without a ControlNet; convert one with --controlnet")
    control = entry.get("control", {})
    return ControlNetSpec(
        source=source, files=tuple(path / f for f in entry["files"]), layout="sd35_mlx converted ControlNet",
        config=ControlNetConfig.from_dict(entry["config"]), rule=rule_named(control.get("rule", "stability")),
        zero_pooled=bool(control.get("zero_pooled", False)), latent_shift=bool(control.get("latent_shift", True)),
        control_type=control.get("control_type"), converted=True,
        stored_quantization=QuantSpec.from_dict(entry["quantization"]) if entry.get("quantization") else None,
    )  # fmt: skip
