"""Shared test utilities: randomizing reference (PyTorch) models, saving them, comparing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import mlx.core as mx
import numpy as np
import torch


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0, gain: float = 1.0) -> torch.nn.Module:
    """Give every parameter a random value, norm weights included (none left at 1 or 0).

    Weights get std gain/sqrt(fan_in) so activations keep their scale through deep stacks.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.ndim == 1 and name.endswith("weight"):
            v = 1.0 + 0.2 * r  # norm scales
        elif p.ndim == 1:
            v = 0.1 * r  # biases
        elif "embedding" in name or "shared" in name or "embed_tokens" in name or "pos_embed" in name:
            v = r  # lookup tables
        else:
            fan_in = math.prod(p.shape[1:])
            v = r * gain / math.sqrt(fan_in)
        p.copy_(v.to(p.dtype))
    for name, b in module.named_buffers():
        if b.is_floating_point() and "pos_embed" in name:
            b.copy_(torch.randn(b.shape, generator=g).to(b.dtype))
    return module


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return np.asarray(x, dtype=np.float32)


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    a, b = to_numpy(ours), to_numpy(ref)
    assert a.shape == b.shape, f"shape {a.shape} vs reference {b.shape}"
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def nchw_to_nhwc(x) -> mx.array:
    return mx.array(to_numpy(x)).transpose(0, 2, 3, 1)


def nhwc_to_nchw(x: mx.array) -> np.ndarray:
    return to_numpy(x).transpose(0, 3, 1, 2)
