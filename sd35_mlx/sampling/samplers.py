"""Flow-matching ODE samplers (docs/sampling.md, "Samplers"): Euler and DPM-Solver++(2M).

The model predicts a velocity v; the denoised estimate is x0 = x − σ·v. All per-step
coefficients are Python floats computed on the host when the sampler is built, so
`step` only records MLX operations: a loop of `x = sampler.step(i, x, v)` never forces
evaluation (no `.item()`, no comparisons on device values). Updates run in float32
whatever the model's dtype, as diffusers upcasts the sample for the update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import mlx.core as mx
import numpy as np

from ..errors import InputError
from .schedule import NUM_TRAIN_TIMESTEPS


def _f32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def euler_step(x: mx.array, v: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """x + (σ' − σ)·v in float32. The difference is taken in float32, as diffusers does."""
    dt = float(np.float32(sigma_next) - np.float32(sigma))
    return _f32(x) + dt * _f32(v)


def _check_sigmas(sigmas: Sequence[float]) -> list:
    values = [float(s) for s in np.asarray(sigmas, dtype=np.float64).reshape(-1)]
    if len(values) < 2:
        raise InputError(f"a sampler needs at least 2 sigmas (start and end), got {len(values)}")
    if any(not math.isfinite(s) for s in values):
        raise InputError("sigmas must be finite")
    if any(s <= 0 for s in values[:-1]) or values[-1] < 0:
        raise InputError("sigmas must be > 0 except the last one, which may be 0")
    if any(b >= a for a, b in pairwise(values)):
        raise InputError("sigmas must be strictly decreasing")
    return values


class Sampler:
    """Common interface: `x = sampler.step(i, x, v)` for i in range(sampler.num_steps)."""

    name: str = ""

    def __init__(self, sigmas: Sequence[float]):
        self.sigmas = _check_sigmas(sigmas)
        # t = σ·1000 in float32, the value diffusers feeds the transformer.
        s32 = np.asarray(self.sigmas, dtype=np.float32)
        self.timesteps = (s32[:-1] * np.float32(NUM_TRAIN_TIMESTEPS)).astype(np.float64).tolist()

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def reset(self) -> None:
        """Forget history so the sampler can run another trajectory."""

    def denoised(self, i: int, x: mx.array, v: mx.array) -> mx.array:
        """The model's estimate of the clean latent at step i: x0 = x − σ_i·v (float32)."""
        return _f32(x) - self.sigmas[i] * _f32(v)

    def step(self, i: int, x: mx.array, v: mx.array) -> mx.array:
        raise NotImplementedError

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_steps:
            raise InputError(f"step index {i} out of range 0..{self.num_steps - 1}")


class EulerSampler(Sampler):
    """x ← x + (σ_{i+1} − σ_i)·v (diffusers `FlowMatchEulerDiscreteScheduler.step`)."""

    name = "euler"

    def __init__(self, sigmas: Sequence[float]):
        super().__init__(sigmas)
        s32 = np.asarray(self.sigmas, dtype=np.float32)
        self._dt = (s32[1:] - s32[:-1]).astype(np.float64).tolist()

    def step(self, i: int, x: mx.array, v: mx.array) -> mx.array:
        self._check_index(i)
        return _f32(x) + self._dt[i] * _f32(v)


class DPMPP2MSampler(Sampler):
    """DPM-Solver++(2M) as in SAI's `sample_dpmpp_2m` (k-diffusion), with λ = −log σ.

    Step i (h = λ_{i+1} − λ_i):
      * first step of a trajectory: x ← (σ_{i+1}/σ_i)·x − expm1(−h)·x0_i  (= Euler for flow);
      * later steps, r = (λ_i − λ_{i−1})/h, D = (1 + 1/2r)·x0_i − (1/2r)·x0_{i−1},
        x ← (σ_{i+1}/σ_i)·x − expm1(−h)·D;
      * a step to σ = 0 returns x0_i: written out, as log(0) would give inf/NaN.
    Keeps the previous x0 between calls; call `reset()` (or step 0) to start a new run.
    """

    name = "dpmpp_2m"

    def __init__(self, sigmas: Sequence[float]):
        super().__init__(sigmas)
        s = self.sigmas
        n = self.num_steps
        self._ratio = [s[i + 1] / s[i] for i in range(n)]
        # λ_{i+1} − λ_i = log σ_i − log σ_{i+1}; undefined (∞) for the final σ = 0.
        self._h = [math.log(s[i]) - math.log(s[i + 1]) if s[i + 1] > 0 else math.inf for i in range(n)]
        self._coef = [-math.expm1(-h) if math.isfinite(h) else 1.0 for h in self._h]
        self._prev_x0: mx.array | None = None
        self._prev_index: int | None = None

    def reset(self) -> None:
        self._prev_x0 = None
        self._prev_index = None

    def step(self, i: int, x: mx.array, v: mx.array) -> mx.array:
        self._check_index(i)
        x0 = self.denoised(i, x, v)
        has_history = self._prev_x0 is not None and self._prev_index == i - 1
        if self.sigmas[i + 1] == 0:
            out = x0
        elif not has_history:
            out = self._ratio[i] * _f32(x) + self._coef[i] * x0
        else:
            r = self._h[i - 1] / self._h[i]
            a = 1.0 / (2.0 * r)
            d = (1.0 + a) * x0 - a * self._prev_x0
            out = self._ratio[i] * _f32(x) + self._coef[i] * d
        self._prev_x0, self._prev_index = x0, i
        return out


SAMPLERS: dict[str, type[Sampler]] = {
    EulerSampler.name: EulerSampler,
    DPMPP2MSampler.name: DPMPP2MSampler,
}


def make_sampler(name: str, sigmas: Sequence[float]) -> Sampler:
    """A fresh sampler by name ("euler" or "dpmpp_2m") over the given sigmas."""
    try:
        cls = SAMPLERS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}") from None
    return cls(sigmas)
