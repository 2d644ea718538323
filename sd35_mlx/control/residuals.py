"""Which transformer block receives which ControlNet output: the residual rule, as data.

The two references differ (docs/control.md):
- Stability (`sd3.5/mmditx.py forward_core_with_concat`): after *every* joint block j,
  the last (context-pre-only) one included, x += out[j // (depth // n)]; a block skipped
  by skip-layer guidance gets nothing (SAI `continue`s before the add).
- diffusers (`SD3Transformer2DModel.forward`): x += out[int(j / (depth / n))] after every
  block *except* the context-pre-only last one; skipped blocks still get theirs.
For SD3.5 Large (38 blocks, 19 outputs) the two differ only in the last block, which
Stability gives out[18] a second time. Each ControlNet runs with the rule of the code it
was trained with (`sd35_mlx.control.spec`), unless the user overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..errors import InputError


@dataclass(frozen=True)
class ResidualRule:
    name: str
    last_block: bool  # the context-pre-only last block receives a residual
    on_skipped_blocks: bool  # a block skipped by skip-layer guidance still receives it
    integer_interval: bool  # interval depth // n (Stability) or the float depth / n (diffusers)

    def output_index(self, block: int, depth: int, outputs: int) -> Optional[int]:
        """The ControlNet output added after `block`, or None."""
        if block == depth - 1 and not self.last_block:
            return None
        if self.integer_interval:
            k = block // max(1, depth // outputs)
        else:
            k = int(block / (depth / outputs))
        return min(k, outputs - 1)  # Stability would index past the end for uneven counts


STABILITY = ResidualRule("stability", last_block=True, on_skipped_blocks=False, integer_interval=True)
DIFFUSERS = ResidualRule("diffusers", last_block=False, on_skipped_blocks=True, integer_interval=False)
RULES: Dict[str, ResidualRule] = {r.name: r for r in (STABILITY, DIFFUSERS)}


def rule_named(name: str) -> ResidualRule:
    if name not in RULES:
        raise InputError(f"unknown ControlNet residual rule {name!r}; choose one of: {', '.join(RULES)}")
    return RULES[name]


def block_residuals(
    nets: Sequence[Tuple[ResidualRule, Sequence[mx.array]]],
    depth: int,
    skip_layers: Sequence[int] = (),
) -> List[Optional[mx.array]]:
    """Per transformer block, the sum of what each ControlNet adds after it (None: nothing).

    nets: (rule, outputs) per ControlNet, outputs already scaled."""
    skip = set(skip_layers)
    out: List[Optional[mx.array]] = [None] * depth
    for rule, outputs in nets:
        for j in range(depth):
            if j in skip and not rule.on_skipped_blocks:
                continue
            k = rule.output_index(j, depth, len(outputs))
            if k is not None:
                out[j] = outputs[k] if out[j] is None else out[j] + outputs[k]
    return out
