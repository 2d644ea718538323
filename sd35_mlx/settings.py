"""Generation settings: one dataclass shared by the Python API, the CLI and PNG metadata.

`validate()` checks everything that can be checked before any model is loaded.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .checks import MAX_SIDE, MAX_STEPS, finite_number, text, whole_number
from .errors import InputError

SAMPLERS = ("euler", "dpmpp_2m")
T5_LENGTH_RANGE = (77, 512)
MAX_CFG = 100.0  # published recipes use 0–7; far beyond that the image is pure saturation
MAX_SHIFT = 100.0  # published models use 1–3
MAX_SLG_LAYERS = 64  # deeper than any SD3 transformer (Large: 38); the model's depth is checked later


@dataclass(frozen=True)
class SkipLayerSettings:
    layers: Tuple[int, ...] = (7, 8, 9)
    scale: float = 2.8
    start: float = 0.01
    end: float = 0.2

    def validate(self) -> "SkipLayerSettings":
        """Types and ranges; whether the layers exist is checked against the model's depth."""
        if not isinstance(self.layers, (tuple, list)) or not self.layers:
            raise InputError(f"skip-layer guidance needs at least one layer index (got {self.layers!r:.60})")
        if len(self.layers) > MAX_SLG_LAYERS:
            raise InputError(f"skip-layer guidance names {len(self.layers)} layers; at most {MAX_SLG_LAYERS}")
        for layer in self.layers:
            whole_number("skip-layer guidance layer", layer, 0, MAX_SLG_LAYERS - 1)
        if len(set(self.layers)) != len(self.layers):
            raise InputError(f"skip-layer guidance names a layer twice: {list(self.layers)}")
        finite_number("skip-layer guidance scale", self.scale, 0.0, MAX_CFG)
        start = finite_number("skip-layer guidance start", self.start, 0.0, 1.0)
        end = finite_number("skip-layer guidance end", self.end, 0.0, 1.0)
        if not start < end:
            raise InputError(f"skip-layer guidance needs 0 ≤ start < end ≤ 1 (got {start:g}, {end:g})")
        return self

    @classmethod
    def from_dict(cls, d: Any) -> "SkipLayerSettings":
        if not isinstance(d, dict):
            raise InputError(f"skip_layer_guidance must be an object with layers, scale, start, end (got {d!r:.60})")
        unknown = set(d) - {"layers", "scale", "start", "end"}
        if unknown:
            raise InputError(f"skip_layer_guidance has unknown fields: {', '.join(sorted(map(str, unknown)))}")
        layers = d.get("layers", cls.layers)
        if not isinstance(layers, (list, tuple)):
            raise InputError(f"skip_layer_guidance.layers must be a list of layer indices (got {layers!r:.60})")
        kwargs = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                  for k, v in d.items() if k != "layers"}  # fmt: skip
        return cls(layers=tuple(layers), **kwargs).validate()


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate. `None` fields take the model variant's defaults."""

    prompt: str = ""
    negative_prompt: str = ""
    width: Optional[int] = None
    height: Optional[int] = None
    steps: Optional[int] = None
    cfg: Optional[float] = None
    sampler: Optional[str] = None
    shift: Optional[float] = None
    seed: Optional[int] = None
    t5_length: int = 256
    skip_layer_guidance: Optional[SkipLayerSettings] = None
    init_image: Optional[str] = None
    strength: float = 0.6

    def validate(self) -> "GenerationSettings":
        """Check every field's type and range (nothing here needs the model)."""
        text("prompt", self.prompt)
        text("negative_prompt", self.negative_prompt)
        if self.steps is not None:
            whole_number("steps", self.steps, 1, MAX_STEPS)
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is None:
                continue
            whole_number(name, v, 16, MAX_SIDE)
            if v % 16:
                raise InputError(f"{name} must be a positive multiple of 16 (got {v!r}); try {round(v / 16) * 16}")
        lo, hi = T5_LENGTH_RANGE
        whole_number("t5_length", self.t5_length, lo, hi)
        if self.cfg is not None:
            finite_number("cfg", self.cfg, 0.0, MAX_CFG)
        if self.shift is not None:
            finite_number("shift", self.shift, 0.0, MAX_SHIFT, low_open=True)
        finite_number("strength", self.strength, 0.0, 1.0, low_open=True)
        if self.init_image is not None:
            text("init_image", self.init_image, 4096)
            if not Path(self.init_image).is_file():
                raise InputError(f"init image not found: {self.init_image}")
        if self.skip_layer_guidance is not None:
            if not isinstance(self.skip_layer_guidance, SkipLayerSettings):
                raise InputError(f"skip_layer_guidance must be a SkipLayerSettings (got {self.skip_layer_guidance!r:.60})")
            self.skip_layer_guidance.validate()
        if self.seed is not None:
            whole_number("seed", self.seed, 0, 2**63 - 1)
        return self

    def with_seed(self) -> "GenerationSettings":
        """A copy with a concrete seed (random when none was given)."""
        return self if self.seed is not None else replace(self, seed=random.randrange(2**32))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if self.skip_layer_guidance is not None:
            d["skip_layer_guidance"]["layers"] = list(self.skip_layer_guidance.layers)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GenerationSettings":
        """Settings from a dict such as `to_dict()` wrote (PNG metadata: untrusted). Unknown keys
        are ignored; every known one is checked like a flag (`InputError` names the field)."""
        if not isinstance(d, dict):
            raise InputError(f"settings must be a JSON object (got {type(d).__name__})")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        slg = kwargs.get("skip_layer_guidance")
        if slg is not None:
            kwargs["skip_layer_guidance"] = SkipLayerSettings.from_dict(slg)
        for name in ("cfg", "shift", "strength"):  # JSON writes 4.0 as 4.0 but a hand edit may write 4
            if isinstance(kwargs.get(name), int) and not isinstance(kwargs[name], bool):
                kwargs[name] = float(kwargs[name])
        return cls(**kwargs).validate()
