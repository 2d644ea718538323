"""The LoRAs a pipeline holds, kept apart from its networks so a network can be dropped and
reloaded (low-memory mode) and get the same LoRAs back, and so LoRAs can be switched between
generations without reloading or re-quantizing the base model.

    registry.add(lora, networks)             # attaches to the networks loaded now
    network = registry.attach_all(network, "transformer")   # on every fresh load
    registry.set_scales({"style": 0.5}, networks)
    registry.remove(["style"], networks)
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Mapping, Optional, Union

import mlx.nn as nn

from ..errors import InputError
from .apply import LORA_COMPONENTS, LoRA, attach_lora, remove, rescale
from .lora import check_scale

log = logging.getLogger(__name__)
Networks = Mapping[str, Optional[nn.Module]]


class LoRARegistry:
    def __init__(self) -> None:
        self.loras: Dict[str, LoRA] = {}

    def __bool__(self) -> bool:
        return bool(self.loras)

    def add(self, lora: LoRA, networks: Networks) -> LoRA:
        if lora.name in self.loras:
            raise InputError(
                f"a LoRA named '{lora.name}' is already loaded; unload it first or give this one another name"
            )
        self.loras[lora.name] = lora
        for component in LORA_COMPONENTS:
            if networks.get(component) is not None:
                attach_lora(networks[component], component, lora)
        return lora

    def attach_all(self, network: Optional[nn.Module], component: str):
        """`network` (freshly loaded) with every registered LoRA for `component` on it."""
        if network is not None:
            for lora in self.loras.values():
                attach_lora(network, component, lora)
        return network

    def _named(self, names: Iterable[str]) -> List[LoRA]:
        unknown = [n for n in names if n not in self.loras]
        if unknown:
            raise InputError(
                f"no LoRA named {', '.join(map(repr, unknown))} is loaded; loaded: {', '.join(self.loras) or 'none'}"
            )
        return [self.loras[n] for n in names]

    def set_scales(self, scales: Union[float, Mapping[str, float]], networks: Networks,
                   text_encoder_scales: Optional[Union[float, Mapping[str, float]]] = None) -> None:  # fmt: skip
        """New weights by name (a single number: every LoRA); text-encoder weights likewise."""
        def by_name(value):
            if value is None:
                return {}
            if isinstance(value, Mapping):
                return {n: check_scale(v) for n, v in value.items()}
            return {n: check_scale(value) for n in self.loras}

        weights, te_weights = by_name(scales), by_name(text_encoder_scales)
        self._named(list(weights) + list(te_weights))
        for name, w in weights.items():
            self.loras[name].scale = w
        for name, w in te_weights.items():
            self.loras[name].text_encoder_scale = w
        for lora in self._named(sorted(set(weights) | set(te_weights))):
            for component in LORA_COMPONENTS:
                if networks.get(component) is not None and lora.placed.get(component):
                    rescale(networks[component], component, lora)

    def remove(self, names: Optional[Iterable[str]], networks: Networks) -> List[str]:
        """Unload LoRAs by name (None: all); their layers become plain again. Returns the names."""
        names = list(self.loras) if names is None else list(names)
        self._named(names)
        for name in names:
            for component in LORA_COMPONENTS:
                if networks.get(component) is not None:
                    remove(networks[component], name)
            del self.loras[name]
        return names

    def records(self) -> List[dict]:
        return [lora.record() for lora in self.loras.values()]


__all__ = ["LoRARegistry"]
