"""LoRAs at runtime, beside 16-bit and quantized layers: `y = W·x + Σ_j w_j · B_j (A_j · x)`.

    attach(model, placed, name="style", scale=0.8)   # wrap the targeted layers (nothing copied)
    set_scale(model, "style", 0.5)
    detach(model, "style")                           # the plain layers again
    fuse(model) / unfuse(model)                      # 16-bit only; unfuse restores W bit for bit

The base layer (`nn.Linear`, `nn.QuantizedLinear`, `fast_quantized.DequantizingLinear`, the
patch-embedding `nn.Conv2d`) stays as it is under `.base`, so `use_dequantized_matmul` still
swaps a quantized base for its dequantize-before-large-matmuls form. A LoRA is never merged into
quantized weights: re-quantizing `Wq + ΔW` rounds the small ΔW away (mflux #665).

The LoRA factors are kept transposed in MLX order (down `(in, r)`, up `(r, rows)`, alpha/r folded
into up) and cast once to the layer's compute dtype; they are held outside the module's
parameters, so saving or quantizing a network never sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import InputError
from .targets import Placed, layer_dims


@dataclass
class Adapter:
    """One LoRA's contribution to one layer."""

    down: mx.array  # linear: (in, R); conv: (R, kh, kw, C)
    segments: Tuple[Tuple[int, int, int, int, mx.array], ...]  # (row0, row1, r0, r1, up (r1-r0, row1-row0))
    scale: float  # the user's weight for this LoRA (and component)

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + sum(s[4].nbytes for s in self.segments)


class _Adapters:
    """Named adapters of one layer, held outside the MLX parameter tree."""

    def __init__(self):
        self.by_name: Dict[str, Adapter] = {}
        self.original: Optional[mx.array] = None  # the base weight while fused

    def active(self) -> List[Adapter]:
        return [a for a in self.by_name.values() if a.scale != 0.0]


def check_scale(scale: float, what: str = "LoRA scale") -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number (got {scale!r})") from None
    if not math.isfinite(value):
        raise InputError(f"{what} must be a finite number (got {value}); 1.0 is full strength, 0 turns it off")
    return value


def _compute_dtype(base: nn.Module) -> mx.Dtype:
    if isinstance(base, nn.QuantizedLinear):
        return base["scales"].dtype if base.mode == "affine" else base.get("bias", mx.zeros((), mx.bfloat16)).dtype
    return base["weight"].dtype


class LoRALayer(nn.Module):
    """A layer with LoRAs beside it. `weight` (and `bias`) read through to the base layer."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.loras = _Adapters()
        self.conv = isinstance(base, nn.Conv2d)
        self.out_features = layer_dims(base)[0]

    @property
    def weight(self) -> mx.array:
        return self.base["weight"]

    @property
    def fused(self) -> bool:
        return self.loras.original is not None

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if self.fused:
            return y
        for a in self.loras.active():
            y = y + self._delta(a, x)
        return y

    def _delta(self, a: Adapter, x: mx.array) -> mx.array:
        if self.conv:
            b = self.base
            h = mx.conv2d(x, a.down.astype(x.dtype), b.stride, b.padding, b.dilation, b.groups)
        else:
            h = x @ a.down.astype(x.dtype)
        h = h * a.scale
        if len(a.segments) == 1 and a.segments[0][:2] == (0, self.out_features):
            return h @ a.segments[0][4].astype(x.dtype)
        pieces, pos = [], 0
        lead = h.shape[:-1]
        for row0, row1, r0, r1, up in a.segments:
            if row0 > pos:
                pieces.append(mx.zeros(lead + (row0 - pos,), x.dtype))
            pieces.append(h[..., r0:r1] @ up.astype(x.dtype))
            pos = row1
        if pos < self.out_features:
            pieces.append(mx.zeros(lead + (self.out_features - pos,), x.dtype))
        return mx.concatenate(pieces, axis=-1)

    def delta_weight(self, adapters: Optional[Iterable[Adapter]] = None) -> mx.array:
        """Σ w·ΔW over the active adapters, fp32, in the base weight's layout."""
        base_w = self.base["weight"]
        out = layer_dims(self.base)[0]
        rest = tuple(base_w.shape[1:]) if self.conv else (layer_dims(self.base)[1],)
        total = mx.zeros((out,) + rest, mx.float32)
        for a in adapters if adapters is not None else self.loras.active():
            down = a.down.astype(mx.float32)
            flat_down = down.reshape(down.shape[0], -1) if self.conv else down.T  # (R, in…)
            rows = []
            pos = 0
            for row0, row1, r0, r1, up in a.segments:
                if row0 > pos:
                    rows.append(mx.zeros((row0 - pos, flat_down.shape[1]), mx.float32))
                rows.append(up.astype(mx.float32).T @ flat_down[r0:r1])
                pos = row1
            if pos < out:
                rows.append(mx.zeros((out - pos, flat_down.shape[1]), mx.float32))
            total = total + a.scale * mx.concatenate(rows, axis=0).reshape(total.shape)
        return total

    # ---- 16-bit fusing ----
    def fuse(self, keep_original: bool = True) -> None:
        if self.fused:
            return
        if isinstance(self.base, nn.QuantizedLinear):
            raise InputError(
                "a LoRA cannot be fused into quantized weights: re-quantizing would round it away. It runs "
                "beside them at runtime instead; to bake it into a quantized model, fuse it into the 16-bit "
                "weights before quantizing (convert.py --lora ... --fuse-lora)"
            )
        w = self.base["weight"]
        self.base["weight"] = (w.astype(mx.float32) + self.delta_weight()).astype(w.dtype)
        self.loras.original = w if keep_original else mx.zeros((0,))

    def unfuse(self) -> None:
        if not self.fused:
            return
        if self.loras.original.size == 0:
            raise InputError("this layer was fused without keeping its original weights; reload the model")
        self.base["weight"] = self.loras.original
        self.loras.original = None


