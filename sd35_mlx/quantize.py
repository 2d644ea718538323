"""Per-component quantization policy: what is quantized, how, and what stays 16-bit.

    specs = parse_quantize("t5=4,clip_g=8,transformer=mxfp4")   # + defaults: T5 4-bit
    quantize_network(t5_model, specs["t5"], "t5")

Rule (reproducible at load time from `QuantSpec.to_dict()`, which the converted folder's
config.json stores per component): quantize every `nn.Linear` whose input dimension is a
multiple of the group size, except the layers whose module path matches one of the spec's
`keep` patterns. Embeddings, norms, convolutions and `pos_embed` are never quantized; the
VAE never is (quantizing it "severely degrades image quality", mflux PR #436).

The default `keep` lists come from `benchmarks/quantization_error.py` (results in
`benchmarks/results/quantization_error.md`): layers whose quantization costs much more
error than their share of the weights saves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .checks import whole_number
from .components import COMPONENTS, QUANTIZABLE, TEXT_ENCODERS, check_component
from .errors import InputError

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class ModeRule:
    bits: Tuple[int, ...]
    group_sizes: Tuple[int, ...]
    default_bits: int
    default_group_size: int


# mx.quantize's table of modes (mlx 0.32). Affine 1-bit exists but is useless for these
# networks, so it is not offered.
MODES: Dict[str, ModeRule] = {
    "affine": ModeRule((2, 3, 4, 5, 6, 8), (32, 64, 128), 4, 64),
    "mxfp4": ModeRule((4,), (32,), 4, 32),
    "mxfp8": ModeRule((8,), (32,), 8, 32),
    "nvfp4": ModeRule((4,), (16,), 4, 16),
}

# Layers kept at 16-bit by default (regexes over module paths, full match). Chosen by
# measurement (benchmarks/results/quantization_error.md, section 2): the layer kinds whose
# share of the error is larger than their share of the weights, and which hold < 1% of the real
# network's weights. Together: 0.49% of SD3.5 Large's Linear weights, 0.26% of CLIP-G's.
DEFAULT_KEEP: Dict[str, Tuple[str, ...]] = {
    # the conditioning path (timestep and pooled-text embedders, the final modulation) feeds
    # every token's scale and shift, and the output projection writes every output value:
    # their errors are not averaged out over blocks
    "transformer": (
        r"t_embedder\..*",
        r"y_embedder\..*",
        r"context_embedder",
        r"final_layer\.adaLN",
        r"final_layer\.linear",
    ),
    "clip_l": (r"text_projection",),
    "clip_g": (r"text_projection",),
    "t5": (),
    # as the transformer's: the conditioning path feeds every token's modulation (not measured
    # on a real ControlNet: docs/control.md)
    "controlnet": (r"t_embedder\..*", r"y_embedder\..*", r"context_embedder"),
}


@dataclass(frozen=True)
class QuantSpec:
    """How one network is quantized. `keep`: module-path regexes left unquantized."""

    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    keep: Tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        validate(self.bits, self.group_size, self.mode)
        for pattern in self.keep:
            try:
                re.compile(pattern)
            except re.error as e:
                raise InputError(f"invalid keep pattern {pattern!r}: {e}") from None

    @property
    def label(self) -> str:
        """Short text for summaries and folder names: '4-bit', 'mxfp4', '4-bit g32'."""
        if self.mode != "affine":
            return self.mode
        rule = MODES["affine"]
        return f"{self.bits}-bit" + ("" if self.group_size == rule.default_group_size else f" g{self.group_size}")

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "mode": self.mode,
            "keep": list(self.keep),
            "rule": "nn.Linear with input_dims % group_size == 0 and path not matching keep",
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantSpec":
        """From a stored entry (config.json): every field's type checked, InputError if wrong."""
        if not isinstance(d, Mapping):
            raise InputError(f"a quantization entry must be an object with bits and group_size (got {d!r:.60})")
        missing = [k for k in ("bits", "group_size") if k not in d]
        if missing:
            raise InputError(f"quantization entry lacks {', '.join(missing)}: {dict(d)!r:.100}")
        mode, keep = d.get("mode", "affine"), d.get("keep", ())
        if not isinstance(mode, str) or not isinstance(keep, (list, tuple)) or not all(isinstance(k, str) for k in keep):
            raise InputError(f"quantization entry: mode must be text and keep a list of names (got {dict(d)!r:.100})")
        return cls(whole_number("bits", d["bits"], 1, 16), whole_number("group_size", d["group_size"], 1, 4096), mode, tuple(keep))


