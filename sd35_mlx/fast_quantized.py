"""Quantized layers that cost memory but not time.

`mx.quantized_matmul` is the right kernel when few rows pass through a layer (it reads
4-/8-bit weights: the matmul is memory-bound), but at the MMDiT's token counts (thousands
of rows per step) it is much slower than a 16-bit matmul on some backends (measured: 2.2–2.5×
slower on an H100 with MLX 0.32.4 CUDA, ~14× on the CPU at bf16). There, dequantizing the
layer's weight just before its matmul is cheaper: the weight stays quantized in memory and
the full-precision copy of ONE layer lives only until its matmul has run.

    use_dequantized_matmul(transformer)        # in place; same parameters, same file format
    use_quantized_matmul(transformer)          # back to plain nn.QuantizedLinear

See benchmarks/bench_quantized_matmul.py for the measurements that set `min_rows`.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

# Rows (tokens × batch) from which dequantize-then-matmul is used, per backend. Measured
# with benchmarks/bench_quantized_matmul.py (docs/performance.md): on the CPU the quantized
# kernel is slower at every size that matters; on CUDA it wins only for small row counts.
DEFAULT_MIN_ROWS = {"cpu": 1, "gpu": 256}


def default_min_rows(device: Optional[mx.Device] = None) -> int:
    device = device or mx.default_device()
    return DEFAULT_MIN_ROWS["cpu" if device.type == mx.cpu else "gpu"]


def dequantized_weight(layer: nn.QuantizedLinear, dtype: Optional[mx.Dtype] = None) -> mx.array:
    """The layer's weight (out, in) in full precision (`dtype`, default the scales' dtype)."""
    return mx.dequantize(
        layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits,
        mode=layer.mode, dtype=dtype,
    )  # fmt: skip


class DequantizingLinear(nn.QuantizedLinear):
    """An nn.QuantizedLinear (same parameters) that, for inputs of at least `min_rows`
    rows, dequantizes its weight and runs a dense matmul instead of `quantized_matmul`."""

    min_rows: int = 1

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear, min_rows: int) -> "DequantizingLinear":
        # Bypass __init__: it would draw and quantize a random weight of the full size.
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.group_size, new.bits, new.mode = layer.group_size, layer.bits, layer.mode
        new.min_rows = int(min_rows)
        for key, value in layer.items():  # weight, scales, [biases], [bias]: shared, not copied
            new[key] = value
        new.freeze()
        return new

    def to_quantized(self) -> nn.QuantizedLinear:
        plain = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
        nn.Module.__init__(plain)
        plain.group_size, plain.bits, plain.mode = self.group_size, self.bits, self.mode
        for key, value in self.items():
            plain[key] = value
        plain.freeze()
        return plain

    def __call__(self, x: mx.array) -> mx.array:
        rows = math.prod(x.shape[:-1])
        if rows < self.min_rows:
            return super().__call__(x)
        w = dequantized_weight(self, x.dtype)
        if "bias" in self:
            return mx.addmm(self["bias"].astype(x.dtype), x, w.T)
        return x @ w.T


def use_dequantized_matmul(model: nn.Module, min_rows: Optional[int] = None) -> int:
    """Swap every nn.QuantizedLinear of `model` for a DequantizingLinear (in place, sharing
    the arrays). min_rows: default per backend (`default_min_rows`). Returns the count."""
    threshold = default_min_rows() if min_rows is None else int(min_rows)
    count = 0

    def convert(_path: str, module: nn.Module) -> nn.Module:
        nonlocal count
        if isinstance(module, DequantizingLinear):
            module.min_rows = threshold
            count += 1
            return module
        if isinstance(module, nn.QuantizedLinear):
            count += 1
            return DequantizingLinear.from_quantized(module, threshold)
        return module

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    if count:
        model.update_modules(leaves)
    return count


def use_quantized_matmul(model: nn.Module) -> int:
    """Undo `use_dequantized_matmul`: plain nn.QuantizedLinear layers again. Returns the count."""
    count = 0

    def convert(_path: str, module: nn.Module) -> nn.Module:
        nonlocal count
        if isinstance(module, DequantizingLinear):
            count += 1
            return module.to_quantized()
        return module

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    if count:
        model.update_modules(leaves)
    return count


__all__ = [
    "DEFAULT_MIN_ROWS", "DequantizingLinear", "default_min_rows", "dequantized_weight",
    "use_dequantized_matmul", "use_quantized_matmul",
]  # fmt: skip
