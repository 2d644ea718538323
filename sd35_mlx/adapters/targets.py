"""Where a LoRA module lands on our networks, derived from the weight tables (`weights/tables/`).

The tables already say how every checkpoint parameter becomes one of ours, e.g.

    Rule("blocks.{i}.x.attn.qkv.weight", (to_q.weight, to_k.weight, to_v.weight), concat)

so a LoRA on diffusers' `transformer_blocks.3.attn.to_k` fills rows H..2H of our fused
`blocks.3.x.attn.qkv`; `swap_halves` rules (diffusers' (scale, shift) modulations) swap the row
halves of the LoRA's up matrix; `conv_to_nhwc` rules (the patch embedder) take a conv LoRA. Rules
with a `when` (the last block's context modulation) are decided on the key set our model would
have in that layout, obtained by running the rules backwards over our parameter names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import SD35_LARGE_MMDIT, SD35_MEDIUM_MMDIT
from ..errors import InputError
from ..weights.mapping import Rule, _regex, concat, conv_to_nhwc, identity, swap_halves
from ..weights.tables import clip as clip_table
from ..weights.tables import mmdit as mmdit_table
from ..weights.tables import t5 as t5_table
from .formats import LoRAModule, ParsedLoRA

# (component, naming) -> the table whose source names that naming uses
TABLES: Dict[Tuple[str, str], Tuple[Rule, ...]] = {
    ("transformer", "diffusers"): mmdit_table.DIFFUSERS.rules,
    ("transformer", "stability"): mmdit_table.STABILITY.rules,
    ("clip_l", "hf"): clip_table.RULES,
    ("clip_g", "hf"): clip_table.RULES,
    ("t5", "hf"): t5_table.RULES,
}
COMPONENT_NAMES = {"transformer": "MMDiT transformer", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5-XXL"}
_WIDTHS = {SD35_MEDIUM_MMDIT.hidden_size: "SD3 Medium / SD3.5 Medium", SD35_LARGE_MMDIT.hidden_size: "SD3.5 Large / Large Turbo"}


@dataclass(frozen=True)
class Target:
    """One source module's place in ours: row block `part` of `parts`, maybe half-swapped or a conv."""

    module: str
    part: int = 0
    parts: int = 1
    swap_halves: bool = False
    conv: bool = False


@dataclass(frozen=True)
class Placed:
    """A LoRA factor pair on (a row range of) one of our modules, in MLX layout."""

    source: str  # key stem in the file
    rows: Tuple[int, int]  # (start, stop) of the module's output rows
    down: mx.array  # (r, in); conv: (r, kh, kw, C)
    up: mx.array  # (stop - start, r), rows already in our order
    scale: float  # alpha / r


def _our_names(model: nn.Module) -> List[str]:
    """Parameter names as the tables spell them (a LoRA layer's `base.` level left out)."""
    return [k.replace(".base.", ".") for k, _ in tree_flatten(model.parameters())]


def _source_keys(rules: Sequence[Rule], names: Sequence[str]) -> frozenset:
    keys = set()
    for rule in rules:
        if rule.rename is not None:
            continue
        rx = _regex(rule.target)
        for name in names:
            m = rx.match(name)
            if m:
                keys.update(s.format(**m.groupdict()) for s in rule.sources)
    return frozenset(keys)


def module_targets(rules: Sequence[Rule], names: Sequence[str]) -> Dict[str, Target]:
    """{source module name: Target} for every weight rule that applies to a model with `names`."""
    keys = _source_keys(rules, names)
    out: Dict[str, Target] = {}
    for rule in rules:
        if not rule.target.endswith(".weight") or not all(s.endswith(".weight") for s in rule.sources):
            continue
        if rule.transform not in (identity, concat, swap_halves, conv_to_nhwc) or rule.rename is not None:
            continue
        if rule.transform is not concat and len(rule.sources) != 1:
            continue
        rx = _regex(rule.target)
        for name in names:
            m = rx.match(name)
            if not m:
                continue
            groups = m.groupdict()
            if rule.when is not None and not rule.when(groups, keys):
                continue
            for j, source in enumerate(rule.sources):
                out[source.format(**groups)[: -len(".weight")]] = Target(
                    name[: -len(".weight")], j, len(rule.sources),
                    rule.transform is swap_halves, rule.transform is conv_to_nhwc,
                )  # fmt: skip
    return out


def _flat(targets: Mapping[str, Target]) -> Dict[str, Target]:
    return {k.replace(".", "_"): t for k, t in targets.items()}


def layer_dims(module: nn.Module) -> Tuple[int, int]:
    """(out, in) of a Linear, QuantizedLinear or Conv2d (in = input channels), a LoRA layer's base."""
    module = module["base"] if "base" in module else module
    w = module["weight"]
    if isinstance(module, nn.QuantizedLinear):
        return w.shape[0], w.shape[1] * 32 // module.bits
    return w.shape[0], w.shape[-1]


