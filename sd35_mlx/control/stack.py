"""One or more ControlNets during denoising: per step, their residuals for the transformer.

    stack = ControlStack([ActiveControlNet(net, rule, control_latents, scale=0.7)], transformer,
                         pooled=cfg_batch_pooled, context=cfg_batch_context)
    scales = stack.scales_at(step, num_steps)          # 0 outside a net's [start, end] window
    residuals = stack.residuals(latents, timestep, mx.array(scales), active, rows=slice(None))
    v = transformer.forward_packed(latents, ctx, mods, residuals=residuals)

As diffusers' `StableDiffusion3ControlNetPipeline`: the ControlNet runs on the whole CFG
batch (the same control latents for the negative and the positive half), its outputs are
multiplied by scale · keep(step) with keep = 0 when step/N < start or (step+1)/N > end,
and several ControlNets' contributions add up. A ControlNet whose scale is 0 at a step is
not run at all (its contribution would be zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

from ..errors import InputError
from .residuals import ResidualRule, block_residuals


@dataclass
class ActiveControlNet:
    net: object  # sd35_mlx.models.controlnet.ControlNet
    rule: ResidualRule
    control: mx.array  # (1, h, w, control_channels) control latents
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    zero_pooled: bool = False

    def keep(self, step: int, num_steps: int) -> float:
        return 1.0 - float(step / num_steps < self.start or (step + 1) / num_steps > self.end)


class ControlStack:
    def __init__(
        self,
        nets: Sequence[ActiveControlNet],
        transformer,
        *,
        pooled: mx.array,
        context: mx.array,
    ):
        """pooled (B, P) / context (B, L, 4096): the conditioning batch the transformer sees
        (negative rows first under CFG), raw: joint ControlNets embed the prompt themselves."""
        if not nets:
            raise InputError("a ControlStack needs at least one ControlNet")
        self.nets = list(nets)
        self.transformer = transformer
        self.depth = len(transformer.blocks)
        self._pooled = [mx.zeros_like(pooled) if n.zero_pooled else pooled for n in self.nets]
        self._context = context

    def scales_at(self, step: int, num_steps: int) -> Tuple[float, ...]:
        return tuple(n.scale * n.keep(step, num_steps) for n in self.nets)

    @staticmethod
    def active(scales: Sequence[float]) -> Tuple[int, ...]:
        return tuple(i for i, s in enumerate(scales) if s != 0.0)

    def residuals(
        self,
        latents: mx.array,
        timestep: mx.array,
        scales: mx.array,
        active: Sequence[int],
        rows: slice = slice(None),
        skip_layers: Sequence[int] = (),
    ) -> Optional[List[Optional[mx.array]]]:
        """Per transformer block, what the active ControlNets add (None when none is active).

        latents: the batch the transformer runs on, whose conditioning is rows `rows` of
        pooled/context; timestep: scalar σ·1000; scales: (n_nets,) float32."""
        if not active:
            return None
        b = latents.shape[0]
        t = mx.broadcast_to(timestep.reshape(1), (b,))
        shared_tokens = None
        outs = []
        for i in active:
            n = self.nets[i]
            if n.net.config.joint:
                tokens = n.net.embed_latents(latents)
                context = self._context[rows]
            else:
                if shared_tokens is None:
                    shared_tokens = self.transformer.embed_latents(latents)
                tokens, context = shared_tokens, None
            control = mx.broadcast_to(n.control, (b, *n.control.shape[1:]))
            out = n.net(tokens, control, t, self._pooled[i][rows], context, scale=scales[i])
            outs.append((n.rule, out))
        return block_residuals(outs, self.depth, skip_layers)
