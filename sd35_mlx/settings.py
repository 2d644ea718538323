"""Generation settings: one dataclass shared by the Python API, the CLI and PNG metadata.

`validate()` checks everything that can be checked before any model is loaded.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .checks import MAX_SIDE, MAX_STEPS, finite_number, text, whole_number
from .components import T5_DEFAULT_LENGTH, T5_LENGTH_RANGE
from .control.settings import ControlNetSettings
from .errors import InputError
from .sampling.guidance import MAX_GUIDANCE_SCALE, SkipLayerGuidance
from .sampling.samplers import SAMPLERS as _SAMPLER_CLASSES
from .sampling.schedule import IMG2IMG_RULES

SAMPLERS = tuple(_SAMPLER_CLASSES)
DEFAULT_STRENGTH = 0.6  # img2img: how much of the schedule runs (1.0 ignores the init image)
MAX_SHIFT = 100.0  # published models use 1–3

# One skip-layer guidance type (its defaults and checks are defined there); the old name stays public.
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
    img2img_rule: str = "diffusers"  # img2img step truncation and SLG window: "diffusers" or "stability"
    # ControlNets and inpainting (docs/control.md)
    controlnets: Tuple[ControlNetSettings, ...] = ()
    mask: Optional[str] = None  # white = repaint; needs init_image
    mask_blur: float = 0.0
    mask_crop_padding: Optional[int] = None  # inpaint a crop around the mask (diffusers' padding_mask_crop)

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
            whole_number(name, v, -(2**63), None)  # the type; the range comes with the multiple
            if v % 16 or not 16 <= v <= MAX_SIDE:
                nearest = min(max(round(v / 16) * 16, 16), MAX_SIDE)
                raise InputError(f"{name} must be a multiple of 16 between 16 and {MAX_SIDE} (got {v}); try {nearest}")
        lo, hi = T5_LENGTH_RANGE
        whole_number("t5_length", self.t5_length, lo, hi)
        if self.cfg is not None:
            finite_number("cfg", self.cfg, 0.0, MAX_GUIDANCE_SCALE)
        if self.shift is not None:
            finite_number("shift", self.shift, 0.0, MAX_SHIFT, low_open=True)
        finite_number("strength", self.strength, 0.0, 1.0, low_open=True)
        if self.img2img_rule not in IMG2IMG_RULES:
            raise InputError(f"unknown img2img_rule {self.img2img_rule!r:.40}; choose one of: {', '.join(IMG2IMG_RULES)}")
        if self.init_image is not None:
            text("init_image", self.init_image, 4096)
            if not Path(self.init_image).is_file():
                raise InputError(f"init image not found: {self.init_image}")
        self._validate_control()
        if self.skip_layer_guidance is not None and not isinstance(self.skip_layer_guidance, SkipLayerGuidance):
            raise InputError(f"skip_layer_guidance must be a SkipLayerGuidance (got {self.skip_layer_guidance!r:.60})")
        if self.seed is not None:
            whole_number("seed", self.seed, 0, 2**63 - 1)
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
        """Settings from a dict such as `to_dict()` wrote (PNG metadata: untrusted). Unknown keys
        are ignored; every known one is checked like a flag (`InputError` names the field)."""
        if not isinstance(d, dict):
            raise InputError(f"settings must be a JSON object (got {type(d).__name__})")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        slg = kwargs.get("skip_layer_guidance")
        if slg is not None:
            kwargs["skip_layer_guidance"] = SkipLayerGuidance.from_dict(slg)
        for name in ("cfg", "shift", "strength"):  # a hand edit may write 4 for 4.0
            if isinstance(kwargs.get(name), int) and not isinstance(kwargs[name], bool):
                kwargs[name] = float(kwargs[name])
        if "controlnets" in kwargs:
            nets = kwargs["controlnets"]
            if not isinstance(nets, (list, tuple)):
                raise InputError(f"controlnets must be a list of ControlNet settings (got {nets!r:.60})")
            kwargs["controlnets"] = tuple(ControlNetSettings.from_dict(c) for c in nets)
        return cls(**kwargs).validate()
