"""What the pipeline tells its caller while it works, and how the caller stops it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import mlx.core as mx


class GenerationInterrupted(Exception):
    """Raised by `SD35Pipeline.generate` when a callback asked to stop."""


@dataclass
class StepInfo:
    """One denoising step, as yielded by `generate_latents` and passed to callbacks."""

    step: int  # 1-based index of the finished step
    total: int
    sigma: float  # noise level after this step
    latents: mx.array  # (B, H/8, W/8, 16), float32
    seed: int


class StepCallback(Protocol):
    def __call__(self, info: StepInfo) -> Optional[bool]:
        """Return False to stop generation after this step."""