def validate(bits: int, group_size: int, mode: str) -> None:
    """Raise InputError for a combination mx.quantize does not support."""
    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    rule = MODES[mode]
    if bits not in rule.bits:
        raise InputError(
            f"{mode} quantization takes bits in {list(rule.bits)}; got {bits}"
            + ("" if mode == "affine" else f" ({mode} is always {rule.default_bits}-bit)")
        )
    if group_size not in rule.group_sizes:
        raise InputError(f"{mode} quantization takes group sizes {list(rule.group_sizes)}; got {group_size}")
    if not _mode_available(mode):
        raise InputError(f"this MLX version ({mx.__version__}) cannot quantize with mode {mode!r}")


@lru_cache(maxsize=None)
def _mode_available(mode: str) -> bool:
    rule = MODES[mode]
    try:
        mx.eval(mx.quantize(mx.ones((32, 128)), rule.default_group_size,
                            rule.default_bits, mode=mode))  # fmt: skip
        return True
    except (ValueError, RuntimeError, TypeError):
        return False


def make_spec(component: str, bits: Optional[int] = None, group_size: Optional[int] = None,
              mode: str = "affine", keep: Optional[Sequence[str]] = None) -> QuantSpec:  # fmt: skip
    """A spec with the mode's defaults and the component's default keep list."""
    check_component(component)
    if component == "vae":
        raise InputError(
            "the VAE is never quantized: it is small (0.17 GB) and quantizing it severely "
            "degrades image quality. Leave it out of --quantize (or use vae=16)."
        )
    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    rule = MODES[mode]
    return QuantSpec(
        bits if bits is not None else rule.default_bits,
        group_size if group_size is not None else rule.default_group_size,
        mode,
        tuple(DEFAULT_KEEP[component] if keep is None else keep),
    )


def default_quantization() -> Dict[str, Optional[QuantSpec]]:
    """T5 at 4-bit (it is 59% of SD3.5 Medium's weights), everything else 16-bit."""
    return {c: (make_spec("t5", 4) if c == "t5" else None) for c in COMPONENTS}


_NONE_WORDS = ("16", "none", "no", "off", "bf16", "fp16", "float16", "bfloat16", "32", "fp32", "float32")


def parse_value(component: str, text: str) -> Optional[QuantSpec]:
    """'4', '8:32' (bits:group), 'mxfp4', 'affine:4:128', or '16'/'none' (unquantized)."""
    t = text.strip().lower()
    if t in _NONE_WORDS:
        return None
    parts = t.split(":")
    try:
        if parts[0] in MODES:
            mode, nums = parts[0], [int(p) for p in parts[1:]]
            bits, group = (nums + [None, None])[:2] if mode == "affine" else (None, nums[0] if nums else None)
            if mode != "affine" and len(nums) > 1:
                raise ValueError
        else:
            mode, nums = "affine", [int(p) for p in parts]
            if len(nums) > 2:
                raise ValueError
            bits, group = (nums + [None])[:2]
    except ValueError:
        raise InputError(
            f"cannot read quantization {component}={text!r}: use bits (2,3,4,5,6,8), "
            f"bits:group_size (e.g. 4:32), a mode ({', '.join(m for m in MODES if m != 'affine')}) "
            "or 16/none for no quantization"
        ) from None
    return make_spec(component, bits, group, mode)