# ---- finding and replacing layers by path ----
def _parent(model: nn.Module, path: str) -> Tuple[object, str]:
    parts = path.split(".")
    node: object = model
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, parts[-1]


def get_layer(model: nn.Module, path: str) -> nn.Module:
    parent, last = _parent(model, path)
    return parent[int(last)] if isinstance(parent, list) else parent[last]


def _set_layer(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent, last = _parent(model, path)
    if isinstance(parent, list):
        parent[int(last)] = layer
    else:
        setattr(parent, last, layer)


def lora_layers(model: nn.Module) -> Dict[str, LoRALayer]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALayer)}


def _adapter(layer: nn.Module, parts: Sequence[Placed], scale: float) -> Adapter:
    dtype = _compute_dtype(layer)
    parts = sorted(parts, key=lambda p: p.rows)
    downs, segments, r = [], [], 0
    for p in parts:
        rank = p.down.shape[0]
        # linear down (r, in) -> (in, r); a conv keeps (r, kh, kw, C) and is concatenated on r
        downs.append(p.down if p.down.ndim == 4 else p.down.T)
        up = (p.up.astype(mx.float32) * p.scale).T.astype(dtype)  # (r, rows), alpha/r folded in
        segments.append((p.rows[0], p.rows[1], r, r + rank, up))
        r += rank
    down = mx.concatenate(downs, axis=0 if downs[0].ndim == 4 else 1).astype(dtype)
    adapter = Adapter(down, tuple(segments), scale)
    mx.eval(down, *(s[4] for s in segments))
    return adapter


def attach(model: nn.Module, placed: Dict[str, List[Placed]], name: str, scale: float = 1.0) -> int:
    """Add LoRA `name` to the layers in `placed` (from `targets.place`); returns how many layers."""
    scale = check_scale(scale)
    for path, parts in placed.items():
        layer = get_layer(model, path)
        if not isinstance(layer, LoRALayer):
            if not isinstance(layer, (nn.Linear, nn.QuantizedLinear, nn.Conv2d)):
                raise InputError(f"cannot put a LoRA on {path}: it is a {type(layer).__name__}")
            layer = LoRALayer(layer)
            _set_layer(model, path, layer)
        if layer.fused:
            raise InputError(f"{path} has LoRAs fused into it; unfuse before adding another")
        layer.loras.by_name[name] = _adapter(layer.base, parts, scale)
    return len(placed)


def set_scale(model: nn.Module, name: str, scale: float) -> int:
    """Change LoRA `name`'s weight on every layer it is on; returns how many layers."""
    scale = check_scale(scale)
    n = 0
    for path, layer in lora_layers(model).items():
        if name in layer.loras.by_name:
            if layer.fused:
                raise InputError(f"{path} has LoRAs fused into it; unfuse before changing scales")
            layer.loras.by_name[name].scale = scale
            n += 1
    return n


def detach(model: nn.Module, name: Optional[str] = None) -> int:
    """Remove LoRA `name` (None: all); layers left without LoRAs become their plain base again."""
    n = 0
    for path, layer in lora_layers(model).items():
        if layer.fused:
            layer.unfuse()
        names = list(layer.loras.by_name) if name is None else [name]
        for key in names:
            if layer.loras.by_name.pop(key, None) is not None:
                n += 1
        if not layer.loras.by_name:
            _set_layer(model, path, layer.base)
    return n


def names_on(model: nn.Module) -> List[str]:
    return sorted({n for layer in lora_layers(model).values() for n in layer.loras.by_name})


def fuse(model: nn.Module, keep_original: bool = True) -> int:
    """Merge every active LoRA into its 16-bit layer's weight (quantized layers: InputError)."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.fuse(keep_original)
    mx.eval([layer.base["weight"] for layer in layers.values()])
    return len(layers)


def unfuse(model: nn.Module) -> int:
    """Undo `fuse`: the original weights again (the same arrays, bit for bit)."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.unfuse()
    return len(layers)


def bake(model: nn.Module) -> int:
    """Fuse without keeping the originals and drop the LoRA layers: plain 16-bit layers holding
    W + ΔW (for the converter, which quantizes afterwards). Returns how many layers."""
    layers = lora_layers(model)
    for path, layer in layers.items():
        layer.fuse(keep_original=False)  # lazy: computed when the weight is first used or written
        _set_layer(model, path, layer.base)
    return len(layers)


def adapter_bytes(model: nn.Module, name: Optional[str] = None) -> int:
    return sum(a.nbytes for layer in lora_layers(model).values()
               for n, a in layer.loras.by_name.items() if name is None or n == name)  # fmt: skip


__all__ = [
    "Adapter", "LoRALayer", "adapter_bytes", "attach", "bake", "check_scale", "detach", "fuse",
    "get_layer", "lora_layers", "names_on", "set_scale", "unfuse",
]  # fmt: skip
