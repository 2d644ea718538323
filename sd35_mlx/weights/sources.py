"""One model's sources, resolved once: which files hold which network, or the converted
folder's config. The pipeline resolves them in `from_pretrained` and hands them to every
loader, the planner and the metadata, so no one looks at the path (or a header) again.

    sources = resolve_sources(path, ("transformer", "vae", "clip_l", "clip_g", "t5"))
    sources.has("t5"); sources.stored_quantization("transformer")   # QuantSpec or None
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

from ..components import COMPONENTS
from ..quantize import QuantSpec
from .converted import is_converted, read_converted_config
from .layouts import ComponentSource, resolve_component, resolve_components


@dataclass(frozen=True)
class ModelSources:
    """Where the networks of the model at `path` are.

    converted: the config.json of a converted sd35_mlx folder (its networks are loaded from
        it), else None and `found` holds the networks of the original layout found there.
    """

    path: Path
    converted: Optional[dict] = None
    found: Dict[str, ComponentSource] = field(default_factory=dict)

    def has(self, component: str) -> bool:
        if self.converted is not None:
            return component in self.converted["components"]
        return component in self.found

    def source(self, component: str) -> ComponentSource:
        """The files of `component` (original layouts); a clear error when it is not there."""
        if component in self.found:
            return self.found[component]
        return resolve_component(self.path, component)  # raises, saying what is there

    def stored_quantization(self, component: str) -> Optional[QuantSpec]:
        """How a converted folder stores `component` (None: 16-bit, or not converted)."""
        entry = (self.converted or {}).get("components", {}).get(component) or {}
        q = entry.get("quantization")
        return QuantSpec.from_dict(q) if q else None

    @property
    def recorded_variant(self) -> Optional[str]:
        """The variant a converted folder recorded (Turbo and Large share one architecture)."""
        return (self.converted or {}).get("variant")


def resolve_sources(path: str | Path, components: Sequence[str] = COMPONENTS) -> ModelSources:
    """Resolve the networks of the local model at `path` (headers only; nothing is loaded).

    Networks that are not there are simply absent (`has` says so; `source` raises the
    explanation), as T5 is in T5-drop models.
    """
    path = Path(path).expanduser()
    if is_converted(path):
        return ModelSources(path, converted=read_converted_config(path))
    return ModelSources(path, found=resolve_components(path, components))


__all__ = ["ModelSources", "resolve_sources"]