def parse_quantize(
    text: str,
    defaults: bool = True,
    base: Optional[Mapping[str, Optional[QuantSpec]]] = None,
) -> Dict[str, Optional[QuantSpec]]:
    """Parse 'component=value,...' into {component: QuantSpec or None} for every component.

    Unnamed components come from `base` if given, else from `default_quantization()`
    (T5 4-bit) when `defaults`, else stay unquantized. 'none' alone means no quantization
    anywhere. Components: transformer, clip_l, clip_g, t5 (the VAE only accepts 16/none).
    Values: see `parse_value`.
    """
    if base is not None:
        specs = {c: base.get(c) for c in COMPONENTS}
    elif defaults:
        specs = default_quantization()
    else:
        specs = {c: None for c in COMPONENTS}
    text = text.strip()
    if text.lower() in ("none", "16", "off"):
        return {c: None for c in COMPONENTS}
    seen = set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise InputError(
                f"cannot read {item!r} in --quantize: expected component=value, e.g. "
                "'t5=4,clip_g=8,transformer=4' (components: transformer, clip_l, clip_g, t5)"
            )
        name, value = (s.strip() for s in item.split("=", 1))
        check_component(name)
        if name in seen:
            raise InputError(f"--quantize names {name} twice")
        seen.add(name)
        specs[name] = parse_value(name, value)
    return specs


def describe(specs: Mapping[str, Optional[QuantSpec]]) -> str:
    return ", ".join(f"{c}={s.label if s else '16-bit'}" for c, s in specs.items())


# ---- the load-time boundary: what the user named, parsed once ----
Quantization = Dict[str, Optional[QuantSpec]]  # {component: spec, or None for 16-bit}


def named_quantization(value: Union[None, str, Mapping[str, Optional[QuantSpec]]]) -> Quantization:
    """The components a load-time `quantize=` argument names, as specs (None: 16-bit).

    value: None (nothing named), text such as "transformer=4,t5=4" ("none": every quantizable
    network named as 16-bit), or {component: QuantSpec or None}. Unnamed components are
    absent: the pipeline leaves them 16-bit or lets the memory planner choose them.
    """
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("none", "16", "off"):
            return {c: None for c in QUANTIZABLE}
        specs = parse_quantize(text, defaults=False)
        named = {item.split("=", 1)[0].strip() for item in text.split(",") if "=" in item}
        return {c: specs[c] for c in COMPONENTS if c in named and c != "vae"}
    out: Quantization = {}
    for c, spec in value.items():
        check_component(c)
        if c == "vae" and spec is not None:
            make_spec("vae")  # raises the explanation
        if spec is not None and not isinstance(spec, QuantSpec):
            raise InputError(f"quantize[{c!r}] must be a QuantSpec or None (got {type(spec).__name__})")
        if c != "vae":
            out[c] = spec
    return out


def spec_text(spec: Optional[QuantSpec]) -> str:
    """The `parse_value` text of a spec: '4', '4:32', 'mxfp4', '16' (keep lists are not written)."""
    if spec is None:
        return "16"
    rule = MODES[spec.mode]
    if spec.mode != "affine":
        return spec.mode + ("" if spec.group_size == rule.default_group_size else f":{spec.group_size}")
    return f"{spec.bits}" + ("" if spec.group_size == rule.default_group_size else f":{spec.group_size}")


def quantization_text(specs: Mapping[str, Optional[QuantSpec]]) -> str:
    """'transformer=4,t5=16' for the networks `specs` names (in component order), 'none' when
    none of them is quantized; `named_quantization` reads it back."""
    if all(s is None for s in specs.values()):
        return "none"
    return ",".join(f"{c}={spec_text(specs[c])}" for c in QUANTIZABLE if c in specs)


