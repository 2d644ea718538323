"""The flow-matching sigma schedule (docs/sampling.md: "Flow matching", "Schedule", "img2img truncation").

Numbers match diffusers' `FlowMatchEulerDiscreteScheduler` bit for bit: its 1000-entry
training table is float32, the inference grid is built in float64 and cast to float32.
Everything here runs on the host (NumPy) once per generation; samplers take the result
as Python floats so the denoising loop never synchronises with the device.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from ..errors import InputError

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 3.0  # every public SD3/SD3.5 diffusers scheduler config


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise InputError(f"steps must be a whole number ≥ 1 (got {steps!r})")
    return int(steps)


def _check_shift(shift: float) -> float:
    if isinstance(shift, bool) or not isinstance(shift, Real) or not math.isfinite(shift) or shift <= 0:
        raise InputError(f"shift must be a finite number > 0 (got {shift!r})")
    return float(shift)


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, Real) or not (0.0 < strength <= 1.0):
        raise InputError(
            f"strength must be in (0, 1] (got {strength!r}): 1 replaces the image entirely, "
            "small values keep more of it"
        )
    return float(strength)


def shift_sigmas(sigmas, shift: float):
    """σ ↦ shift·σ / (1 + (shift−1)·σ), in the dtype of `sigmas`."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _sigma_min(shift: float) -> float:
    # diffusers' training table is float32: σ_min = shift(1/1000) evaluated in float32.
    s = np.float32(1) / np.float32(NUM_TRAIN_TIMESTEPS)
    f32 = np.float32
    return float(f32(shift) * s / (f32(1) + f32(shift - 1) * s))


def flow_sigmas(steps: int, shift: float = DEFAULT_SHIFT) -> np.ndarray:
    """The `steps + 1` sigmas of a txt2img run, from 1.0 down, ending with an appended 0.

    Same values as diffusers `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)`:
    linspace(σ_max, σ_min) over the *shifted* training table is shifted again, so the last
    non-zero sigma is shift(shift(0.001)) (0.008929 for shift 3), not shift(0.001).
    """
    steps = _check_steps(steps)
    shift = _check_shift(shift)
    sigma_max = 1.0  # shift(1) == 1 for every shift
    grid = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, _sigma_min(shift) * NUM_TRAIN_TIMESTEPS, steps)
    sigmas = shift_sigmas(grid / NUM_TRAIN_TIMESTEPS, shift).astype(np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)])


def flow_timesteps(sigmas: np.ndarray) -> np.ndarray:
    """Model timesteps t = σ·1000 (float32, one per step: the final 0 is dropped)."""
    sigmas = np.asarray(sigmas, dtype=np.float32)
    return sigmas[:-1] * np.float32(NUM_TRAIN_TIMESTEPS)


def img2img_start_index(steps: int, strength: float) -> int:
    """How many leading sigmas img2img skips: diffusers' `get_timesteps` formula.

    `t_start = int(max(N − min(N·strength, N), 0))`. SAI's `sd3_infer.py` uses
    `int(N·(1 − denoise))` instead; in float arithmetic the two differ by one for e.g.
    40/0.8 (diffusers skips 8, SAI 7) and 50/0.8 (10 vs 9). We follow diffusers because
    our whole-pipeline parity tests compare against its img2img pipeline.
    """
    steps = _check_steps(steps)
    strength = _check_strength(strength)
    init_steps = min(steps * strength, steps)
    t_start = int(max(steps - init_steps, 0))
    if t_start >= steps:  # only when steps·strength is lost to rounding
        raise InputError(
            f"strength {strength!r} leaves no denoising step out of {steps}; "
            f"use strength ≥ 1/steps = {1 / steps:.6g}"
        )
    return t_start


def img2img_sigmas(steps: int, strength: float, shift: float = DEFAULT_SHIFT) -> np.ndarray:
    """The tail of `flow_sigmas(steps, shift)` that img2img runs (final 0 included).

    Its first value σ₀ is the noise level of the start latent: x = σ₀·noise + (1−σ₀)·z.
    The number of model calls is `len(result) − 1`.
    """
    t_start = img2img_start_index(steps, strength)
    return flow_sigmas(steps, shift)[t_start:]


def scale_noise(latents, noise, sigma: float):
    """The flow forward process x_σ = σ·noise + (1−σ)·x0 (diffusers `scale_noise`)."""
    return sigma * noise + (1.0 - sigma) * latents
