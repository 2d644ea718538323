"""What the user asks of ControlNets and inpainting: plain values, checked before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError

PREPROCESS = ("canny", "blur")


@dataclass(frozen=True)
class ControlNetSettings:
    """One ControlNet: where it is, what steers it, how strongly and when.

    path: a file, a folder or a Hugging Face repo id (`owner/name[/file.safetensors]`).
    image: the control image (an edge map, a depth map, …; for the inpainting ControlNet the
        image to inpaint, defaulting to the init image). preprocess: "canny" or "blur" turns a
        photo into that map first. control_type: overrides the type the checkpoint states.
    scale: multiplies the ControlNet's output; start / end: the fraction of the schedule in
        which it acts (diffusers' control_guidance_start/end). residual_rule: "stability" or
        "diffusers" overrides the rule recognised from the checkpoint (docs/control.md).
    """

    path: str
    image: Optional[str] = None
    control_type: Optional[str] = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: Optional[str] = None
    residual_rule: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Any) -> "ControlNetSettings":
        """From PNG metadata or JSON: a mapping with `path` and known fields only."""
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict) or not isinstance(d.get("path"), str):
            raise InputError(f"a ControlNet setting needs at least a path (got {d!r:.80})")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown ControlNet setting(s): {', '.join(sorted(map(str, unknown)))}")
        return cls(**d)

    def validate(self, *, init_image: Optional[str] = None) -> "ControlNetSettings":
        from .residuals import rule_named
        from .spec import check_control_type

        for name in ("path", "image", "control_type", "preprocess", "residual_rule"):
            v = getattr(self, name)
            if not (v is None and name != "path") and not isinstance(v, str):
                raise InputError(f"ControlNet {name} must be text (got {v!r:.60})")
        for name in ("scale", "start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"control {name} must be a finite number (got {v!r:.60})")
        if not (0.0 <= self.start < self.end <= 1.0):
            raise InputError(
                f"control start/end must satisfy 0 ≤ start < end ≤ 1 (got {self.start}, {self.end}); "
                "they are fractions of the schedule"
            )
        if self.preprocess is not None and self.preprocess not in PREPROCESS:
            raise InputError(f"unknown control preprocessor {self.preprocess!r}; choose one of: {', '.join(PREPROCESS)}")
        if self.control_type is not None:
            check_control_type(self.control_type)
        if self.residual_rule is not None:
            rule_named(self.residual_rule)
        image = self.image or init_image
        if image is None:
            raise InputError(f"ControlNet {self.path} needs a control image (--control-image)")
        check_readable_image(image, "control image")
        return self


def check_readable_image(path: str, what: str) -> None:
    """Exists and opens as an image (header only): a bad file fails before any model loads."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        from PIL import Image

        with Image.open(p) as img:
            img.verify()
    except Exception as e:
        raise InputError(f"cannot read {what} {path}: {e}") from e
