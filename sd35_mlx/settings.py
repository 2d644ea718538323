"""Generation settings: one dataclass shared by the Python API, the CLI and PNG metadata.

`validate()` checks everything that can be checked before any model is loaded.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .components import T5_DEFAULT_LENGTH, T5_LENGTH_RANGE
from .control.settings import ControlNetSettings
from .errors import InputError
from .sampling.guidance import SkipLayerGuidance
from .sampling.samplers import SAMPLERS as _SAMPLER_CLASSES

SAMPLERS = tuple(_SAMPLER_CLASSES)
DEFAULT_STRENGTH = 0.6  # img2img: how much of the schedule runs (1.0 ignores the init image)

# One skip-layer guidance type (its defaults are defined there); the old name stays public.
SkipLayerSettings = SkipLayerGuidance


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
    t5_length: int = T5_DEFAULT_LENGTH
    skip_layer_guidance: Optional[SkipLayerGuidance] = None
    init_image: Optional[str] = None
    strength: float = DEFAULT_STRENGTH
    # ControlNets and inpainting (docs/control.md)
    controlnets: Tuple[ControlNetSettings, ...] = ()
    mask: Optional[str] = None  # white = repaint; needs init_image
    mask_blur: float = 0.0
    mask_crop_padding: Optional[int] = None  # inpaint a crop around the mask (diffusers' padding_mask_crop)

    def validate(self) -> "GenerationSettings":
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise InputError(f"steps must be a whole number ≥ 1 (got {self.steps!r})")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0 or v % 16):
                raise InputError(f"{name} must be a positive multiple of 16 (got {v!r}); try {max(16, round((v or 0) / 16) * 16)}")
        lo, hi = T5_LENGTH_RANGE
        if not lo <= self.t5_length <= hi:
            raise InputError(f"t5_length must be between {lo} and {hi} tokens (got {self.t5_length})")
        if self.cfg is not None and self.cfg < 0:
            raise InputError(f"cfg must be ≥ 0 (got {self.cfg})")
        if self.shift is not None and self.shift <= 0:
            raise InputError(f"shift must be > 0 (got {self.shift})")
        if self.init_image is not None:
            if not (0.0 < self.strength <= 1.0):
                raise InputError(f"strength must be in (0, 1] (got {self.strength}); 1.0 ignores the init image")
            if not Path(self.init_image).is_file():
                raise InputError(f"init image not found: {self.init_image}")
        self._validate_control()
        slg = self.skip_layer_guidance
        if slg is not None:
            if not (0.0 <= slg.start < slg.end <= 1.0):
                raise InputError(f"skip-layer guidance needs 0 ≤ start < end ≤ 1 (got {slg.start}, {slg.end})")
            if not slg.layers:
                raise InputError("skip-layer guidance needs at least one layer index")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InputError(f"seed must be in [0, 2**63) (got {self.seed})")
        return self

    def _validate_control(self) -> None:
        from .control.inpaint import check_mask_size
        from .control.settings import check_readable_image

        if not isinstance(self.controlnets, tuple) or not all(isinstance(c, ControlNetSettings) for c in self.controlnets):
            raise InputError("controlnets must be a tuple of ControlNetSettings")
        for cn in self.controlnets:
            cn.validate(init_image=self.init_image)
        if self.mask is not None:
            if self.init_image is None:
                raise InputError("a mask needs the image it applies to (init_image / --init-image)")
            if isinstance(self.mask_blur, bool) or not isinstance(self.mask_blur, (int, float)) or not (
                self.mask_blur >= 0.0 and math.isfinite(self.mask_blur)
            ):
                raise InputError(f"mask blur must be a radius ≥ 0 (got {self.mask_blur})")
            check_readable_image(self.mask, "mask")
            if self.mask_crop_padding is not None and not (isinstance(self.mask_crop_padding, int) and self.mask_crop_padding >= 0):
                raise InputError(f"mask crop padding must be a whole number of pixels ≥ 0 (got {self.mask_crop_padding!r})")
            check_mask_size(self.mask, self.init_image)

    def with_seed(self) -> "GenerationSettings":
        """A copy with a concrete seed (random when none was given)."""
        return self if self.seed is not None else replace(self, seed=random.randrange(2**32))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["controlnets"] = [asdict(c) for c in self.controlnets]
        if self.skip_layer_guidance is not None:
            d["skip_layer_guidance"]["layers"] = list(self.skip_layer_guidance.layers)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GenerationSettings":
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        slg = kwargs.get("skip_layer_guidance")
        if isinstance(slg, dict):  # absent fields take SkipLayerGuidance's defaults
            known = {f.name for f in fields(SkipLayerGuidance)}
            kwargs["skip_layer_guidance"] = SkipLayerGuidance(
                **{k: tuple(v) if k == "layers" else v for k, v in slg.items() if k in known}
            )
        if "controlnets" in kwargs:
            nets = kwargs["controlnets"]
            if not isinstance(nets, (list, tuple)):
                raise InputError(f"controlnets must be a list of ControlNet settings (got {nets!r:.60})")
            kwargs["controlnets"] = tuple(ControlNetSettings.from_dict(c) for c in nets)
        return cls(**kwargs)
