"""Guidance arithmetic: classifier-free guidance and skip-layer guidance (docs/sampling.md, "Guidance").

Works on velocities (diffusers' choice; SAI combines x0 predictions, which is the same
thing because x0 = x − σ·v is affine in v with the same x for every branch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import mlx.core as mx

from ..errors import InputError


def _f32(x: mx.array) -> mx.array:
    # Upcast 16-bit predictions: cond − uncond is a small difference of large numbers.
    return x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x


def uses_cfg(scale: float) -> bool:
    """Whether to run the unconditional branch at all.

    Follows diffusers (`guidance_scale > 1`): at cfg ≤ 1 only the conditional prediction
    is used. TRAP: SAI's formula uncond + cfg·(cond − uncond) at cfg 0 (Turbo's recipe)
    would return the *unconditional* prediction instead.
    """
    return scale > 1.0


def cfg_combine(v_uncond: mx.array, v_cond: mx.array, scale: float) -> mx.array:
    """v_uncond + scale·(v_cond − v_uncond), in float32 for 16-bit inputs."""
    v_uncond = _f32(v_uncond)
    return v_uncond + scale * (_f32(v_cond) - v_uncond)


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance (SD3.5 Medium): an extra conditional pass with `layers` skipped.

    Defaults are diffusers' (scale 2.8; SAI's reference uses 2.5), with the layers that
    diffusers' docstring and SAI recommend for SD3.5 Medium. Like diffusers, it only
    applies on steps where CFG is on.
    """

    layers: tuple[int, ...] = (7, 8, 9)
    scale: float = 2.8
    start: float = 0.01
    end: float = 0.2

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, Integral) or i < 0 for i in layers):
            raise InputError(f"skip-layer guidance layers must be block indices ≥ 0 (got {self.layers!r})")
        object.__setattr__(self, "layers", tuple(int(i) for i in layers))
        if not math.isfinite(self.scale) or self.scale < 0:
            raise InputError(f"skip-layer guidance scale must be ≥ 0 (got {self.scale!r})")
        if not (0.0 <= self.start < self.end <= 1.0):
            raise InputError(
                f"skip-layer guidance needs 0 ≤ start < end ≤ 1 as fractions of the steps "
                f"(got start={self.start!r}, end={self.end!r})"
            )

    def check_depth(self, depth: int) -> None:
        """Raise InputError if a skipped layer does not exist in a `depth`-block model."""
        bad = [i for i in self.layers if i >= depth]
        if bad:
            raise InputError(
                f"skip-layer guidance layers {bad} do not exist: the model has blocks 0..{depth - 1}"
            )

    def active(self, step_index: int, num_steps: int) -> bool:
        """Whether step `step_index` (0-based) gets the skip pass: N·start < i < N·end, strictly."""
        return self.scale > 0 and num_steps * self.start < step_index < num_steps * self.end

    def active_steps(self, num_steps: int) -> tuple[int, ...]:
        return tuple(i for i in range(num_steps) if self.active(i, num_steps))

    def apply(self, v: mx.array, v_cond: mx.array, v_skip: mx.array) -> mx.array:
        """v + scale·(v_cond − v_skip); `v` is the CFG-combined prediction."""
        return _f32(v) + self.scale * (_f32(v_cond) - _f32(v_skip))
