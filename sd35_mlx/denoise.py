"""One velocity evaluation per step: CFG as a batch of 2, a single pass for cfg ≤ 1,
and skip-layer guidance on the steps where it is active.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .conditioning import Conditioning
from .settings import SkipLayerSettings


class Denoiser:
    def __init__(
        self,
        transformer,
        positive: Conditioning,
        negative: Optional[Conditioning],
        *,
        cfg: float,
        skip_layer_guidance: Optional[SkipLayerSettings],
        num_steps: int,
    ):
        self.transformer = transformer
        self.positive = positive
        self.cfg = cfg
        self.batched = Conditioning.concat([negative, positive]) if negative is not None else None
        self.slg = skip_layer_guidance if negative is not None else None  # as diffusers: needs CFG
        self.num_steps = num_steps
        dtype = _param_dtype(transformer)
        self.dtype = dtype

    def slg_active(self, step: int) -> bool:
        s = self.slg
        return s is not None and step > self.num_steps * s.start and step < self.num_steps * s.end

    def __call__(self, latents: mx.array, sigma: float, step: int) -> mx.array:
        x = latents.astype(self.dtype)
        if self.batched is None:
            t = mx.full((x.shape[0],), sigma * 1000.0, dtype=mx.float32)
            return self._run(x, t, self.positive).astype(mx.float32)
        c = self.batched
        x2 = mx.concatenate([x, x], axis=0)
        t = mx.full((x2.shape[0],), sigma * 1000.0, dtype=mx.float32)
        v_uncond, v_cond = mx.split(self._run(x2, t, c).astype(mx.float32), 2, axis=0)
        v = v_uncond + self.cfg * (v_cond - v_uncond)
        if self.slg_active(step):
            t1 = mx.full((x.shape[0],), sigma * 1000.0, dtype=mx.float32)
            v_skip = self._run(x, t1, self.positive, self.slg.layers).astype(mx.float32)
            v = v + self.slg.scale * (v_cond - v_skip)
        return v

    def _run(self, x, t, cond: Conditioning, skip_layers=()):
        return self.transformer(
            x, t, cond.context.astype(self.dtype), cond.pooled.astype(self.dtype), skip_layers=tuple(skip_layers)
        )


def _param_dtype(module) -> mx.Dtype:
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(module.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return p.dtype
    return mx.float32