# ---- applying a spec to a network ----
def quantizable_layers(model: nn.Module, spec: QuantSpec) -> List[str]:
    """Module paths the rule quantizes, in module order."""
    keep = [re.compile(p) for p in spec.keep]
    out = []
    for path, module in model.named_modules():
        if (
            type(module) is nn.Linear  # not QuantizedLinear or subclasses with other forwards
            and module.weight.shape[-1] % spec.group_size == 0
            and not any(k.fullmatch(path) for k in keep)
        ):
            out.append(path)
    return sorted(out)


def quantize_network(model: M, spec: Optional[QuantSpec], component: str) -> M:
    """Quantize `model` in place by `spec` (no-op for None) and return it.

    Layers that are already quantized are left alone. Quantize after casting to the target
    dtype: scales and biases take the weights' dtype. `quantized_paths(model)` lists the result.
    """
    check_component(component)
    if spec is None:
        return model
    if component == "vae":
        make_spec("vae")  # raises the explanation
    targets = set(quantizable_layers(model, spec))
    if targets:
        nn.quantize(
            model, spec.group_size, spec.bits, mode=spec.mode,
            class_predicate=lambda path, module: path in targets,
        )  # fmt: skip
    return model


def unquantized_share(model: nn.Module, spec: QuantSpec) -> float:
    """Share of the weights the rule wanted but could not quantize: Linear layers outside
    `keep` whose input width is not a multiple of the group size (e.g. SD3.5 Large's 2432
    with group 128). 0.0 when everything eligible was quantized."""
    keep = [re.compile(p) for p in spec.keep]
    skipped = done = 0
    for path, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            done += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
        elif type(m) is nn.Linear and not any(k.fullmatch(path) for k in keep):
            skipped += m.weight.size
    return skipped / max(skipped + done, 1)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def dequantize_network(model: nn.Module) -> int:
    """Replace every QuantizedLinear by an nn.Linear holding its dequantized weight.

    The dequantized weight has the scales' dtype (affine) or the bias's / bf16 (fp modes).
    Returns the number of layers replaced.
    """
    count = 0

    def convert(_path: str, module: nn.Module) -> nn.Module:
        nonlocal count
        if not isinstance(module, nn.QuantizedLinear):
            return module
        count += 1
        if module.mode == "affine":
            dtype = module.scales.dtype
        else:
            dtype = module.bias.dtype if "bias" in module else mx.bfloat16
        weight = mx.dequantize(
            module.weight, module.scales, module.get("biases"), module.group_size, module.bits,
            mode=module.mode, dtype=dtype,
        )  # fmt: skip
        out_dims, in_dims = weight.shape
        linear = nn.Linear(in_dims, out_dims, bias="bias" in module)
        linear.weight = weight
        if "bias" in module:
            linear.bias = module.bias
        return linear

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    return count


def quantized_paths(model: nn.Module) -> List[str]:
    return sorted(p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear))


def spec_of(model: nn.Module) -> Optional[Tuple[int, int, str]]:
    """(bits, group_size, mode) shared by every quantized layer, None if none is quantized."""
    found = {(m.bits, m.group_size, m.mode) for _, m in model.named_modules()
             if isinstance(m, nn.QuantizedLinear)}  # fmt: skip
    if not found:
        return None
    if len(found) > 1:
        raise InputError(f"network mixes quantization settings {sorted(found)}")
    return found.pop()


__all__ = [
    "COMPONENTS", "QUANTIZABLE", "TEXT_ENCODERS", "MODES", "DEFAULT_KEEP", "QuantSpec",
    "validate", "make_spec", "default_quantization", "parse_value", "parse_quantize",
    "describe", "Quantization", "named_quantization", "spec_text", "quantization_text", "quantizable_layers", "quantize_network", "dequantize_network",
    "is_quantized", "quantized_paths", "spec_of", "unquantized_share",
]  # fmt: skip
