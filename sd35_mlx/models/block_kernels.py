"""The joint block's elementwise work: LayerNorm + adaLN modulation (optionally after the
gated residual), and the tanh GELU, for one stream or for both streams of a block at once.

    h = norm_modulate(x, shift, scale)                      # LayerNorm(x) * (1 + scale) + shift
    x, h = residual_norm_modulate(x, y, gate, shift, scale)  # x + gate * y, then the same on it
    y = gelu_tanh(fc1_out)                                  # 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
    (h_x, h_c) = norm_modulate_pair((x, sx, cx), (ctx, sc, cc))   # both streams, one launch
    (g_x, g_c) = gelu_tanh_pair(fc1_x, fc1_c)                        # likewise
    ((x, h),) = norm_modulate_streams((Pending(x, y, gate), shift, scale))  # the residual deferred

On CUDA each call is one kernel of ours (block_kernels_cuda.py). Profiled on an H200
(benchmarks/profile_kernels.py): MLX's LayerNorm took 51 µs per call where torch's takes 15 µs,
the modulation after it and the gated residual before it were passes of their own, and a
512² step is bound by the host's cost per launch (~23 µs), so both streams share a launch.
The kernels read their inputs once, compute in float32 and round once; results are within a
bf16 rounding step of the plain path (which rounds after every op). Every other backend (CPU,
Metal) and any unusual shape take the plain path, which is what the kernels are tested against.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ..backend import KERNELS, backend_name
from . import block_kernels_cuda as cuda

NORM_EPS = cuda.NORM_EPS  # every SD3 LayerNorm and RMSNorm

# (x, shift, scale) or, with the gated residual in front, (x, y, gate, shift, scale)
NormStream = Tuple[mx.array, ...]


def layer_norm(x: mx.array) -> mx.array:
    """LayerNorm without affine parameters (every norm of the MMDiT)."""
    return mx.fast.layer_norm(x, None, None, NORM_EPS)


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return x * (1 + scale) + shift


def norm_modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """modulate(layer_norm(x), shift, scale) for x (B, N, H) and shift, scale (B, 1, H)."""
    (h,) = norm_modulate_pair((x, shift, scale))
    return h


def residual_norm_modulate(x: mx.array, y: mx.array, gate: mx.array, shift: mx.array, scale: mx.array
                           ) -> Tuple[mx.array, mx.array]:  # fmt: skip
    """(x + gate * y, norm_modulate(x + gate * y, shift, scale)): the block's residual after
    attention and the MLP's input in one pass."""
    ((x, h),) = residual_norm_modulate_pair((x, y, gate, shift, scale))
    return x, h


def norm_modulate_pair(*streams: NormStream) -> Tuple[mx.array, ...]:
    """norm_modulate of each (x, shift, scale) stream (one or two), one launch on CUDA."""
    if _use_cuda() and cuda.norm_fits(streams, residual=False):
        return tuple(cuda.norm_modulate(streams, residual=False))
    return tuple(modulate(layer_norm(x), shift, scale) for x, shift, scale in streams)


def residual_norm_modulate_pair(*streams: NormStream) -> Tuple[Tuple[mx.array, mx.array], ...]:
    """residual_norm_modulate of each (x, y, gate, shift, scale) stream -> ((x, h), ...)."""
    if _use_cuda() and cuda.norm_fits(streams, residual=True):
        out = cuda.norm_modulate(streams, residual=True)
        return tuple((out[2 * i], out[2 * i + 1]) for i in range(len(streams)))
    pairs = []
    for x, y, gate, shift, scale in streams:
        x = x + gate * y
        pairs.append((x, modulate(layer_norm(x), shift, scale)))
    return tuple(pairs)


class Pending(NamedTuple):
    """A residual stream whose last gated update is not added yet: base + gate * update. The
    next LayerNorm makes the addition in its own pass (`norm_modulate_streams`): one launch
    and one pass over the tokens fewer per block."""

    base: mx.array
    update: mx.array
    gate: mx.array

    def value(self) -> mx.array:
        return self.base + self.gate * self.update


Stream = Union[mx.array, Pending]


def settle(x: Stream) -> mx.array:
    """The stream's value (adds a pending update)."""
    return x.value() if isinstance(x, Pending) else x


def norm_modulate_streams(*streams: Tuple[Stream, mx.array, mx.array]) -> Tuple[Tuple[mx.array, mx.array], ...]:
    """For each (stream, shift, scale): (the stream's value, norm_modulate of it); pending
    updates are added in the same launch (one launch for up to two streams on CUDA)."""
    if all(isinstance(x, Pending) for x, _, _ in streams):
        return residual_norm_modulate_pair(*((*x, shift, scale) for x, shift, scale in streams))
    values = [settle(x) for x, _, _ in streams]
    hs = norm_modulate_pair(*((v, shift, scale) for v, (_, shift, scale) in zip(values, streams)))
    return tuple(zip(values, hs))


def gelu_tanh(x: mx.array) -> mx.array:
    """The tanh approximation of GELU (diffusers' "gelu-approximate", T5's gelu_new)."""
    (y,) = gelu_tanh_pair(x)
    return y


def gelu_tanh_pair(*arrays: mx.array) -> Tuple[mx.array, ...]:
    """gelu_tanh of each array (one or two: both streams' fc1 outputs), one launch on CUDA."""
    if _use_cuda() and cuda.gelu_fits(arrays):
        return tuple(cuda.gelu_tanh(arrays))
    return tuple(nn.gelu_approx(a) for a in arrays)


def _use_cuda() -> bool:
    return KERNELS.block_elementwise and backend_name() == "cuda"


__all__ = [
    "NORM_EPS", "Pending", "Stream", "gelu_tanh", "gelu_tanh_pair", "layer_norm", "modulate", "norm_modulate", "norm_modulate_pair",
    "norm_modulate_streams", "residual_norm_modulate", "residual_norm_modulate_pair", "settle",
]  # fmt: skip
