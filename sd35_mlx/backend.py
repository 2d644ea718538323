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
    group_norm: compiled GroupNorm (+ SiLU) on GPUs (models/vae.py).
    """

    dequantize: bool = True
    joint_heads: bool = True
    group_norm: bool = True

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

__all__ = ["BACKENDS", "backend_name", "cuda_available", "on_cpu", "Kernels", "KERNELS"]