def _width_hint(width: int, ours: int, component: str) -> str:
    if component != "transformer":
        return ""
    theirs, mine = _WIDTHS.get(width), _WIDTHS.get(ours)
    if theirs and mine and theirs != mine:
        return f" The LoRA was trained for {theirs} (width {width}); this model is {mine} (width {ours})."
    return f" The LoRA was trained for a model of width {width}; this model has width {ours}."


def _hints(unmatched: Iterable[LoRAModule], model: nn.Module) -> str:
    stems = [m.stem for m in unmatched]
    depth = len(model["blocks"]) if "blocks" in model else None
    notes = []
    if any("attn2" in s for s in stems):
        notes.append("it targets attn2, the dual attention only SD3.5 Medium (MMDiT-X) has")
    if depth is not None:
        idx = [int(g) for s in stems for g in re.findall(r"blocks[._](\d+)[._]", s)]
        if idx and max(idx) >= depth:
            notes.append(f"it addresses block {max(idx)} but this model has {depth} blocks (0..{depth - 1})")
    return (" Probably a LoRA for another base model: " + "; ".join(notes) + ".") if notes else ""


def place(
    parsed: ParsedLoRA, component: str, model: nn.Module, where: str
) -> Tuple[Dict[str, List[Placed]], List[str], str]:
    """Put `parsed`'s modules for `component` onto `model`.

    Returns ({our module path: [Placed, ...]}, [keys of modules that have no place in this
    model], a hint on why they have none ("" when there is nothing to say).
    Raises InputError when a module's shapes do not fit (another base model, a damaged file).
    """
    names = _our_names(model)
    modules = dict(model.named_modules())
    maps: Dict[Tuple[str, bool], Dict[str, Target]] = {}
    placed: Dict[str, List[Placed]] = {}
    homeless: List[LoRAModule] = []
    for lora in parsed.modules:
        if lora.prefix.component != component:
            continue
        key = (lora.prefix.naming, lora.prefix.flat)
        if key not in maps:
            targets = module_targets(TABLES[(component, lora.prefix.naming)], names)
            maps[key] = _flat(targets) if lora.prefix.flat else targets
        target = maps[key].get(lora.stem)
        if target is None or target.module not in modules:
            homeless.append(lora)
            continue
        placed.setdefault(target.module, []).append(_fit(lora, target, modules[target.module], component, where))
    for module, parts in placed.items():
        spans = sorted(p.rows for p in parts)
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            if b0 < a1:
                raise InputError(
                    f"{where}: several LoRA keys land on the same rows of {module} "
                    f"({', '.join(p.source for p in parts)}); a file should hold one of them"
                )
    return placed, [m.key for m in homeless], _hints(homeless, model)


def _fit(lora: LoRAModule, target: Target, module: nn.Module, component: str, where: str) -> Placed:
    out, inp = layer_dims(module)
    rows = out // target.parts
    start = target.part * rows
    down, up = lora.down, lora.up
    if target.conv != (down.ndim == 4):
        raise InputError(
            f"{where}: '{lora.key}' is a {'conv' if down.ndim == 4 else 'linear'} LoRA but {target.module} "
            f"of the {COMPONENT_NAMES[component]} is {'a conv' if target.conv else 'linear'}"
        )
    if target.conv:
        up = up.reshape(up.shape[0], up.shape[1])
        down = conv_to_nhwc(down)  # (r, kh, kw, C), like the base weight
        ours = module["base"].weight if "base" in module else module.weight
        if tuple(down.shape[1:]) != tuple(ours.shape[1:]) or up.shape[0] != out:
            raise InputError(
                f"{where}: '{lora.key}' (down {tuple(lora.down.shape)}, up {tuple(lora.up.shape)}) does not fit "
                f"{target.module} (weight {tuple(ours.shape)} in MLX layout).{_width_hint(down.shape[-1], ours.shape[-1], component)}"
            )
    elif down.shape[1] != inp or up.shape[0] != rows:
        raise InputError(
            f"{where}: '{lora.key}' (down {tuple(down.shape)}, up {tuple(up.shape)}) does not fit "
            f"{target.module} of the {COMPONENT_NAMES[component]}, which needs down (rank, {inp}) and up "
            f"({rows}, rank).{_width_hint(int(down.shape[1]), inp, component)}"
        )
    if target.swap_halves:
        up = swap_halves(up)
    return Placed(lora.key, (start, start + rows), down, up, lora.scale)


__all__ = ["COMPONENT_NAMES", "Placed", "TABLES", "Target", "layer_dims", "module_targets", "place"]
