"""Which MLX backend runs the work (`cpu`, `metal`, `cuda`), and the switches of our own
kernels and fused paths, as one settable object.

    from sd35_mlx.backend import KERNELS, backend_name
    backend_name()                          # "cpu", "metal" or "cuda"
    with KERNELS.overridden(joint_heads=False):
        ...                                 # the plain path, e.g. to time the fused one against it

Each switch only allows its path; the path itself still checks that the backend and the
arrays fit it (the CUDA kernels run only on CUDA, compiled GroupNorm only on a GPU).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator, Optional

import mlx.core as mx

BACKENDS = ("cpu", "metal", "cuda")


def backend_name(device: Optional[mx.Device] = None) -> str:
    """'cpu', 'metal' or 'cuda': the backend of `device` (default: MLX's default device)."""
    device = device or mx.default_device()
    if device.type == mx.DeviceType.cpu:
        return "cpu"
    return "cuda" if cuda_available() else "metal"


def cuda_available() -> bool:
    return hasattr(mx, "cuda") and mx.cuda.is_available()


def on_cpu(device: Optional[mx.Device] = None) -> bool:
    return backend_name(device) == "cpu"


@dataclass
class Kernels:
    """Switches of the fast paths (all on by default). Benchmarks and tests turn one off to
    compare against the plain path; nothing else should need to.

    dequantize: our CUDA dequantize kernel (fast_quantized.dequantized_weight) instead of
        mx.dequantize.
    joint_heads: the CUDA kernel that splits the qkv projections into heads
        (models/joint_heads.py) instead of reshapes, norms and concatenations.
    block_elementwise: the CUDA kernels for LayerNorm + modulation and the tanh GELU of
        the joint blocks (models/block_kernels.py) instead of MLX's separate ops.
    group_norm: compiled GroupNorm (+ SiLU) on GPUs (models/vae.py).
    cpu_float32: on the CPU, 16-bit matmuls, convolutions and attention compute in float32
        (cpu_compute.py: MLX's CPU backend has no fast 16-bit kernels; the weights stay 16-bit).
    """

    dequantize: bool = True
    joint_heads: bool = True
    block_elementwise: bool = True
    group_norm: bool = True
    cpu_float32: bool = True

    @contextmanager
    def overridden(self, **switches: bool) -> Iterator["Kernels"]:
        """Set some switches inside the block, then restore them (even on an error)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(switches) - names)
        if unknown:
            raise TypeError(f"unknown kernel switch(es) {unknown}; the switches are {sorted(names)}")
        previous = {k: getattr(self, k) for k in switches}
        for k, v in switches.items():
            setattr(self, k, bool(v))
        try:
            yield self
        finally:
            for k, v in previous.items():
                setattr(self, k, v)


KERNELS = Kernels()


def compute_in_float32(dtype: mx.Dtype, device: Optional[mx.Device] = None) -> bool:
    """Whether 16-bit work should be computed in float32 here (the CPU; see Kernels.cpu_float32)."""
    return KERNELS.cpu_float32 and dtype in (mx.bfloat16, mx.float16) and on_cpu(device)

__all__ = ["BACKENDS", "backend_name", "compute_in_float32", "cuda_available", "on_cpu", "Kernels", "KERNELS"]
