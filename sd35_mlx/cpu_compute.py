"""16-bit weights, float32 arithmetic on the CPU.

MLX's CPU backend has no fast bf16 / fp16 matmul or convolution: they run its own loops at
1-5 GFLOP/s, where float32 goes to the BLAS (OpenBLAS, see cpu_blas.py: ~28 GFLOP/s on 2
cores). So on the CPU the Linear and Conv2d layers of a 16-bit network cast their input and
weight to float32, compute, and cast the result back: the weights stay stored in the dtype the
user asked for (memory unchanged but for one layer's float32 copy at a time), the activations
between layers keep that dtype too. Casting a weight is one pass over it, cheap next to the
matmul on a CPU. Other backends are untouched (`backend.cpu_float32_compute`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

HALF = (mx.bfloat16, mx.float16)


class Float32Linear(nn.Linear):
    """nn.Linear (same parameters) computing in float32."""

    def __call__(self, x: mx.array) -> mx.array:
        xf, w = x.astype(mx.float32), self["weight"].astype(mx.float32)
        y = mx.addmm(self["bias"].astype(mx.float32), xf, w.T) if "bias" in self else xf @ w.T
        return y.astype(x.dtype)


class Float32Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters) computing in float32."""

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.conv2d(x.astype(mx.float32), self["weight"].astype(mx.float32), self.stride, self.padding,
                      self.dilation, self.groups)  # fmt: skip
        if "bias" in self:
            y = y + self["bias"].astype(mx.float32)
        return y.astype(x.dtype)


_SWAPS = {nn.Linear: Float32Linear, nn.Conv2d: Float32Conv2d}
_BACK = {v: k for k, v in _SWAPS.items()}


def _retyped(module: nn.Module, cls: type) -> nn.Module:
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update(module.__dict__)  # settings (stride, padding, frozen state)
    for key, value in module.items():  # the same parameters, shared
        new[key] = value
    return new


def _swap(model: nn.Module, table: dict, wanted) -> int:
    count = 0

    def convert(_path: str, module: nn.Module) -> nn.Module:
        nonlocal count
        cls = table.get(type(module))
        if cls is None or not wanted(module):
            return module
        count += 1
        return _retyped(module, cls)

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    if count:
        model.update_modules(leaves)
    return count


def use_float32_compute(model: nn.Module, only_where_useful: bool = True) -> int:
    """Swap the 16-bit nn.Linear / nn.Conv2d layers of `model` (exactly those types: quantized
    layers have their own path) for their float32-computing twins, in place. Returns the count.
    only_where_useful: only where `backend.compute_in_float32` says so (the CPU)."""
    from .backend import compute_in_float32

    if only_where_useful and not compute_in_float32(model_dtype(model)):
        return 0
    return _swap(model, _SWAPS, lambda m: m["weight"].dtype in HALF)


def model_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype of the model's first floating-point parameter (float32 if none)."""
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return p.dtype
    return mx.float32


def use_native_compute(model: nn.Module) -> int:
    """Undo `use_float32_compute`."""
    return _swap(model, _BACK, lambda m: True)
