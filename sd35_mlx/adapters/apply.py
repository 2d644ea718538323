"""One LoRA file made ready for our networks, checked once, attachable to any (re)load of them.

    lora = prepare(read_lora("style.safetensors"), networks, name="style", scale=0.8)
    attach_lora(transformer, "transformer", lora)      # every time that network is (re)loaded

`prepare` places every module on the networks it addresses (built lazily: only shapes are read),
so a LoRA that does not fit is refused before anything runs; with `strict=False` the keys that
match nothing are left out and a warning says how many of how many keys were applied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import InputError
from .formats import ParsedLoRA, parse_lora
from .lora import attach, check_scale, detach, set_scale
from .source import LoRAFile
from .targets import COMPONENT_NAMES, Placed, place

log = logging.getLogger(__name__)

LORA_COMPONENTS = ("transformer", "clip_l", "clip_g", "t5")


@dataclass
class LoRA:
    """A LoRA file prepared for this model: its placements per network and its weights."""

    name: str
    file: LoRAFile
    parsed: ParsedLoRA
    placed: Dict[str, Dict[str, List[Placed]]]  # component -> our module -> parts
    scale: float = 1.0
    text_encoder_scale: Optional[float] = None  # None: the same as `scale`
    applied_keys: int = 0
    preset: Optional[str] = None  # the distilled variant this LoRA makes of the base (variants.LORA_PRESETS)

    def scale_for(self, component: str) -> float:
        if component == "transformer" or self.text_encoder_scale is None:
            return self.scale
        return self.text_encoder_scale

    def factor_bytes(self, component: str, dtype: mx.Dtype) -> int:
        """What its factors take on `component` once attached (they are held in the
        network's dtype while the network is loaded)."""
        return sum((p.down.size + p.up.size) * dtype.size for parts in self.placed.get(component, {}).values()
                   for p in parts)  # fmt: skip

    @property
    def components(self) -> List[str]:
        return [c for c in LORA_COMPONENTS if self.placed.get(c)]

    def record(self) -> dict:
        """What image metadata keeps of it (enough to find and reapply the same file)."""
        out = {"name": self.name, "source": self.file.source, "sha256": self.file.sha256, "scale": self.scale}
        if self.text_encoder_scale is not None:
            out["text_encoder_scale"] = self.text_encoder_scale
        return out


def _short(keys: List[str], limit: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" … and {len(keys) - limit} more" if len(keys) > limit else "")


def prepare(
    file: LoRAFile,
    networks: Mapping[str, Optional[nn.Module]],
    *,
    name: Optional[str] = None,
    scale: float = 1.0,
    text_encoder_scale: Optional[float] = None,
    strict: bool = True,
    absent: Optional[Mapping[str, str]] = None,
) -> LoRA:
    """Parse `file` and place it on `networks` ({component: network}, lazily built is enough).

    absent: {component: why it is not there} for networks this run does not load (e.g. T5 in
    T5-drop mode): their LoRA parts are skipped with a warning, never an error.
    """
    where = f"LoRA {file.path}"
    scale = check_scale(scale)
    te_scale = None if text_encoder_scale is None else check_scale(text_encoder_scale, "text-encoder LoRA scale")
    parsed = parse_lora(file.tensors, file.metadata, where)
    if not parsed.modules:
        raise InputError(
            f"{where}: none of its {parsed.total_keys} keys is a LoRA pair of an SD3 / SD3.5 network "
            f"({_short(list(parsed.unmatched), 5)}). Is it a LoRA (and not a full checkpoint or an embedding)?"
        )
    placed: Dict[str, Dict[str, List[Placed]]] = {}
    unmatched: List[str] = list(parsed.unmatched)
    hints: List[str] = []
    skipped: Dict[str, int] = {}
    for component in parsed.components:
        network = networks.get(component)
        if network is None:
            skipped[component] = sum(1 for m in parsed.modules if m.prefix.component == component)
            continue
        where_c = f"{where} ({COMPONENT_NAMES[component]})"
        placed[component], homeless, hint = place(parsed, component, network, where_c)
        unmatched += homeless
        hints += [hint] if hint else []
    for component, n in skipped.items():
        why = (absent or {}).get(component, "it is not loaded")
        log.warning("%s: its %d %s modules are not applied: %s", where, n, COMPONENT_NAMES[component], why)
    keys_of = {m.key: 1 + 1 + (m.key + ".alpha" in file.tensors) for m in parsed.modules}
    bad_keys = sum(keys_of.get(k, 1) for k in unmatched)
    skipped_keys = sum(keys_of[m.key] for m in parsed.modules if m.prefix.component in skipped)
    applied = parsed.total_keys - bad_keys - skipped_keys
    if unmatched:
        what = f"{bad_keys} of its {parsed.total_keys} keys match nothing in this model: {_short(unmatched)}." + "".join(hints)
        if strict:
            raise InputError(
                f"{where} ({parsed.format} format): {what} Use a LoRA made for this model, or pass "
                "--lora-strict off (Python: strict=False) to apply the rest."
            )
        log.warning("%s: applied %d of %d keys; %s", where, applied, parsed.total_keys, what)
    lora = LoRA(name or file.default_name, file, parsed, placed, scale, te_scale, applied)
    log.info("%s: %s format, %d modules on %s", where, parsed.format,
             sum(len(p) for p in placed.values()), ", ".join(lora.components) or "nothing")  # fmt: skip
    return lora


def attach_lora(network: nn.Module, component: str, lora: LoRA) -> int:
    """Attach `lora`'s parts for `component` to `network` (a fresh load or one already holding others)."""
    return attach(network, lora.placed.get(component, {}), lora.name, lora.scale_for(component))


def rescale(network: nn.Module, component: str, lora: LoRA) -> int:
    return set_scale(network, lora.name, lora.scale_for(component))


def remove(network: nn.Module, name: Optional[str] = None) -> int:
    return detach(network, name)


__all__ = ["LORA_COMPONENTS", "LoRA", "attach_lora", "prepare", "remove", "rescale"]
