"""One velocity evaluation per step: CFG as a batch of 2, a single pass for cfg ≤ 1,
and skip-layer guidance on the steps where it is active.

    denoiser = Denoiser(transformer, positive, negative, cfg=4.5, skip_layer_guidance=None,
                        num_steps=28, sigmas=sigmas, free_adaln=True)
    for i, latents in denoiser.run(latents, sampler, range(28)):   # model + guidance + sampler update
        ...                                             # step i's latents, evaluated

What makes a step fast and lean (docs/performance.md):
* the modulations of every block depend only on the timestep and the pooled text, so with
  `sigmas` they are computed for all steps in one batched pass (a table of
  steps × CFG batch), and `free_adaln=True` then drops the adaLN / embedder weights;
* the text tokens are embedded once, the position table is cropped once per resolution
  (`free_pos_embed=True` drops the full table);
* the step (transformer given modulations + CFG + SLG, and the Euler update when
  `step()` is given an Euler sampler) is one `mx.compile`d call; per-step data (the
  modulation-table row, dt) are arrays, so nothing retraces;
* a quantized transformer uses dequantize-then-matmul for large token counts, one
  de-quantization launch per block (`dequantize_per_block`);
* `run` builds step i+1's graph while step i runs on the device (`builds_ahead`) and
  queues it before waiting for step i (`queue_ahead`), so the device does not idle while
  the host records and encodes the next step's ~800 operations.

`free_adaln` / `free_pos_embed` mutate the transformer: use them only when the caller owns
it and will not call it directly again (the pipeline drops it after denoising). Calling
such a transformer the plain way raises `FreedWeightsError`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Iterator, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .conditioning import Conditioning
from .control.stack import ActiveControlNet, ControlStack
from .errors import InputError
from .cpu_compute import use_float32_compute
from .fast_quantized import use_dequantized_matmul
from .models.mmdit import FreedWeightsError
from .sampling.guidance import SkipLayerGuidance, cfg_combine
from .sampling.samplers import EulerSampler, Sampler


def timestep_of(sigma: float) -> np.float32:
    """The float32 timestep σ·1000 the transformer sees (as the plain path computes it)."""
    return np.float32(float(sigma) * 1000.0)


class Denoiser:
    def __init__(
        self,
        transformer,
        positive: Conditioning,
        negative: Optional[Conditioning],
        *,
        cfg: float,
        skip_layer_guidance: Optional[SkipLayerGuidance],
        num_steps: int,
        sigmas: Optional[Sequence[float]] = None,
        free_adaln: bool = False,
        free_pos_embed: bool = False,
        compile: bool = True,
        dequantize_min_rows: Optional[int] = None,
        dequantize_per_block: bool = True,
        split_cfg: bool = False,
        slg_steps: Optional[int] = None,
        controlnets: Sequence[ActiveControlNet] = (),
        cfg_exchange=None,
    ):
        """sigmas: the schedule (num_steps + 1 values); with it every step's modulations
        are precomputed. free_adaln (needs sigmas) / free_pos_embed: drop those weights
        from the transformer (see the module docstring). compile: mx.compile the step.
        dequantize_min_rows: rows from which quantized layers dequantize before their
        matmul (default per backend; fast_quantized.py); dequantize_per_block: all of a block's
        quantized layers de-quantize in one launch (their 16-bit weights alive together for the
        block; the pipeline turns it off under a budget without room for that). split_cfg: run
        the negative and positive passes one after the other (batch 1 each, evaluated in between) instead of
        as one batch of 2: half the activation memory, somewhat slower. cfg_exchange
        (distributed.CFGExchange): CFG-parallel over 2 ranks, this rank runs one of the two
        passes on its half of the conditioning and the velocities are exchanged each step.
        slg_steps: the step count the skip-layer window is measured against (default
        num_steps; Stability's img2img uses the full schedule's, see
        sampling.schedule.img2img_start_index).
        controlnets: whose residuals enter the transformer (sd35_mlx.control.stack), on both
        CFG halves."""
        if free_adaln and sigmas is None:
            raise InputError("free_adaln needs the schedule (sigmas=) to precompute the modulations")
        self.transformer = transformer
        self.cfg = float(cfg)
        self.num_steps = num_steps
        self.slg_steps = num_steps if slg_steps is None else slg_steps
        self.dtype = transformer.dtype
        self.positive = positive
        self.batched = Conditioning.concat([negative, positive]) if negative is not None else None
        self.slg = skip_layer_guidance if negative is not None else None  # as diffusers: needs CFG
        self.free_pos_embed = free_pos_embed
        self._n_pos = positive.batch_size
        cond = self.batched if self.batched is not None else positive
        self.exchange = cfg_exchange
        if cfg_exchange is not None:
            if negative is None:
                raise InputError(f"CFG-parallel needs cfg > 1 and a negative conditioning (cfg={cfg:g})")
            cond = positive if cfg_exchange.runs_conditional else negative  # this rank's half
        self._pooled = cond.pooled.astype(self.dtype)

        networks = (transformer, *(c.net for c in controlnets))
        quantized = [use_dequantized_matmul(n, dequantize_min_rows) for n in networks]  # 0: not quantized
        for network in networks:
            use_float32_compute(network)  # the CPU only: 16-bit weights, float32 matmuls
        # Only quantized layers share a de-quantization: a 16-bit transformer's forward then
        # does not walk its blocks looking for them.
        transformer.dequantize_per_block = bool(dequantize_per_block) and quantized[0] > 0
        self.sigmas = None if sigmas is None else [float(s) for s in sigmas]
        self.table = None  # (steps, B, N, H) packed modulations
        if self.sigmas is not None:
            if len(self.sigmas) != num_steps + 1:
                raise InputError(f"sigmas has {len(self.sigmas)} values; {num_steps} steps need {num_steps + 1}")
            self._timesteps = np.array([timestep_of(s) for s in self.sigmas[:-1]], dtype=np.float32)
            self.table = transformer.modulation_table(mx.array(self._timesteps), self._pooled)
            mx.eval(self.table)
            if free_adaln:
                transformer.free_conditioning_weights()
        # Embedded once: the text tokens do not change between steps.
        self._ctx = transformer.embed_context(cond.context)
        self._ctx_pos = self._ctx[-self._n_pos :] if self.batched is not None and cfg_exchange is None else self._ctx
        mx.eval(self._ctx)
        self._compile = compile
        self._fns = {}
        self.split_cfg = bool(split_cfg) and self.batched is not None
        self.control = (
            ControlStack(controlnets, transformer, pooled=cond.pooled, context=cond.context) if controlnets else None
        )

    # ---- schedule ----
    def slg_active(self, step: int) -> bool:
        return self.slg is not None and self.slg.active(step, self.slg_steps)

    def modulations_at(self, step: int, sigma: float) -> mx.array:
        """Packed modulations (B, N, H) for this step: a table row, or computed now."""
        if self.table is not None and 0 <= step < self.num_steps and self._timesteps[step] == timestep_of(sigma):
            return self.table[step]
        if self.transformer.conditioning_freed:
            raise FreedWeightsError(
                f"step {step} at sigma {sigma} is not in the precomputed schedule and the "
                "transformer's adaLN weights were freed"
            )
        t = mx.full((self._pooled.shape[0],), timestep_of(sigma), dtype=mx.float32)
        tr = self.transformer
        return tr.pack_modulations(tr.modulations(tr.conditioning(t, self._pooled)))

    # ---- one step ----
    def __call__(self, latents: mx.array, sigma: float, step: int) -> mx.array:
        """Velocity (float32) for `latents` at `sigma` (step index `step`, 0-based)."""
        self._prepare_positions(latents)
        mods = self.modulations_at(step, sigma)
        t, scales, active = self._control_at(step, sigma)
        if self.exchange is not None:
            return self._exchanged_velocity(latents, mods, step, t, scales, active)
        if self.split_cfg:
            return self._split_velocity(latents, mods, step, t, scales, active)
        return self._fn(self._kind(step), euler=False, active=active)(latents, mods, t, scales)

    def step(self, latents: mx.array, step: int, sampler: Sampler) -> mx.array:
        """Latents after step `step`: model + guidance + `sampler`'s update. With an Euler
        sampler the update is inside the compiled call; other samplers run after it."""
        sigma = sampler.sigmas[step]
        if type(sampler) is not EulerSampler:
            return sampler.step(step, latents, self(latents, sigma, step))
        if not 0 <= step < sampler.num_steps:
            raise InputError(f"step index {step} out of range 0..{sampler.num_steps - 1}")
        self._prepare_positions(latents)
        mods = self.modulations_at(step, sigma)
        # dt in float32, the difference taken in float32 (as EulerSampler does)
        dt = np.float32(sampler.sigmas[step + 1]) - np.float32(sigma)
        t, scales, active = self._control_at(step, sigma)
        if self.exchange is not None:
            v = self._exchanged_velocity(latents, mods, step, t, scales, active)
            return latents.astype(mx.float32) + mx.array(dt) * v
        if self.split_cfg:
            v = self._split_velocity(latents, mods, step, t, scales, active)
            return latents.astype(mx.float32) + mx.array(dt) * v
        fn = self._fn(self._kind(step), euler=True, active=active)
        return fn(latents, mods, mx.array(dt, dtype=mx.float32), t, scales)

    # ---- the step loop ----
    @property
    def builds_ahead(self) -> bool:
        """Whether a step is purely lazy, so `run` may build the next one while it runs: the
        split-CFG step evaluates inside (one pass after the other) and the CFG-parallel one
        exchanges with the other rank inside, so those keep one step after the other."""
        return self.exchange is None and not self.split_cfg

    def run(
        self,
        latents: mx.array,
        sampler: Sampler,
        indices: Iterable[int],
        after_step: Optional[Callable[[int, mx.array], mx.array]] = None,
        evaluation: Callable[[], ContextManager] = nullcontext,
        queue_ahead: bool = True,
    ) -> Iterator[Tuple[int, mx.array]]:
        """Yield (i, latents after step i), evaluated, for each step index in `indices`.

        after_step(i, latents) -> latents: lazy work that belongs to step i (inpainting's blend).
        evaluation(): a context each step's evaluation runs in (a memory limit); the consumer's
        code between steps runs outside it. With `builds_ahead`, step i+1's graph is built
        on top of step i's (still lazy) result while step i runs on the device. queue_ahead:
        step i+1 is also queued on the device before step i is waited for, so the device
        never idles while the host encodes the next step's kernels (two steps' buffers may
        then be alive at once, up to the memory limit `evaluation` sets: past it, evaluation
        waits); without it, step i+1 is evaluated only after step i is yielded. A consumer
        that stops leaves nothing running: a queued step is waited for and dropped. The sampler's history
        (DPM-Solver++) then already holds step i+1: use a fresh sampler per run.
        """

        def build(i: int, x: mx.array) -> mx.array:
            x = self.step(x, i, sampler)
            return after_step(i, x) if after_step is not None else x

        steps = list(indices)
        ahead = self.builds_ahead
        built = None  # the next step's graph, built (and maybe queued) ahead
        try:
            for n, i in enumerate(steps):
                with evaluation():  # evaluating allocates; building does not
                    current = built if built is not None else build(i, latents)
                    built = None
                    if ahead and n + 1 < len(steps):
                        mx.async_eval(current)  # a no-op when it was queued ahead
                        try:
                            built = build(steps[n + 1], current)
                            if queue_ahead:
                                mx.async_eval(built)
                        except Exception:  # built again in order: its error comes after this step, as it would
                            ahead, built = False, None
                    mx.eval(current)
                latents = current
                yield i, current
        finally:
            if built is not None and queue_ahead:
                mx.synchronize()  # the queued step finishes before its buffers are dropped

    def _control_at(self, step: int, sigma: float):
        """(timestep, per-ControlNet scales, indices of the ControlNets that run) at `step`."""
        t = mx.array(timestep_of(sigma))
        if self.control is None:
            return t, mx.zeros((0,)), ()
        scales = self.control.scales_at(step, self.num_steps)
        return t, mx.array(np.array(scales, dtype=np.float32)), self.control.active(scales)

    def _split_velocity(self, latents, mods, step, t, scales, active) -> mx.array:
        """CFG (and SLG) as separate batch-1 passes, each evaluated before the next starts,
        so only one pass's activations are ever alive (ControlNets run per pass too)."""
        n = self._n_pos
        neg, pos = slice(None, -n), slice(-n, None)
        v_uncond = self._pass((), neg, active)(latents, self._ctx[:-n], mods[:-n], t, scales)
        mx.eval(v_uncond)
        v_cond = self._pass((), pos, active)(latents, self._ctx_pos, mods[-n:], t, scales)
        mx.eval(v_cond)
        v = cfg_combine(v_uncond, v_cond, self.cfg)
        if self.slg_active(step):
            v_skip = self._pass(self.slg.layers, pos, active)(latents, self._ctx_pos, mods[-n:], t, scales)
            v = self.slg.apply(v, v_cond, v_skip)
        return v

    def _exchanged_velocity(self, latents, mods, step, t, scales, active) -> mx.array:
        """CFG-parallel: this rank's pass(es), one exchange, then the guidance every rank
        computes alike (the same arithmetic as the batched path)."""
        x, slg, rows = self.exchange, self.slg_active(step), slice(None)
        own = [self._pass((), rows, active)(latents, self._ctx, mods, t, scales)]
        if slg and x.runs_conditional:
            own.append(self._pass(self.slg.layers, rows, active)(latents, self._ctx, mods, t, scales))
        v_cond, v_uncond, v_skip = x.exchange(own, step, with_skip=slg)
        v = cfg_combine(v_uncond, v_cond, self.cfg)
        return self.slg.apply(v, v_cond, v_skip) if slg else v

    def _pass(self, skip_layers: tuple, rows: slice, active: tuple) -> Callable:
        key = ("pass", skip_layers, (rows.start, rows.stop), active)
        if key not in self._fns:
            tr, dtype, control = self.transformer, self.dtype, self.control

            def one_pass(latents: mx.array, ctx: mx.array, mods: mx.array, t: mx.array, scales: mx.array) -> mx.array:
                x = latents.astype(dtype)
                res = control.residuals(x, t, scales, active, rows, skip_layers) if active else None
                return tr.forward_packed(x, ctx, mods, skip_layers, res).astype(mx.float32)

            if self._compile:
                self._materialise()
                one_pass = mx.compile(one_pass)
            self._fns[key] = one_pass
        return self._fns[key]

    # ---- internals ----
    def _materialise(self) -> None:
        """Weights are constants of a compiled graph: they must be materialised, or their
        (lazy) loading would become part of every call."""
        mx.eval(self.transformer.parameters())
        if self.control is not None:
            mx.eval([n.net.parameters() for n in self.control.nets])

    def _kind(self, step: int) -> str:
        if self.batched is None:
            return "single"
        return "cfg+slg" if self.slg_active(step) else "cfg"

    def _prepare_positions(self, latents: mx.array) -> None:
        tr, p = self.transformer, self.transformer.config.patch_size
        if latents.ndim == 4:
            tr.cache_pos_embed(latents.shape[1] // p, latents.shape[2] // p)
            if self.free_pos_embed:
                tr.free_pos_embed()

    def _fn(self, kind: str, euler: bool, active: tuple = ()) -> Callable:
        key = (kind, euler, active)
        if key not in self._fns:
            fn = self._build(kind, euler, active)
            if self._compile:
                # Weights are constants of the compiled graph: they must be materialised,
                # or their (lazy) loading would become part of every call.
                self._materialise()
                fn = mx.compile(fn)
            self._fns[key] = fn
        return self._fns[key]

    def _build(self, kind: str, euler: bool, active: tuple = ()) -> Callable:
        tr, dtype, ctx, ctx_pos, n_pos, scale, slg, control = (
            self.transformer, self.dtype, self._ctx, self._ctx_pos, self._n_pos, self.cfg, self.slg, self.control
        )  # fmt: skip

        def residuals(x, t, scales, rows=slice(None), skip=()):
            return control.residuals(x, t, scales, active, rows, skip) if active else None

        def velocity(latents: mx.array, mods: mx.array, t: mx.array, scales: mx.array) -> mx.array:
            x = latents.astype(dtype)
            if kind == "single":
                return tr.forward_packed(x, ctx, mods, (), residuals(x, t, scales)).astype(mx.float32)
            x2 = mx.concatenate([x, x], axis=0)
            out = tr.forward_packed(x2, ctx, mods, (), residuals(x2, t, scales)).astype(mx.float32)
            v_uncond, v_cond = out[:-n_pos], out[-n_pos:]
            v = cfg_combine(v_uncond, v_cond, scale)
            if kind == "cfg+slg":
                # the conditional pass with layers skipped: the positive half of the table row
                res = residuals(x, t, scales, slice(-n_pos, None), slg.layers)
                v_skip = tr.forward_packed(x, ctx_pos, mods[-n_pos:], slg.layers, res).astype(mx.float32)
                v = slg.apply(v, v_cond, v_skip)
            return v

        if not euler:
            return velocity

        def euler_step(latents: mx.array, mods: mx.array, dt: mx.array, t: mx.array, scales: mx.array) -> mx.array:
            return latents.astype(mx.float32) + dt * velocity(latents, mods, t, scales)

        return euler_step
